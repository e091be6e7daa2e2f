"""The fidelity table of docs/FIDELITY.md: every path against the exact-math logits.

Compares, over every position of a prompt, the logits of lowmem.reference
(fp32, bf16), of the engine (each packed model given, each precision, host
backend) and optionally of the release's own bf16 run (an .npy from
tools/release_oracle.py) against an oracle's exact-math logits (an .npy from
tools/release_oracle.py --mode fp32), with lowmem.eval's metrics.

    python tools/fidelity_table.py --checkpoint CKPT --preset tiny-12 --tokens 5,17,... \\
        --oracle oracle-fp32.npy --release-bf16 oracle-bf16.npy --model int8=DIR --model int4=DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def engine_logits(model_dir: str, precision: str, backend: str, tokens: list[int]) -> np.ndarray:
    from lowmem.engine import Engine, EngineOptions
    from lowmem.eval import teacher_forced_logits
    from quant.packed import PackedModel
    engine = Engine(PackedModel.open(model_dir),
                    EngineOptions(backend=backend, precision=precision, expert_cache_gb=1.0))
    try:
        return teacher_forced_logits(engine, tokens, progress=False)
    finally:
        engine.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--oracle", required=True, help="exact-math logits (T, V) .npy")
    ap.add_argument("--release-bf16", help="the release's bf16 run, logits (T, V) .npy")
    ap.add_argument("--model", action="append", default=[], help="NAME=packed model dir")
    ap.add_argument("--backend", action="append", help="host and/or device (default host)")
    ap.add_argument("--round-embedding", action="store_true",
                    help="give the reference the bf16 embedding the packed models store")
    ap.add_argument("--out", help="JSON out")
    args = ap.parse_args(argv)
    from lowmem import reference as R
    from lowmem.eval import compare
    from quant.config import preset
    cfg = preset(args.preset)
    tokens = [int(t) for t in args.tokens.split(",")]
    oracle = np.load(args.oracle)
    paths: dict[str, np.ndarray] = {}
    params = R.load_params(args.checkpoint, cfg)
    if args.round_embedding:
        params["embed"] = R.bf16(params["embed"])
    for mode in ("fp32", "bf16"):
        paths[f"lowmem.reference {mode}"] = R.forward(cfg, params, np.array(tokens), mode)[0]
    if args.release_bf16:
        paths["release code, bf16"] = np.load(args.release_bf16)
    for spec in args.model:
        name, model_dir = spec.split("=", 1)
        for backend in args.backend or ["host"]:
            for precision in ("fp32", "bf16"):
                paths[f"engine {name} {precision} ({backend})"] = engine_logits(
                    model_dir, precision, backend, tokens)
    rows = {}
    print("| path | rel. max error | KL mean | argmax agreement |\n|---|---|---|---|")
    for name, logits in paths.items():
        o = compare(logits, oracle, tokens)["overall"]
        rows[name] = o
        print(f"| {name} | {o['max_rel_error']:.2g} | {o['kl_mean']:.2g} | "
              f"{o['top1_matches']}/{o['positions']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
