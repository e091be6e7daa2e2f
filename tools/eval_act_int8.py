"""What int8 activations (cpu_kernels act_int8) change in a model's logits.

``lowmem.eval`` compares two models in one process, where LOWMEM_ACT_INT8
would switch both; this runs one model twice on the host backend, with the
fp32-activation kernels and with act_int8, teacher-forced over the same
random token ids, and prints lowmem.eval's overall metrics of the second
against the first (and, with --reference, of --reference against --model
with fp32 activations, for scale).

    python tools/eval_act_int8.py --model /tmp/kw/models/grok1-L2-int4 \\
        --reference /tmp/kw/models/grok1-L2-int8 --tokens 24
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowmem import cpu_kernels  # noqa: E402
from lowmem.api import load  # noqa: E402
from lowmem.eval import compare, teacher_forced_logits  # noqa: E402


def logits_of(model: str, tokens: list[int], act_int8: bool, context: int) -> np.ndarray:
    rt = load(model, backend="host", context=context, verify=False)
    try:
        cpu_kernels.ACT_INT8 = act_int8
        return teacher_forced_logits(rt.engine, tokens, False)
    finally:
        cpu_kernels.ACT_INT8 = False
        rt.close()


def show(label: str, logits: np.ndarray, ref: np.ndarray, tokens: list[int]) -> None:
    o = compare(logits, ref, tokens)["overall"]
    print(f"{label}: kl_mean {o['kl_mean']:.3g} kl_max {o['kl_max']:.3g} "
          f"top1 {o['top1_matches']}/{o['positions']} top5 {o['top5_overlap']:.3f} "
          f"max_rel_error {o['max_rel_error']:.3g}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="packed model directory")
    ap.add_argument("--reference", help="another packed model, compared with fp32 activations")
    ap.add_argument("--tokens", type=int, default=24, help="random token ids (default 24)")
    ap.add_argument("--context", type=int, default=64, help="KV cache length (default 64)")
    args = ap.parse_args(argv)
    if not 1 <= args.tokens < args.context:
        print(f"error: --tokens must be in 1..{args.context - 1}, got {args.tokens}",
              file=sys.stderr)
        return 2
    tokens = [int(t) for t in np.random.default_rng(0).integers(100, 20000, args.tokens)]
    fp32 = logits_of(args.model, tokens, False, args.context)
    show("act_int8 vs fp32 activations", logits_of(args.model, tokens, True, args.context),
         fp32, tokens)
    if args.reference:
        show("model vs reference (fp32 activations)", fp32,
             logits_of(args.reference, tokens, False, args.context), tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
