"""Grok-1's resident computation in JAX: embedding, attention, routing, logits.

Everything except the routed experts. Each function is pure and jit-friendly,
takes the config explicitly, and follows SPEC.md section 2: fp32 norms/router/
softmax, soft-capped attention logits, raw top-2 gates.

``precision`` ('bf16' or 'fp32', a static argument of every jitted step), as
``lowmem.reference``'s modes: 'fp32' is the exact math (activations, norms,
softmax, gelu, the MoE sum and the logits in fp32, weights dequantized exactly,
constants unrounded). 'bf16' is the release's default run as it executes under
jit (docs/FIDELITY.md: the roundings its optimized HLO keeps): the same fp32
arithmetic, except that the q, k and v projection outputs are rounded to bf16,
the KV cache holds keys (after RoPE) and values in bf16 (stored as their bit
patterns, ``cache_dtype``), the attention output
is rounded to bf16, the logits are rounded to bf16 after a bf16 output
multiplier, and python-float constants are bf16 values.

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
from quant.qweight import QWeight, untile

BF16 = jnp.bfloat16
F32 = jnp.float32
MASK_VALUE = -1e30
PRECISIONS = ("fp32", "bf16")
KEY_BLOCK = 128    # cache positions per step of ``attend``'s loop (key_block), the host's choice


def act_dtype(precision: str):
    """The KV cache's dtype in a precision ('bf16' or 'fp32'); activations are fp32 in both."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return F32 if precision == "fp32" else BF16


def round_act(x: jax.Array, precision: str) -> jax.Array:
    """fp32 x rounded to bf16 values in 'bf16' (one of the release's kept roundings)."""
    return x.astype(BF16).astype(F32) if act_dtype(precision) == BF16 else x.astype(F32)


class KVCache(NamedTuple):
    """One layer's keys (after RoPE) and values; preallocated, updated in place.

    Head-major, laid out as ``attend``'s two products read them: keys (Hkv, S, K),
    values (Hkv, K, S). With the positions first, XLA copied (transposed) the
    whole cache twice per layer and token before its dots (0.2 ms per layer at
    512 rows, 30+ ms at 8192); in these layouts the dots read it in place.
    """
    k: jax.Array  # (Hkv, S, K) cache_dtype(precision)
    v: jax.Array  # (Hkv, K, S)


def cache_dtype(precision: str):
    """The KV cache's storage dtype: fp32 in 'fp32'; in 'bf16' uint16, the bf16 values'
    bit patterns. XLA:CPU normalizes a bf16 ``dynamic_update_slice`` to fp32 over the
    whole array, so a bf16 cache was rewritten whole for every token written (2.8 ms
    a layer at 8192 positions); a uint16 one is updated in place (0.01 ms)."""
    return F32 if act_dtype(precision) == F32 else jnp.uint16


def cache_values(part: jax.Array) -> jax.Array:
    """A stored cache array (or a block of one) as fp32 values."""
    if part.dtype == jnp.uint16:   # bf16 bits: the high half of the fp32 word
        return jax.lax.bitcast_convert_type(part.astype(jnp.uint32) << 16, F32)
    return part.astype(F32)


def _cache_store(x: jax.Array, dtype) -> jax.Array:
    """fp32 rows in a cache's storage dtype (uint16: rounded to bf16, its bits)."""
    if dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(BF16), jnp.uint16)
    return x.astype(dtype)


def kv_cache_shapes(cfg: GrokConfig, length: int) -> KVCache:
    """The shapes of one layer's cache of ``length`` positions (keys, values)."""
    return KVCache((cfg.num_kv_heads, length, cfg.key_size),
                   (cfg.num_kv_heads, cfg.key_size, length))


def init_kv_cache(cfg: GrokConfig, length: int, device=None, precision: str = "bf16"
                  ) -> list[KVCache]:
    dtype = cache_dtype(precision)
    zeros = lambda shape: jax.device_put(jnp.zeros(shape, dtype), device)  # noqa: E731
    return [KVCache(*map(zeros, kv_cache_shapes(cfg, length))) for _ in range(cfg.num_layers)]


def scale_act(x: jax.Array, constant: float, precision: str) -> jax.Array:
    """fp32 activation times a python float, the constant a bf16 value in 'bf16'."""
    if precision == "fp32":
        return x.astype(F32) * jnp.float32(constant)
    return x.astype(F32) * jnp.asarray(constant, BF16).astype(F32)


