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


@pytest.mark.parametrize("key_block", [None, M.KEY_BLOCK])
def test_attention_step_reads_the_cache_in_place(tiny_cfg, key_block):
    """The compiled decode step's temporaries stay below ONE fp32 copy of the cache's
    keys: with positions first, XLA transposed keys and values (two such copies)
    before its dots on every token. Both forms of attend (the whole cache, the
    host's blocks)."""
    from lowmem import engine as E
    cfg, s = tiny_cfg, 8192
    d, q_w, kv_w = cfg.emb_size, cfg.q_width, cfg.num_kv_heads * cfg.key_size
    sds = jax.ShapeDtypeStruct
    lp = {"attn_norm": sds((d,), jnp.float32), "attn_post_norm": sds((d,), jnp.float32),
          "q": sds((d, q_w), jnp.float32), "k": sds((d, kv_w), jnp.float32),
          "v": sds((d, kv_w), jnp.float32), "o": sds((q_w, d), jnp.float32)}
    cache = M.KVCache(*[sds(shape, jnp.float32) for shape in M.kv_cache_shapes(cfg, s)])
    lowered = E._attention.lower(cfg, M.dense_linear, "fp32", lp, sds((1, d), jnp.float32),
                                 cache, sds((s,), bool), 0, key_block=key_block)
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temp < s * kv_w * 4, temp



