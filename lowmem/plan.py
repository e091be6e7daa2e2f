"""``python -m lowmem.plan``: where Grok-1's bytes live on one device, and the decode floor.

A memory plan for the streaming engine, computed from the same layout the
quantizer writes and the engine maps (``quant.packed.tensor_layout``), so its
byte counts are exact, not estimates:

- resident weights (attention, embeddings, norms, routers) by kind;
- the KV cache: bf16 keys and values, layers * length * kv_heads * key_size * 2 * 2
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

Sizes: "80GB" is 80 * 10^9 bytes, "80GiB" is 80 * 2^30; a bare number is GB.
The engine's ``--expert-cache-gb`` is in GiB (2^30).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import asdict, dataclass, field

from lowmem.backends import GIB
from lowmem.engine import HEADROOM_GIB, cache_length
from quant.config import GrokConfig, preset
from quant.packed import QuantSettings, expert_block_layout, file_sizes, tensor_layout
from quant.spec import ATTENTION_ROLES

log = logging.getLogger(__name__)
_UNITS = {"": 10**9, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


class PlanError(ValueError):
    """Bad planner input (an unparseable size, an impossible setting)."""


def parse_size(text: str, what: str = "size") -> int:
    """'80GB' -> 80e9 bytes, '80GiB' -> 80 * 2^30, '80' -> 80e9 (GB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise PlanError(f"{what}: expected a size like 80GB, 80GiB or 512MB, found {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


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


def kv_cache_bytes(cfg: GrokConfig, context: int, batch: int = 1) -> int:
    """bf16 k and v for every layer at the engine's cache length (context in whole chunks)."""
    length = cache_length(context)
    return cfg.num_layers * length * cfg.num_kv_heads * cfg.key_size * 2 * 2 * batch


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
    host_memory: int | None
    host_fits: bool | None
    link_gbps: float
    device_gbps: float | None
    uniform_hit_rate: float
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


def make_plan(cfg: GrokConfig, settings: QuantSettings, device_memory: int, *,
              context: int | None = None, batch: int = 1, headroom: int = int(HEADROOM_GIB * GIB),
              host_memory: int | None = None, link_gbps: float = 50.0,
              hit_rates: tuple[float, ...] = (0.0,), device_gbps: float | None = None,
              expert_cache_bytes: int | None = None) -> MemoryPlan:
    """The plan for one device. ``expert_cache_bytes`` replaces the derived budget
    (the engine's ``expert_cache_gb * 2**30``)."""
    context = context or cfg.sequence_len
    if context < 1 or batch < 1:
        raise PlanError(f"context and batch must be >= 1, found {context} and {batch}")
    entries = tensor_layout(cfg, settings)
    _, block = expert_block_layout(cfg, settings)
    resident = resident_bytes_by_kind(cfg, settings)
    res_total = sum(resident.values())
    kv = kv_cache_bytes(cfg, context, batch)
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
        host_memory=host_memory,
        host_fits=None if host_memory is None else sum(sizes.values()) <= host_memory,
        link_gbps=link_gbps, device_gbps=device_gbps, uniform_hit_rate=slots / total)
    rates = sorted(set(hit_rates) | {0.0, round(plan.uniform_hit_rate, 4)})
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
              f"KV cache (bf16 k+v)     {_gb(plan.kv_cache)}  ({plan.kv_cache:,} bytes)",
              f"expert block            {_gb(plan.expert_block_nbytes)}  "
              f"({plan.expert_block_nbytes:,} bytes)",
              f"expert cache            {plan.cache_slots} slots of {plan.experts_total} "
              f"({_gb(plan.cache_slots * plan.expert_block_nbytes).strip()}; budget "
              f"{_gb(plan.expert_budget).strip()})",
              f"device total            {_gb(plan.device_used)}",
              f"fits: {'yes' if plan.fits else 'NO'} (needs at least {plan.min_slots} slots)",
              f"host pages (experts)    {_gb(plan.host_expert_bytes)}; all files "
              f"{_gb(plan.host_file_bytes).strip()}"]
    if plan.host_memory is not None:
        lines.append(f"host memory {_gb(plan.host_memory).strip()}: files "
                     f"{'stay in the page cache' if plan.host_fits else 'do NOT fit: misses read disk'}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lowmem.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device-memory", default="80GB", help="device memory (default 80GB)")
    p.add_argument("--model", help="packed model directory (its config and quant settings)")
    p.add_argument("--preset", default="grok-1", help="config preset without --model "
                   "(default grok-1)")
    p.add_argument("--bits", default="4", help="expert bits, 8 or 4 (default 4)")
    p.add_argument("--group-size", default=None, help="int4 group size (default per channel)")
    p.add_argument("--attention", default="int8", help="int8 or bf16 (default int8)")
    p.add_argument("--context", default=None, help="KV cache tokens (default: the model's)")
    p.add_argument("--batch", default="1", help="sequences decoded together (default 1)")
    p.add_argument("--headroom", default=f"{HEADROOM_GIB:g}GiB",
                   help=f"left free on the device (default {HEADROOM_GIB:g}GiB, the engine's "
                        f"headroom_gb)")
    p.add_argument("--expert-cache-gb", default=None,
                   help="explicit expert cache budget in GiB, as the engine's option")
    p.add_argument("--host-memory", default=None, help="host memory, e.g. 128GB")
    p.add_argument("--link-gbps", default="50", help="host-to-device GB/s (default 50)")
    p.add_argument("--device-gbps", default=None, help="device memory GB/s for a compute term")
    p.add_argument("--hit-rate", action="append", default=None,
                   help="expert cache hit rate(s) to estimate (repeatable; 0 always shown)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _number(text, what: str, kind=float):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise PlanError(f"{what}: expected a {'whole ' if kind is int else ''}number, "
                        f"found {text!r}") from None


def plan_from_args(args) -> MemoryPlan:
    """Parse and check every argument, then plan (PlanError/ValueError on bad input)."""
    if args.model:
        from quant.packed import PackedModel
        model = PackedModel.open(args.model)
        cfg, settings = model.cfg, model.settings
    else:
        cfg = preset(args.preset)
        group = None if args.group_size is None else _number(args.group_size, "--group-size", int)
        settings = QuantSettings(_number(args.bits, "--bits", int), group, args.attention)
    budget = None
    if args.expert_cache_gb is not None:
        budget = int(_number(args.expert_cache_gb, "--expert-cache-gb") * GIB)
    return make_plan(
        cfg, settings, parse_size(args.device_memory, "--device-memory"),
        context=None if args.context is None else _number(args.context, "--context", int),
        batch=_number(args.batch, "--batch", int), headroom=parse_size(args.headroom, "--headroom"),
        host_memory=None if args.host_memory is None else parse_size(args.host_memory,
                                                                     "--host-memory"),
        link_gbps=_number(args.link_gbps, "--link-gbps"),
        hit_rates=tuple(_number(h, "--hit-rate") for h in args.hit_rate or ()),
        device_gbps=None if args.device_gbps is None else _number(args.device_gbps,
                                                                  "--device-gbps"),
        expert_cache_bytes=budget)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_from_args(args)
    except (PlanError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_dict(), indent=1) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