def rms_norm(cfg: GrokConfig, x: jax.Array, scale: jax.Array, precision: str = "bf16"
             ) -> jax.Array:
    """fp32 RMSNorm with the scale used as stored; fp32 out in both precisions."""
    xf = x.astype(F32)
    ms = jnp.mean(xf * xf, axis=-1, keepdims=True)
    out = xf * jax.lax.rsqrt(ms + cfg.rms_norm_eps) * scale.astype(F32)
    act_dtype(precision)
    return out


def dequantize(w: QWeight, dtype=BF16) -> jax.Array:
    """(K, N) weights from int8 or packed int4 values: ``int * scale`` rounded to dtype
    (int4 with a level table: ``levels[nibble] * scale``).

    The reference computes ``weight.astype(bf16) * scales`` in bf16, so the
    dequantized weights themselves are bf16 values; in fp32 the product of an
    int8 (or int4) and a bf16 scale is exact.
    """
    v = w.values[:, :w.scales.shape[-1]]          # (K or K/2, N): without any row padding
    if w.tiled:
        v = untile(v, w.bits)                     # (K or K/2, N) in row order
    if w.bits == 4 and w.levels is not None:      # nibble -> its level (QWeight.levels)
        table = jnp.asarray(w.levels, jnp.int8)                                   # (16,)
        lo, hi = table[v & jnp.uint8(15)], table[v >> jnp.uint8(4)]               # (K/2, N) int8
        v = jnp.stack([lo, hi], axis=1).reshape(v.shape[0] * 2, v.shape[1])      # (K, N)
    elif w.bits == 4:
        as_i8 = lambda a: jax.lax.bitcast_convert_type(a, jnp.int8)  # noqa: E731
        lo = jax.lax.shift_right_arithmetic(as_i8(jax.lax.shift_left(v, jnp.uint8(4))), jnp.int8(4))
        hi = jax.lax.shift_right_arithmetic(as_i8(v), jnp.int8(4))
        v = jnp.stack([lo, hi], axis=1).reshape(v.shape[0] * 2, v.shape[1])  # (K, N)
    k, n = v.shape
    groups = k // w.group_size
    q = v.astype(dtype).reshape(groups, w.group_size, n)
    return (q * w.scales.astype(dtype)[:, None, :]).reshape(k, n)


def dense_linear(x: jax.Array, w, precision: str = "bf16") -> jax.Array:
    """x @ W on the accelerator, W float (bf16) or QWeight; fp32 in and out (both precisions).

    Weights dequantized exactly; Precision.HIGHEST: a GPU would otherwise run the
    dot as TF32 (or bf16), which the release as executed on CPU does not round.
    """
    act_dtype(precision)
    if isinstance(w, QWeight):
        w = dequantize(w, F32)
    return jnp.dot(x.astype(F32), w.astype(F32), precision=jax.lax.Precision.HIGHEST)


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
           positions: jax.Array, precision: str = "bf16", key_block: int | None = None
           ) -> jax.Array:
    """Grouped-query attention of q (T, Hq, K) over the cache -> (T, Hq*K).

    A key is visible when it holds a real token (``valid``) at a position not
    after the query's. Query head h reads KV head h // q_group.

    key_block None: one softmax over the whole cache, whatever its filled part.
    key_block B (static; a divisor of the cache length, which must hold at least 2
    blocks, else the whole cache is read): while the latest query's position is in
    the cache's first half, a loop over the blocks of B positions up to it with a
    running (online) softmax, so the cost follows the filled part; past the half,
    the whole cache (the loop's per-block cost then exceeds the saving; not for the
    bf16 precision's cache, whose conversion to fp32 the loop does block by block:
    22 ms against 36 at the end of an 8192 cache). On XLA:CPU,
    Grok-1's attention step for one token at position 20 of an 8192-position cache
    took 4.0 ms instead of 11.6, a 16-token chunk 14.7 ms instead of 61
    (docs/PERFORMANCE.md). The backend chooses: the host backend the loop
    (``KEY_BLOCK``), the device backend the whole cache (a loop whose trip count is
    only known on the device costs a GPU a read-back per block). The two forms agree
    to fp32 rounding (the sums' order differs).
    """
    s = cache.k.shape[1]
    if key_block is None or s < 2 * key_block or s % key_block:
        return _attend_whole(cfg, q, cache, valid, positions, precision)
    if cache.k.dtype == jnp.uint16:   # bf16 bits: the whole form converts the whole cache
        return _attend_blocks(cfg, q, cache, valid, positions, precision, key_block)
    return jax.lax.cond(
        (jnp.max(positions) + 1) * 2 > s,
        lambda *a: _attend_whole(cfg, *a, precision),
        lambda *a: _attend_blocks(cfg, *a, precision, key_block), q, cache, valid, positions)


