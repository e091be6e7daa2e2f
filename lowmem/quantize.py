"""Command line: quantize the Grok-1 release checkpoint into a packed model directory.

    python -m lowmem.quantize --checkpoint ckpt-0 --out grok1-int8 --bits 8
    python -m lowmem.quantize --checkpoint ckpt-0 --out grok1-int4 --bits 4 --tokenizer tokenizer.model
    python -m lowmem.quantize --checkpoint ckpt-0 --out grok1-int4 --bits 4 --resume
    python -m lowmem.quantize --verify grok1-int4

The work is done by quant.pipeline.quantize_checkpoint; this module only parses
options, shows progress and prints the summary. Exit status: 0 done, 1 --verify
found a bad tensor or an I/O error stopped the run, 2 bad input (one line on
stderr, no traceback), 130 interrupted (rerun with --resume).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from lowmem import cli
from quant.config import PRESETS, GrokConfig
from quant.checkpoint import CheckpointError
from quant.packed import ROW_PAD, PackedFormatError, verify_model
from quant.pipeline import (DEFAULT_GROUP_SIZE, DEFAULT_INT4_LEVELS, INT4_LEVELS, LAYOUTS,
                            PER_CHANNEL, Progress, QuantizeError, quantize_checkpoint, settings_for)

log = logging.getLogger("lowmem.quantize")


def group_size_type(text: str) -> int | str:
    """``--group-size``: a whole number >= 1 or the word PER_CHANNEL."""
    if text == PER_CHANNEL:
        return PER_CHANNEL
    try:
        return cli.int_type(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number >= 1 or '{PER_CHANNEL}', found {text!r}") from None


def build_parser(prog: str = "python -m lowmem.quantize") -> argparse.ArgumentParser:
    p = cli.Parser(
        prog=prog,
        description="Quantize a Grok-1 release checkpoint (ckpt-0/) into a packed model "
                    "directory for the lowmem runtime, or verify one.")
    p.add_argument("--checkpoint", metavar="CKPT_DIR", type=Path,
                   help="the release checkpoint directory (tensor00000_000 ...); required "
                        "unless --verify")
    p.add_argument("--out", metavar="MODEL_DIR", type=cli.new_directory,
                   help="output directory, in an existing directory; must not exist (work goes "
                        "to MODEL_DIR.partial/ and is renamed when complete); required unless "
                        "--verify")
    p.add_argument("--bits", type=int, choices=(8, 4),
                   help="expert weight bits: 8 keeps the release's int8 values and scales "
                        "bit-exact; 4 re-quantizes to symmetric int4 (half the size); required "
                        "unless --verify")
    p.add_argument("--group-size", type=group_size_type, metavar="G",
                   help=f"--bits 4 only: one scale per G input rows (e.g. 128, 64, 32; must "
                        f"divide the model widths), or '{PER_CHANNEL}': one per output channel "
                        f"(default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--int4-levels", choices=sorted(INT4_LEVELS),
                   help=f"--bits 4 with groups: the 16 values a nibble stands for, "
                        f"'{DEFAULT_INT4_LEVELS}' (default: non-uniform, denser near zero, "
                        f"less error at the same bytes) or 'uniform' (-8..7; per channel "
                        f"always)")
    p.add_argument("--attention", choices=("int8", "bf16"), default="int8",
                   help="attention weights: int8 as released (default) or dequantized bf16")
    p.add_argument("--layout", choices=LAYOUTS, default="tiles",
                   help="expert and int8 attention values in 32 x 64 tiles, one sequential "
                        "read per matmul (default: 1.1-1.4x faster on the host backend), or in "
                        "rows (format 4)")
    p.add_argument("--row-pad", type=int, metavar="BYTES",
                   help=f"--layout rows: zero bytes after each stored row of expert values, a "
                        f"multiple of 64 (default {ROW_PAD}: rows a multiple of 4 KiB long, as "
                        f"Grok-1's gate and up, then do not share one L1 cache set, 1.1-1.3x "
                        f"faster; 0: dense rows, 0.5%% smaller blocks, as format 3)")
    p.add_argument("--tokenizer", type=Path, metavar="PATH",
                   help="SentencePiece tokenizer.model to copy into the model directory "
                        "(default: none; text prompts then need one)")
    cfg = p.add_mutually_exclusive_group()
    cfg.add_argument("--preset", choices=sorted(PRESETS),
                     help="model configuration the checkpoint must match (default: inferred "
                          "from the checkpoint's shapes)")
    cfg.add_argument("--config", metavar="JSON",
                     help="model configuration as a JSON file or a JSON object string "
                          "(GrokConfig fields), instead of --preset (default: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from MODEL_DIR.partial/: completed "
                        "layers whose checksums verify are kept, the rest redone (default: off)")
    p.add_argument("--verify", metavar="MODEL_DIR", type=Path,
                   help="re-check every tensor checksum of a packed model directory; "
                        "reports the first bad tensor and exits 1 (other options ignored; "
                        "default: quantize)")
    cli.add_verbosity(p)
    return p


def load_config(args: argparse.Namespace) -> GrokConfig | None:
    """The config given (a check on the checkpoint), or None: infer it from the shapes."""
    if args.config is None and args.preset is None:
        return None
    try:
        return cli.load_config(args.preset, args.config)
    except cli.CLIError as e:
        raise QuantizeError(str(e)) from None


def fmt_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as disk sizes are quoted)."""
    for unit in ("B", "KB", "MB"):
        if abs(n) < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


