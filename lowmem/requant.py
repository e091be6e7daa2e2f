"""Baseline expert quantizers applied in memory, for ``lowmem.eval --requant-experts``.

To compare lowmem's int4 with what other runtimes ship, the experts of an int8
packed model are requantized in memory with a foreign scheme and the model is
run densely by ``lowmem.reference`` (fp32 or its bf16 mode): nothing is
written, and no other runtime is needed. Only for small presets (the dense
forward holds every expert in fp32).

- ``q4_0``: llama.cpp's Q4_0 (``quantize_row_q4_0_ref``): groups of 32
  consecutive weights along the input dimension (a GGUF row is one output
  feature's input weights), one fp16 scale ``d = max / -8`` per group where
  ``max`` is the signed value of largest magnitude, codes
  ``min(15, int(x / d + 8.5))``, value ``(code - 8) * fp16(d)``. 18 bytes per
  32 weights: 4.5 bits.
- ``q4_0_bf16``: the same with the scale stored in bf16 (what lowmem's format
  holds), to tell the -8 level trick from the fp16 scale's precision.
- ``q4_0_gguf``: Q4_0 on every matrix but the router, as ``q8_0`` below: the
  Q4_0 GGUF that issue 10's llama.cpp figures ran (its tied output table Q4_0,
  0.45 GB at Grok-1 size), the baseline for ``--output-table int4``.
- ``q8_0``: llama.cpp's Q8_0 file (``quantize_row_q8_0_ref``): groups of 32
  along the input dimension, fp16 ``d = max |x| / 127``, codes
  ``roundf(x / d)`` (half away from zero), value ``code * fp16(d)``; 34 bytes
  per 32 weights. A Q8_0 GGUF stores EVERY matrix so except the router
  (``ffn_gate_inp``, kept as is by llama-quantize): the experts, the
  attention projections and the tied embedding / output table (groups along
  D) are all requantized here, the baseline for lowmem's int8 models.

The other resident weights (for q4_0 and q4_0_bf16 the attention, and the
router, norms, bf16 embedding in every case) are used exactly as the packed
model stores them, so a model without ``--requant-experts`` run this way
gives the engine's logits (to fp32 rounding).
"""
from __future__ import annotations

import logging

import ml_dtypes
import numpy as np

from quant.packed import PackedModel
from quant.qweight import QWeight, dequantize

log = logging.getLogger(__name__)

Q4_0_GROUP = 32
Q4_0_GROUP_BYTES = 18          # fp16 scale + 32 four-bit codes
Q8_0_GROUP_BYTES = 34          # fp16 scale + 32 int8 codes
SCHEMES = ("q4_0", "q4_0_bf16", "q4_0_gguf", "q8_0")
WHOLE_FILE = ("q4_0_gguf", "q8_0")   # attention and the tied table requantized too


def q4_0(w: np.ndarray, scale_dtype=np.float16) -> np.ndarray:
    """(K, N) fp32 weights -> the (K, N) fp32 values a Q4_0 GGUF stores for them
    (``scale_dtype`` float16 as llama.cpp; ml_dtypes.bfloat16 for the variant)."""
    k, n = w.shape
    if k % Q4_0_GROUP:
        raise ValueError(f"Q4_0 needs K divisible by {Q4_0_GROUP}, got K={k}")
    g = np.asarray(w, np.float32).reshape(k // Q4_0_GROUP, Q4_0_GROUP, n)   # (G, 32, N)
    first = np.argmax(np.abs(g), axis=1)                                     # first max |x|
    mx = np.take_along_axis(g, first[:, None, :], axis=1)[:, 0, :]           # (G, N) signed
    d = mx / np.float32(-8.0)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d != 0)
    codes = np.minimum(15, np.trunc(g * inv[:, None, :] + np.float32(8.5)))  # (G, 32, N)
    d16 = d.astype(scale_dtype).astype(np.float32)
    return ((codes - np.float32(8.0)) * d16[:, None, :]).reshape(k, n)


def q8_0(w: np.ndarray) -> np.ndarray:
    """(K, N) fp32 weights -> the (K, N) fp32 values a Q8_0 GGUF stores for them."""
    k, n = w.shape
    if k % Q4_0_GROUP:
        raise ValueError(f"Q8_0 needs K divisible by {Q4_0_GROUP}, got K={k}")
    g = np.asarray(w, np.float32).reshape(k // Q4_0_GROUP, Q4_0_GROUP, n)   # (G, 32, N)
    d = np.abs(g).max(axis=1) / np.float32(127.0)                            # (G, N)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d != 0)
    x = g * inv[:, None, :]                                                  # (G, 32, N)
    t = np.trunc(x)                                    # roundf: half away from zero (the
    codes = t + np.sign(x) * (np.abs(x - t) >= 0.5)    # fraction x - t is exact; |x| + 0.5 is not)
    d16 = d.astype(np.float16).astype(np.float32)
    return (codes * d16[:, None, :]).reshape(k, n)


_REQUANT = {"q4_0": q4_0, "q4_0_bf16": lambda m: q4_0(m, ml_dtypes.bfloat16),
            "q4_0_gguf": q4_0, "q8_0": q8_0}


def _dense(w) -> np.ndarray:
    return dequantize(w) if isinstance(w, QWeight) else np.asarray(w, np.float32)


def dense_params(model: PackedModel, scheme: str | None = None) -> dict:
    """``lowmem.reference`` params from a packed model, experts requantized by ``scheme``.

    ``scheme`` None keeps the stored experts; 'q4_0' needs int8 experts (the
    release's own values), so that the baseline starts from the same source.
    """
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {SCHEMES}")
    if scheme is not None and model.settings.bits != 8:
        raise ValueError(f"requantizing experts needs an int8 model, found "
                         f"{model.settings.bits}-bit experts in {model.model_dir}")
    cfg = model.cfg
    requant = _REQUANT[scheme] if scheme else (lambda m: m)
    every_matrix = scheme in WHOLE_FILE                 # attention and table too
    layers = []
    for layer in range(cfg.num_layers):
        p = {role: _dense(w) for role, w in model.layer(layer).items()}
        if every_matrix:
            for role in ("q", "k", "v", "o"):
                p[role] = requant(p[role])                                     # (K, N)
        blocks = [model.expert(layer, e) for e in range(cfg.num_experts)]
        for role in ("gate", "up", "down"):
            mats = [_dense(getattr(b, role)) for b in blocks]                  # E x (K, N)
            p[role] = np.stack([requant(m) for m in mats])                     # (E, K, N)
        layers.append(p)
    embed = _dense(model.embed())                                              # (V, D)
    if every_matrix:
        embed = requant(embed.T).T                     # a GGUF row is one token's D values
    return {"embed": embed, "final_norm": _dense(model.final_norm()), "layers": layers}


def expert_bytes_per_token(model: PackedModel, scheme: str | None = None) -> int:
    """Expert bytes one decode token reads: layers x routed experts x one expert's data
    (values and scales; not the block's alignment padding, which the host kernels
    never read and which is negligible at Grok-1 size)."""
    cfg = model.cfg
    per_expert = sum(p.nbytes for p in model.expert_parts)
    if scheme in SCHEMES:
        weights = 3 * cfg.emb_size * cfg.ffn_size
        group = Q8_0_GROUP_BYTES if scheme == "q8_0" else Q4_0_GROUP_BYTES
        per_expert = weights // Q4_0_GROUP * group
    return cfg.num_layers * cfg.num_selected_experts * per_expert
