"""lowmem plan (python -m lowmem.plan): where Grok-1's bytes live on one device, and the decode floor.

A memory plan for the streaming engine, computed from the same layout the
quantizer writes and the engine maps (``quant.packed.tensor_layout``), so its
byte counts are exact, not estimates:

- resident weights (attention, embeddings, norms, routers) by kind;
- the KV cache: keys and values in the activation dtype (fp32 or bf16), layers * length * kv_heads * key_size * 2 * itemsize
  bytes per sequence, at the engine's cache length (the context rounded up to
  whole prefill chunks);
- the expert cache: (device memory - resident - KV - headroom) // expert block
  bytes slots, at most every expert; or the slots of an explicit budget, as the
  engine's ``expert_cache_gb`` computes them;
- host pages: every expert block stays in the mapped files.

Decode time per token is modelled from the bytes that must cross the
host-to-device link: layers * distinct experts per layer * (1 - hit rate) *
block bytes / link bandwidth, plus (only when ``--device-gbps`` is given) a
compute term: the bytes one step reads from device memory (resident weights,
the touched experts, the KV cache) / device memory bandwidth, added without
overlap, so the result is a floor-side estimate, not a promise.

Sizes: "80GB" is 80 * 10^9 bytes, "80GiB" is 80 * 2^30; a bare number is GB,
except --expert-cache-gb where a bare number is GiB (2^30), as the engine's option.
A plan that does not fit says so and gives no speed figures.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax.numpy as jnp

from lowmem import cli
from lowmem.backends import GIB, HEADROOM_GIB
from lowmem.cli import CLIError
from lowmem.engine import DEFAULT_PRECISION, cache_length
from lowmem.model import cache_dtype
from quant.config import GrokConfig
from lowmem.quantize import group_size_type
from quant.packed import QuantSettings, expert_block_layout, file_sizes, tensor_layout
from quant.pipeline import DEFAULT_GROUP_SIZE, PER_CHANNEL, settings_group_size
from quant.spec import ATTENTION_ROLES

log = logging.getLogger(__name__)
PLOT_MEMORY_GB = tuple(range(8, 201, 4))   # --plot's x axis: device memory, GB


class PlanError(ValueError):
    """Bad planner input (an impossible setting)."""


def resident_kind(role: str) -> str:
    """The kind a resident tensor is reported under."""
    if role in ATTENTION_ROLES:
        return "attention"
    if role == "embed":
        return "embedding"
    return "router" if role == "router" else "norms"


def resident_bytes_by_kind(cfg: GrokConfig, settings: QuantSettings) -> dict[str, int]:
    """Exact bytes of every non-expert tensor (values and scales), by kind."""
    out = {"attention": 0, "embedding": 0, "norms": 0, "router": 0}
    for e in tensor_layout(cfg, settings):
        if e.expert is None:
            out[resident_kind(e.role)] += e.nbytes
    return out


def resident_params(cfg: GrokConfig, settings: QuantSettings) -> int:
    """Weights (not scales) held resident: int8/bf16/fp32 elements, two per packed int4 byte."""
    n = 0
    for e in tensor_layout(cfg, settings):
        if e.expert is None and e.part != "scales":
            count = e.nbytes // (2 if e.dtype == "bfloat16" else 4 if e.dtype == "float32" else 1)
            n += count * (2 if e.dtype == "uint8" else 1)
    return n


def kv_cache_bytes(cfg: GrokConfig, context: int, batch: int = 1,
                   precision: str = DEFAULT_PRECISION) -> int:
    """k and v (in the cache's storage dtype) for every layer at the engine's cache length
    (context in whole chunks)."""
    length = cache_length(context)
    itemsize = jnp.dtype(cache_dtype(precision)).itemsize
    return cfg.num_layers * length * cfg.num_kv_heads * cfg.key_size * 2 * itemsize * batch


def distinct_experts(cfg: GrokConfig, batch: int) -> float:
    """Expected distinct experts per layer for ``batch`` independently routed tokens.

    Exactly top_k for one token; for more, E * (1 - (1 - k/E)^B), the
    uniform-routing expectation (real routing is skewed, so fewer).
    """
    e, k = cfg.num_experts, cfg.num_selected_experts
    return float(k) if batch == 1 else e * (1.0 - (1.0 - k / e) ** batch)


@dataclass
class DecodeEstimate:
    hit_rate: float
    bytes_per_token: float     # expert bytes crossing the link per decode step
    transfer_s: float
    compute_s: float | None    # device-memory term, only with --device-gbps
    seconds_per_token: float
    tokens_per_s: float


@dataclass
class MemoryPlan:
    config: dict
    settings: dict
    device_memory: int
    headroom: int
    context: int
    batch: int
    resident: dict[str, int]
    resident_total: int
    resident_params: int
    kv_cache: int
    expert_block_nbytes: int
    experts_total: int
    expert_budget: int
    cache_slots: int
    min_slots: int
    device_used: int
    fits: bool
    host_expert_bytes: int
    host_file_bytes: int
    host_output_table: int
    host_memory: int | None
    host_fits: bool | None
    link_gbps: float
    device_gbps: float | None
    uniform_hit_rate: float
    precision: str = DEFAULT_PRECISION     # the KV cache's dtype follows it
    decode: list[DecodeEstimate] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def decode_estimate(cfg: GrokConfig, block: int, hit_rate: float, link_gbps: float,
                    batch: int = 1, device_read: int | None = None,
                    device_gbps: float | None = None) -> DecodeEstimate:
    """Seconds per decode step from link traffic (and device reads, if a bandwidth is given)."""
    if not 0.0 <= hit_rate <= 1.0:
        raise PlanError(f"hit rate must be in [0, 1], found {hit_rate}")
    if link_gbps <= 0:
        raise PlanError(f"link bandwidth must be > 0 GB/s, found {link_gbps}")
    moved = cfg.num_layers * distinct_experts(cfg, batch) * (1.0 - hit_rate) * block
    transfer = moved / (link_gbps * 1e9)
    compute = None
    if device_gbps:
        compute = device_read / (device_gbps * 1e9)
    total = transfer + (compute or 0.0)
    return DecodeEstimate(hit_rate, moved, transfer, compute, total,
                          batch / total if total > 0 else float("inf"))


def host_output_table_bytes(cfg: GrokConfig, settings: QuantSettings) -> int:
    """RAM the host backend adds at load for the int8 output table that
    ``--output-table auto`` builds for int4-expert models (int8 values and a bf16
    scale per vocabulary row; ``backends.output_table_choice``); 0 for int8 models."""
    return cfg.vocab_size * (cfg.emb_size + 2) if settings.bits == 4 else 0


def make_plan(cfg: GrokConfig, settings: QuantSettings, device_memory: int, *,
              context: int | None = None, batch: int = 1, headroom: int = int(HEADROOM_GIB * GIB),
              host_memory: int | None = None, link_gbps: float = 50.0,
              hit_rates: tuple[float, ...] = (0.0,), device_gbps: float | None = None,
              expert_cache_bytes: int | None = None,
              precision: str = DEFAULT_PRECISION) -> MemoryPlan:
    """The plan for one device. ``expert_cache_bytes`` replaces the derived budget
    (the engine's ``expert_cache_gb * 2**30``)."""
    context = context or cfg.sequence_len
    if context < 1 or batch < 1:
        raise PlanError(f"context and batch must be >= 1, found {context} and {batch}")
    entries = tensor_layout(cfg, settings)
    _, block = expert_block_layout(cfg, settings)
    resident = resident_bytes_by_kind(cfg, settings)
    res_total = sum(resident.values())
    kv = kv_cache_bytes(cfg, context, batch, precision)
    total = cfg.num_layers * cfg.num_experts
    budget = (device_memory - res_total - kv - headroom if expert_cache_bytes is None
              else expert_cache_bytes)
    slots = min(total, max(budget, 0) // block)
    min_slots = cfg.num_selected_experts
    sizes = file_sizes(entries)
    host_experts = sum(v for k, v in sizes.items() if k.endswith(".experts.bin"))
    read = res_total + kv + int(cfg.num_layers * distinct_experts(cfg, batch) * block)
    plan = MemoryPlan(
        config=json.loads(cfg.to_json()), settings=asdict(settings), device_memory=device_memory,
        headroom=headroom, context=context, batch=batch, resident=resident,
        resident_total=res_total, resident_params=resident_params(cfg, settings), kv_cache=kv, expert_block_nbytes=block, experts_total=total,
        expert_budget=budget, cache_slots=slots, min_slots=min_slots,
        device_used=res_total + kv + slots * block,
        fits=slots >= min_slots and res_total + kv + slots * block <= device_memory,
        host_expert_bytes=host_experts, host_file_bytes=sum(sizes.values()),
        host_output_table=host_output_table_bytes(cfg, settings), host_memory=host_memory,
        host_fits=None if host_memory is None else sum(sizes.values()) <= host_memory,
        link_gbps=link_gbps, device_gbps=device_gbps, uniform_hit_rate=slots / total,
        precision=precision)
    rates = sorted(set(hit_rates) | {0.0, round(plan.uniform_hit_rate, 4)})
    if plan.fits:     # no speed for a model that cannot run
        plan.decode = [decode_estimate(cfg, block, h, link_gbps, batch, read, device_gbps)
                       for h in rates]
    return plan


def _gb(n: float) -> str:
    return f"{n / 1e9:10.3f} GB"


def format_plan(plan: MemoryPlan) -> str:
    """A readable report of a plan."""
    s = plan.settings
    lines = [f"model: {plan.config['num_layers']} layers, {plan.experts_total} experts, "
             f"int{s['bits']} experts (group {s['group_size'] or 'per-channel'}), "
             f"{s['attention']} attention; context {plan.context}, batch {plan.batch}",
             f"device memory {_gb(plan.device_memory)}  (headroom {_gb(plan.headroom).strip()})",
             "resident weights (on the device):"]
    for kind, n in plan.resident.items():
        lines.append(f"  {kind:<22}{_gb(n)}  ({n:,} bytes)")
    lines += [f"  {'total':<22}{_gb(plan.resident_total)}  ({plan.resident_total:,} bytes; "
              f"{plan.resident_params / 1e9:.2f}B weights)",
              f"KV cache ({plan.precision} k+v)     {_gb(plan.kv_cache)}  ({plan.kv_cache:,} bytes)",
              f"expert block            {_gb(plan.expert_block_nbytes)}  "
              f"({plan.expert_block_nbytes:,} bytes)",
              f"expert cache            {plan.cache_slots} slots of {plan.experts_total} "
              f"({_gb(plan.cache_slots * plan.expert_block_nbytes).strip()}; budget "
              f"{_gb(plan.expert_budget).strip()})",
              f"device total            {_gb(plan.device_used)}",
              f"fits: {'yes' if plan.fits else 'NO'} (needs at least {plan.min_slots} slots)",
              f"host pages (experts)    {_gb(plan.host_expert_bytes)}; all files "
              f"{_gb(plan.host_file_bytes).strip()}"]
    if plan.host_output_table:
        lines.append(f"host backend only: + int8 output table in RAM "
                     f"{_gb(plan.host_output_table).strip()} (--output-table bf16 skips it)")
    if plan.host_memory is not None:
        lines.append(f"host memory {_gb(plan.host_memory).strip()}: files "
                     f"{'stay in the page cache' if plan.host_fits else 'do NOT fit: misses read disk'}")
    if not plan.fits:
        lines.append(f"does not fit: {_gb(plan.resident_total + plan.kv_cache).strip()} resident "
                     f"+ KV cache leave room for {plan.cache_slots} expert slots, at least "
                     f"{plan.min_slots} needed; no decode estimate (more device memory, "
                     f"a shorter --context, or --bits 4)")
        return "\n".join(lines)
    term = (f" + device reads at {plan.device_gbps:g} GB/s (no overlap)"
            if plan.device_gbps else " (transfer only; no compute term)")
    lines.append(f"decode at {plan.link_gbps:g} GB/s link{term}:")
    lines.append("  hit rate   GB/token    s/token   tokens/s")
    for d in plan.decode:
        mark = "  (slots/experts: uniform routing, --cache-policy layer)" if (
            abs(d.hit_rate - round(plan.uniform_hit_rate, 4)) < 1e-12) else ""
        lines.append(f"  {d.hit_rate:8.3f} {d.bytes_per_token / 1e9:10.3f} "
                     f"{d.seconds_per_token:10.3f} {d.tokens_per_s:10.3f}{mark}")
    return "\n".join(lines)


def build_parser(prog: str = "python -m lowmem.plan") -> cli.Parser:
    p = cli.Parser(prog=prog, description=__doc__)
    size = cli.size_type
    p.add_argument("--device-memory", type=size("--device-memory"), default="80GB",
                   metavar="SIZE", help="device memory, e.g. 80GB, 80GiB (default 80GB)")
    cli.add_model_argument(p, "none: --preset/--config and the quant options below")
    cli.add_config_arguments(p)
    p.add_argument("--bits", type=int, choices=(8, 4), default=4,
                   help="expert bits without --model (default 4)")
    p.add_argument("--group-size", type=group_size_type, default=None,
                   help=f"int4 scale group size in input rows without --model, or "
                        f"'{PER_CHANNEL}' (default: the quantizer's, {DEFAULT_GROUP_SIZE})")
    p.add_argument("--attention", choices=("int8", "bf16"), default="int8",
                   help="attention weights without --model (default int8)")
    p.add_argument("--context", type=cli.int_type(1), default=None, metavar="TOKENS",
                   help="KV cache length in tokens, 1 .. the model's sequence length "
                        "(default: the model's sequence length)")
    cli.add_precision_argument(p)
    p.add_argument("--batch", type=cli.int_type(1), default=1,
                   help="sequences decoded together, >= 1 (default 1)")
    p.add_argument("--headroom", type=_headroom_type, default=f"{HEADROOM_GIB:g}GiB",
                   metavar="SIZE|measured",
                   help=f"left free on the device for the steps' temporaries, or 'measured': "
                        f"compile every step at these shapes on this machine and take the "
                        f"largest temporary plus a margin, as the engine does on a GPU (about "
                        f"10 s) (default {HEADROOM_GIB:g}GiB)")
    p.add_argument("--expert-cache-gb", type=size("--expert-cache-gb", bare="gib"), default=None,
                   metavar="SIZE", help="explicit expert cache budget, as the engine's option; "
                                        "a bare number is GiB (default: what fits)")
    p.add_argument("--host-memory", type=size("--host-memory"), default=None, metavar="SIZE",
                   help="host memory, e.g. 128GB (default: not checked)")
    p.add_argument("--link-gbps", type=cli.float_type(0.0, lo_open=True), default=50.0,
                   help="host-to-device bandwidth in GB/s, > 0 (default 50)")
    p.add_argument("--device-gbps", type=cli.float_type(0.0, lo_open=True), default=None,
                   help="device memory bandwidth in GB/s, > 0, for a compute term "
                        "(default: none, transfer only)")
    p.add_argument("--hit-rate", type=cli.float_type(0.0, 1.0), action="append", default=None,
                   help="expert cache hit rate(s) in [0, 1] to estimate, repeatable "
                        "(default: 0 and the uniform-routing rate)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (default: text)")
    p.add_argument("--plot", type=cli.output_file, metavar="PNG", default=None,
                   help="also plot decode s/token vs device memory for int8 and int4 "
                        "(needs matplotlib; default: no plot)")
    cli.add_verbosity(p)
    return p


def _headroom_type(text: str):
    return "measured" if text == "measured" else cli.size_type("--headroom")(text)


_headroom_type.__name__ = "size"


def plan_from_args(args) -> MemoryPlan:
    """Check the arguments against the model, then plan (CLIError/PlanError on bad input)."""
    if args.model:
        from quant.packed import PackedModel
        model = PackedModel.open(args.model)
        cfg, settings = model.cfg, model.settings
    else:
        cfg = cli.load_config(args.preset, args.config)
        try:
            settings = QuantSettings(args.bits, settings_group_size(args.bits, args.group_size),
                                     args.attention, row_pad=0, tiles=True)  # quantize's default
        except ValueError as e:
            raise CLIError(str(e)) from None
    cli.check_context(args, cfg)
    headroom = args.headroom
    if headroom == "measured":
        from lowmem.step_memory import measured_headroom
        headroom = measured_headroom(cfg, settings, args.precision, args.context)
    try:    # settings the layout cannot take (a group size that does not divide a width)
        return make_plan(
            cfg, settings, args.device_memory, context=args.context, batch=args.batch,
            headroom=headroom, host_memory=args.host_memory, link_gbps=args.link_gbps,
            hit_rates=tuple(args.hit_rate or ()), device_gbps=args.device_gbps,
            expert_cache_bytes=args.expert_cache_gb, precision=args.precision)
    except ValueError as e:
        raise CLIError(str(e)) from None


def memory_sweep(plan: MemoryPlan, bits: int) -> list[float]:
    """Decode s/token at the uniform-routing hit rate for each PLOT_MEMORY_GB (nan: no fit)."""
    cfg = GrokConfig.from_dict(plan.config)
    settings = QuantSettings(bits, plan.settings["group_size"] if bits == 4 else None,
                             plan.settings["attention"], row_pad=plan.settings["row_pad"],
                             tiles=plan.settings.get("tiles", False))
    out = []
    for gb in PLOT_MEMORY_GB:
        p = make_plan(cfg, settings, gb * 10**9, context=plan.context, batch=plan.batch,
                      headroom=plan.headroom, link_gbps=plan.link_gbps,
                      device_gbps=plan.device_gbps)
        uniform = [d for d in p.decode if abs(d.hit_rate - round(p.uniform_hit_rate, 4)) < 1e-12]
        out.append(uniform[0].seconds_per_token if uniform else math.nan)
    return out


def save_plot(plan: MemoryPlan, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for bits in (8, 4):
        ax.plot(PLOT_MEMORY_GB, memory_sweep(plan, bits), "o-", ms=3, label=f"int{bits} experts")
    ax.axvline(plan.device_memory / 1e9, color="grey", ls=":", label="--device-memory")
    ax.set_xlabel("device memory (GB)")
    ax.set_ylabel("decode time (s/token, floor)")
    ax.set_title(f"{plan.config['num_layers']}-layer Grok-1 shape, context {plan.context}, "
                 f"{plan.link_gbps:g} GB/s link, uniform routing (missing: does not fit)",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".partial.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def run(args) -> int:
    if args.plot is not None:
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise CLIError("--plot needs matplotlib: pip install '.[plot]'")
    plan = plan_from_args(args)
    print(json.dumps(plan.as_dict(), indent=1) if args.json else format_plan(plan))
    if args.plot is not None:
        save_plot(plan, args.plot)
        cli.stage("plot written to %s", args.plot)
    return 0


def main(argv=None, prog: str = "python -m lowmem.plan") -> int:
    args = build_parser(prog).parse_args(argv)
    cli.setup_cli(args)
    return cli.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
