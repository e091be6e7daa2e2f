"""Write a synthetic checkpoint in the Grok-1 release format (``tensor{i:05d}_000`` files).

Only the release's files go into the output directory; the config is not
stored there (readers are given it separately), so note the preset printed.

    python tools/make_checkpoint.py --preset tiny --out /tmp/ckpt-tiny
    python tools/make_checkpoint.py --preset grok-1 --num-layers 2 --out /data/grok-2l
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from quant.config import PRESETS, GrokConfig, preset
from quant.spec import WeightSpec, checkpoint_specs
from quant.synthetic import HeavyTails, write_checkpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                     help="named config (default: tiny)")
    src.add_argument("--config", type=Path, metavar="JSON_FILE",
                     help="GrokConfig as JSON (instead of --preset)")
    p.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--heavy-tails", type=float, metavar="DOF",
                   help="heavy-tailed int8 leaves: Student-t with DOF (> 2) degrees of freedom, "
                        "1%% outlier rows and columns 6x wide (quant.synthetic.HeavyTails)")
    p.add_argument("--num-layers", type=int, metavar="N",
                   help="write only the first N layers of the config")
    return p


def _fail(message: str) -> int:
    print(f"make_checkpoint: error: {message}", file=sys.stderr)
    return 2


def _load_config(args) -> tuple[GrokConfig, str]:
    """The config to write and a one-line description of where it came from."""
    if args.config is not None:
        cfg = GrokConfig.from_json(args.config.read_text())
        label = f"config {args.config}"
    else:
        cfg = preset(args.preset)
        label = f"preset {args.preset}"
    if args.num_layers is not None:
        if args.num_layers < 1:
            raise ValueError(f"--num-layers must be >= 1, got {args.num_layers}")
        cfg = dataclasses.replace(cfg, num_layers=args.num_layers)
        label += f" with num_layers={args.num_layers}"
    return cfg, label


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg, label = _load_config(args)
    except (OSError, ValueError, TypeError) as e:
        return _fail(f"bad config: {e}")
    try:
        tails = None if args.heavy_tails is None else HeavyTails(dof=args.heavy_tails)
    except ValueError as e:
        return _fail(f"--heavy-tails: {e}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        return _fail(f"{args.out} exists and is not an empty directory; choose a new --out")
    total = len(checkpoint_specs(cfg))
    print(f"{label}, seed {args.seed}: writing {total} files to {args.out}", flush=True)
    done = [0]

    def progress(spec: WeightSpec, seconds: float) -> None:
        done[0] += 1
        print(f"\r[{done[0]}/{total}] {spec.filename} {spec.name} ({seconds:.1f} s)\033[K",
              end="", flush=True)

    start = time.perf_counter()
    out = write_checkpoint(cfg, args.out, seed=args.seed,
                           progress=progress if sys.stdout.isatty() else None, tails=tails)
    if sys.stdout.isatty():
        print()
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {total} files, {size / 1e9:.3f} GB in {time.perf_counter() - start:.1f} s "
          f"to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