class BarProgress(Progress):
    """tqdm bar over checkpoint bytes (terminal)."""

    def start(self, total_bytes: int, done_bytes: int) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True,
                        desc="quantize", dynamic_ncols=True)

    def advance(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def unit_done(self, unit: str, nbytes: int, seconds: float) -> None:
        self.bar.set_postfix_str(unit, refresh=False)

    def close(self) -> None:
        if hasattr(self, "bar"):
            self.bar.close()


class LogProgress(Progress):
    """One log line per unit (not a terminal)."""

    def start(self, total_bytes: int, done_bytes: int) -> None:
        self.total, self.done = total_bytes, done_bytes
        if done_bytes:
            log.info("resuming: %s of %s already done", fmt_bytes(done_bytes),
                     fmt_bytes(total_bytes))

    def unit_done(self, unit: str, nbytes: int, seconds: float) -> None:
        self.done += nbytes
        log.info("%s: %s in %.1f s (%s/s), %.0f%% done", unit, fmt_bytes(nbytes), seconds,
                 fmt_bytes(nbytes / max(seconds, 1e-9)), 100 * self.done / max(self.total, 1))

    def close(self) -> None:
        pass


def _summary(manifest: dict, ckpt_dir: Path, out_dir: Path, seconds: float) -> None:
    size_in = sum(p.stat().st_size for p in ckpt_dir.glob("tensor*_000"))
    size_out = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    log.info("done: %s -> %s: %s in, %s out, %.1f s (%s/s in)", ckpt_dir, out_dir,
             fmt_bytes(size_in), fmt_bytes(size_out), seconds,
             fmt_bytes(size_in / max(seconds, 1e-9)))
    log.info("relative quantization error per role (experts: per expert matrix):")
    for role, s in manifest["quant_error_summary"].items():
        log.info("  %-15s worst %.5f  mean %.5f  (%d tensors)", role, s["worst"], s["mean"],
                 s["count"])


def run_quantize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    missing = [f"--{n}" for n in ("checkpoint", "out", "bits") if getattr(args, n) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)} (or use --verify MODEL_DIR)")
    cfg = load_config(args)
    try:
        settings = settings_for(args.bits, args.group_size, args.int4_levels, args.attention,
                                args.row_pad, args.layout)
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    progress = BarProgress() if sys.stderr.isatty() else LogProgress()
    start = time.perf_counter()
    try:
        manifest = quantize_checkpoint(args.checkpoint, args.out, cfg, settings,
                                       tokenizer=args.tokenizer, resume=args.resume,
                                       progress=progress)
    finally:
        progress.close()
    _summary(manifest, args.checkpoint, args.out, time.perf_counter() - start)
    return 0


def run_verify(model_dir: Path) -> int:
    problems = verify_model(model_dir)
    if problems:
        log.error("%s (%d bad tensor%s in all)", problems[0], len(problems),
                  "" if len(problems) == 1 else "s")
        return 1
    log.info("%s: every tensor matches its checksum", model_dir)
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m lowmem.quantize") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    try:
        if args.verify is not None:
            return run_verify(args.verify)
        return run_quantize(args, parser)
    except (QuantizeError, CheckpointError, PackedFormatError) as e:
        log.error("error: %s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; rerun with --resume to continue")
        return 130
    except OSError as e:  # e.g. disk full mid-run: completed layers are kept
        log.error("error: %s (rerun with --resume once fixed)", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
