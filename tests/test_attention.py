"""The KV cache's head-major layout: writes land where ``attend`` reads them, ``attend``
equals an independent numpy grouped-query attention, and the compiled step reads
the cache in place (no transposed copy per token)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowmem import model as M


def _numpy_attention(cfg, q, keys, values, visible):
    """Grouped-query attention written per head with numpy: q (T, Hq, K), keys and
    values (S, Hkv, K) by position, visible (T, S) -> (T, Hq*K) fp64."""
    t = q.shape[0]
    out = np.zeros((t, cfg.num_q_heads, cfg.key_size))
    cap = cfg.attn_logit_softcap
    for head in range(cfg.num_q_heads):
        kv = head // cfg.q_group
        logits = q[:, head, :].astype(np.float64) @ keys[:, kv, :].T.astype(np.float64)
        logits = cap * np.tanh(logits * cfg.attn_output_multiplier / cap)  # (T, S)
        logits = np.where(visible, logits, -np.inf)
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        out[:, head, :] = w @ values[:, kv, :].astype(np.float64)
    return out.reshape(t, -1)


def test_kv_write_lands_by_head_and_position(tiny_cfg):
    cfg = tiny_cfg
    cache = M.init_kv_cache(cfg, 16, precision="fp32")[0]
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, cfg.num_kv_heads, cfg.key_size)).astype(np.float32)
    v = rng.standard_normal((3, cfg.num_kv_heads, cfg.key_size)).astype(np.float32)
    cache = M.kv_write(cache, jnp.asarray(k), jnp.asarray(v), jnp.int32(5))
    ck, cv = np.asarray(cache.k), np.asarray(cache.v)
    assert ck.shape == (cfg.num_kv_heads, 16, cfg.key_size)
    assert cv.shape == (cfg.num_kv_heads, cfg.key_size, 16)
    np.testing.assert_array_equal(ck[:, 5:8, :], k.transpose(1, 0, 2))
    np.testing.assert_array_equal(cv[:, :, 5:8], v.transpose(1, 2, 0))
    untouched = np.ones(16, bool)
    untouched[5:8] = False
    assert not ck[:, untouched].any() and not cv[:, :, untouched].any()


@pytest.mark.parametrize("t", [1, 4])
def test_attend_matches_numpy_reference(tiny_cfg, t):
    """fp32: written rows at positions 0..S-3 (one of them padding), queries at the
    last T of them; causal and validity masks as the release."""
    cfg, s = tiny_cfg, 24
    rng = np.random.default_rng(t)
    n = s - 2
    keys = rng.standard_normal((n, cfg.num_kv_heads, cfg.key_size)).astype(np.float32)
    values = rng.standard_normal((n, cfg.num_kv_heads, cfg.key_size)).astype(np.float32)
    q = (3 * rng.standard_normal((t, cfg.num_q_heads, cfg.key_size))).astype(np.float32)
    cache = M.init_kv_cache(cfg, s, precision="fp32")[0]
    cache = M.kv_write(cache, jnp.asarray(keys), jnp.asarray(values), jnp.int32(0))
    valid = np.arange(s) < n
    valid[3] = False                                                # a pad token
    positions = np.arange(n - t, n)
    out = M.attend(cfg, jnp.asarray(q), cache, jnp.asarray(valid), jnp.asarray(positions), "fp32")
    visible = valid[None, :n] & (np.arange(n)[None, :] <= positions[:, None])  # (T, n)
    want = _numpy_attention(cfg, q, keys, values, visible)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_attention_step_reads_the_cache_in_place(tiny_cfg):
    """The compiled decode step's temporaries stay below ONE fp32 copy of the cache's
    keys: with positions first, XLA transposed keys and values (two such copies)
    before its dots on every token."""
    from lowmem import engine as E
    cfg, s = tiny_cfg, 8192
    d, q_w, kv_w = cfg.emb_size, cfg.q_width, cfg.num_kv_heads * cfg.key_size
    sds = jax.ShapeDtypeStruct
    lp = {"attn_norm": sds((d,), jnp.float32), "attn_post_norm": sds((d,), jnp.float32),
          "q": sds((d, q_w), jnp.float32), "k": sds((d, kv_w), jnp.float32),
          "v": sds((d, kv_w), jnp.float32), "o": sds((q_w, d), jnp.float32)}
    cache = M.KVCache(*[sds(shape, jnp.float32) for shape in M.kv_cache_shapes(cfg, s)])
    lowered = E._attention.lower(cfg, M.dense_linear, "fp32", lp, sds((1, d), jnp.float32),
                                 cache, sds((s,), bool), 0)
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temp < s * kv_w * 4, temp
