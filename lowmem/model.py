"""Grok-1's resident computation in JAX: embedding, attention, routing, logits.

Everything except the routed experts. Each function is pure and jit-friendly,
takes the config explicitly, and follows SPEC.md section 2 in the reference's
bf16 mode: bf16 activations, fp32 norms/router/softmax, soft-capped attention
logits, raw top-2 gates.

Matrix products go through a ``linear(x, w)`` function chosen by the engine, so
the same attention code runs with weights on the accelerator (``dense_linear``:
dequantize inside the jitted function) or on the host (numba kernels reached
through ``jax.pure_callback``, see ``lowmem.backends``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from quant.config import GrokConfig
from quant.qweight import QWeight

BF16 = jnp.bfloat16
F32 = jnp.float32
MASK_VALUE = -1e30


class KVCache(NamedTuple):
    """One layer's keys (after RoPE) and values; preallocated, updated in place."""
    k: jax.Array  # (S, Hkv, K) bf16
    v: jax.Array  # (S, Hkv, K) bf16


def init_kv_cache(cfg: GrokConfig, length: int, device=None) -> list[KVCache]:
    shape = (length, cfg.num_kv_heads, cfg.key_size)
    zeros = lambda: jax.device_put(jnp.zeros(shape, BF16), device)  # noqa: E731
    return [KVCache(zeros(), zeros()) for _ in range(cfg.num_layers)]


def bf16_mul(x: jax.Array, constant: float) -> jax.Array:
    """``x.astype(bf16) * python_float``: the constant is rounded to bf16 (SPEC 2)."""
    return x.astype(BF16) * jnp.asarray(constant, BF16)


def rms_norm(cfg: GrokConfig, x: jax.Array, scale: jax.Array) -> jax.Array:
    """fp32 RMSNorm with the scale used as stored, cast back to bf16."""
    xf = x.astype(F32)
    ms = jnp.mean(xf * xf, axis=-1, keepdims=True)
    return (xf * jax.lax.rsqrt(ms + cfg.rms_norm_eps) * scale.astype(F32)).astype(BF16)


def dequantize(w: QWeight, dtype=BF16) -> jax.Array:
    """(K, N) weights from int8 or packed int4 values: ``int * scale`` rounded to dtype.

    The reference computes ``weight.astype(bf16) * scales`` in bf16, so the
    dequantized weights themselves are bf16 values.
    """
    v = w.values
    if w.bits == 4:
        as_i8 = lambda a: jax.lax.bitcast_convert_type(a, jnp.int8)  # noqa: E731
        lo = jax.lax.shift_right_arithmetic(as_i8(jax.lax.shift_left(v, jnp.uint8(4))), jnp.int8(4))
        hi = jax.lax.shift_right_arithmetic(as_i8(v), jnp.int8(4))
        v = jnp.stack([lo, hi], axis=1).reshape(v.shape[0] * 2, v.shape[1])  # (K, N)
    k, n = v.shape
    groups = k // w.group_size
    q = v.astype(dtype).reshape(groups, w.group_size, n)
    return (q * w.scales.astype(dtype)[:, None, :]).reshape(k, n)


def dense_linear(x: jax.Array, w) -> jax.Array:
    """x @ W on the accelerator, W float (bf16) or QWeight; bf16 in, bf16 out."""
    if isinstance(w, QWeight):
        w = dequantize(w)
    return jnp.dot(x.astype(BF16), w.astype(BF16))


