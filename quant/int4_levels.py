"""Non-uniform int4: the default level table and the search that quantizes to it.

Why a table: the uniform int4 grid spends as many levels on the sparse tails
of a group as on its dense middle. A group of 32 weights normalized by its
signed extreme (the extreme lands on -127) is distributed, for Gaussian or
Student-t weights, with most of its mass near zero; the 16 levels that
minimize the squared error of such values (Lloyd-Max: k-means in one dimension
with one level pinned at the extreme) are closer together near zero and
further apart in the tails. Measured on the 12-layer heavy-tailed synthetic
model (docs/FIDELITY.md): weight error 0.132 -> 0.103 and KL to int8 0.72x of
the uniform grid's, at the same 4.5 bits per weight (groups of 32, one bf16
scale each).

STUDENT_T_LEVELS: Lloyd-Max levels of groups of 32 Student-t values with 6
degrees of freedom (between the Gaussian and the heavy tails measured), each
group divided by minus its signed extreme, times 127, rounded; 200,000 groups,
60 iterations (derivation: ``tools/int4_levels_fit.py``). Sorted, so nibble n
is the n-th smallest level.

The search (``quantize_levels``; KL to int8 0.43x of the old default over 48
prompts on the heavy-tailed 12-layer model, docs/FIDELITY.md): per (group,
column), with ``ext`` the signed value of largest magnitude (the negative one
on a tie), stage-1 candidates ``bf16(ext * r / L)`` for L the smallest and the
largest level and r in CLIP_RATIOS; each followed by LS_STEPS least-squares
rescalings ``bf16(sum x q / sum q^2)`` of its own codes (a chain). Every
candidate is scored by its squared error ``sum x^2 - 2 d sum x q + d^2 sum q^2``
(float64 from the float32 sums of _score); the first least error in the order
(ratio, smallest level first, step) wins, so a candidate must be strictly
better than every earlier one.

Codes, exactly: weight x takes the level nearest to x / d, the smaller one on a
tie. Each midpoint m between adjacent levels is compared with x through the
product ``m * |d|``, exact in float32 (at most 9 + 8 significant bits, outside
the subnormal range far below any weight), so no division rounds;
``searchsorted(mids, float32(x / d))`` (the test's reference) decides the same,
since a correctly rounded quotient equals a midpoint only when it is one. A
scale 0 codes as if it were 1 (its group dequantizes to 0).

Speed, without changing a bit: without a gather (LLVM does not vectorize table
lookups on AMD CPUs) a level costs 15 comparisons (_level), about four times
a uniform rint. Only the first candidate of each family (the extreme on the
smallest, or on the largest level) pays that; it records, per weight, its level
and the midpoints above and below it. Any scale within a factor ``gamma`` of
that reference (the least ratio of two same-sign midpoints: 1.29 for
STUDENT_T_LEVELS) moves a weight across at most one midpoint, so the other
candidates, nearly all inside, take two exact comparisons per weight
(_score_window); the others the full pass. A chain whose scales stopped moving
in every column of its tile stops. At Grok-1 shapes (int8, 8 row blocks) this
takes 1.5-1.9x the CPU time of the uniform g32 search with the two clip ratios
kept (2.1-3.1x with five); the whole quantizer 1.32x (docs/PERFORMANCE.md).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from quant.bf16 import round_bf16_scalar
from quant.int4 import Int4Result
from quant.qweight import BF16, QWeight, check_levels

STUDENT_T_LEVELS = (-127, -97, -75, -57, -42, -29, -17, -6, 4, 14, 25, 37, 51, 67, 86, 111)
# Stage 1: the signed extreme is put on the smallest level (its sign flipped) or on the
# largest one, times each clip ratio; chain order: ratio-major, smallest level first.
# Two ratios: on Grok-shape int8 matrices (6144 x 8192, 8 row blocks) (1.0, 0.95, 0.9,
# 0.85, 0.8) lowered the weight error by only 0.1% (Student-t 4) / 0.2% (Gaussian)
# more, for 1.4-1.6x the search time (measured 2026-12-01, docs/PERFORMANCE.md).
CLIP_RATIOS = (1.0, 0.9)
LS_STEPS = 2       # least-squares rescalings per stage-1 candidate
MAX_GROUP = 256    # keeps every per-group integer sum exact in float32 (see _score)
LEVEL_TILE = 256   # columns per tile (64 and 128 measured slower: per-pass overheads)


@njit(cache=True)
def _load_tile(w, ws, rb, r0, r1, c0, cw):
    """Rows r0..r1, columns c0.. as float32 ``v`` (rows, cw) and one scale per column
    ``s`` (cw,), so that the weights are ``v * s`` exactly: int8 values with their
    row block's scale (the group lies inside one block), or fp32 values with s = 1."""
    v = np.empty((r1 - r0, cw), np.float32)                  # (g, cw) f32
    for k in range(r0, r1):
        wr, vr = w[k, c0:c0 + cw], v[k - r0]
        for j in range(cw):
            vr[j] = np.float32(wr[j])
    s = np.empty(cw, np.float32)
    s[:] = ws[r0 // rb, c0:c0 + cw]
    return v, s


@njit(cache=True)
def _extreme(v, s):
    """Per column, the signed value of largest magnitude of ``v * s``; the negative
    one when +a and -a tie (an order-free rule)."""
    cw = v.shape[1]
    hi, lo = np.zeros(cw, np.float32), np.zeros(cw, np.float32)
    for k in range(v.shape[0]):
        vr = v[k]
        for j in range(cw):
            x = vr[j] * s[j]
            hi[j] = x if x > hi[j] else hi[j]
            lo[j] = x if x < lo[j] else lo[j]
    ext = np.empty(cw, np.float32)
    for j in range(cw):
        ext[j] = lo[j] if -lo[j] >= hi[j] else hi[j]
    return ext


@njit(cache=True)
def _thresholds(d, mids, sg, thr):
    """For scales ``d`` (cw,): the sign factors ``sg`` (cw,) and thresholds ``thr``
    (15, cw) ``mid_i * |d|`` (exact products: a half-integer of at most 9 bits times
    a bf16). A zero scale codes as if it were 1 (its dequantized values are 0 anyway)."""
    for j in range(len(d)):
        a = abs(d[j]) if d[j] != 0 else np.float32(1.0)
        sg[j] = np.float32(-1.0) if d[j] < 0 else np.float32(1.0)
        for i in range(15):
            thr[i, j] = mids[i] * a


@njit(cache=True)
def _rows(thr, steps):
    """The 15 thresholds as a tuple of rows and the 15 steps as a tuple of scalars,
    for _level's constant indexing."""
    return ((thr[0], thr[1], thr[2], thr[3], thr[4], thr[5], thr[6], thr[7], thr[8],
             thr[9], thr[10], thr[11], thr[12], thr[13], thr[14]),
            (steps[0], steps[1], steps[2], steps[3], steps[4], steps[5], steps[6], steps[7],
             steps[8], steps[9], steps[10], steps[11], steps[12], steps[13], steps[14]))


@njit(inline="always", cache=True)
def _level(x, j, t, e, base):
    """The level nearest to x / d, for x = value * sign(d): ``base`` (the smallest
    level) plus every step ``e[i]`` whose threshold ``t[i][j]`` x exceeds (exact
    comparisons; a tie stays below). With ``e`` all ones and base 0: the level's
    index in the sorted table.

    Written out as a tree over constant indexes so that the caller's column loop
    vectorizes (a loop over the thresholds, or a table lookup, does not: LLVM
    then gathers along the thresholds or gives up)."""
    z = np.float32(0.0)
    return (((((e[0] if x > t[0][j] else z) + (e[1] if x > t[1][j] else z))
              + ((e[2] if x > t[2][j] else z) + (e[3] if x > t[3][j] else z)))
             + (((e[4] if x > t[4][j] else z) + (e[5] if x > t[5][j] else z))
                + ((e[6] if x > t[6][j] else z) + (e[7] if x > t[7][j] else z))))
            + ((((e[8] if x > t[8][j] else z) + (e[9] if x > t[9][j] else z))
                + ((e[10] if x > t[10][j] else z) + (e[11] if x > t[11][j] else z)))
               + (((e[12] if x > t[12][j] else z) + (e[13] if x > t[13][j] else z))
                  + ((e[14] if x > t[14][j] else z) + base))))


@njit(cache=True, error_model="numpy")
def _score(v, s, d, mids, lev0, steps, sg, thr, vq, qq):
    """Per column, for the codes of scale ``d``: ``vq`` = sum v q and ``qq`` = sum q^2
    (float32, overwritten; ``sg`` and ``thr`` are scratch for _thresholds).

    Summed in float32 in row order: for int8 input (integer v, |v q| <= 128 * 127,
    at most MAX_GROUP rows) every term and partial sum is an exact integer below
    2**24, so the sums are exact; fp32 input rounds each product and partial sum
    to float32 (a fixed order: the test's reference reproduces it)."""
    _thresholds(d, mids, sg, thr)
    t, e = _rows(thr, steps)
    vq[:], qq[:] = 0, 0
    for k in range(v.shape[0]):
        vr = v[k]
        for j in range(v.shape[1]):
            q = _level(vr[j] * s[j] * sg[j], j, t, e, lev0)
            vq[j] += vr[j] * q
            qq[j] += q * q


@njit(cache=True)
def _sum_squares(v):
    """Per column sum v^2, float64 (exact for int8 values)."""
    out = np.zeros(v.shape[1], np.float64)
    for k in range(v.shape[0]):
        vr = v[k]
        for j in range(v.shape[1]):
            out[j] += np.float64(vr[j]) * vr[j]
    return out


@njit(cache=True)
def _err_and_ls(s, d, vv, vq, qq, err, nxt):
    """Per column: the squared error of scale ``d`` from the sums (float64,
    ``xx - 2 d xq + d^2 qq`` with xx = s^2 vv and xq = s vq), and the least-squares
    rescaling ``bf16(f32(xq / qq))`` (``d`` itself where every level is 0)."""
    for j in range(len(d)):
        s64, d64, q2 = np.float64(s[j]), np.float64(d[j]), np.float64(qq[j])
        xx, xq = s64 * s64 * vv[j], s64 * np.float64(vq[j])
        err[j] = xx - 2.0 * d64 * xq + d64 * d64 * q2
        nxt[j] = round_bf16_scalar(np.float32(xq / q2)) if q2 > 0 else d[j]
        if nxt[j] == 0:
            nxt[j] = np.float32(0.0)                             # stored as +0


@njit(cache=True)
def _window_steps(mids):
    """Step arrays for _level that give, from the same 15 comparisons as the level,
    the midpoint above it (+inf at the top) and the one below it (m_0 at the
    bottom: _window_ref replaces it by -inf)."""
    up_m, dn_m = np.empty(15, np.float32), np.zeros(15, np.float32)
    up_m[:14], up_m[14] = mids[1:] - mids[:-1], np.inf
    dn_m[1:] = mids[1:] - mids[:-1]
    return up_m, dn_m


@njit(cache=True, error_model="numpy")
def _window_ref(v, s, d, mids, levels_sorted, win, sg, size, thr, x, vq, qq):
    """The exact pass of _score at a family's reference scale ``d``, which also keeps,
    per weight, its level and the midpoints above and below it (+-inf past the
    ends) into ``win`` (3, rows, cw), and the reference's sign and size (|d|, 1 for
    0) into ``sg`` and ``size``; ``thr`` and ``x`` are scratch."""
    cw = v.shape[1]
    _thresholds(d, mids, sg, thr)
    up_m, dn_m = _window_steps(mids)
    t, e = _rows(thr, levels_sorted[1:] - levels_sorted[:-1])
    _, eum = _rows(thr, up_m)
    _, edm = _rows(thr, dn_m)
    lev0, m0, ninf = levels_sorted[0], mids[0], np.float32(-np.inf)
    vq[:], qq[:] = 0, 0
    for k in range(v.shape[0]):                 # one tree per loop: each loop vectorizes
        vr, qc, mup, mdn = v[k], win[0, k], win[1, k], win[2, k]
        for j in range(cw):
            x[j] = vr[j] * s[j] * sg[j]
        for j in range(cw):
            xj = x[j]
            qc[j] = _level(xj, j, t, e, lev0)
            mup[j] = _level(xj, j, t, eum, m0)
            mdn[j] = _level(xj, j, t, edm, m0)
        for j in range(cw):
            mdn[j] = mdn[j] if x[j] > t[0][j] else ninf
        for j in range(cw):
            vq[j] += vr[j] * qc[j]
            qq[j] += qc[j] * qc[j]
    for j in range(cw):
        size[j] = abs(d[j]) if d[j] != 0 else np.float32(1.0)


@njit(cache=True, error_model="numpy")
def _score_window(v, s, d, sg_ref, size_ref, gamma, win, size, xs, vq, qq):
    """_score for a scale ``d`` near the family's reference: within a factor
    ``gamma`` (the least ratio of two same-sign midpoints) no weight crosses more
    than one midpoint, so its level is its reference level L_c, or the next one up
    (2 m_c - L_c, m_c the midpoint above) or down (2 m_(c-1) - L_c), decided by
    two exact comparisons. Fills ``vq`` and ``qq`` as _score does (``size``, ``xs``:
    scratch) and returns True, or returns False when some column's scale is
    outside the window or of the other sign (then use _score).

    The sums go to arrays allocated here and every load precedes the selects:
    otherwise LLVM needs more run-time alias checks than it allows, or cannot
    if-convert, and the column loop stays scalar."""
    cw = v.shape[1]
    ok = True
    for j in range(cw):
        size[j] = abs(d[j]) if d[j] != 0 else np.float32(1.0)
        sgn = np.float32(-1.0) if d[j] < 0 else np.float32(1.0)
        a, b = np.float64(size[j]), np.float64(size_ref[j])
        ok &= (sgn == sg_ref[j]) & (a < b * gamma) & (b < a * gamma)    # no branches
        xs[j] = s[j] * sgn
    if not ok:
        return False
    a_vq, a_qq = np.zeros(cw, np.float32), np.zeros(cw, np.float32)
    two = np.float32(2.0)
    for k in range(v.shape[0]):
        vr, qc, mup, mdn = v[k], win[0, k], win[1, k], win[2, k]
        for j in range(cw):
            w8, q0, mu, md, sz = vr[j], qc[j], mup[j], mdn[j], size[j]
            x = w8 * xs[j]
            q = two * mu - q0 if x > mu * sz else (two * md - q0 if x <= md * sz else q0)
            a_vq[j] += w8 * q
            a_qq[j] += q * q
    vq[:], qq[:] = a_vq, a_qq
    return True


@njit(cache=True)
def _search_tile(v, s, ratios, ls_steps, levels_sorted, mids, gamma):
    """The search of this module's docstring for one tile: per column the best scale,
    its squared error (float64, from the sums) and sum v^2.

    Family by family (the extreme on the smallest level, then on the largest): the
    first ratio's candidate is scored exactly and kept as the window reference, the
    other candidates of the family through _score_window. Errors are recorded per
    (chain, step) and reduced in the canonical order (ratio-major, smallest level
    first, then the steps), keeping the first least error."""
    cw = v.shape[1]
    n_ch = 2 * len(ratios)
    ext = _extreme(v, s)
    vv = _sum_squares(v)
    errs = np.full((n_ch, ls_steps + 1, cw), np.inf)
    ds = np.zeros((n_ch, ls_steps + 1, cw), np.float32)
    win = np.empty((3, v.shape[0], cw), np.float32)            # (3, g, cw) window data
    err, nxt, d = np.empty(cw, np.float64), np.empty(cw, np.float32), np.empty(cw, np.float32)
    scratch = np.empty((5, cw), np.float32)
    sg_ref, size_ref, sg, size, x = scratch[0], scratch[1], scratch[2], scratch[3], scratch[4]
    vq, qq, thr = np.empty(cw, np.float32), np.empty(cw, np.float32), np.empty((15, cw), np.float32)
    gaps = levels_sorted[1:] - levels_sorted[:-1]
    for fam in range(2):
        anchor = levels_sorted[0] if fam == 0 else levels_sorted[-1]
        for ri in range(len(ratios)):
            for j in range(cw):
                d[j] = round_bf16_scalar(ext[j] * ratios[ri] / anchor)
                d[j] = np.float32(0.0) if d[j] == 0 else d[j]
            for step in range(ls_steps + 1):
                if ri == 0 and step == 0:
                    _window_ref(v, s, d, mids, levels_sorted, win, sg_ref, size_ref, thr, x,
                                vq, qq)
                elif not _score_window(v, s, d, sg_ref, size_ref, gamma, win, size, x, vq, qq):
                    _score(v, s, d, mids, levels_sorted[0], gaps, sg, thr, vq, qq)
                _err_and_ls(s, d, vv, vq, qq, err, nxt)
                errs[2 * ri + fam, step], ds[2 * ri + fam, step] = err, d
                moved = False
                for j in range(cw):
                    moved |= nxt[j] != d[j]
                if not moved:
                    break          # every column converged: later steps repeat this one
                d[:] = nxt
    best, best_err = np.zeros(cw, np.float32), np.full(cw, np.inf)
    for c in range(n_ch):
        for step in range(ls_steps + 1):
            for j in range(cw):
                if errs[c, step, j] < best_err[j]:
                    best[j], best_err[j] = ds[c, step, j], errs[c, step, j]
    for j in range(cw):                   # the formula may leave a rounding residue below 0
        best_err[j] = max(best_err[j], 0.0)
    return best, best_err, vv


def window_ratio(levels_sorted: np.ndarray) -> float:
    """The least ratio |m_b / m_a| of two consecutive same-sign midpoints (a zero
    midpoint is never crossed), slightly shrunk: within this factor of a scale, a
    weight crosses at most one midpoint (see _score_window)."""
    m = (levels_sorted[1:].astype(np.float64) + levels_sorted[:-1]) / 2
    ratios = [b / a for a, b in zip(m[:-1], m[1:]) if a > 0 and b > 0]
    ratios += [a / b for a, b in zip(m[:-1], m[1:]) if a < 0 and b < 0]
    return min(ratios, default=np.inf) * (1 - 1e-9)


@njit(cache=True, error_model="numpy")
def _pack_tile(v, s, d, mids, nibble_of, r0, c0, packed):
    """Codes of the chosen scales, packed two per byte (even row low nibble). The
    codes come from a _level tree (a table lookup would not vectorize); the nibble
    lookup is skipped for a sorted table (``nibble_of`` = identity)."""
    cw = v.shape[1]
    sg, thr = np.empty(cw, np.float32), np.empty((15, cw), np.float32)
    _thresholds(d, mids, sg, thr)
    t, ones = _rows(thr, np.ones(15, np.float32))
    sorted_table = (nibble_of == np.arange(16)).all()
    code, x = np.empty((2, cw), np.float32), np.empty(cw, np.float32)
    for k in range(0, v.shape[0], 2):
        for h in range(2):
            vr, ch = v[k + h], code[h]
            for j in range(cw):
                x[j] = vr[j] * s[j] * sg[j]
            for j in range(cw):
                ch[j] = _level(x[j], j, t, ones, np.float32(0.0))
        out = packed[(r0 + k) // 2, c0:c0 + cw]
        if sorted_table:
            for j in range(cw):
                out[j] = np.uint8(code[0, j]) | (np.uint8(code[1, j]) << np.uint8(4))
        else:
            for j in range(cw):
                out[j] = np.uint8(nibble_of[np.intp(code[0, j])]
                                  | (nibble_of[np.intp(code[1, j])] << 4))


@njit(parallel=True, cache=True, nogil=True)
def _levels_kernel(w, ws, group, ratios, ls_steps, levels_sorted, gamma, nibble_of,
                   packed, scales, err_parts, norm_parts):
    """All (group, column tile) tiles in parallel; per-tile error sums, fixed order:
    the search's own error of each chosen scale (``xx - 2 d xq + d^2 qq``, float64
    from exact sums for int8 input) and sum w^2."""
    k_n, n = w.shape
    rb = k_n // ws.shape[0]
    mids = (levels_sorted[1:] + levels_sorted[:-1]) * np.float32(0.5)
    tiles_n = (n + LEVEL_TILE - 1) // LEVEL_TILE
    for t in prange((k_n // group) * tiles_n):
        gi, ci = t // tiles_n, t % tiles_n
        r0, c0 = gi * group, ci * LEVEL_TILE
        cw = min(LEVEL_TILE, n - c0)
        v, s = _load_tile(w, ws, rb, r0, r0 + group, c0, cw)
        d, err, vv = _search_tile(v, s, ratios, ls_steps, levels_sorted, mids, gamma)
        scales[gi, c0:c0 + cw] = d
        _pack_tile(v, s, d, mids, nibble_of, r0, c0, packed)
        err_parts[t] = err.sum()
        norm_parts[t] = (s.astype(np.float64) ** 2 * vv).sum()


def quantize_levels(values: np.ndarray, scales: np.ndarray | None, group_size: int | None,
                    levels=STUDENT_T_LEVELS, clip_ratios: tuple[float, ...] = CLIP_RATIOS,
                    ls_steps: int = LS_STEPS) -> Int4Result:
    """int4 QWeight of a (K, N) matrix on the level table ``levels`` (nibble n stands
    for ``levels[n] * scale``).

    Same input contract as ``quant.int4.quantize_int4``: int8 (K, N) ``values`` with
    bf16/fp32 (B, N) row-block ``scales`` (B divides K), or fp32 (K, N) with
    ``scales=None``. Groups only: ``group_size`` must be even, divide K and be at most
    MAX_GROUP (per-channel scales are not offered with levels, and larger groups would
    lose the exactness of the float32 sums). Returns the weight (bf16 scales
    (K // group_size, N), ``levels`` recorded) and its squared error sums: the
    search's own error of the chosen scales, from exact sums for int8 input (to
    ~1e-12), from float32 sums for fp32 input (to ~1e-6, relative)."""
    table = check_levels(levels)
    k, n = values.shape
    if group_size is None or not 2 <= group_size <= MAX_GROUP:
        raise ValueError(f"group size {group_size}: level tables need groups of 2 to "
                         f"{MAX_GROUP} rows (per-channel scales are not supported with levels)")
    if k % group_size or group_size % 2:
        raise ValueError(f"group size {group_size} must be even and divide K={k}")
    if values.dtype not in (np.int8, np.float32):
        raise ValueError(f"values must be int8 or float32, got {values.dtype}")
    if (values.dtype == np.int8) != (scales is not None):
        raise ValueError("int8 values need their row-block scales; fp32 values take scales=None")
    if not clip_ratios or any(not 0 < r <= 1 for r in clip_ratios) or ls_steps < 0:
        raise ValueError(f"clip ratios must be in (0, 1] and ls_steps >= 0, got "
                         f"{clip_ratios}, {ls_steps}")
    w, ws = _prepared(values, scales, group_size)
    order = np.argsort(table)
    levels_sorted = np.asarray(table, np.float32)[order]                # (16,) ascending
    nibble_of = order.astype(np.int64)                                  # sorted index -> nibble
    packed = np.empty((k // 2, n), np.uint8)                            # (K/2, N)
    out_scales = np.empty((k // group_size, n), np.float32)             # (G, N)
    tiles = (k // group_size) * (-(-n // LEVEL_TILE))
    err_parts, norm_parts = np.zeros(tiles), np.zeros(tiles)
    _levels_kernel(w, ws, group_size, np.asarray(clip_ratios, np.float32), int(ls_steps),
                   levels_sorted, window_ratio(levels_sorted), nibble_of, packed, out_scales,
                   err_parts, norm_parts)
    weight = QWeight(packed, out_scales.astype(BF16), 4, group_size, levels=table)
    return Int4Result(weight, float(err_parts.sum()), float(norm_parts.sum()))


def _prepared(values, scales, group):
    """(w, ws) for the kernel: int8 with float32 (B, N) scales when every group lies in
    one row block, else the exact fp32 products ``w8 * s8`` with unit scales."""
    k, n = values.shape
    if scales is None:
        return np.ascontiguousarray(values), np.ones((1, n), np.float32)
    ws = np.ascontiguousarray(scales, dtype=np.float32)                # (B, N)
    if ws.ndim != 2 or ws.shape[1] != n or k % ws.shape[0]:
        raise ValueError(f"scales shape {ws.shape} does not fit values {values.shape}")
    rb = k // ws.shape[0]
    if rb % group == 0:
        return np.ascontiguousarray(values), ws
    x = values.reshape(ws.shape[0], rb, n).astype(np.float32) * ws[:, None, :]
    return x.reshape(k, n), np.ones((1, n), np.float32)
