"""The host's filters for one row (lowmem/host_sampling.py) against the independent
loop reference of tests/test_sampling.py and against sampling.filter_logits; the
draw after them against sampling.sample's."""
import jax
import numpy as np
import pytest

from lowmem.decoding import draw_next, sample_next
from lowmem.host_sampling import sampled_row
from lowmem.sampling import categorical

from test_sampling import (NEG, assert_same_filter, jit_filter, jit_sample, random_logits,
                           reference_filter_row)

SETTINGS = [(1.0, 0.95, 0), (0.7, 0.9, 40), (1.2, 0.5, 3000), (1.0, 1.0, 5), (1.0, 0.999, 0),
            (0.5, 0.05, 0), (1.0, 0.95, 200000), (1.7, 1e-9, 0), (0.0, 0.9, 0), (0.0, 1.0, 0),
            (1.0, 0.9, 1), (2.0, 0.3, 7)]


@pytest.mark.parametrize("seed", range(6))
def test_sampled_row_keeps_the_references_tokens(seed):
    """Smooth and tied rows (a coarse grid: many exact ties at both thresholds), every
    setting: the loop reference's kept set exactly, its values to 1 ulp."""
    for row in random_logits(seed, batch=2, vocab=3000) * (1 + seed % 3):
        for t, p, k in SETTINGS:
            want = reference_filter_row(row, t, p, k)
            assert_same_filter(sampled_row(row, t, p, k)[None], want[None])


def test_sampled_row_equals_filter_logits_on_the_vocabulary():
    """131072 logits, peaked, flat and on a grid: the same row as filter_logits (its
    capped and its bisected paths), NaN and infinities included."""
    rng = np.random.default_rng(1)
    peaked = (rng.normal(0, 1, 131072) - 8 * (np.arange(131072) > 50)).astype(np.float32)
    flat = rng.normal(0, 3, 131072).astype(np.float32)
    grid = np.round(rng.normal(0, 2, 131072)).astype(np.float32)
    odd = flat.copy()
    odd[[3, 70, 9000]] = [np.nan, np.inf, -np.inf]
    odd[[5, 6]] = [-0.0, 0.0]
    for row in (peaked, flat, grid, odd):
        for t, p, k in SETTINGS:
            want = np.asarray(jit_filter(row[None], np.float32(t), np.float32(p), np.int32(k)))
            got = sampled_row(row, t, p, k)
            assert_same_filter(got[None], want)
            assert not np.isnan(got).any()
            np.testing.assert_array_equal(np.signbit(got), np.signbit(want[0]))


def test_hand_ties_and_signed_zeros():
    """Ties at the k-th value and at the nucleus threshold are kept; -0.0 is 0.0."""
    row = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 0.0, -0.0, 0.0], np.float32)
    kept = {(1.0, 2): [1, 3], (1.0, 3): [1, 2, 3, 4], (0.5, 0): [1, 3],
            (1.0, 20): list(range(8)), (0.999, 0): list(range(8)), (1e-9, 0): [1, 3]}
    for (p, k), want in kept.items():
        got = sampled_row(row, 1.0, p, k)
        assert list(np.flatnonzero(got > NEG)) == want, (p, k)
        assert_same_filter(got[None], reference_filter_row(row, 1.0, p, k)[None])


def test_unfiltered_row_is_the_scaled_row_as_sample_draws_from():
    """No filter (top_k 0, top_p 1): the row divided by the temperature, bit for bit,
    NaN left as it is (sample's unfiltered branch draws from it so)."""
    row = np.random.default_rng(2).normal(0, 2, 5000).astype(np.float32)
    row[[17, 18]] = [np.nan, -0.0]
    for t in (0.3, 1.0, 1.9):
        got = sampled_row(row, t, 1.0, 0)
        np.testing.assert_array_equal(got, row / np.float32(t))
        assert np.signbit(got[18])
    with pytest.raises(ValueError, match=r"shape \(V,\)"):
        sampled_row(row[None], 1.0, 0.9, 0)


def test_the_draw_from_the_host_row_is_samples_draw():
    """categorical(key, sampled_row(...)) draws sample's token for every key and
    setting; draw_next splits the key and draws as decoding.sample_next (a device's
    path) does. The rows of
    two vocabulary sizes alternate (each thread's buffers are rebuilt per size)."""
    rng = np.random.default_rng(3)
    rows = [rng.normal(0, 1.5, 131072).astype(np.float32),
            rng.normal(0, 1.5, 4099).astype(np.float32)]
    draw = jax.jit(lambda row, key: categorical(key, row[None])[0])
    for seed in range(8):
        for row in rows:
            for t, p, k in [(1.0, 0.95, 0), (0.8, 0.9, 50), (1.3, 1.0, 0), (1.0, 0.6, 3000)]:
                key = jax.random.key(seed)
                want = int(jit_sample(row[None], key, np.float32(t), np.float32(p),
                                      np.int32(k))[0])
                assert int(draw(sampled_row(row, t, p, k), key)) == want
                key, sub = jax.random.split(key)
                token, after = draw_next(sampled_row(row, t, p, k), jax.random.key(seed))
                assert int(token) == int(draw(sampled_row(row, t, p, k), sub))
                assert np.array_equal(jax.random.key_data(after), jax.random.key_data(key))
                jitted, after2 = sample_next(row, jax.random.key(seed), np.float32(t),
                                             np.float32(p), np.int32(k))   # a device's path
                assert int(jitted) == int(token)
                assert np.array_equal(jax.random.key_data(after2), jax.random.key_data(key))
