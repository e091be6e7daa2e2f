"""FROZEN: quant/int4.py as it was before the speed-up of the g32 search (commit 5b3185c).

Kept only as the reference that tests/test_int4_identical.py compares the
current quantizer against, byte for byte. Do not edit; do not import from quant code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from quant.bf16 import round_bf16_inplace
from quant.qweight import BF16, QWeight

COL_TILE = 256  # output columns per tile: 256 contiguous bytes per int8 row
FLUSH_ROWS = 32  # rows summed in float32 before adding into the float64 totals
# Stage 1: clip ratios searched per (group, column), geometric from 1.0 (amax,
# first, so ties keep it) down to 0.27: per-channel columns of 32768 heavy-tailed
# weights are best clipped near 0.3 of their amax (tools/int4_error_study.py).
CLIP_RATIOS = tuple(0.85 ** i for i in range(9))
# Stage 2: multipliers of each column's stage-1 winner (a 3x finer grid around it).
REFINE = (0.85 ** (-2 / 3), 0.85 ** (-1 / 3), 0.85 ** (1 / 3), 0.85 ** (2 / 3))
AMAX_ONLY = (1.0,)
# Groups of at most SHORT_GROUP rows search only the first 4 ratios (1 .. 0.61):
# among so few values a deeper clip never pays (identical errors to 6 digits at
# g32 and g64 on Gaussian, Student-t and the heavy-tailed synthetic weights),
# and these groups take the row pass, where each candidate costs a pass.
SHORT_GROUP = 64
SHORT_CLIP_RATIOS = CLIP_RATIOS[:4]
# Stage-1 anchors, as divisors: d > 0 makes scales ``amax * r / d`` (positive,
# the extreme on code +-7 at r = 1); d < 0 makes ``signed extreme * r / d``,
# whose sign is the opposite of the extreme's, so at r = 1 the extreme lands
# exactly on code -8 (llama.cpp Q4_0's scale) and all 16 levels are used.
POSITIVE, SIGNED = (7.0,), (-8.0,)
ANCHORS = POSITIVE + SIGNED
# Least-squares rescalings after the search: scale = sum x q / sum q^2 for the
# codes q of the current scale, kept only where it lowers the error.
LS_STEPS = 2
# Histogram search (int8 input): used when a group has at least this many rows
# per histogram bin (256 int8 values x row blocks spanned); below it the direct
# search over the rows is cheaper.
HIST_ROWS_PER_BIN = 4
HIST_MAX_ROWS = 65535  # uint16 counts: at most this many rows per (row block, group)
ROW_CHUNK = 64  # rows copied at a time into a contiguous buffer (see _load_rows)


@dataclass(frozen=True)
class Int4Result:
    """A quantized matrix and its squared error against the input (float64 sums)."""
    weight: QWeight
    sq_error: float   # sum (w - dequantized)^2
    sq_norm: float    # sum w^2

    @property
    def rel_error(self) -> float:
        """Relative Frobenius error ||W - Q|| / ||W|| (0 for an all-zero W)."""
        return math.sqrt(self.sq_error / self.sq_norm) if self.sq_norm > 0 else 0.0


@njit(cache=True)
def _fold_extremes(hi, lo):
    """(amax, signed extreme) per column from its max and min values: the value
    of largest magnitude, the negative one on a tie (an order-free rule, so the
    row and the histogram paths agree)."""
    cw = len(hi)
    amax, ext = np.empty(cw, np.float32), np.empty(cw, np.float32)
    for j in range(cw):
        neg = -lo[j] >= hi[j]
        amax[j] = -lo[j] if neg else hi[j]
        ext[j] = lo[j] if neg else hi[j]
    return amax, ext


@njit(cache=True)
def _extremes(w, ws, rb, r0, r1, c0, cw):
    """Per column over rows r0..r1: max |w8 * s8| and the signed value that
    has it (fp32, exact products). Max and min only, so it vectorizes."""
    hi, lo = np.zeros(cw, np.float32), np.zeros(cw, np.float32)
    for k in range(r0, r1):
        wr, sr = w[k, c0:c0 + cw], ws[k // rb, c0:c0 + cw]
        for j in range(cw):
            x = np.float32(wr[j]) * sr[j]
            hi[j] = x if x > hi[j] else hi[j]
            lo[j] = x if x < lo[j] else lo[j]
    return _fold_extremes(hi, lo)


@njit(cache=True)
def _candidate_scales(top, ratio, div):
    """Scales ``bf16(top * ratio / div)`` (all (C, cw)), and their reciprocals
    (0 for a zero scale; a zero scale is stored as +0)."""
    c_n, cw = ratio.shape
    scale = np.empty((c_n, cw), np.float32)
    inv = np.empty((c_n, cw), np.float32)
    for c in range(c_n):
        sc, iv = scale[c], inv[c]
        for j in range(cw):
            sc[j] = top[c, j] * ratio[c, j] / div[c, j]
        round_bf16_inplace(sc)
        for j in range(cw):
            if sc[j] == 0:
                sc[j] = np.float32(0.0)
            iv[j] = np.float32(1.0) / sc[j] if sc[j] != 0 else np.float32(0.0)
    return scale, inv


@njit(cache=True)
def _search(w, ws, rb, r0, r1, c0, scale, inv):
    """Per column: index of the candidate scale with the least squared error over
    rows r0..r1, and that error.

    Squares are summed in float32 over FLUSH_ROWS rows (vectorizes twice as
    wide), then added into float64 totals, so long columns lose no precision.
    """
    c_n, cw = scale.shape
    total = np.zeros((c_n, cw), np.float64)
    part = np.zeros((c_n, cw), np.float32)
    row = np.empty(cw, np.float32)
    for k in range(r0, r1):
        i = k - r0
        wr, sr = w[k, c0:c0 + cw], ws[k // rb, c0:c0 + cw]
        for j in range(cw):
            row[j] = np.float32(wr[j]) * sr[j]
        for c in range(c_n):
            sc, iv, pc = scale[c], inv[c], part[c]
            for j in range(cw):
                q = min(max(np.rint(row[j] * iv[j]), np.float32(-8.0)), np.float32(7.0))
                d = row[j] - q * sc[j]
                pc[j] += d * d
        if i % FLUSH_ROWS == FLUSH_ROWS - 1 or k == r1 - 1:
            for c in range(c_n):
                for j in range(cw):
                    total[c, j] += part[c, j]
                    part[c, j] = 0.0
    return _argmin_rows(total)


@njit(cache=True)
def _load_rows(w, k0, k1, c0, buf):
    """Copy rows k0..k1, columns c0.. of w into buf (ROW_CHUNK, cw).

    Why: consecutive rows of a tile are a row stride apart (another page), so
    each is a cache miss. This short loop keeps many of them in flight; the
    histogram and packing loops, hundreds of instructions per row, do not."""
    cw = buf.shape[1]
    for k in range(k0, k1):
        wr, br = w[k, c0:c0 + cw], buf[k - k0]
        for j in range(cw):
            br[j] = wr[j]


@njit(cache=True)
def _histogram(w, rb, r0, r1, c0, cw):
    """Counts (blocks, 256, cw) int32 of each int8 value per (row block, column)
    over rows r0..r1; block 0 is row block r0 // rb. Integer increments only,
    into uint16 rows COL_TILE wide indexed by the raw byte (a constant stride
    and a non-negative index: the fastest scatter numba makes)."""
    b0 = r0 // rb
    nb = (r1 - 1) // rb - b0 + 1
    size = 256 * COL_TILE
    counts = np.zeros(nb * size, np.uint16)                 # (B, 256 bytes, COL_TILE)
    buf = np.empty((ROW_CHUNK, cw), np.uint8)               # raw bytes: v & 255
    for k0 in range(r0, r1, ROW_CHUNK):
        k1 = min(k0 + ROW_CHUNK, r1)
        _load_rows(w, k0, k1, c0, buf[:k1 - k0])
        for k in range(k0, k1):
            h, br = counts[(k // rb - b0) * size:(k // rb - b0 + 1) * size], buf[k - k0]
            for j in range(cw):
                h[np.intp(br[j]) * COL_TILE + j] += 1
    hist = np.empty((nb, 256, cw), np.int32)
    for b in range(nb):
        for v in range(256):
            o = b * size + (v ^ 128) * COL_TILE                 # byte of value v - 128
            hist[b, v, :] = counts[o:o + cw]
    return hist


@njit(cache=True)
def _hist_extremes(hist, ws, b0, c0):
    """_extremes from the histogram (the same values: exact products, same rule)."""
    nb, nv, cw = hist.shape
    hi, lo = np.zeros(cw, np.float32), np.zeros(cw, np.float32)
    for b in range(nb):
        sr = ws[b0 + b, c0:c0 + cw]
        for j in range(cw):
            v0, v1 = 0, nv - 1
            while v0 < v1 and hist[b, v0, j] == 0:
                v0 += 1
            while v1 > v0 and hist[b, v1, j] == 0:
                v1 -= 1
            if hist[b, v1, j] == 0:
                continue                      # no rows of this block (cannot happen)
            for v in (v0, v1):
                x = np.float32(v - 128) * sr[j]
                hi[j] = x if x > hi[j] else hi[j]
                lo[j] = x if x < lo[j] else lo[j]
    return _fold_extremes(hi, lo)


@njit(cache=True)
def _hist_search(hist, ws, b0, c0, scale, inv):
    """_search from the histogram: per (row block, int8 value) the float32
    difference ``x - q * scale`` (as _search computes it), squared in float64
    and times its count, summed in float64: exact for release data, so exact
    ties keep the earlier candidate."""
    nb, nv, cw = hist.shape
    c_n = scale.shape[0]
    total = np.zeros((c_n, cw), np.float64)
    x = np.empty(cw, np.float32)
    cnt = np.empty(cw, np.float64)
    for b in range(nb):
        sr = ws[b0 + b, c0:c0 + cw]
        for v in range(nv):
            h = hist[b, v]
            for j in range(cw):
                x[j] = np.float32(v - 128) * sr[j]
                cnt[j] = h[j]
            for c in range(c_n):
                sc, iv, tc = scale[c], inv[c], total[c]
                for j in range(cw):
                    q = min(max(np.rint(x[j] * iv[j]), np.float32(-8.0)), np.float32(7.0))
                    d = x[j] - q * sc[j]
                    dd = np.float64(d)
                    tc[j] += cnt[j] * (dd * dd)
    return _argmin_rows(total)


@njit(cache=True)
def _argmin_rows(total):
    """Per column, the first row index with the least value, and that value."""
    c_n, cw = total.shape
    best = np.zeros(cw, np.int64)
    best_err = total[0].copy()
    for j in range(cw):
        for c in range(1, c_n):
            if total[c, j] < best_err[j]:
                best[j], best_err[j] = c, total[c, j]
    return best, best_err


@njit(cache=True)
def _hist_sums(hist, ws, b0, c0, s, si):
    """Per column (sum (w - dequantized)^2, sum w^2) from the histogram, float64.

    The terms are exact (float64 squares of float32 values with few significant
    bits) and, for release data, so is every partial sum (all are multiples of
    one power of two and stay below 2**53 of it), so these equal _pack_rows'
    row-order sums bit for bit; otherwise they may differ in the last bit."""
    nb, nv, cw = hist.shape
    err, norm = np.zeros(cw, np.float64), np.zeros(cw, np.float64)
    for b in range(nb):
        sr = ws[b0 + b, c0:c0 + cw]
        for v in range(nv):
            h = hist[b, v]
            for j in range(cw):
                x = np.float32(v - 128) * sr[j]
                q = min(max(np.rint(x * si[j]), np.float32(-8.0)), np.float32(7.0))
                d = np.float64(x - q * s[j])
                err[j] += h[j] * (d * d)
                norm[j] += h[j] * (np.float64(x) * x)
    return err, norm


@njit(inline="always", cache=True)
def _nibble(x, inv):
    """x quantized with reciprocal scale ``inv``: rint, clipped to [-8, 7] (float32)."""
    return min(max(np.rint(x * inv), np.float32(-8.0)), np.float32(7.0))


@njit(inline="always", cache=True)
def _pack2(q0, q1):
    """Two int4 values in one byte: q0 (even row) low nibble, q1 high."""
    return np.uint8((np.int32(q0) & 15) | ((np.int32(q1) & 15) << 4))


@njit(cache=True)
def _pack_values(w, ws, rb, r0, r1, c0, s, si, packed):
    """_pack_rows without the error sums (the histogram path has them), reading
    rows through _load_rows."""
    cw = len(s)
    buf = np.empty((ROW_CHUNK, cw), w.dtype)
    for k0 in range(r0, r1, ROW_CHUNK):
        k1 = min(k0 + ROW_CHUNK, r1)                # k0, k1 even: r0, r1, ROW_CHUNK are
        _load_rows(w, k0, k1, c0, buf[:k1 - k0])
        for k in range(k0, k1, 2):
            w0, w1 = buf[k - k0], buf[k + 1 - k0]
            s0, s1 = ws[k // rb, c0:c0 + cw], ws[(k + 1) // rb, c0:c0 + cw]
            out = packed[k // 2, c0:c0 + cw]
            for j in range(cw):
                x0 = np.float32(w0[j]) * s0[j]
                x1 = np.float32(w1[j]) * s1[j]
                q0 = _nibble(x0, si[j])
                q1 = _nibble(x1, si[j])
                out[j] = _pack2(q0, q1)


@njit(cache=True)
def _pack_rows(w, ws, rb, r0, r1, c0, s, si, packed):
    """Quantize and pack rows r0..r1 (two per byte); returns (sq_error, sq_norm)."""
    cw = len(s)
    err = np.zeros(cw, np.float64)
    norm = np.zeros(cw, np.float64)
    for k in range(r0, r1, 2):
        w0, w1 = w[k, c0:c0 + cw], w[k + 1, c0:c0 + cw]
        s0, s1 = ws[k // rb, c0:c0 + cw], ws[(k + 1) // rb, c0:c0 + cw]
        out = packed[k // 2, c0:c0 + cw]
        for j in range(cw):
            x0 = np.float32(w0[j]) * s0[j]
            x1 = np.float32(w1[j]) * s1[j]
            q0 = _nibble(x0, si[j])
            q1 = _nibble(x1, si[j])
            d0 = np.float64(x0 - q0 * s[j])
            d1 = np.float64(x1 - q1 * s[j])
            err[j] += d0 * d0 + d1 * d1
            norm[j] += np.float64(x0) * x0 + np.float64(x1) * x1
            out[j] = _pack2(q0, q1)
    return err.sum(), norm.sum()


@njit(cache=True)
def _pick(scale, inv, best):
    """Per column, the candidate ``best[j]``: (scale, reciprocal)."""
    cw = len(best)
    s, si = np.empty(cw, np.float32), np.empty(cw, np.float32)
    for j in range(cw):
        s[j], si[j] = scale[best[j], j], inv[best[j], j]
    return s, si


@njit(cache=True)
def _search_any(w, ws, rb, r0, r1, c0, hist, scale, inv):
    """_hist_search when a histogram is given (hist.shape[0] > 0), else _search."""
    if hist.shape[0] > 0:
        return _hist_search(hist, ws, r0 // rb, c0, scale, inv)
    return _search(w, ws, rb, r0, r1, c0, scale, inv)


@njit(cache=True)
def _ls_scale(w, ws, rb, r0, r1, c0, hist, s, si):
    """Per column, the least-squares scale for the codes ``s`` gives:
    ``sum x q / sum q^2`` (float64; exact sums for release data, so the row
    and histogram paths agree), 0 where every code is 0."""
    cw = len(s)
    xq, qq = np.zeros(cw, np.float64), np.zeros(cw, np.float64)
    if hist.shape[0] > 0:
        nb, nv = hist.shape[0], hist.shape[1]
        for b in range(nb):
            sr = ws[r0 // rb + b, c0:c0 + cw]
            for v in range(nv):
                h = hist[b, v]
                for j in range(cw):
                    x = np.float32(v - 128) * sr[j]
                    q = _nibble(x, si[j])
                    xq[j] += h[j] * (np.float64(x) * q)
                    qq[j] += h[j] * (np.float64(q) * q)
    else:
        for k in range(r0, r1):
            wr, sr = w[k, c0:c0 + cw], ws[k // rb, c0:c0 + cw]
            for j in range(cw):
                x = np.float32(wr[j]) * sr[j]
                q = _nibble(x, si[j])
                xq[j] += np.float64(x) * q
                qq[j] += np.float64(q) * q
    out = np.zeros((1, cw), np.float32)
    for j in range(cw):
        out[0, j] = xq[j] / qq[j] if qq[j] > 0 else 0.0
    return out


@njit(cache=True)
def _candidates(amax, ext, ratios, divs):
    """Stage-1 candidates (C = len(divs) * len(ratios), cw): tops, ratios and
    divisors; divisor d > 0 scales amax, d < 0 the signed extreme."""
    cw, nr = len(amax), len(ratios)
    c_n = len(divs) * nr
    top = np.empty((c_n, cw), np.float32)
    ratio = np.empty((c_n, cw), np.float32)
    div = np.empty((c_n, cw), np.float32)
    for d in range(len(divs)):
        for r in range(nr):
            c = d * nr + r
            top[c, :] = amax if divs[d] > 0 else ext
            ratio[c, :] = ratios[r]
            div[c, :] = divs[d]
    return top, ratio, div


@njit(cache=True)
def _adopt(s, si, err, scale, inv, best, err2):
    """Take candidate ``best[j]`` for the columns where it is strictly better."""
    for j in range(len(s)):
        if err2[j] < err[j]:
            s[j], si[j], err[j] = scale[best[j], j], inv[best[j], j], err2[j]


@njit(cache=True)
def _choose_scales(w, ws, rb, r0, r1, c0, amax, ext, method, hist):
    """Per-column scale (cw,) and reciprocal. Stage 1 tries every (divisor,
    ratio) of ``method`` = (ratios, refine, divisors, ls_steps); stage 2
    ``refine`` times each column's winner (same top and divisor); then
    ``ls_steps`` least-squares rescalings. A later candidate must be strictly
    better to replace the current one, so the first (amax, ratio 1) keeps ties.
    Errors come from ``hist`` (int8 value counts) when it is not empty, else
    from the rows."""
    ratios, refine, divs, ls_steps = method
    top, ratio, div = _candidates(amax, ext, ratios, divs)
    scale, inv = _candidate_scales(top, ratio, div)
    cw = len(amax)
    if scale.shape[0] == 1 and len(refine) == 0 and ls_steps == 0:
        return _pick(scale, inv, np.zeros(cw, np.int64))
    best, err = _search_any(w, ws, rb, r0, r1, c0, hist, scale, inv)
    s, si = _pick(scale, inv, best)
    if len(refine) > 0:
        nf = len(refine)
        top2 = np.empty((nf, cw), np.float32)
        ratio2, div2 = np.empty((nf, cw), np.float32), np.empty((nf, cw), np.float32)
        for j in range(cw):
            top2[:, j], div2[:, j] = top[best[j], j], div[best[j], j]
            ratio2[:, j] = ratio[best[j], j] * refine
        scale2, inv2 = _candidate_scales(top2, ratio2, div2)
        best2, err2 = _search_any(w, ws, rb, r0, r1, c0, hist, scale2, inv2)
        _adopt(s, si, err, scale2, inv2, best2, err2)
    ones = np.ones((1, cw), np.float32)
    for _ in range(ls_steps):
        scale3, inv3 = _candidate_scales(_ls_scale(w, ws, rb, r0, r1, c0, hist, s, si),
                                         ones, ones)
        best3, err3 = _search_any(w, ws, rb, r0, r1, c0, hist, scale3, inv3)
        _adopt(s, si, err, scale3, inv3, best3, err3)
    return s, si


@njit(cache=True)
def _hist_tile(w, ws, rb, r0, r1, c0, cw, method, packed):
    """The int8 path of _quantize_tile: extremes, candidate errors and error sums
    come from one histogram (no pass over the rows per candidate); returns
    (scales, per-column sq_error, per-column sq_norm)."""
    hist = _histogram(w, rb, r0, r1, c0, cw)                        # (B, 256, cw)
    amax, ext = _hist_extremes(hist, ws, r0 // rb, c0)
    s, si = _choose_scales(w, ws, rb, r0, r1, c0, amax, ext, method, hist)
    err, norm = _hist_sums(hist, ws, r0 // rb, c0, s, si)
    _pack_values(w, ws, rb, r0, r1, c0, s, si, packed)
    return s, err, norm


@njit(cache=True)
def _quantize_tile(w, ws, rb, r0, r1, c0, cw, method, use_hist, packed, scales, gi):
    """Quantize rows r0..r1 x columns c0..c0+cw; returns (sq_error, sq_norm)."""
    if use_hist:
        s, err, norm = _hist_tile(w, ws, rb, r0, r1, c0, cw, method, packed)
        scales[gi, c0:c0 + cw] = s
        return err.sum(), norm.sum()
    amax, ext = _extremes(w, ws, rb, r0, r1, c0, cw)
    none = np.zeros((0, 256, cw), np.int32)
    s, si = _choose_scales(w, ws, rb, r0, r1, c0, amax, ext, method, none)
    scales[gi, c0:c0 + cw] = s
    return _pack_rows(w, ws, rb, r0, r1, c0, s, si, packed)


@njit(parallel=True, cache=True, nogil=True)
def _quantize_kernel(w, ws, group, method, int8_input, packed, scales, err_parts,
                     norm_parts):
    """All tiles in parallel; per-tile error sums land in err_parts/norm_parts."""
    k_n, n = w.shape
    rb = k_n // ws.shape[0]
    tiles_n = (n + COL_TILE - 1) // COL_TILE
    for t in prange((k_n // group) * tiles_n):
        gi, ci = t // tiles_n, t % tiles_n
        r0, r1, c0 = gi * group, (gi + 1) * group, ci * COL_TILE
        cw = min(COL_TILE, n - c0)
        bins = ((r1 - 1) // rb - r0 // rb + 1) * 256
        use_hist = (int8_input and group >= HIST_ROWS_PER_BIN * bins
                    and min(group, rb) <= HIST_MAX_ROWS)
        e, s = _quantize_tile(w, ws, rb, r0, r1, c0, cw, method, use_hist, packed,
                              scales, gi)
        err_parts[t] = e
        norm_parts[t] = s


def clip_ratios_for(group_size: int | None) -> tuple[float, ...]:
    """The default stage-1 grid for a group size (None: per channel)."""
    return SHORT_CLIP_RATIOS if group_size and group_size <= SHORT_GROUP else CLIP_RATIOS


def quantize_int4(values: np.ndarray, scales: np.ndarray | None = None,
                  group_size: int | None = None,
                  clip_ratios: tuple[float, ...] | None = None,
                  refine: tuple[float, ...] | None = None,
                  anchors: tuple[float, ...] = ANCHORS,
                  ls_steps: int | None = None) -> Int4Result:
    """int4 QWeight of a (K, N) matrix.

    ``values``: int8 (K, N) with ``scales`` bf16/fp32 (B, N) row-block scales
    (B divides K), i.e. one release expert matrix; or fp32 (K, N) with
    ``scales=None``. ``group_size``: input rows per int4 scale, None = K.
    ``clip_ratios``: the stage-1 grid (``AMAX_ONLY`` = no clipping; default
    ``clip_ratios_for(group_size)``);
    ``anchors``: the stage-1 divisors (``POSITIVE`` = amax * r / 7 only,
    ``SIGNED`` = signed extreme * r / -8 only); ``refine``: stage-2
    multipliers and ``ls_steps``: least-squares steps, by default REFINE and
    LS_STEPS when there is more than one stage-1 candidate, else none.
    """
    k, n = values.shape
    group = group_size or k
    if k % group or group % 2:
        raise ValueError(f"group size {group} must be even and divide K={k}")
    if scales is None:
        scales = np.ones((1, n), np.float32)
    ws = np.ascontiguousarray(scales, dtype=np.float32)           # (B, N)
    if ws.ndim != 2 or ws.shape[1] != n or k % ws.shape[0]:
        raise ValueError(f"scales shape {ws.shape} does not fit values {values.shape}")
    if values.dtype not in (np.int8, np.float32):
        raise ValueError(f"values must be int8 or float32, got {values.dtype}")
    if not anchors or any(a == 0 for a in anchors):
        raise ValueError(f"anchors must be non-zero divisors, got {anchors}")
    if clip_ratios is None:
        clip_ratios = clip_ratios_for(group)
    searched = len(clip_ratios) * len(anchors) > 1
    refine = (REFINE if searched else ()) if refine is None else refine
    ls_steps = (LS_STEPS if searched else 0) if ls_steps is None else ls_steps
    method = (np.asarray(clip_ratios, np.float32), np.asarray(refine, np.float32).reshape(-1),
              np.asarray(anchors, np.float32), int(ls_steps))
    packed = np.empty((k // 2, n), np.uint8)                       # (K/2, N)
    out_scales = np.empty((k // group, n), np.float32)             # (G, N)
    tiles = (k // group) * (-(-n // COL_TILE))
    err_parts, norm_parts = np.zeros(tiles), np.zeros(tiles)
    int8_input = bool(values.dtype == np.int8)
    _quantize_kernel(np.ascontiguousarray(values), ws, group, method, int8_input,
                     packed, out_scales, err_parts, norm_parts)
    weight = QWeight(packed, out_scales.astype(BF16), 4, group)
    return Int4Result(weight, float(err_parts.sum()), float(norm_parts.sum()))
