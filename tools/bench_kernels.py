"""Benchmark lowmem.cpu_kernels at Grok-1 sizes against a memory-bandwidth floor.

Every case is timed side by side with the fastest plain read of the same
bytes with the same threads (``membw.read_seconds``: numba's parallel sum,
numpy's one-thread sum, numpy's sums of contiguous parts on the threads),
interleaved repeat by repeat so a
noisy neighbour slows both alike. Reported: medians in ms, effective GB/s of
weight bytes, and the ratio to the floor (1.00 = at memory bandwidth).

    python tools/bench_kernels.py                 # everything, T = 1 and 8
    python tools/bench_kernels.py --cases int8-gate logits --tokens 1
    python tools/bench_kernels.py --cases int4-gate int4-down ffn-int4 --tokens 1 2 8
    python tools/bench_kernels.py --cases int8-gate int8-down ffn-int8 --tokens 1 2 4 8 --repeats 5
    python tools/bench_kernels.py --mmap /tmp/bench   # weights as np.memmap files
    python tools/bench_kernels.py --cases int4-gate int8-gate --tokens 1 2 4 8 --threads 1 --act-int8
    python tools/bench_kernels.py --cases logits logits-int8 --tokens 1 2 4 8 16 --repeats 5
    python tools/bench_kernels.py --cases int4g32-gate int4lv32-gate int4g32-down int4lv32-down
    python tools/bench_kernels.py --cases int8-gate --tokens 1 3 6 11 --layout rows   # format 4
    python tools/bench_kernels.py --cases int8-gate --layout rows --row-pad 0       # format 3

Quantized weights are stored as ``lowmem quantize`` writes them: in tiles
(format 5, ``--layout tiles``, the default), or in rows (``--layout rows``,
padded by ``--row-pad`` bytes).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import ml_dtypes
import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from membw import parallel_sum, read_seconds, words  # noqa: E402
from lowmem import cpu_kernels as kernels  # noqa: E402
from lowmem import logits_kernels  # noqa: E402
from quant.int4_levels import STUDENT_T_LEVELS  # noqa: E402
from quant.packed import ROW_PAD  # noqa: E402
from quant.qweight import QWeight, tile_values  # noqa: E402

D, F, V = 6144, 32768, 131072


def _store(arr: np.ndarray, mmap_dir: Path | None, name: str) -> np.ndarray:
    """The array itself, or a read-only np.memmap of it written under mmap_dir."""
    if mmap_dir is None:
        return arr
    path = mmap_dir / f"{name}.bin"
    arr.reshape(-1).view(np.uint8).tofile(path)
    return np.memmap(path, dtype=arr.dtype, mode="r", shape=arr.shape)


def _qweight(rng, k, n, bits, group, mmap_dir, name, levels=None, row_pad=0,
             tiled=False) -> QWeight:
    """Random int8 or packed-int4 weight with bf16 scales (values do not matter
    for speed); levels: an int4 level table (QWeight.levels) or None; row_pad:
    stored bytes after each row of values, as a packed model's experts have;
    tiled: the values in tiles instead (QWeight.tiled, format 5)."""
    raw = rng.integers(0, 256, (k // 2 if bits == 4 else k, n + row_pad), dtype=np.uint8)
    values = raw if bits == 4 else raw.view(np.int8)
    if tiled:
        values = tile_values(values, bits)
    scales = (rng.random((k // group, n), dtype=np.float32) * 1e-3).astype(ml_dtypes.bfloat16)
    return QWeight(_store(values, mmap_dir, name), _store(scales, mmap_dir, name + "_s"), bits,
                   group, levels, tiled)


def _bf16_table(rng, rows, cols, mmap_dir, name) -> np.ndarray:
    """Random bf16 values in +-[1, 2) (cheap to make at 1.6 GB)."""
    bits = rng.integers(0, 1 << 16, (rows, cols), dtype=np.uint16)
    bits = (bits & 0x807F) | 0x3F80
    return _store(bits.view(ml_dtypes.bfloat16), mmap_dir, name)


def _int8_table(rng, rows, cols, mmap_dir, name) -> logits_kernels.Int8Table:
    """Random int8 output table (V, D) with one bf16 scale per row, grouped where the
    shape allows, as the engine builds it (logits_kernels.quantize_table)."""
    values = rng.integers(-127, 128, (rows, cols), dtype=np.int8)
    scales = (rng.random(rows, dtype=np.float32) * 1e-2).astype(ml_dtypes.bfloat16)
    grouped = logits_kernels.groupable(rows, cols)
    if grouped:
        values = logits_kernels.group_rows(values)
    return logits_kernels.Int8Table(_store(values, mmap_dir, name),
                                    _store(scales, mmap_dir, name + "_s"), grouped)


def _buffers(*weights):
    """Every byte buffer a kernel reads (values and scales), as uint64 words."""
    out = []
    for w in weights:
        quantized = isinstance(w, (QWeight, logits_kernels.Int8Table))
        out += [words(w.values), words(w.scales)] if quantized else [words(w)]
    return out


# name -> (kernel, input width, weights as (rows, cols, bits, group[, int4 levels]) or "bf16")
CASES = {
    "int8-gate": ("matmul", D, [(D, F, 8, D)]),          # per-channel scales, as released
    "int8-down": ("matmul", F, [(F, D, 8, F // 8)]),     # the release's 8 row blocks
    "int4-gate": ("matmul", D, [(D, F, 4, D)]),          # int4 per-channel, as packed
    "int4-down": ("matmul", F, [(F, D, 4, F)]),
    "int4g64-gate": ("matmul", D, [(D, F, 4, 64)]),
    "int4g64-down": ("matmul", F, [(F, D, 4, 64)]),
    "int4g32-gate": ("matmul", D, [(D, F, 4, 32)]),      # the int4 default
    "int4g32-down": ("matmul", F, [(F, D, 4, 32)]),
    "int4lv32-gate": ("matmul", D, [(D, F, 4, 32, STUDENT_T_LEVELS)]),  # non-uniform levels
    "int4lv32-down": ("matmul", F, [(F, D, 4, 32, STUDENT_T_LEVELS)]),
    "bf16-gate": ("matmul", D, [(D, F, "bf16", None)]),
    "logits": ("matmul_nt", D, [(V, D, "bf16", None)]),  # tied embeddings, x @ e.T
    "logits-int8": ("logits_int8", D, [(V, D, "table8", None)]),  # --output-table int8
    "ffn-int8": ("expert_ffn", D, [(D, F, 8, D), (D, F, 8, D), (F, D, 8, F // 8)]),
    "ffn-int4": ("expert_ffn", D, [(D, F, 4, D), (D, F, 4, D), (F, D, 4, F)]),
    "ffn-int4g64": ("expert_ffn", D, [(D, F, 4, 64), (D, F, 4, 64), (F, D, 4, 64)]),
}


def _build(name, rng, mmap_dir, row_pad, tiled):
    """(fn(x) running the case's kernel, input width, weights read)."""
    kernel, width, specs = CASES[name]
    weights = []
    for i, (rows, cols, bits, group, *levels) in enumerate(specs):
        tag = f"{name}-{i}"
        make = {"bf16": _bf16_table, "table8": _int8_table}.get(bits)
        weights.append(make(rng, rows, cols, mmap_dir, tag) if make
                       else _qweight(rng, rows, cols, bits, group, mmap_dir, tag, *levels,
                                     row_pad=row_pad, tiled=tiled))
    if kernel == "logits_int8":   # --act-int8: its int16 activations (the int8 mode's logits)
        fn = partial(logits_kernels.logits_int8, act16=bool(kernels.ACT_INT8))
    else:
        fn = getattr(kernels, kernel)
    return (lambda x: fn(x, *weights)), width, weights


def _median_pair(fn, buffers, repeats):
    """Median kernel time and median floor time, measured alternately."""
    fn()  # compile (or load from cache) and fault the pages in
    k_times, f_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        k_times.append(time.perf_counter() - t0)
        f_times.append(read_seconds(buffers))
    return float(np.median(k_times)), float(np.median(f_times))


ALL = list(CASES)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", choices=ALL, default=ALL)
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8], help="T values")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="numba threads (default: all)")
    ap.add_argument("--act-int8", action="store_true",
                    help="int8 activations (matmul act_int8=True: a numerics change)")
    ap.add_argument("--mmap", type=Path, default=None, metavar="DIR",
                    help="write weights to files in DIR (left there, ~3 GB for all cases) "
                         "and pass them as read-only np.memmap")
    ap.add_argument("--layout", choices=("tiles", "rows"), default="tiles",
                    help="quantized values in tiles (default, what lowmem quantize writes) "
                         "or in rows (format 4)")
    ap.add_argument("--row-pad", type=int, default=None, metavar="BYTES",
                    help=f"--layout rows: stored bytes after each row of quantized values "
                         f"(default {ROW_PAD}, format 4; 0: format 3's dense rows)")
    args = ap.parse_args(argv)
    if args.layout == "tiles" and args.row_pad:
        ap.error(f"--row-pad {args.row_pad} applies to --layout rows")
    args.row_pad = 0 if args.layout == "tiles" else ROW_PAD if args.row_pad is None else \
        args.row_pad
    if args.threads:
        numba.set_num_threads(args.threads)
    kernels.ACT_INT8 = args.act_int8
    if args.mmap:
        args.mmap.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    parallel_sum(np.zeros(8, np.uint64))
    print(f"# numba {numba.__version__}, {numba.get_num_threads()} threads, "
          f"{os.cpu_count()} cpus, {'memmap' if args.mmap else 'in-memory'} weights, "
          f"{'int8' if args.act_int8 else 'fp32'} activations, {args.layout}"
          f"{f' (row pad {args.row_pad})' if args.layout == 'rows' else ''}, "
          f"load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'case':14s} {'T':>3s} {'MB':>7s} {'floor ms':>9s} {'floor GB/s':>10s} "
          f"{'kernel ms':>9s} {'GB/s':>6s} {'ratio':>6s}")
    for name in args.cases:
        fn, width, weights = _build(name, rng, args.mmap, args.row_pad, args.layout == "tiles")
        buffers = _buffers(*weights)
        nbytes = sum(b.nbytes for b in buffers)
        for t in args.tokens:
            x = rng.standard_normal((t, width)).astype(np.float32)
            k_s, f_s = _median_pair(lambda: fn(x), buffers, args.repeats)
            print(f"{name:14s} {t:3d} {nbytes / 1e6:7.1f} {f_s * 1e3:9.2f} {nbytes / f_s / 1e9:10.2f} "
                  f"{k_s * 1e3:9.2f} {nbytes / k_s / 1e9:6.2f} {k_s / f_s:6.2f}", flush=True)
        del fn, weights, buffers
    return 0


if __name__ == "__main__":
    sys.exit(main())
