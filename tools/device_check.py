"""One-shot check of the accelerator path: link, staging, expert compute, decode, memory.

Run it first whenever a GPU machine is lent (the project installed, nothing
else needed): it writes a Grok-1-width synthetic checkpoint of ``--layers``
layers (2 by default: about 25 GB of disk for the checkpoint and both models),
packs it at int8 and int4, and prints one table:

- raw host -> device copy GB/s, pageable and pinned (``device_put``);
- the engine's staging GB/s: its ring of registered chunk buffers (dma_map,
  pinned or pageable, whichever the device takes) moving expert blocks, for
  several worker counts, as a share of the raw pinned copy, each staged block
  checked against the file's bytes;
- device ms per expert (one jitted call for the k routed experts, T=1) next
  to its floor: the block's bytes at the device's measured copy bandwidth;
- decode tok/s with zero hits (the minimum cache, no prefetch) and with every
  expert resident; host syncs and engine dispatches per decode token (the
  dispatches checked against the XLA executions JAX's profiler sees); peak
  device memory;
- the extrapolation to 64 layers on 80 GB and 141 GB devices (``lowmem.plan``
  with the measured link and device bandwidths, uniform-routing hit rate).

``--dry-run`` runs the same code on the CPU with the tiny preset in seconds,
and marks the rows that only mean something on an accelerator.

    python tools/device_check.py --out device_check.json
    python tools/device_check.py --dry-run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GIB = 1 << 30


def build_model(preset_name: str, layers: int, bits: int, workdir: Path) -> Path:
    """A packed synthetic model (reused when present)."""
    from quant.config import preset
    from quant.packed import MANIFEST, QuantSettings
    from quant.pipeline import quantize_checkpoint
    from quant.synthetic import write_checkpoint
    cfg = preset(preset_name, num_layers=layers)
    out = workdir / f"{preset_name}-L{layers}-int{bits}-tl"
    if (out / MANIFEST).is_file():
        return out
    ckpt = workdir / f"ckpt-{preset_name}-L{layers}"
    if not (ckpt / "done").is_file():
        print(f"writing a synthetic {preset_name} checkpoint ({layers} layers) ...", flush=True)
        write_checkpoint(preset(preset_name), ckpt, seed=0, num_layers=layers)
        (ckpt / "done").write_text("")
    print(f"quantizing to int{bits} ...", flush=True)
    settings = QuantSettings(bits, row_pad=0, tiles=True)     # the quantizer's default layout
    quantize_checkpoint(ckpt, out, cfg, settings, resume=True)
    return out


def device_copy_gbps(device, nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth: a copy reads and writes ``nbytes``."""
    x = jax.device_put(jnp.ones(nbytes // 4, jnp.float32), device)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    best = min(_timed(lambda: copy(x).block_until_ready()) for _ in range(5))
    return 2 * nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def staging_rows(model, device, workers_list, chunk_mb: float, blocks: int = 8) -> list[dict]:
    """The engine's staging ring moving ``blocks`` expert blocks, two at a time (the
    cache's two fetch threads), for each worker count; each staged block is checked
    against the file's bytes (the pinned path writes through a host view)."""
    from concurrent.futures import ThreadPoolExecutor
    from lowmem.staging import Stager
    cfg = model.cfg
    keys = [(i // cfg.num_experts % cfg.num_layers, i % cfg.num_experts) for i in range(blocks)]
    rows = []
    for workers in workers_list:
        stager = Stager(model, device, workers, int(chunk_mb * (1 << 20)))
        try:
            with ThreadPoolExecutor(2) as pool:
                jax.block_until_ready(list(pool.map(stager, keys[:2])))          # warm
                start = time.perf_counter()
                out = list(pool.map(stager, keys))
                jax.block_until_ready(out)
                seconds = time.perf_counter() - start
            exact = all(_staged_bytes_equal(model, key, chunks) for key, chunks in
                        zip(keys[:2], out[:2]))
            rows.append({"workers": workers, "registration": stager.registration,
                         "chunk_mb": stager.chunk / 1e6, "chunks": stager.chunks,
                         "gbps": blocks * model.expert_block_nbytes / seconds / 1e9,
                         "bytes_exact": exact})
        finally:
            stager.close()
    return rows


def _staged_bytes_equal(model, key, chunks) -> bool:
    got = np.concatenate([np.asarray(c) for c in chunks])[:model.expert_block_nbytes]
    return bool(np.array_equal(got, np.asarray(model.expert(*key).raw)))


def expert_call_ms(engine) -> float:
    """Device time of one jitted call for the k routed experts of one token."""
    from lowmem import moe
    cache, cfg = engine.experts.cache, engine.cfg
    k = cfg.num_selected_experts
    keys = [(0, e) for e in range(k)]
    cache.acquire(keys)
    slot_ids = np.array([cache.get(key) for key in keys], np.int32)
    cache.release(keys)
    x = jnp.ones((1, cfg.emb_size), jnp.bfloat16)
    gates = jnp.full((1, k), 0.5, jnp.float32)
    experts = jnp.arange(k, dtype=jnp.int32)[None]
    parts = tuple(engine.model.expert_parts)

    def call():
        acc = jnp.zeros((1, cfg.emb_size), jnp.float32)
        moe._experts_accumulate(parts, acc, cache.slots.array, slot_ids,
                                np.arange(k, dtype=np.int32), x, gates, experts).block_until_ready()
    call()
    return min(_timed(call) for _ in range(5)) * 1e3


def decode_rate(engine, tokens: int) -> tuple[float, float, float]:
    """(decode tok/s, host syncs and engine dispatches per decode token) for greedy
    decoding after a short prompt."""
    from lowmem.decoding import GenerationRequest, generate_tokens
    from lowmem.sampling import SamplingParams
    req = GenerationRequest(tokens, SamplingParams(temperature=0.0), stop_at_eos=False)
    prompt = [5, 17, 99, 3]
    list(generate_tokens(engine, prompt, GenerationRequest(2, req.sampling, stop_at_eos=False)))
    stamps, syncs = [], engine.host_syncs
    dispatches = []
    for _ in generate_tokens(engine, prompt, req):
        stamps.append(time.perf_counter())
        dispatches.append(engine.dispatches)
    steps = len(stamps) - 1
    per_token = (engine.host_syncs - syncs - (engine.cfg.num_layers + 1)) / steps
    return (steps / (stamps[-1] - stamps[0]), per_token,
            (dispatches[-1] - dispatches[0]) / steps)


def xla_executions_per_token(engine) -> int | None:
    """XLA executions of one decode step seen by JAX's profiler (every expert resident)."""
    from lowmem.profiler import xla_executions
    engine.reset()
    engine.feed([5, 17, 99, 3])
    before = engine.slot_writes
    try:                          # a GPU profiler needs CUPTI: a failure costs this row only
        seen = xla_executions(lambda: jax.block_until_ready(engine.feed([7])))
    except Exception as e:        # noqa: BLE001 (reported, the other rows stand)
        print(f"note: profiler unavailable ({type(e).__name__}: {e})", file=sys.stderr)
        return None
    return None if seen is None else seen - (engine.slot_writes - before)


def extrapolate(bits: int, link_gbps: float, device_gbps: float | None) -> list[dict]:
    """Grok-1 (64 layers) on 80 GB and 141 GB devices with the measured bandwidths."""
    from lowmem.plan import make_plan
    from quant.config import preset
    from quant.packed import QuantSettings
    rows = []
    for memory in (80e9, 141e9):
        plan = make_plan(preset("grok-1"), QuantSettings(bits), int(memory),
                         link_gbps=link_gbps, device_gbps=device_gbps, context=8192)
        uniform = next(d for d in plan.decode if abs(d.hit_rate - round(plan.uniform_hit_rate,
                                                                         4)) < 1e-12)
        rows.append({"device_gb": memory / 1e9, "bits": bits, "fits": plan.fits,
                     "slots": plan.cache_slots, "hit_rate": uniform.hit_rate,
                     "tokens_per_s": uniform.tokens_per_s if plan.fits else None})
    return rows


def check_bits(args, bits: int, device, copy: dict, hbm_gbps: float | None) -> dict:
    from lowmem.engine import Engine, EngineOptions
    from quant.packed import PackedModel
    model = PackedModel.open(build_model(args.preset, args.layers, bits, Path(args.workdir)))
    block = model.expert_block_nbytes
    cfg = model.cfg
    k = cfg.num_selected_experts
    row = {"bits": bits, "block_mb": block / 1e6,
           "staging": staging_rows(model, device, args.staging_workers, args.staging_chunk_mb)}
    best = max(row["staging"], key=lambda r: r["gbps"])
    row["staging_gbps"], row["staging_workers"] = best["gbps"], best["workers"]
    opts = dict(backend="device", context=256, staging_workers=best["workers"],
                staging_chunk_mb=args.staging_chunk_mb)
    cold = Engine(model, EngineOptions(prefetch=False, expert_cache_gb=(k + 0.5) * block / GIB,
                                       **opts), device)
    (row["decode_zero_hits_tok_s"], row["syncs_per_token"],
     row["dispatches_per_token"]) = decode_rate(cold, args.tokens)
    cold.close()
    total = cfg.num_layers * cfg.num_experts
    warm = Engine(model, EngineOptions(expert_cache_gb=(total + 0.5) * block / GIB, **opts),
                  device)
    row["expert_call_ms"] = expert_call_ms(warm)
    row["expert_floor_ms"] = k * block / (hbm_gbps * 1e9) * 1e3 if hbm_gbps else None
    decode_rate(warm, 2)                                  # fill the cache with every expert
    row["decode_resident_tok_s"], _, _ = decode_rate(warm, args.tokens)
    row["xla_executions_per_token"] = xla_executions_per_token(warm)
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    row["peak_device_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9 if stats else None
    warm.close()
    link = copy.get("pinned_gbps") or copy["gbps"]
    row["staging_vs_raw"] = row["staging_gbps"] / link
    row["extrapolation"] = extrapolate(bits, min(link, row["staging_gbps"]), hbm_gbps)
    return row


def format_rows(report: dict) -> str:
    c, dry = report["copy"], report["dry_run"]
    note = "  (CPU dry run: host memory, not a link)" if dry else ""
    lines = [f"device: {report['device']}",
             f"raw host->device: pageable {c['gbps']:.2f} GB/s, pinned "
             f"{c.get('pinned_gbps', float('nan')):.2f} GB/s{note}",
             "device copy bandwidth: "
             + (f"{report['hbm_gbps']:.0f} GB/s" if report["hbm_gbps"] else "n/a (dry run)"),
             f"{'bits':>4} {'block MB':>9} {'staging GB/s':>13} {'expert ms':>10} {'floor ms':>9} "
             f"{'tok/s 0 hits':>13} {'tok/s resident':>15} {'syncs/tok':>10} {'peak GB':>8}"]
    for r in report["rows"]:
        fl = f"{r['expert_floor_ms']:.2f}" if r["expert_floor_ms"] else "-"
        pk = f"{r['peak_device_gb']:.1f}" if r["peak_device_gb"] is not None else "-"
        lines.append(f"{r['bits']:>4} {r['block_mb']:>9.1f} {r['staging_gbps']:>13.2f} "
                     f"{r['expert_call_ms']:>10.2f} {fl:>9} {r['decode_zero_hits_tok_s']:>13.2f} "
                     f"{r['decode_resident_tok_s']:>15.2f} {r['syncs_per_token']:>10.1f} {pk:>8}")
    link = "pinned" if "pinned_gbps" in c else "pageable"
    lines.append(f"staging ring (engine effective vs raw {link} host->device, 2 blocks in "
                 f"flight; bytes checked against the file):")
    for r in report["rows"]:
        for s in r["staging"]:
            lines.append(f"  int{r['bits']}: {s['workers']} workers, {s['chunks']} x "
                         f"{s['chunk_mb']:.1f} MB {s['registration']} chunks: {s['gbps']:.2f} "
                         f"GB/s = {100 * s['gbps'] / (c.get('pinned_gbps') or c['gbps']):.0f}% "
                         f"of raw; bytes {'exact' if s['bytes_exact'] else 'WRONG'}")
        xla = r["xla_executions_per_token"]
        lines.append(f"  int{r['bits']}: engine dispatches per decode token "
                     f"{r['dispatches_per_token']:.1f} (XLA executions seen by the profiler: "
                     f"{'n/a' if xla is None else xla})")
    lines.append("64-layer Grok-1 extrapolation (uniform-routing hit rate, measured bandwidths):")
    for r in report["rows"]:
        for e in r["extrapolation"]:
            speed = f"{e['tokens_per_s']:.2f} tok/s" if e["fits"] else "does not fit"
            lines.append(f"  int{e['bits']} on {e['device_gb']:.0f} GB: {e['slots']} slots, "
                         f"hit rate {e['hit_rate']:.3f}, {speed}")
    if dry:
        lines.append("dry run on the CPU: link, floor and peak-memory rows mean nothing here; "
                     "run without --dry-run on a GPU machine")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="layers of the synthetic model (default 2)")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=(4, 8))
    p.add_argument("--tokens", type=int, default=16, help="decode tokens per rate (default 16)")
    p.add_argument("--workdir", default="/tmp/lowmem-device-check",
                   help="where the synthetic checkpoint and models go (default /tmp/...)")
    p.add_argument("--staging-workers", type=int, nargs="+", default=[2, 4, 8],
                   help="staging worker counts to measure; the fastest runs the decode rows "
                        "(default 2 4 8)")
    p.add_argument("--staging-chunk-mb", type=float, default=32.0,
                   help="staging chunk in MiB (default 32)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny preset: checks that the command runs, measures nothing real")
    p.add_argument("--out", help="also write the report as JSON here")
    args = p.parse_args(argv)
    args.preset = "tiny" if args.dry_run else "grok-1"
    if min(args.staging_workers) < 1 or not args.staging_chunk_mb > 0:
        print(f"error: --staging-workers: expected counts >= 1 and --staging-chunk-mb > 0, "
              f"found {args.staging_workers} and {args.staging_chunk_mb}", file=sys.stderr)
        return 2
    from lowmem.profiler import copy_bandwidth
    device = jax.devices()[0]
    if device.platform == "cpu" and not args.dry_run:
        print("error: no accelerator found (jax.devices() is CPU); use --dry-run",
              file=sys.stderr)
        return 2
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    copy = copy_bandwidth(device, nbytes=16 << 20 if args.dry_run else 256 << 20)
    hbm = None if args.dry_run else device_copy_gbps(device)
    report = {"device": str(device), "dry_run": args.dry_run, "copy": copy, "hbm_gbps": hbm,
              "rows": [check_bits(args, b, device, copy, hbm) for b in args.bits]}
    print(format_rows(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