def _attention_logits(cfg: GrokConfig, qg: jax.Array, keys: jax.Array, valid: jax.Array,
                      index: jax.Array, positions: jax.Array) -> jax.Array:
    """Soft-capped logits of grouped queries qg (T, Hkv, G, K) against keys (Hkv, S, K)
    at cache positions index (S,), MASK_VALUE where a key is invalid (valid (S,)) or
    after the row's position -> fp32 (Hkv, G, T, S)."""
    logits = jnp.einsum("thgd,hsd->hgts", qg.astype(F32), cache_values(keys),
                        precision=jax.lax.Precision.HIGHEST)                 # (Hkv, G, T, S)
    logits = logits * cfg.attn_output_multiplier
    cap = cfg.attn_logit_softcap
    logits = cap * jnp.tanh(logits / cap)
    visible = valid[None, :] & (index[None, :] <= positions[:, None])        # (T, S)
    return jnp.where(visible[None, None], logits, MASK_VALUE)


def _attend_whole(cfg: GrokConfig, q: jax.Array, cache: KVCache, valid: jax.Array,
                  positions: jax.Array, precision: str) -> jax.Array:
    """``attend`` as one softmax over every cache position -> (T, Hq*K)."""
    t, s = q.shape[0], cache.k.shape[1]
    qg = q.reshape(t, cfg.num_kv_heads, cfg.q_group, cfg.key_size)          # (T, Hkv, G, K)
    logits = _attention_logits(cfg, qg, cache.k, valid, jnp.arange(s), positions)
    weights = jax.nn.softmax(logits, axis=-1)                                # fp32
    out = jnp.einsum("hgts,hds->thgd", weights, cache_values(cache.v),
                     precision=jax.lax.Precision.HIGHEST)                    # (T, Hkv, G, K)
    return round_act(out.reshape(t, cfg.q_width), precision)                # (T, Hq*K)


def _attend_blocks(cfg: GrokConfig, q: jax.Array, cache: KVCache, valid: jax.Array,
                   positions: jax.Array, precision: str, block: int) -> jax.Array:
    """``attend`` over the blocks of ``block`` positions that hold a visible key, with a
    running max m, sum l and weighted sum acc per (head, row) -> (T, Hq*K).

    A row's masked keys weigh exp(MASK_VALUE - m) = 0 once any visible key has been
    seen; a block before its first visible key leaves garbage that the next
    block's rescaling exp(m_old - m_new) = 0 clears."""
    t = q.shape[0]
    hkv, g, kd = cfg.num_kv_heads, cfg.q_group, cfg.key_size
    qg = q.reshape(t, hkv, g, kd)                                           # (T, Hkv, G, K)
    blocks = (jnp.max(positions) + block) // block                          # up to the last row's

    def step(b, carry):
        m, l, acc = carry                                                   # (Hkv, G, T) x2, (.., K)
        start = b * block
        keys = jax.lax.dynamic_slice_in_dim(cache.k, start, block, 1)        # (Hkv, B, K)
        values = jax.lax.dynamic_slice_in_dim(cache.v, start, block, 2)      # (Hkv, K, B)
        seen = jax.lax.dynamic_slice_in_dim(valid, start, block)            # (B,)
        logits = _attention_logits(cfg, qg, keys, seen, start + jnp.arange(block),
                                   positions)                                # (Hkv, G, T, B)
        m_new = jnp.maximum(m, logits.max(axis=-1))                          # (Hkv, G, T)
        rescale = jnp.exp(m - m_new)
        p = jnp.exp(logits - m_new[..., None])                               # (Hkv, G, T, B)
        acc = acc * rescale[..., None] + jnp.einsum(
            "hgts,hds->hgtd", p, cache_values(values), precision=jax.lax.Precision.HIGHEST)
        return m_new, l * rescale + p.sum(axis=-1), acc

    init = (jnp.full((hkv, g, t), -jnp.inf, F32), jnp.zeros((hkv, g, t), F32),
            jnp.zeros((hkv, g, t, kd), F32))
    _, l, acc = jax.lax.fori_loop(0, blocks, step, init)
    out = jnp.transpose(acc / l[..., None], (2, 0, 1, 3))                    # (T, Hkv, G, K)
    return round_act(out.reshape(t, cfg.q_width), precision)                # (T, Hq*K)


