"""Expert streaming throughput: the engine's Stager + ExpertCache against a raw copy.

Expert blocks are fetched through an ``ExpertCache`` the way a decode step
does (acquire the step's two experts, prefetch the next step's two, wait,
release), over a cyclic order of more blocks than the cache holds, so every
fetch is a real transfer. Effective GB/s = bytes moved / wall time, next to a
plain copy of the same mapped bytes measured in the same run (interleaved,
one thread and two threads, as the cache's two fetch workers; ratios are
against the faster of the two).

The fetch paths are the engine's staging ring (``lowmem.staging.Stager``:
registered chunk buffers filled by 1, 2 or 4 worker threads while earlier
chunks transfer), with the registration the device takes by default and with
``pinned_host`` forced (and pageable forced on an accelerator). On a CPU the
"device" is host memory and a transfer that aliases a ring buffer is copied,
so its figures are two host copies; on an accelerator raw ``device_put`` from
pageable and from pinned host memory is printed as well.

    python tools/bench_streaming.py --model /tmp/lowmem-bench-decode/grok1-L2-int4
    python tools/bench_streaming.py            # the embedded demo model (small blocks)
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowmem.expert_cache import ExpertCache  # noqa: E402
from lowmem.staging import Stager  # noqa: E402
from lowmem.profiler import copy_bandwidth  # noqa: E402
from quant.packed import PackedModel  # noqa: E402

GB = 1e9


def block_keys(model: PackedModel, count: int) -> list[tuple[int, int]]:
    """``count`` distinct (layer, expert) keys, layer-major, cycling if there are fewer."""
    keys = [(l, e) for l in range(model.cfg.num_layers) for e in range(model.cfg.num_experts)]
    return [keys[i % len(keys)] for i in range(count)]


def stream_seconds(fetch, model: PackedModel, keys: list, capacity: int) -> tuple[float, int]:
    """Wall seconds and bytes moved fetching ``keys`` two per step with next-step prefetch."""
    cache = ExpertCache(fetch, model.expert_block_nbytes, capacity)   # list slots: transfers only
    steps = [keys[i:i + 2] for i in range(0, len(keys), 2)]
    start = time.perf_counter()
    try:
        for i, step in enumerate(steps):
            cache.acquire(step)
            if i + 1 < len(steps):
                cache.prefetch(steps[i + 1])
            for key in step:
                jax.block_until_ready(cache.block(key))
            cache.release(step)
        seconds = time.perf_counter() - start
    finally:
        cache.close()
    return seconds, cache.stats.bytes_moved


def raw_copy_seconds(model: PackedModel, keys: list, threads: int) -> float:
    """np.copyto of the same mapped blocks into reused page-aligned buffers."""
    nbytes = model.expert_block_nbytes
    bufs = [np.empty(nbytes, np.uint8) for _ in range(threads)]
    for b in bufs:
        b.fill(0)                                                        # touch the pages
    groups = [keys[i::threads] for i in range(threads)]

    def run(i):
        for key in groups[i]:
            np.copyto(bufs[i], model.expert(*key).raw)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))
    return time.perf_counter() - start


def variants(model: PackedModel, device, on_cpu: bool, chunk_bytes: int) -> dict:
    """Name -> fetch function for each staging setting measured on this platform."""
    out = {}
    for workers in (1, 2, 4):
        out[f"ring, {workers} worker(s), default"] = Stager(model, device, workers, chunk_bytes)
    out["ring, 4 workers, pinned"] = Stager(model, device, 4, chunk_bytes, registration="pinned")
    if not on_cpu:
        out["ring, 4 workers, pageable"] = Stager(model, device, 4, chunk_bytes,
                                                  registration="pageable")
    return out


def prefault(model: PackedModel, keys: list) -> None:
    """Read each block once so the runs measure memory, not the disk or page faults."""
    for key in dict.fromkeys(keys):
        int(np.asarray(model.expert(*key).raw[::4096]).sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="packed model dir (default: the embedded demo model)")
    ap.add_argument("--blocks", type=int, default=16, help="blocks fetched per run (default 16)")
    ap.add_argument("--capacity", type=int, default=4, help="cache slots (default 4)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    ap.add_argument("--workdir", default=".lowmem", help="where the demo model is kept")
    ap.add_argument("--chunk-mb", type=float, default=32.0,
                    help="staging chunk in MiB (default 32)")
    args = ap.parse_args(argv)
    if args.capacity < 4 or args.blocks < 2 or args.repeats < 1 or not args.chunk_mb > 0:
        print("error: need --capacity >= 4 (2 pinned + 2 prefetched), --blocks >= 2, "
              "--repeats >= 1, --chunk-mb > 0", file=sys.stderr)
        return 2
    if args.model is None:
        from lowmem.demo import ensure_demo_model
        args.model = ensure_demo_model(args.workdir)
    model, device = PackedModel.open(args.model), jax.devices()[0]
    on_cpu = device.platform == "cpu"
    keys = block_keys(model, args.blocks)
    distinct = len(set(keys))
    if distinct <= args.capacity:
        print(f"error: {args.model}: {distinct} distinct experts fit the {args.capacity}-slot "
              f"cache; nothing would be transferred (lower --capacity)", file=sys.stderr)
        return 2
    prefault(model, keys)
    fetchers = variants(model, device, on_cpu, int(args.chunk_mb * (1 << 20)))
    times: dict[str, list[float]] = {name: [] for name in fetchers}
    times.update({"raw copy, 1 thread": [], "raw copy, 2 threads": []})
    moved = {}
    for _ in range(args.repeats):
        times["raw copy, 1 thread"].append(raw_copy_seconds(model, keys, 1))
        times["raw copy, 2 threads"].append(raw_copy_seconds(model, keys, 2))
        for name, fetch in fetchers.items():
            seconds, moved[name] = stream_seconds(fetch, model, keys, args.capacity)
            times[name].append(seconds)
    nbytes = len(keys) * model.expert_block_nbytes
    ref = nbytes / min(times["raw copy, 1 thread"] + times["raw copy, 2 threads"]) / GB
    copy = copy_bandwidth(device)
    print(f"model {args.model}: block {model.expert_block_nbytes / 1e6:.1f} MB, {len(keys)} "
          f"blocks per run ({nbytes / GB:.2f} GB), cache {args.capacity} slots, device "
          f"{device.platform}; best of {args.repeats}")
    print(f"{'path':<34}{'GB/s':>8}{'vs best raw':>13}{'moved GB':>10}")
    for name, ts in times.items():
        gbps = nbytes / min(ts) / GB
        print(f"{name:<34}{gbps:8.2f}{gbps / ref:12.0%}{moved.get(name, nbytes) / GB:10.2f}")
    extra = f", pinned {copy['pinned_gbps']:.2f} GB/s" if "pinned_gbps" in copy else ""
    print(f"plain {copy['kind']} of {copy['bytes'] >> 20} MiB: {copy['gbps']:.2f} GB/s{extra}")
    for fetch in fetchers.values():
        fetch.close()
    if on_cpu:
        print("note: on a CPU the ring's transfer aliases its buffer, so each chunk is copied "
              "twice (file -> ring buffer -> a new 'device' buffer); an accelerator's is one "
              "host copy and one DMA")
    return 0


if __name__ == "__main__":
    sys.exit(main())
