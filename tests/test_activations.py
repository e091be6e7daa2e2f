"""lowmem.activations: the arithmetic exp and gelu against float64, geglu's work items."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from numba import njit

from lowmem import activations as A

BF16 = ml_dtypes.bfloat16


def _gelu64(v):
    return 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v ** 3)))


def test_gelu_tanh_matches_jax():
    """The function of jax.nn.gelu(approximate=True): XLA's fp32 gelu and ours
    each differ from float64 by up to ~2e-7 of max(|v|, 1), hence atol 1e-6;
    the exact-erf gelu would differ by ~1e-3."""
    jax = pytest.importorskip("jax")
    v = np.linspace(-9, 9, 5001, dtype=np.float32)
    ref = np.asarray(jax.nn.gelu(v, approximate=True))
    ours = np.array([A.gelu_tanh(np.float32(a)) for a in v[::25]], np.float32)
    np.testing.assert_allclose(ours, ref[::25], rtol=2e-6, atol=1e-6)


@njit(cache=True)
def _each(fn, v):
    out = np.empty_like(v)
    for i in range(v.size):
        out[i] = fn(v[i])
    return out


_exp_each = njit(lambda v: _each(A.exp_f32, v))
_gelu_each = njit(lambda v: _each(A.gelu_tanh, v))


def testexp_f32_within_2_ulp_and_saturates():
    """The arithmetic exp (vectorizable, no libm call) against float64 exp over
    its whole range; above 88 it is inf, below -87 the float just above 0."""
    z = np.concatenate([np.linspace(-87, 88, 400_001, dtype=np.float32),
                        np.float32([0.0, 1e-8, -1e-8, 0.5, -0.5])])
    ref = np.exp(z.astype(np.float64))
    ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(_exp_each(z) - ref) / ulp) <= 2.0
    edges = _exp_each(np.float32([88.5, 1e30, np.inf, -88.0, -1e30]))
    assert np.all(np.isinf(edges[:3])) and np.all((edges[3:] >= 0) & (edges[3:] < 1e-37))


def test_gelu_tanh_against_float64():
    """gelu via v / (1 + exp(-2z)) within 4e-7 of float64 gelu relative to
    max(|v|, 1) (XLA's own fp32 gelu: 2e-7 here); 0 for very negative v, v for
    very positive, NaN through."""
    v = np.linspace(-12, 12, 400_001, dtype=np.float32)
    ref = _gelu64(v.astype(np.float64))
    err = np.abs(_gelu_each(v) - ref) / np.maximum(np.abs(v), 1.0)
    assert err.max() <= 4e-7
    edges = _gelu_each(np.float32([-1e30, 1e30, np.inf, np.nan, 0.0]))
    assert edges[0] == 0 and edges[1] == np.float32(1e30) and edges[2] == np.inf
    assert np.isnan(edges[3]) and edges[4] == 0


@pytest.mark.parametrize("rnd", [False, True])
def test_geglu_rows_of_column_items(rnd):
    """geglu's work items (_GELU_COLS columns of one row, a short last one)
    cover every element once: gelu(r(h)) * r(u) against float64 gelu on the
    same (rounded) inputs."""
    rng = np.random.default_rng(3)
    t, f = 3, 2 * A._GELU_COLS + 37
    h = (rng.standard_normal((t, f)) * 3).astype(np.float32)
    u = rng.standard_normal((t, f)).astype(np.float32)
    r = (lambda a: a.astype(BF16).astype(np.float32)) if rnd else (lambda a: a)
    ref = _gelu64(r(h).astype(np.float64)) * r(u)
    got = h.copy()
    A.geglu(got, u, rnd)
    assert np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1.0)) <= 5e-7