def route(cfg: GrokConfig, x: jax.Array, router: jax.Array):
    """fp32 softmax router and top-k: (probs (T, E), gates (T, k), experts (T, k))."""
    probs = jax.nn.softmax(jnp.dot(x.astype(F32), router.astype(F32),
                                   precision=jax.lax.Precision.HIGHEST), axis=-1)
    gates, experts = jax.lax.top_k(probs, cfg.num_selected_experts)
    return probs, gates, experts


def attention_block(cfg: GrokConfig, linear: Callable, precision: str, lp: dict, h: jax.Array,
                    cache: KVCache, valid: jax.Array, pos: jax.Array,
                    rows: jax.Array | None = None, key_block: int | None = None):
    """``h + rms_norm_1(attention(rms_norm(h)))`` with the KV cache -> (h, cache).
    rows: the number of real (not padding) leading rows of h, or None; see _rows_kw.
    key_block: see attend (static)."""
    q, k, v = attention_products(cfg, linear, precision, lp, h, rows)        # (T, N) each
    attn, cache = attention_core(cfg, precision, q, k, v, cache, valid, pos, key_block)
    return attention_output(cfg, linear, precision, lp, h, attn, rows), cache


def _rows_kw(linear: Callable, rows: jax.Array | None) -> dict:
    """``{"rows": rows}`` for a linear that can skip rows (``skips_rows``: the host
    backend's, and its fused ``qkv``), else ``{}``. rows: how many leading rows of
    x are real (a traced int32, or None: all). A prompt chunk padded to its
    bucket (11 tokens -> 16) or a batch padded to a compiled size would otherwise
    pay the padding rows' multiply-adds; their outputs are 0 instead, and nothing
    reads them (their keys are invalid, their rows skip the experts and logits)."""
    return {"rows": rows} if rows is not None and getattr(linear, "skips_rows", False) else {}


def attention_qkv(cfg: GrokConfig, linear: Callable, precision: str, lp: dict, h: jax.Array,
                  positions: jax.Array, rows: jax.Array | None = None):
    """Queries, keys (both after RoPE) and values of rows at their own positions (T,).

    Batched decode runs these once over B sequences' rows (one read of the
    weights), then writes and attends per sequence. A ``linear`` with a ``qkv``
    attribute (the host backend's ``host_qkv``) computes the three products in
    one call: one hand-over to the host kernels per layer instead of three.
    rows: see _rows_kw.
    """
    q, k, v = attention_products(cfg, linear, precision, lp, h, rows)
    return attention_heads(cfg, precision, q, k, v, positions)


def attention_products(cfg: GrokConfig, linear: Callable, precision: str, lp: dict,
                       h: jax.Array, rows: jax.Array | None = None):
    """The q, k, v products of rms_norm(h) (T, D): fp32 (T, Hq*K), (T, Hkv*K) x2."""
    x = rms_norm(cfg, h, lp["attn_norm"], precision)                         # (T, D)
    fused = getattr(linear, "qkv", None)   # the host's three products in one callback
    kw = _rows_kw(linear, rows)
    if fused is not None:
        return fused(x, lp["q"], lp["k"], lp["v"], precision, **kw)
    return tuple(linear(x, lp[role], precision, **kw) for role in ("q", "k", "v"))


def attention_heads(cfg: GrokConfig, precision: str, q: jax.Array, k: jax.Array, v: jax.Array,
                    positions: jax.Array):
    """The q, k, v products (T, Hq*K), (T, Hkv*K), (T, Hkv*K) as rounded heads, q and k
    after RoPE at positions (T,)."""
    t = q.shape[0]
    q = round_act(q, precision).reshape(t, cfg.num_q_heads, cfg.key_size)    # (T, Hq, K)
    k = round_act(k, precision).reshape(t, cfg.num_kv_heads, cfg.key_size)   # (T, Hkv, K)
    v = round_act(v, precision).reshape(t, cfg.num_kv_heads, cfg.key_size)   # (T, Hkv, K)
    return rope(cfg, q, positions), rope(cfg, k, positions), v


def kv_write(cache: KVCache, k: jax.Array, v: jax.Array, pos: jax.Array) -> KVCache:
    """The cache with rows k, v (T, Hkv, K) written from position pos (in the cache's
    storage dtype, see cache_dtype)."""
    kh = _cache_store(jnp.transpose(k, (1, 0, 2)), cache.k.dtype)           # (Hkv, T, K)
    vh = _cache_store(jnp.transpose(v, (1, 2, 0)), cache.v.dtype)           # (Hkv, K, T)
    return KVCache(jax.lax.dynamic_update_slice_in_dim(cache.k, kh, pos, 1),
                   jax.lax.dynamic_update_slice_in_dim(cache.v, vh, pos, 2))


