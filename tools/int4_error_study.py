"""Measure int4 quantization error of expert matrices under several methods.

Why: the quantizer (quant/int4.py) stores symmetric int4 with bf16 scales; this
script justifies its choice of rounding/clipping by comparing, on release-like
int8 matrices (int8 values with bf16 per-column or 8-row-block scales):

  sym-amax      scale = bf16(amax / 7)                       (plain)
  sym-grid      stage 1 only: the 9-ratio CLIP_RATIOS grid
  sym-clip      CLIP_RATIOS then REFINE around the winner     (the default)
  sym-fine      a 76-point clip grid, 1.00 .. 0.25            (search headroom)
  sym-clip+ls   sym-clip, then least-squares scale refits     (refinement headroom)
  asym-minmax   zero point, scale = bf16((max - min) / 15)    (not storable)
  asym-clip     asymmetric with a clip search                 (not storable)

for per-channel scales and groups of 128, 64 and 32 input rows. Reported: the
relative Frobenius error ||W - Q|| / ||W|| of the dequantized result.

Usage: python tools/int4_error_study.py [--cols 256] [--seed 0]
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from quant.config import preset
from quant.checkpoint import dequantize
from quant.int4 import AMAX_ONLY, CLIP_RATIOS, quantize_int4
from quant.qweight import BF16, int_values
from quant.qweight import dequantize as dequantize_q
from quant.spec import layer_specs
from quant.synthetic import generate_tensor

FINE_RATIOS = tuple(round(1.0 - 0.01 * i, 2) for i in range(76))
GROUPS = (None, 128, 64, 32)


def bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def release_like(w: np.ndarray, blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and bf16 (blocks, N) scales the way the release stores a matrix."""
    k, n = w.shape
    wb = w.reshape(blocks, k // blocks, n)
    s8 = bf16(np.abs(wb).max(1) / 127.0)                           # (B, N)
    q8 = np.clip(np.rint(wb / s8[:, None, :]), -128, 127).astype(np.int8)
    return q8.reshape(k, n), s8


def rel(w: np.ndarray, d: np.ndarray) -> float:
    w64 = w.astype(np.float64)
    return float(np.sqrt(((w64 - d) ** 2).sum() / (w64 ** 2).sum()))


def sym_ls_refit(w: np.ndarray, q8, s8, group, iters: int = 3) -> float:
    """sym-clip, then per (group, column) refit s = <w,q>/<q,q> and requantize; keep the best."""
    res = quantize_int4(q8, s8, group)
    k, n = w.shape
    g = group or k
    wg = w.reshape(k // g, g, n).astype(np.float64)                # (G, g, N)
    q = int_values(res.weight).reshape(k // g, g, n).astype(np.float64)
    s = res.weight.scales.astype(np.float64)                       # (G, N)
    best = ((wg - q * s[:, None]) ** 2).sum(1)
    for _ in range(iters):
        qq = (q * q).sum(1)
        s_new = bf16(np.where(qq > 0, (wg * q).sum(1) / np.maximum(qq, 1), s)).astype(np.float64)
        q_new = np.clip(np.rint(wg / np.where(s_new > 0, s_new, 1)[:, None]), -8, 7)
        err = ((wg - q_new * s_new[:, None]) ** 2).sum(1)
        better = err < best
        best = np.where(better, err, best)
        q = np.where(better[:, None], q_new, q)
    return float(np.sqrt(best.sum() / (wg ** 2).sum()))


def asym(w: np.ndarray, group, ratios) -> float:
    """Asymmetric int4 (levels 0..15, integer zero point) with a clip-ratio search."""
    k, n = w.shape
    g = group or k
    wg = w.reshape(k // g, g, n)                                   # (G, g, N)
    mn, mx = np.minimum(wg.min(1), 0), np.maximum(wg.max(1), 0)
    best = np.full(mn.shape, np.inf)
    for r in ratios:
        s = bf16((mx - mn) * r / 15.0)
        s = np.where(s > 0, s, 1.0)
        z = np.clip(np.rint(-mn * r / s), 0, 15)
        q = np.clip(np.rint(wg / s[:, None]) + z[:, None], 0, 15)
        d = (q - z[:, None]) * s[:, None]
        best = np.minimum(best, ((wg.astype(np.float64) - d) ** 2).sum(1))
    return float(np.sqrt(best.sum() / (wg.astype(np.float64) ** 2).sum()))


def methods(q8: np.ndarray, s8: np.ndarray, group) -> dict[str, float]:
    w = q8.astype(np.float32).reshape(s8.shape[0], -1, q8.shape[1]) * s8[:, None, :]
    w = w.reshape(q8.shape)                                        # (K, N) fp32, exact
    out = {}
    for name, ratios, refine in (("sym-amax", AMAX_ONLY, ()), ("sym-grid", CLIP_RATIOS, ()),
                                 ("sym-clip", CLIP_RATIOS, None), ("sym-fine", FINE_RATIOS, ())):
        res = quantize_int4(q8, s8, group, ratios, refine)
        assert abs(res.rel_error - rel(w, dequantize_q(res.weight))) < 1e-6
        out[name] = res.rel_error
    out["sym-clip+ls"] = sym_ls_refit(w, q8, s8, group)
    out["asym-minmax"] = asym(w, group, (1.0,))
    out["asym-clip"] = asym(w, group, CLIP_RATIOS)
    return out


def matrices(cols: int, seed: int):
    """(label, int8 values, bf16-valued fp32 scales) test matrices."""
    rng = np.random.default_rng(seed)
    for dist in ("gaussian", "student-t5"):
        for label, k, blocks in (("gate 6144", 6144, 1), ("down 32768", 32768, 8)):
            shape = (k, cols)
            w = (rng.standard_normal(shape) if dist == "gaussian"
                 else rng.standard_t(5, shape)).astype(np.float32)
            yield (f"{dist} {label}", *release_like(w, blocks))
    cfg = dataclasses.replace(preset("tiny"), emb_size=2048, ffn_size=8192)
    specs = layer_specs(cfg, 0)
    for role in ("gate", "down"):
        value = generate_tensor(cfg, specs[role], seed)
        q8, s8 = value.weight[0], value.scales[0].astype(np.float32)
        assert np.array_equal(dequantize(value)[0], q8.astype(np.float32).reshape(
            s8.shape[0], -1, q8.shape[1]).__mul__(s8[:, None, :]).reshape(q8.shape))
        yield f"synthetic {role} {q8.shape[0]}", q8[:, :cols * 4], s8[:, :cols * 4]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cols", type=int, default=256, help="output columns per test matrix")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for label, q8, s8 in matrices(args.cols, args.seed):
        print(f"\n{label} x {q8.shape[1]}  (relative Frobenius error)")
        rows = {g: methods(q8, s8, g) for g in GROUPS}
        names = list(rows[None])
        print(f"{'group':>12} " + " ".join(f"{n:>12}" for n in names))
        for g, r in rows.items():
            print(f"{str(g or 'per-channel'):>12} " + " ".join(f"{r[n]:12.5f}" for n in names))


if __name__ == "__main__":
    main()
