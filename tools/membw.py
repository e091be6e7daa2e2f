"""Memory-bandwidth floors for the benchmarks: a pure parallel read of some bytes.

A benchmark's kernel is compared with the time to simply read the same bytes,
measured in the same run (these machines are noisy).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit, prange

_POOLS: dict[int, ThreadPoolExecutor] = {}


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


def threaded_sum(a: np.ndarray, threads: int):
    """Sum of a uint64 buffer as numpy sums of ``threads`` contiguous parts, each on its
    own Python thread (numpy's reduction releases the GIL): a plain read by that many
    cores, each streaming one part."""
    pool = _POOLS.setdefault(threads, ThreadPoolExecutor(threads))
    parts = np.fromiter(pool.map(np.sum, np.array_split(a, threads)), np.uint64, threads)
    return parts.sum()                  # uint64: wraps as a.sum() does


def read_seconds(buffers: list[np.ndarray], threads: int | None = None) -> float:
    """One read of all buffers (uint64 words), each by the fastest of three readers:
    numba's parallel sum, numpy's one-thread sum and ``threaded_sum`` on ``threads``
    threads (default: numba's thread count). The floor the kernels are held to is the
    machine's read with those threads, so the fastest plain reader sets it. On the
    Zen 5 VM (2026-12-03, 4 GB buffer): numba's parallel sum 10-16 GB/s (its loop is
    not the machine's limit), numpy's one thread 32-35, numpy on two threads 41-43,
    an AVX-512 C loop on two threads 45-50 (one thread 34): the benchmarks' earlier
    "faster of numba's and numpy's one-thread sum" was a one-core read, 0.7-0.8x the
    two-core read, and flattered every ratio to it."""
    threads = threads or numba.get_num_threads()
    total = 0.0
    for w in buffers:
        t0 = time.perf_counter()
        parallel_sum(w)
        t1 = time.perf_counter()
        w.sum()
        t2 = time.perf_counter()
        threaded_sum(w, threads)
        total += min(t1 - t0, t2 - t1, time.perf_counter() - t2)
    return total
