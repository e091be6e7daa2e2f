"""Time and error of the level-table int4 quantizer against uniform int4 g32.

On one release-like matrix (int8 values, bf16 scales per row block, from a
Gaussian or Student-t draw), in one process and side by side: the uniform
search ``quant.int4.quantize_int4(..., group_size=32)`` and
``quant.int4_levels.quantize_levels(..., group_size=32)``, each timed
--repeat times (least wall and CPU time kept, after one compiling call on a
small slice), with
their relative weight errors, the time ratio and the load average (the
timings mean little on a shared machine without it).

    python tools/bench_int4_levels.py                          # 6144 x 32768, Gaussian and t4
    python tools/bench_int4_levels.py --shape 32768x6144 --dist t4
"""
from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np

from quant.int4 import quantize_int4
from quant.int4_levels import quantize_levels
from quant.qweight import BF16


def release_like(k: int, n: int, dist: str, blocks: int, seed: int):
    """int8 (K, N) and bf16-valued float32 (blocks, N) scales, as the release stores."""
    rng = np.random.default_rng(seed)
    q8 = np.empty((k, n), np.int8)
    s8 = np.empty((blocks, n), np.float32)
    rb = k // blocks
    for b in range(blocks):                              # a block at a time: bounded memory
        w = (rng.standard_normal((rb, n), np.float32) if dist == "gauss"
             else rng.standard_t(int(dist[1:]), (rb, n)).astype(np.float32))   # (rb, N)
        s = (np.abs(w).max(0) / 127).astype(BF16).astype(np.float32)
        s8[b] = s
        q8[b * rb:(b + 1) * rb] = np.clip(np.rint(w / s), -128, 127)
    return q8, s8


def best_time(fn, repeat: int):
    """(least wall seconds, least CPU seconds of this process, the last result): on a
    shared machine the CPU time is the steadier of the two."""
    result, wall, cpu = None, float("inf"), float("inf")
    for _ in range(repeat):
        start, cpu0 = time.perf_counter(), time.process_time()
        result = fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - cpu0)
    return wall, cpu, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="6144x32768", help="KxN (default 6144x32768)")
    ap.add_argument("--dist", nargs="+", default=["gauss", "t4"],
                    help="gauss and/or tD (Student-t, D degrees of freedom)")
    ap.add_argument("--blocks", type=int, default=8, help="row blocks of int8 scales (8)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each (best kept)")
    args = ap.parse_args()
    try:
        k, n = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape: expected KxN, got {args.shape!r}")
    if k % (args.blocks * 32) or any(d != "gauss" and not d[1:].isdigit() for d in args.dist):
        ap.error("--shape K must be a multiple of 32 * --blocks; --dist: gauss or tD")
    for dist in args.dist:
        q8, s8 = release_like(k, n, dist, args.blocks, seed=0)
        quantize_int4(q8[:64, :512], s8[:1, :512], 32)                 # compile (cached)
        quantize_levels(q8[:64, :512], s8[:1, :512], 32)
        load0 = os.getloadavg()[0]
        t_u, c_u, r_u = best_time(lambda: quantize_int4(q8, s8, 32), args.repeat)
        t_l, c_l, r_l = best_time(lambda: quantize_levels(q8, s8, 32), args.repeat)
        print(f"{k}x{n} {dist}: uniform g32 {t_u:.2f} s ({c_u:.2f} s CPU, rel. error "
              f"{r_u.rel_error:.4f}) | levels g32 {t_l:.2f} s ({c_l:.2f} s CPU, rel. error "
              f"{r_l.rel_error:.4f}, {r_l.rel_error / r_u.rel_error:.3f}x) | ratio wall "
              f"{t_l / t_u:.2f}, CPU {c_l / c_u:.2f} | "
              f"{numba.get_num_threads()} threads, load average {load0:.2f} -> "
              f"{os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
