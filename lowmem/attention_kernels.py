"""Attention of one decode row over its KV cache in numba: the host backend's core.

Why: a host decode step calls XLA between its kernels, and right after the
kernels have streamed the weights through the caches, XLA's attention over the
cache (``model.attend``) took 0.59 ms a layer mid-step, mostly the dispatch of
its many small operations running cold; this kernel, its views of the cache
included, 0.13 ms (docs/PERFORMANCE.md, section 3, session 27). The keys and
values are written by XLA as before (``model.heads_into_cache``, the cache
donated); this kernel only reads them, through zero-copy views of the cache's
buffers.

Numerics: the same operations as ``model.attend`` (fp32 logits times the
multiplier, soft cap, softmax over the visible keys, the weighted sum of the
values divided by the weights' sum, bf16 rounding of the output in 'bf16'), in
an order of its own and with numba's tanh and exp, so the result agrees with
XLA's to fp32 rounding, not bit for bit (tests/test_attention.py).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from lowmem.cpu_kernels import _f32
from quant.bf16 import round_bf16_scalar

_FM = {"contract", "reassoc"}   # reassoc: the dot products vectorize (as XLA's do)


@njit(parallel=True, fastmath=_FM, cache=True)
def _attend(q, keys, values, visible, mult, cap, rnd, out):
    """out (Hq, K) = attention of q (Hq, K) over the positions where visible (n,) is
    set, for each KV head in parallel; keys (Hkv, S, K), values (Hkv, K, S) as
    stored (uint16: bf16 bits, see model.cache_dtype; read as cpu_kernels reads
    bf16 weights); rnd: round the output to bf16."""
    hq, kd = q.shape
    hkv, n = keys.shape[0], visible.shape[0]
    g = hq // hkv
    for h in prange(hkv):
        w = np.zeros((g, n), np.float32)                # (G, n) logits, then weights
        for s in range(n):
            if not visible[s]:
                continue
            key = keys[h, s]
            for j in range(g):
                qj = q[h * g + j]
                acc = np.float32(0.0)
                for d in range(kd):
                    acc += qj[d] * _f32(key[d])
                x = acc * mult
                w[j, s] = cap * np.tanh(x / cap)
        for j in range(g):
            m = np.float32(-np.inf)
            for s in range(n):
                if visible[s]:
                    m = max(m, w[j, s])
            total = np.float32(0.0)
            for s in range(n):
                p = np.exp(w[j, s] - m) if visible[s] else np.float32(0.0)
                w[j, s] = p
                total += p
            for d in range(kd):
                row = values[h, d]
                acc = np.float32(0.0)
                for s in range(n):
                    acc += w[j, s] * _f32(row[s])
                o = acc / total
                out[h * g + j, d] = round_bf16_scalar(o) if rnd else o


def attend_row(cfg, q: np.ndarray, keys: np.ndarray, values: np.ndarray, valid: np.ndarray,
               pos: int, precision: str) -> np.ndarray:
    """``model.attend`` for one row at position pos: q (1, Hq, K) fp32 after RoPE, the
    cache's keys (Hkv, S, K) and values (Hkv, K, S) as stored, valid (S,) -> (1, Hq*K)
    fp32. The row sees the valid keys at positions <= pos; it must see one (its own:
    the engine asks only for real tokens), else ValueError (XLA's masked softmax
    would average every key it saw)."""
    visible = np.asarray(valid[:pos + 1], np.bool_)                  # (pos + 1,)
    if not visible.any():
        raise ValueError(f"attend_row: no valid key at positions 0..{pos}")
    hq, kd = cfg.num_q_heads, cfg.key_size
    out = np.empty((hq, kd), np.float32)                            # (Hq, K)
    _attend(np.ascontiguousarray(q, np.float32).reshape(hq, kd), keys, values, visible,
            np.float32(cfg.attn_output_multiplier), np.float32(cfg.attn_logit_softcap),
            precision == "bf16", out)
    return out.reshape(1, hq * kd)
