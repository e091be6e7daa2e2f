"""Scoring kernels of the int4 search (quant/int4.py): the squared error of
candidate scales per (group, column), from a pass over the rows or from an
int8 value histogram, least-squares rescaling, and the column gathering that
lets a step rescore only the columns still moving. Split from quant/int4.py to
keep modules small; the method and its bit-for-bit rules are documented there.
"""
from __future__ import annotations

import numpy as np
from numba import njit

FLUSH_ROWS = 32  # rows summed in float32 before adding into the float64 totals


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
    for c in range(1, c_n):                       # rows outer: the column loop vectorizes
        tc = total[c]
        for j in range(cw):
            better = tc[j] < best_err[j]
            best[j] = c if better else best[j]
            best_err[j] = tc[j] if better else best_err[j]
    return best, best_err


@njit(inline="always", cache=True)
def _nibble(x, inv):
    """x quantized with reciprocal scale ``inv``: rint, clipped to [-8, 7] (float32)."""
    return min(max(np.rint(x * inv), np.float32(-8.0)), np.float32(7.0))


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
def _gather_cols(w, ws, rb, r0, r1, c0, idx):
    """Values ``w8 * s8`` (rows r0..r1, columns c0 + idx) as an fp32 (rows, m) tile."""
    m = len(idx)
    x = np.empty((r1 - r0, m), np.float32)                     # (rows, m) fp32
    for k in range(r0, r1):
        b = k // rb
        for i in range(m):
            x[k - r0, i] = np.float32(w[k, c0 + idx[i]]) * ws[b, c0 + idx[i]]
    return x


@njit(cache=True)
def _ls_cols(w, ws, rb, r0, r1, c0, hist, s, si, need):
    """_ls_scale (1, cw) where ``need``; elsewhere the current scale ``s`` (so
    that column is not rescored). Few columns: gathered as in _search_cols."""
    cw = len(need)
    idx = np.nonzero(need)[0]
    m = len(idx)
    if hist.shape[0] > 0 or 2 * m > cw:
        return _ls_scale(w, ws, rb, r0, r1, c0, hist, s, si)
    out = np.empty((1, cw), np.float32)
    out[0, :] = s
    if m == 0:
        return out
    x = _gather_cols(w, ws, rb, r0, r1, c0, idx)
    sc, iv = np.empty(m, np.float32), np.empty(m, np.float32)
    for i in range(m):
        sc[i], iv[i] = s[idx[i]], si[idx[i]]
    t = _ls_scale(x, np.ones((1, m), np.float32), r1 - r0, 0, r1 - r0, 0, hist, sc, iv)
    for i in range(m):
        out[0, idx[i]] = t[0, i]
    return out


@njit(cache=True)
def _search_cols(w, ws, rb, r0, r1, c0, hist, scale, inv, need):
    """_search_any where ``need``, +inf error elsewhere (never adopted). When
    fewer than half the columns need it (row path), their values ``w8 * s8`` are
    gathered into a narrow fp32 tile and searched as unit-scale input (``x * 1``
    is exact: the same sums, bit for bit)."""
    cw = len(need)
    idx = np.nonzero(need)[0]
    m = len(idx)
    if hist.shape[0] > 0 or 2 * m > cw:
        return _search_any(w, ws, rb, r0, r1, c0, hist, scale, inv)
    best, err = np.zeros(cw, np.int64), np.full(cw, np.inf)
    if m == 0:
        return best, err
    c_n = scale.shape[0]
    x = _gather_cols(w, ws, rb, r0, r1, c0, idx)                # (rows, m) fp32
    sc, iv = np.empty((c_n, m), np.float32), np.empty((c_n, m), np.float32)
    for c in range(c_n):
        for i in range(m):
            sc[c, i], iv[c, i] = scale[c, idx[i]], inv[c, idx[i]]
    bc, ec = _search(x, np.ones((1, m), np.float32), r1 - r0, 0, r1 - r0, 0, sc, iv)
    for i in range(m):
        best[idx[i]], err[idx[i]] = bc[i], ec[i]
    return best, err
