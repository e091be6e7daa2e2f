"""Sampling's filters for one row on the host CPU, in numba.

Why: ``sampling.filter_logits`` finds its thresholds with ``lax.top_k`` of the
1024 largest logits and, for rows whose top-k or nucleus lies beyond them, a
bisection under ``lax.cond``; on a 2.1 GHz Xeon that filter took 3.1 ms of a
131072 vocabulary (1.3 in the top-k, 1.1 for the bisection branch even when
not taken), these 0.5 ms. Mid-step, with the draw after it, a top-p 0.95
token took 2.85 ms against 3.52 (p90 3.6 against 5.3; docs/PERFORMANCE.md,
section 3, session 29). Both thresholds come from a radix selection on the
values' order-preserving uint32 keys: one pass counts the row (or sums its
probability mass) by the keys' upper 16 bits, a second pass the one bucket
that holds the threshold by their lower 16, so the exact key is found in two
passes whatever the distribution, with no sort and no cap.

The thresholds are those of ``sampling.filter_logits`` (the reference's, SPEC
section 3): the k-th largest value (ties kept), then, among the values at or
above it, the smallest value whose mass at or below it reaches ``1 - p`` of
the total. The mass is summed in float64 here (of float32 weights), in
float32 there, so the kept sets can differ only where a cumulative
probability lies within float32 rounding of ``1 - p`` (as ``filter_logits``
and the full sort already may). ``sampled_row`` returns the row
``sampling.sample`` draws from, so the draw after it (``sampling.categorical``,
the same key) gives the same token (tests/test_host_sampling.py).
"""
from __future__ import annotations

import threading

import numpy as np
from numba import njit

from lowmem.activations import exp_f32
from lowmem.sampling import DISALLOWED_LOGIT

_HALF = 1 << 16
_FM = {"contract", "reassoc"}   # reassoc: the sums vectorize; NaN and inf kept as they are
_INF_KEY = np.uint32(0xFF800000)   # +inf's key
_LOCAL = threading.local()      # each thread's _Workspace, reused row after row


class _Workspace:
    """A row's temporaries, kept from row to row: allocated afresh, each one's first
    touch page-faulted (with a float64 running total, the first version took 1.25 ms
    a 131072 row; 0.49 ms with neither)."""

    def __init__(self, vocab: int):
        self.scaled = np.empty(vocab, np.float32)
        self.keys = np.empty(vocab, np.uint32)
        self.weights = np.empty(vocab, np.float32)
        self.counts = np.empty(_HALF, np.int64)
        self.mass = np.empty(_HALF, np.float64)


@njit(fastmath=_FM, cache=True)
def _scale_and_key(logits, temperature, scaled, keys):
    """scaled = logits / temperature in float32 (as ``sampling._scaled_logits``), and
    their uint32 keys in the values' order: the keys of ``sampling._float_keys``
    with the sign bit flipped, so that unsigned order is the values' order ->
    the largest key of a number (NaN's keys lie above +inf's). -0.0 keys just
    below +0.0 here; the thresholds are compared as floats, so both are kept
    alike."""
    bits = scaled.view(np.int32)
    top = np.uint32(0)
    for i in range(logits.shape[0]):
        scaled[i] = logits[i] / temperature
        b = bits[i]
        key = np.uint32((b ^ 0x7FFFFFFF) if b < 0 else b) ^ np.uint32(0x80000000)
        keys[i] = key
        top = max(top, key if key <= _INF_KEY else np.uint32(0))
    return top


@njit(cache=True)
def _value(key):
    """The float32 value of a key from ``_scale_and_key``."""
    b = np.int32(np.uint32(key) ^ np.uint32(0x80000000))
    if b < 0:
        b = b ^ np.int32(0x7FFFFFFF)
    return np.array([b], np.int32).view(np.float32)[0]


