"""Element-wise activations of the host experts (numba): GeGLU's gelu on arithmetic only.

Grok-1's expert FFN is down(gelu_tanh(x @ gate) * (x @ up)). Between the
matmuls, the gelu of every (token, 32768) element used to call libm's tanhf,
a scalar call LLVM cannot vectorize: 11 ns an element, 5.9 ms for an expert
of 16 tokens, ~14% of that expert (the three int4 matmuls with int8
activations took 13 + 13 + 11.5 ms). Here gelu is written with an exp of
plain arithmetic (range reduction, polynomial, exponent bits), so the loop
over a row's columns vectorizes: 1.35 ms at 16 tokens, 0.25 ms at 4
(Zen 5, 2 threads; ``cpu_kernels.expert_ffn`` and ``geglu`` timed alone;
docs/PERFORMANCE.md section 3, "Session 7").
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from quant.bf16 import round_bf16_scalar

_GELU_C = np.float32(np.sqrt(2.0 / np.pi))
_GELU_COLS = 4096         # columns of one row per geglu work item


@njit(inline="always", cache=True)
def exp_f32(z):
    """exp(z) in float32 from arithmetic only, so that loops calling it vectorize
    (libm's expf/tanhf are scalar calls LLVM does not vectorize).
    z is clamped to [-87, 88] (2^n stays a normal float); z = n ln2 + r with
    |r| <= ln2 / 2 (Cody-Waite: ln2 in two parts, n ln2_hi exact); e^r by its
    Taylor series to r^7 (truncation < 6e-9 relative); times 2^n by exponent
    bits; inf above 88 (exp overflows there). Within 2 ulp of exp over the
    range (tests/test_activations.py)."""
    big = z > np.float32(88.0)
    z = min(max(z, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(z * np.float32(1.4426950408889634) + np.float32(0.5))
    r = (z - n * np.float32(0.693359375)) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    e = p * np.uint32((np.int32(n) + np.int32(127)) << 23).view(np.float32)
    return np.float32(np.inf) if big else e


@njit(inline="always", cache=True)
def gelu_tanh(v):
    """jax.nn.gelu(approximate=True) in float32: v * (1 + tanh(z)) / 2 with
    z = sqrt(2/pi) (v + 0.044715 v^3), computed as v / (1 + exp(-2z)) (the same
    function: (1 + tanh z) / 2 is the logistic of 2z) on exp_f32, which has no
    cancellation where 1 + tanh z does (v around -4). Against float64 gelu:
    within 4e-7 relative to max(|v|, 1) (tests/test_activations.py); XLA's own
    fp32 gelu differs from float64 by about as much. NaN in, NaN out."""
    z = _GELU_C * (v + np.float32(0.044715) * (v * v * v))
    return v / (np.float32(1.0) + exp_f32(np.float32(-2.0) * z))


@njit(parallel=True, fastmath={"contract"}, cache=True)
def geglu(h, u, rnd):
    """h (T, F) <- gelu(r(h)) * r(u), r = bf16 rounding if rnd, else identity:
    work items of _GELU_COLS contiguous columns of one row (a vectorized loop)."""
    T, F = h.shape
    nc = (F + _GELU_COLS - 1) // _GELU_COLS
    for item in prange(T * nc):
        t = item // nc
        j0 = (item - t * nc) * _GELU_COLS
        for j in range(j0, min(F, j0 + _GELU_COLS)):
            a = h[t, j]
            b = u[t, j]
            if rnd:
                a = round_bf16_scalar(a)
                b = round_bf16_scalar(b)
            h[t, j] = gelu_tanh(a) * b
