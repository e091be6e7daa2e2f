"""Decode cost of --precision fp32 against bf16 on the host backend, at Grok-1 width.

Uses the packed models tools/bench_decode.py builds (a synthetic Grok-1-width
checkpoint with a few layers) and decodes with two engines on the same mapped
files, one per precision, alternating them repeat by repeat so a noisy
neighbour slows both alike. Reports the median seconds per token of each and
their ratio (the figure the engine's default precision is chosen from).

    python tools/bench_decode.py --bits 8 --layers 2 --keep-checkpoint   # builds the model
    python tools/bench_precision.py --model /tmp/lowmem-bench-decode/grok1-L2-int8
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import decode_seconds, prefault_experts  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="packed model directory")
    ap.add_argument("--backend", default="host", choices=("host", "device"))
    ap.add_argument("--context", type=int, default=256, help="KV cache length (default 256)")
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4, help="decode steps per repeat (default 4)")
    ap.add_argument("--repeats", type=int, default=5, help="alternations (default 5)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1:
        print("error: --tokens and --repeats must be >= 1", file=sys.stderr)
        return 2
    from lowmem.api import load
    precisions = ("bf16", "fp32")
    rts = {p: load(args.model, backend=args.backend, context=args.context, precision=p)
           for p in precisions}
    prefault_experts(rts["bf16"].engine.model)
    prompt = list(range(100, 100 + args.prompt_tokens))
    for rt in rts.values():
        decode_seconds(rt.engine, prompt, 2)                              # compile, warm
    steps: dict[str, list[float]] = {p: [] for p in precisions}
    ratios = []
    for i in range(args.repeats):
        order = precisions if i % 2 == 0 else precisions[::-1]
        this = {p: float(np.median(decode_seconds(rts[p].engine, prompt, args.tokens)))
                for p in order}
        for p in precisions:
            steps[p].append(this[p])
        ratios.append(this["fp32"] / this["bf16"])
    result = {"model": str(args.model), "backend": args.backend,
              "s_per_token": {p: float(np.median(v)) for p, v in steps.items()},
              "repeat_ratios_fp32_over_bf16": ratios,
              "median_ratio_fp32_over_bf16": float(np.median(ratios))}
    for p in precisions:
        print(f"{p}: {result['s_per_token'][p]:.3f} s/token (medians per repeat: "
              f"{', '.join(f'{s:.3f}' for s in steps[p])})")
    print(f"fp32 / bf16 per repeat: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {result['median_ratio_fp32_over_bf16']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    for rt in rts.values():
        rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