def heads_into_cache(cfg: GrokConfig, precision: str, q: jax.Array, k: jax.Array,
                     v: jax.Array, cache: KVCache, pos: jax.Array) -> tuple[jax.Array, KVCache]:
    """The first half of attention_core: the q, k, v products of rows from position
    pos -> (their queries after RoPE (T, Hq, K), the cache with their keys and
    values). The host engine attends a decode row in numba after it."""
    positions = pos + jnp.arange(q.shape[0])                                 # (T,)
    q, k, v = attention_heads(cfg, precision, q, k, v, positions)            # (T, H, K)
    return q, kv_write(cache, k, v, pos)


def attention_core(cfg: GrokConfig, precision: str, q: jax.Array, k: jax.Array, v: jax.Array,
                   cache: KVCache, valid: jax.Array, pos: jax.Array,
                   key_block: int | None = None) -> tuple[jax.Array, KVCache]:
    """An attention block between its products (attention_block's middle; the host
    engine's between its own kernels): the q, k, v products of rows from position
    pos -> (attn (T, Hq*K), the cache with their keys and values)."""
    q, cache = heads_into_cache(cfg, precision, q, k, v, cache, pos)        # (T, Hq, K)
    positions = pos + jnp.arange(q.shape[0])                                 # (T,)
    return attend(cfg, q, cache, valid, positions, precision, key_block), cache


def attention_output(cfg: GrokConfig, linear: Callable, precision: str, lp: dict, h: jax.Array,
                     attn: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """``h + rms_norm_1(attn @ o)``: the end of an attention block; attn (T, Hq*K);
    rows: see _rows_kw."""
    out = linear(attn, lp["o"], precision, **_rows_kw(linear, rows))         # (T, D)
    return attention_residual(cfg, precision, lp["attn_post_norm"], h, out)


def attention_residual(cfg: GrokConfig, precision: str, norm: jax.Array, h: jax.Array,
                       out: jax.Array) -> jax.Array:
    """``h + rms_norm_1(out)``, out the o product (T, D)."""
    return h + rms_norm(cfg, out, norm, precision)


def moe_residual(cfg: GrokConfig, precision: str, h: jax.Array, moe_sum: jax.Array,
                 scale: jax.Array):
    """h + rms_norm_3(fp32 sum of gated expert outputs), fp32 in both precisions."""
    return h + rms_norm(cfg, moe_sum.astype(F32), scale, precision)


def embed(cfg: GrokConfig, precision: str, rows: jax.Array) -> jax.Array:
    """Embedding rows (T, D), any float dtype -> activations times the multiplier."""
    return scale_act(rows, cfg.embedding_multiplier_scale, precision)


def mark_valid(valid: jax.Array, tokens: jax.Array, pos: jax.Array, length: jax.Array):
    """Record which of the positions pos..pos+T hold real tokens (id > pad, within length)."""
    t = tokens.shape[0]
    real = (tokens > 0) & (jnp.arange(t) < length)
    return jax.lax.dynamic_update_slice_in_dim(valid, real, pos, 0)


def gated_sum_update(acc: jax.Array, out: jax.Array, gate: jax.Array) -> jax.Array:
    """acc + gate * expert_out in fp32, the gate unrounded in both precisions."""
    return acc + gate.astype(F32)[:, None] * out


def final_hidden(cfg: GrokConfig, h: jax.Array, final_norm: jax.Array,
                 precision: str = "bf16") -> jax.Array:
    return rms_norm(cfg, h, final_norm, precision)


def output_logits(cfg: GrokConfig, hn: jax.Array, embed_bf16: jax.Array,
                  precision: str = "bf16") -> jax.Array:
    """Tied output: (hn @ E^T) times the output multiplier -> fp32 (T, V).

    The bf16 table read exactly, fp32 accumulation; then ``round_logits``.
    """
    logits = jnp.dot(hn.astype(F32), embed_bf16.T.astype(F32),
                     precision=jax.lax.Precision.HIGHEST)                  # (T, V) fp32
    return round_logits(cfg, logits, precision)


def round_logits(cfg: GrokConfig, logits: jax.Array, precision: str) -> jax.Array:
    """fp32 logits (T, V) times the output multiplier: exact in 'fp32'; in 'bf16' the
    multiplier is a bf16 value and the product is rounded to bf16 (as the release)."""
    if precision == "fp32":
        return logits * jnp.float32(cfg.output_multiplier_scale)
    return scale_act(logits, cfg.output_multiplier_scale, precision).astype(BF16).astype(F32)
