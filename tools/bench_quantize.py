"""Benchmark the quantizer against simply reading its input.

Writes (or reuses, --ckpt) a synthetic release-format checkpoint at Grok-1
width with a few layers, then, for --bits 8 and --bits 4, measures under the
same cache conditions:

  read      a cat-like sequential read of every checkpoint file (16 MiB reads)
  quantize  quant.pipeline.quantize_checkpoint into a fresh directory (timed
            to the rename; includes pickle decoding, int4 math, writes, CRC32s
            and the per-layer fsync)

and prints input GB/s and the ratio quantize time / read time (target <= 2).

Cache state (--cache): 'cold' drops each input file from the page cache with
posix_fadvise(DONTNEED) before each measurement (this works without root; a
hypervisor's cache below a VM is outside its reach, so say so when quoting);
'warm' reads every file once first so both measurements come from memory.

    python tools/bench_quantize.py                      # grok-1 width, 1 layer
    python tools/bench_quantize.py --ckpt /data/ckpt-grok1-L1 --cache warm
    python tools/bench_quantize.py --bits --group-size 32   # int4 g32, uniform grid
    python tools/bench_quantize.py --bits --group-size 32 --int4-levels student-t uniform
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import time
from pathlib import Path

import numba

from quant.config import PRESETS, preset
from quant.packed import QuantSettings
from quant.pipeline import INT4_LEVELS, quantize_checkpoint, settings_for
from quant.spec import checkpoint_specs
from quant.synthetic import write_checkpoint

CHUNK = 16 << 20


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd) if os.access(path, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(paths: list[Path]) -> float:
    """Seconds to read every file sequentially into one reused buffer (like cat)."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - start


def prepare_cache(paths: list[Path], cache: str) -> None:
    if cache == "cold":
        drop_cache(paths)
    else:
        read_all(paths)


def get_checkpoint(args) -> tuple[Path, object]:
    cfg = preset(args.preset, num_layers=args.layers)
    if args.ckpt is not None:
        return args.ckpt, cfg
    ckpt = args.work_dir / f"ckpt-{args.preset}-L{args.layers}"
    if not (ckpt / checkpoint_specs(cfg)[-1].filename).is_file():
        print(f"writing synthetic checkpoint {ckpt} ({args.preset} width, {args.layers} "
              f"layer(s)) ...", flush=True)
        start = time.perf_counter()
        write_checkpoint(preset(args.preset), ckpt, seed=0, num_layers=args.layers)
        print(f"  written in {time.perf_counter() - start:.1f} s", flush=True)
    return ckpt, cfg


def bench_one(ckpt: Path, cfg, settings: QuantSettings, out: Path, cache: str,
              paths: list[Path], nbytes: int) -> None:
    prepare_cache(paths, cache)
    t_read = read_all(paths)
    prepare_cache(paths, cache)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    start = time.perf_counter()
    quantize_checkpoint(ckpt, out, cfg, settings)
    t_quant = time.perf_counter() - start
    out_bytes = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(out)
    gb = nbytes / 1e9
    print(f"--bits {settings.bits}"
          + (f" --group-size {settings.group_size}" if settings.group_size else "")
          + (" (levels)" if settings.int4_levels else "")
          + f": read {t_read:6.2f} s ({gb / t_read:5.2f} GB/s) | quantize {t_quant:6.2f} s "
          f"({gb / t_quant:5.2f} GB/s in, {out_bytes / 1e9:.2f} GB out) | "
          f"ratio {t_quant / t_read:5.2f}x (target <= 2) | process peak RSS so far "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", type=Path, help="reuse this checkpoint (must match --preset "
                    "with --layers layers)")
    ap.add_argument("--layers", type=int, default=1, help="layers to write/use (default 1)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="grok-1",
                    help="width to benchmark (default grok-1; 'tiny' for a smoke test)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/lowmem-bench"),
                    help="where the checkpoint (kept for reuse) and outputs go")
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold")
    ap.add_argument("--bits", type=int, nargs="*", choices=(8, 4), default=[8, 4],
                    help="which runs (default: 8 4; int4 here is per channel); none "
                    "('--bits --group-size 32') runs only the --group-size run")
    ap.add_argument("--group-size", type=int, help="also run --bits 4 with this group size")
    ap.add_argument("--int4-levels", nargs="+", choices=sorted(INT4_LEVELS),
                    default=["uniform"], help="level tables of the --group-size runs "
                    "(default uniform; 'student-t uniform' runs both: the CLI default is "
                    "student-t)")
    args = ap.parse_args()
    if not args.bits and not args.group_size:
        ap.error("--bits: nothing to run (give 8 and/or 4, or --group-size)")
    ckpt, cfg = get_checkpoint(args)
    paths = [ckpt / s.filename for s in checkpoint_specs(cfg)]
    nbytes = sum(p.stat().st_size for p in paths)
    print(f"checkpoint {ckpt}: {len(paths)} files, {nbytes / 1e9:.2f} GB; cache {args.cache}; "
          f"{os.cpu_count()} CPUs, {numba.get_num_threads()} numba threads", flush=True)
    runs = [QuantSettings(bits) for bits in args.bits]
    if args.group_size:
        runs += [settings_for(4, args.group_size, name) for name in args.int4_levels]
    for settings in runs:
        bench_one(ckpt, cfg, settings, args.work_dir / "bench-out", args.cache, paths, nbytes)


if __name__ == "__main__":
    main()