@njit(cache=True)
def _kth_key(keys, k, counts):
    """The k-th largest key (1 <= k), the smallest when k exceeds the row."""
    if k >= keys.shape[0]:
        return keys.min()
    counts[:] = 0
    for key in keys:
        counts[key >> 16] += 1
    above, high = 0, 0
    for b in range(_HALF - 1, -1, -1):
        high = b
        if above + counts[b] >= k:
            break
        above += counts[b]
    counts[:] = 0
    for key in keys:
        if key >> 16 == high:
            counts[key & 0xFFFF] += 1
    for low in range(_HALF - 1, -1, -1):
        if counts[low] > 0:
            if above + counts[low] >= k:
                return np.uint32((high << 16) | low)
            above += counts[low]
    return np.uint32(0)                       # not reached: the counts hold k


@njit(fastmath=_FM, cache=True)
def _weights(x, kth, peak, w):
    """w = exp(x - peak) in float32 for the values >= kth, 0 for the others (NaN
    too). Arithmetic only (``exp_f32``): the loop vectorizes."""
    for i in range(x.shape[0]):
        w[i] = exp_f32(x[i] - peak) if x[i] >= kth else np.float32(0.0)


@njit(cache=True)
def _nucleus_key(keys, w, top_p, peak_key, mass):
    """The smallest key K, among those of weight w > 0, whose weight at or below K
    reaches ``1 - top_p`` of the total; ``peak_key`` (the largest) when none does."""
    mass[:] = 0.0
    for i in range(keys.shape[0]):
        if w[i] > 0.0:
            mass[keys[i] >> 16] += w[i]
    target = (1.0 - np.float64(np.float32(top_p))) * mass.sum()
    below, high = 0.0, -1
    for b in range(_HALF):
        if mass[b] > 0.0 and below + mass[b] >= target:
            high = b
            break
        below += mass[b]
    if high < 0:
        return peak_key
    mass[:] = 0.0
    for i in range(keys.shape[0]):
        if w[i] > 0.0 and keys[i] >> 16 == high:
            mass[keys[i] & 0xFFFF] += w[i]
    for low in range(_HALF):
        if mass[low] > 0.0:
            below += mass[low]
            if below >= target:
                return np.uint32((high << 16) | low)
    return peak_key


@njit(cache=True)
def _filter(logits, temperature, top_p, top_k, scaled, keys, w, counts, mass):
    """See ``sampled_row``; the arguments after top_k are its workspace."""
    greedy = temperature <= 0.0
    peak_key = _scale_and_key(logits, np.float32(1.0 if greedy else temperature), scaled, keys)
    k = 1 if greedy else top_k
    out = np.empty_like(scaled)
    if k <= 0 and top_p >= 1.0:
        out[:] = scaled
        return out
    kth = np.float32(-np.inf)
    if k > 0:
        kth = _value(_kth_key(keys, k, counts))
    nucleus = np.float32(-np.inf)
    peak = _value(peak_key)
    if top_p < 1.0 and peak == np.inf:   # all the mass at +inf (as filter_logits)
        nucleus = peak
    elif top_p < 1.0:
        _weights(scaled, kth, peak, w)
        nucleus = _value(_nucleus_key(keys, w, top_p, peak_key, mass))
    for i in range(scaled.shape[0]):
        x = scaled[i]
        out[i] = x if x >= kth and x >= nucleus else np.float32(DISALLOWED_LOGIT)
    return out


def sampled_row(logits: np.ndarray, temperature, top_p, top_k) -> np.ndarray:
    """The row ``sampling.sample`` draws one row's token from, computed on the host:
    fp32 logits (V,) -> a new fp32 (V,). With a filter on (top_k > 0 or top_p < 1,
    or a greedy row) that is ``filter_logits(logits[None], ...)[0]``: the row
    divided by the temperature, the tokens ruled out at ``DISALLOWED_LOGIT``;
    without one, the scaled row as it is (``sample``'s unfiltered branch). So
    ``sampling.categorical(key, sampled_row(...)[None])`` is ``sample``'s draw."""
    row = np.ascontiguousarray(logits, np.float32)
    if row.ndim != 1:
        raise ValueError(f"sampled_row: expected logits of shape (V,), got {row.shape}")
    ws = getattr(_LOCAL, "workspace", None)
    if ws is None or ws.scaled.shape != row.shape:
        ws = _LOCAL.workspace = _Workspace(row.shape[0])
    return _filter(row, float(np.float32(temperature)), float(np.float32(top_p)), int(top_k),
                   ws.scaled, ws.keys, ws.weights, ws.counts, ws.mass)
