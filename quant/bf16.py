"""fp32 -> bf16 rounding (nearest even): the one primitive for numba code.

numba has no bf16 type, so kernels round through the float32 bit pattern:
``round_bf16_bits`` (and ``round_bf16_scalar``, ``round_bf16_inplace`` built on
it) is the only implementation in the project; numpy code uses ml_dtypes
(``x.astype(BF16)``), which it matches bit for bit (tests/test_kernels.py).

The embeddings (131072 x 6144 fp32, 3.2 GB) are stored as bf16; numpy's
``astype(bfloat16)`` plus a float64 error pass takes over ten seconds for them,
this kernel a fraction of a second. Bit-identical to ml_dtypes' conversion
(round to nearest even; NaN becomes a quiet NaN). Error sums are reduced per row
in a fixed order, so they do not depend on the thread count.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from quant.qweight import BF16


@njit(cache=True)
def round_bf16_bits(b):
    """uint32 float32 bit pattern -> the nearest-even bf16's pattern (low 16 bits zero).

    NaN becomes the canonical quiet NaN with its sign (as ml_dtypes does);
    overflow rounds to infinity.
    """
    if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint32((b & np.uint32(0x80000000)) | np.uint32(0x7FC00000))
    return np.uint32((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))
                     & np.uint32(0xFFFF0000))


@njit(cache=True)
def round_bf16_scalar(v):
    """float32 -> float32 holding the nearest bf16 (numba-callable)."""
    return np.uint32(round_bf16_bits(np.float32(v).view(np.uint32))).view(np.float32)


@njit(cache=True)
def round_bf16_inplace(values):
    """Round a 1-D float32 array to bf16 values in place."""
    bits = values.view(np.uint32)
    for j in range(bits.shape[0]):
        bits[j] = round_bf16_bits(bits[j])


@njit(parallel=True, cache=True, nogil=True)
def _round_rows(w, bits, out, err, norm):
    """w: fp32 (R, C) and ``bits``, its uint32 view; out: uint16 (R, C) bf16 bit
    patterns; err/norm: per-row squared rounding error and squared norm."""
    rows, cols = bits.shape
    for r in prange(rows):
        src, dst = bits[r], out[r]
        rounded = np.empty(cols, np.uint32)
        for j in range(cols):
            rounded[j] = round_bf16_bits(src[j])
            dst[j] = np.uint16(rounded[j] >> np.uint32(16))
        y = rounded.view(np.float32)
        x = w[r]
        e = 0.0
        s = 0.0
        for j in range(cols):
            d = np.float64(x[j]) - np.float64(y[j])
            e += d * d
            s += np.float64(x[j]) * np.float64(x[j])
        err[r] = e
        norm[r] = s


def to_bf16(w: np.ndarray) -> tuple[np.ndarray, float]:
    """bf16 copy of fp32 ``w`` (any shape) and the relative Frobenius error of the rounding."""
    w = np.ascontiguousarray(w, np.float32)
    flat = w.reshape(-1, w.shape[-1]) if w.ndim > 1 else w.reshape(1, -1)   # (R, C)
    out = np.empty(flat.shape, np.uint16)
    err, norm = np.zeros(flat.shape[0]), np.zeros(flat.shape[0])
    _round_rows(flat, flat.view(np.uint32), out, err, norm)
    total_err, total_norm = float(err.sum()), float(norm.sum())
    rel = math.sqrt(total_err / total_norm) if total_norm > 0 else 0.0
    return out.view(BF16).reshape(w.shape), rel
