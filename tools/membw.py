"""Memory-bandwidth floors for the benchmarks: a pure parallel read of some bytes.

A benchmark's kernel is compared with the time to simply read the same bytes,
measured in the same run (these machines are noisy).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def parallel_sum(a):
    """Sum of a uint64 buffer in 64 parallel chunks: a pure read of its bytes."""
    n = a.size
    chunk = (n + 63) // 64
    parts = np.zeros(64, np.uint64)
    for b in prange(64):
        s = np.uint64(0)
        for i in range(b * chunk, min(n, (b + 1) * chunk)):
            s += a[i]
        parts[b] = s
    return parts.sum()


def words(a: np.ndarray) -> np.ndarray:
    """A buffer's bytes as uint64 words (a tail shorter than a word is dropped)."""
    flat = np.asarray(a).reshape(-1).view(np.uint8)
    return flat[: flat.size // 8 * 8].view(np.uint64)