@pytest.mark.parametrize("positions", [[40], [126, 127, 128, 129], [700], [1023], [1500]])
def test_attend_by_blocks_reads_only_the_blocks_up_to_the_last_query(tiny_cfg, positions):
    """The host's form (key_block 128) on a 2048-position cache: while the latest query
    is in the first half, every position after its block is NaN. The result equals the
    numpy attention over the visible keys and is finite: no block after it was read (a
    NaN read there makes the output NaN, as the whole-cache form shows), and queries in
    later blocks (129, 700, 1023) still see every key before them. Row 126 of the
    second case sees one block, row 129 two: the running softmax joins them. Past the
    half (1500) attend reads the whole cache (a speed choice): the same result."""
    cfg, s, block = tiny_cfg, 2048, M.KEY_BLOCK
    rng = np.random.default_rng(len(positions) + positions[0])
    n = positions[-1] + 1                                           # keys written
    end = -(-n // block) * block if 2 * n <= s else s               # the positions read
    keys = rng.standard_normal((s, cfg.num_kv_heads, cfg.key_size)).astype(np.float32)
    values = rng.standard_normal((s, cfg.num_kv_heads, cfg.key_size)).astype(np.float32)
    keys[end:], values[end:] = np.nan, np.nan
    q = (3 * rng.standard_normal((len(positions), cfg.num_q_heads, cfg.key_size))
         ).astype(np.float32)
    cache = M.init_kv_cache(cfg, s, precision="fp32")[0]
    cache = M.kv_write(cache, jnp.asarray(keys), jnp.asarray(values), jnp.int32(0))
    valid = np.arange(s) < n
    valid[5] = False                                                # a pad token
    pos = np.asarray(positions, np.int32)
    args = (jnp.asarray(q), cache, jnp.asarray(valid), jnp.asarray(pos), "fp32")
    out = np.asarray(M.attend(cfg, *args, key_block=block))
    visible = valid[None, :n] & (np.arange(n)[None, :] <= pos[:, None])  # (T, n)
    want = _numpy_attention(cfg, q, keys[:n], values[:n], visible)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    if end < s:   # the whole cache: the NaN after the last block reaches the output
        assert np.isnan(np.asarray(M.attend(cfg, *args))).all()


def test_attend_by_blocks_equals_the_whole_cache_form(tiny_cfg):
    """A 16-token chunk at positions 230-245 of a 1024-position cache (blocks 0 and 1): the
    two forms agree to fp32 rounding (and differ: the loop ran), also with blocks of 256
    (a cache of 4 blocks); a block that does not divide the cache, or a cache of fewer
    than 2 blocks, means the whole cache."""
    cfg, s = tiny_cfg, 1024
    rng = np.random.default_rng(7)
    kv = rng.standard_normal((246, cfg.num_kv_heads, cfg.key_size)).astype(np.float32)
    cache = M.init_kv_cache(cfg, s, precision="fp32")[0]
    cache = M.kv_write(cache, jnp.asarray(kv), jnp.asarray(-kv), jnp.int32(0))
    q = jnp.asarray(3 * rng.standard_normal((16, cfg.num_q_heads, cfg.key_size)), jnp.float32)
    valid, pos = jnp.arange(s) < 246, jnp.arange(230, 246, dtype=jnp.int32)
    whole = np.asarray(M.attend(cfg, q, cache, valid, pos, "fp32"))
    for block in (128, 256):
        blocks = np.asarray(M.attend(cfg, q, cache, valid, pos, "fp32", key_block=block))
        np.testing.assert_allclose(blocks, whole, rtol=1e-5, atol=1e-6)
        assert not np.array_equal(blocks, whole)   # the loop ran: its sums differ somewhere
    for other in (96, 1024):                    # 1024 % 96, and 1 block of 1024
        np.testing.assert_array_equal(
            np.asarray(M.attend(cfg, q, cache, valid, pos, "fp32", key_block=other)), whole)


def test_bf16_cache_stores_bit_patterns_and_attends_as_their_values(tiny_cfg):
    """The bf16 precision's cache is uint16: kv_write stores each value rounded to bf16
    (its bits), ``attend`` reads them back as those values exactly (the same output
    as an fp32 cache holding the rounded values), and the compiled write touches no
    fp32 copy of the cache (XLA:CPU rewrote a bf16 cache whole, through fp32, per
    token)."""
    cfg, s = tiny_cfg, 4096
    rng = np.random.default_rng(3)
    kv = rng.standard_normal((2, 40, cfg.num_kv_heads, cfg.key_size)).astype(np.float32)
    rounded = kv.astype(jnp.bfloat16).astype(np.float32)
    packed = M.init_kv_cache(cfg, s, precision="bf16")[0]
    assert packed.k.dtype == packed.v.dtype == jnp.uint16 == M.cache_dtype("bf16")
    packed = M.kv_write(packed, jnp.asarray(kv[0]), jnp.asarray(kv[1]), jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(M.cache_values(packed.k))[:, :40],
                                  rounded[0].transpose(1, 0, 2))
    plain = M.init_kv_cache(cfg, s, precision="fp32")[0]
    plain = M.kv_write(plain, jnp.asarray(rounded[0]), jnp.asarray(rounded[1]), jnp.int32(0))
    q = jnp.asarray(rng.standard_normal((3, cfg.num_q_heads, cfg.key_size)), jnp.float32)
    valid, pos = jnp.arange(s) < 40, jnp.arange(37, 40, dtype=jnp.int32)
    for block in (None, M.KEY_BLOCK):
        np.testing.assert_array_equal(
            np.asarray(M.attend(cfg, q, packed, valid, pos, "bf16", block)),
            np.asarray(M.attend(cfg, q, plain, valid, pos, "bf16", block)))
    write = jax.jit(M.kv_write, donate_argnums=0).lower(
        packed, jnp.asarray(kv[0, :1]), jnp.asarray(kv[1, :1]), jnp.int32(40)).compile()
    whole = f"f32[{cfg.num_kv_heads},{s},{cfg.key_size}]"
    assert whole not in write.as_text()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("pos", [0, 5, 21])
def test_numba_decode_row_attention_matches_numpy_and_xla(tiny_cfg, precision, pos):
    """attention_kernels.attend_row (the host's decode row): against the fp64 numpy
    reference on the cache's stored values, and against model.attend (both forms)
    to fp32 rounding; in 'bf16' its output is rounded to bf16 as attend's, so an
    element may differ by one bf16 step where the fp32 values straddle a rounding
    boundary. Keys at invalid positions and after pos are never seen."""
    from lowmem.attention_kernels import attend_row
    cfg, s = tiny_cfg, 32
    rng = np.random.default_rng(pos)
    keys = (2 * rng.standard_normal((s, cfg.num_kv_heads, cfg.key_size))).astype(np.float32)
    values = rng.standard_normal((s, cfg.num_kv_heads, cfg.key_size)).astype(np.float32)
    q = (3 * rng.standard_normal((1, cfg.num_q_heads, cfg.key_size))).astype(np.float32)
    cache = M.init_kv_cache(cfg, s, precision=precision)[0]
    cache = M.kv_write(cache, jnp.asarray(keys), jnp.asarray(values), jnp.int32(0))
    valid = rng.random(s) < 0.7
    valid[pos] = True
    got = attend_row(cfg, q, np.asarray(cache.k), np.asarray(cache.v), valid, pos, precision)
    stored_k = np.asarray(M.cache_values(cache.k)).transpose(1, 0, 2)          # (S, Hkv, K)
    stored_v = np.asarray(M.cache_values(cache.v)).transpose(2, 0, 1)          # (S, Hkv, K)
    visible = (valid & (np.arange(s) <= pos))[None, :]                          # (1, S)
    want = _numpy_attention(cfg, q, stored_k, stored_v, visible)                 # (1, Hq*K)
    step = 2.0 ** -7 if precision == "bf16" else 2e-6   # bf16: 8 significant bits
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= step * np.abs(want) + 1e-6), np.abs(got - want).max()
    for key_block in (None, 8):
        xla = np.asarray(M.attend(cfg, jnp.asarray(q), cache, jnp.asarray(valid),
                                  jnp.asarray([pos]), precision, key_block))
        assert np.all(np.abs(got - xla) <= step * np.abs(xla) + 1e-6)
        if precision == "bf16":   # bf16 values, and mostly XLA's very ones
            np.testing.assert_array_equal(got, got.astype(jnp.bfloat16).astype(np.float32))
            assert np.mean(got != xla) < 0.02


def test_numba_decode_row_attention_refuses_a_row_that_sees_no_key(tiny_cfg):
    from lowmem.attention_kernels import attend_row
    cfg = tiny_cfg
    cache = M.init_kv_cache(cfg, 16, precision="fp32")[0]
    q = np.ones((1, cfg.num_q_heads, cfg.key_size), np.float32)
    valid = np.zeros(16, bool)
    valid[6] = True                                                 # after the row
    with pytest.raises(ValueError, match="no valid key at positions 0..3"):
        attend_row(cfg, q, np.asarray(cache.k), np.asarray(cache.v), valid, 3, "fp32")
