"""KL(int8 || int4) of several int4 schemes averaged over many prompts.

Why: on the small random synthetic models, one prompt's KL ranks quantizers
of equal weight error in any order (docs/FIDELITY.md: +-30% between schemes
whose weight errors differ by 3%). This tool requantizes the experts of an
int8 packed model in memory with each scheme (``quant.int4.quantize_int4``
with today's or the previous search, or llama.cpp's Q4_0), runs the dense
``lowmem.reference`` forward in fp32 over the FIDELITY prompt plus N random
prompts, and prints per scheme: the experts' relative weight error, the KL on
the first prompt, the mean KL and its standard error, and the mean paired
difference to the first scheme.

    python tools/int4_kl_prompts.py --model /tmp/m-8 --prompts 47 \\
        --schemes old-channel channel g64 g32 q4_0 lv32

Small presets only (the dense forward holds every expert in fp32).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from lowmem import reference as R
from lowmem.eval import kl_divergence
from lowmem.requant import dense_params, q4_0
from quant.int4 import POSITIVE, quantize_int4
from quant.int4_levels import quantize_levels
from quant.packed import PackedModel
from quant.qweight import dequantize

FIDELITY_PROMPT = [(i * 37 + 5) % 500 + 4 for i in range(54)]   # docs/FIDELITY.md's $T


def scheme(name: str):
    """(K, N) fp32 -> dequantized (K, N) for 'g32', 'channel', 'old-g32', 'q4_0', 'lv32', ...:
    'old-' is the search before the signed anchor (positive scales, no rescaling);
    'lvG' the default int4 level table in groups of G (quant.int4_levels)."""
    if name == "q4_0":
        return q4_0
    if name.startswith("lv"):
        group = int(name.removeprefix("lv"))
        return lambda w: dequantize(quantize_levels(np.ascontiguousarray(w), None, group).weight)
    old = name.startswith("old-")
    spec = name.removeprefix("old-")
    group = None if spec == "channel" else int(spec.removeprefix("g"))
    kw = {"anchors": POSITIVE, "ls_steps": 0} if old else {}
    return lambda w: dequantize(quantize_int4(np.ascontiguousarray(w), None, group, **kw).weight)


def requantize(params: dict, fn) -> tuple[dict, float]:
    """Params with every expert matrix replaced by fn(matrix); relative weight error."""
    out, err, norm = dict(params, layers=[]), 0.0, 0.0
    for layer in params["layers"]:
        new = dict(layer)
        for role in ("gate", "up", "down"):
            new[role] = np.stack([fn(w) for w in layer[role]])                # (E, K, N)
            err += float(((new[role] - layer[role].astype(np.float64)) ** 2).sum())
            norm += float((layer[role].astype(np.float64) ** 2).sum())
        out["layers"].append(new)
    return out, (err / norm) ** 0.5


def text_prompts(path: str, vocab: int, count: int, length: int = 54) -> list[list[int]]:
    """Up to ``count`` consecutive ``length``-token prompts of a text (release tokenizer)."""
    from lowmem.tokenizer import Tokenizer, release_tokenizer_path
    ids = Tokenizer(release_tokenizer_path()).encode(open(path, encoding="utf-8").read())
    if max(ids) >= vocab:
        raise SystemExit(f"error: --text needs a model with the release's vocabulary "
                         f"(131072), found {vocab}")
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:count]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="an int8 packed model directory")
    ap.add_argument("--schemes", nargs="+", default=["old-channel", "channel", "g64", "g32",
                                                     "q4_0", "lv32"])
    ap.add_argument("--prompts", type=int, default=47, help="random prompts besides the "
                    "FIDELITY prompt (default 47)")
    ap.add_argument("--seed", type=int, default=7, help="random prompts' seed (default 7)")
    ap.add_argument("--text", help="instead of random prompts: consecutive 54-token prompts "
                    "of this UTF-8 text, through the release tokenizer (a model with its "
                    "131072-token vocabulary, e.g. the demo preset)")
    args = ap.parse_args(argv)
    model = PackedModel.open(args.model)
    if model.settings.bits != 8:
        print(f"error: --model {args.model}: expected an int8 model, found "
              f"{model.settings.bits}-bit experts", file=sys.stderr)
        return 2
    cfg, params = model.cfg, dense_params(model)
    if args.text:
        prompts = text_prompts(args.text, cfg.vocab_size, args.prompts + 1)
    else:
        rng = np.random.default_rng(args.seed)
        prompts = [FIDELITY_PROMPT] + [list(rng.integers(4, min(504, cfg.vocab_size), 54))
                                       for _ in range(args.prompts)]
    refs = [R.forward(cfg, params, np.asarray(p), "fp32")[0] for p in prompts]
    first = None
    print(f"{'scheme':12s} {'weight err':>10s} {'KL prompt 1':>11s} {'KL mean':>8s} "
          f"{'s.e.':>6s} {'paired diff':>16s}")
    for name in args.schemes:
        q, rel = requantize(params, scheme(name))
        kl = np.array([kl_divergence(ref, R.forward(cfg, q, np.asarray(p), "fp32")[0]).mean()
                       for p, ref in zip(prompts, refs)])
        first = kl if first is None else first
        d = kl - first
        print(f"{name:12s} {rel:10.4f} {kl[0]:11.4f} {kl.mean():8.4f} "
              f"{kl.std() / len(kl) ** 0.5:6.4f} {d.mean():+8.4f} +- {d.std() / len(d) ** 0.5:.4f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