def rope(cfg: GrokConfig, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotate-half RoPE over all key_size dims; x (T, H, K), positions (T,)."""
    k = cfg.key_size
    inv_freq = 1.0 / (cfg.rope_base ** (jnp.arange(0, k, 2, dtype=F32) / k))  # (K/2,)
    phase = positions.astype(F32)[:, None] * inv_freq[None, :]               # (T, K/2)
    phase = jnp.concatenate([phase, phase], axis=-1)[:, None, :]              # (T, 1, K)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(phase) + rotated * jnp.sin(phase)).astype(x.dtype)


def attend(cfg: GrokConfig, q: jax.Array, cache: KVCache, valid: jax.Array,
           positions: jax.Array) -> jax.Array:
    """Grouped-query attention of q (T, Hq, K) over the whole cache -> (T, Hq*K).

    A key is visible when it holds a real token (``valid``) at a position not
    after the query's. Query head h reads KV head h // q_group.
    """
    t = q.shape[0]
    s = cache.k.shape[0]
    qg = q.reshape(t, cfg.num_kv_heads, cfg.q_group, cfg.key_size)          # (T, Hkv, G, K)
    logits = jnp.einsum("thgd,shd->hgts", qg, cache.k).astype(F32)           # (Hkv, G, T, S)
    logits = logits * cfg.attn_output_multiplier
    cap = cfg.attn_logit_softcap
    logits = cap * jnp.tanh(logits / cap)
    visible = valid[None, :] & (jnp.arange(s)[None, :] <= positions[:, None])  # (T, S)
    logits = jnp.where(visible[None, None], logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(BF16)
    out = jnp.einsum("hgts,shd->thgd", weights, cache.v)                     # (T, Hkv, G, K)
    return out.reshape(t, cfg.q_width)


def route(cfg: GrokConfig, x: jax.Array, router: jax.Array):
    """fp32 softmax router and top-k: (probs (T, E), gates (T, k), experts (T, k))."""
    probs = jax.nn.softmax(jnp.dot(x.astype(F32), router.astype(F32),
                                   precision=jax.lax.Precision.HIGHEST), axis=-1)
    gates, experts = jax.lax.top_k(probs, cfg.num_selected_experts)
    return probs, gates, experts


def attention_block(cfg: GrokConfig, linear: Callable, lp: dict, h: jax.Array,
                    cache: KVCache, valid: jax.Array, pos: jax.Array):
    """``h + rms_norm_1(attention(rms_norm(h)))`` with the KV cache -> (h, cache)."""
    t = h.shape[0]
    positions = pos + jnp.arange(t)                                          # (T,)
    x = rms_norm(cfg, h, lp["attn_norm"])                                    # (T, D)
    q = linear(x, lp["q"]).reshape(t, cfg.num_q_heads, cfg.key_size)
    k = linear(x, lp["k"]).reshape(t, cfg.num_kv_heads, cfg.key_size)
    v = linear(x, lp["v"]).reshape(t, cfg.num_kv_heads, cfg.key_size)
    q, k = rope(cfg, q, positions), rope(cfg, k, positions)
    cache = KVCache(jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(BF16), pos, 0),
                    jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(BF16), pos, 0))
    attn = attend(cfg, q, cache, valid, positions)                           # (T, Hq*K)
    h = h + rms_norm(cfg, linear(attn, lp["o"]), lp["attn_post_norm"])
    return h, cache


def attention_qkv(cfg: GrokConfig, linear: Callable, lp: dict, h: jax.Array,
                  positions: jax.Array):
    """The projections of ``attention_block`` for rows at their own positions (T,).

    Batched decode runs these once over B sequences' rows (one read of the
    weights), then attends per sequence (``kv_write``, ``attend``); keep in
    step with ``attention_block``.
    """
    t = h.shape[0]
    x = rms_norm(cfg, h, lp["attn_norm"])                                    # (T, D)
    q = linear(x, lp["q"]).reshape(t, cfg.num_q_heads, cfg.key_size)
    k = linear(x, lp["k"]).reshape(t, cfg.num_kv_heads, cfg.key_size)
    v = linear(x, lp["v"]).reshape(t, cfg.num_kv_heads, cfg.key_size)
    return rope(cfg, q, positions), rope(cfg, k, positions), v


def kv_write(cache: KVCache, k: jax.Array, v: jax.Array, pos: jax.Array) -> KVCache:
    """The cache with rows k, v (T, Hkv, K) written from position pos."""
    return KVCache(jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(BF16), pos, 0),
                   jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(BF16), pos, 0))


def attention_output(cfg: GrokConfig, linear: Callable, lp: dict, h: jax.Array,
                     attn: jax.Array) -> jax.Array:
    """``h + rms_norm_1(attn @ o)``: the end of ``attention_block``; attn (T, Hq*K)."""
    return h + rms_norm(cfg, linear(attn, lp["o"]), lp["attn_post_norm"])


def moe_residual(cfg: GrokConfig, h: jax.Array, moe_sum: jax.Array, scale: jax.Array):
    """h + rms_norm_3(bf16(sum of gated expert outputs))."""
    return h + rms_norm(cfg, moe_sum.astype(BF16), scale)


def embed(cfg: GrokConfig, rows: jax.Array) -> jax.Array:
    """Embedding rows (T, D), any float dtype -> bf16 times the bf16-rounded multiplier."""
    return bf16_mul(rows, cfg.embedding_multiplier_scale)


def mark_valid(valid: jax.Array, tokens: jax.Array, pos: jax.Array, length: jax.Array):
    """Record which of the positions pos..pos+T hold real tokens (id > pad, within length)."""
    t = tokens.shape[0]
    real = (tokens > 0) & (jnp.arange(t) < length)
    return jax.lax.dynamic_update_slice_in_dim(valid, real, pos, 0)


def gated_sum_update(acc: jax.Array, out: jax.Array, gate: jax.Array) -> jax.Array:
    """acc + bf16(gate) * expert_out, in fp32 (the reference's weighted sum)."""
    return acc + gate.astype(BF16).astype(F32)[:, None] * out


def final_hidden(cfg: GrokConfig, h: jax.Array, final_norm: jax.Array) -> jax.Array:
    return rms_norm(cfg, h, final_norm)


def output_logits(cfg: GrokConfig, hn: jax.Array, embed_bf16: jax.Array) -> jax.Array:
    """Tied output: (hn @ E^T in bf16) times the bf16-rounded multiplier -> fp32 (T, V)."""
    logits = jnp.dot(hn.astype(BF16), embed_bf16.T.astype(BF16))
    return bf16_mul(logits, cfg.output_multiplier_scale).astype(F32)
