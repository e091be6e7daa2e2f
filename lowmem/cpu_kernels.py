"""CPU compute kernels (numba): matmuls straight from quantized, memory-mapped weights.

Decoding Grok-1 on a CPU is memory-bound: every token reads 2 experts x 64
layers of weights once. These kernels therefore read the stored bytes (int8,
packed int4, bf16 or fp32) where they lie, usually an ``np.memmap`` of a model
file, dequantize them in registers and accumulate in fp32, so a matmul costs
about one pass over the weight bytes and never allocates a dequantized copy.

Layouts (see ``quant.qweight``): a weight is (K, N) = (in, out), ``y = x @ W``;
scales are bf16 (K // group_size, N); int4 is packed two rows per byte along K
(low nibble = even row). bf16 arrays are read as their uint16 bit patterns
(numba has no bf16): ``f32 bits = u16 << 16``. Expert values may be tiled
(QWeight.tiled: 32 x 64 tiles, one sequential stream): the kernels then see
64-byte rows and walk each tile whole (simd_kernels._tiles_strips), adding the
same partial sums in the same order as for rows, so the results are the same.

Parallel split, measured on the 2-core target (``tools/bench_kernels.py``): a
work item is (block of output columns, chunk of input rows). Reading whole
weight rows in file order is the most prefetch-friendly pattern and measured
fastest, so a work item normally takes all N columns (its fp32 accumulators,
one token block x N, stay in L2) and the threads split the input rows into
chunks whose partial sums are added at the end. Weights are read once per
block of ``_TOKEN_BLOCK`` tokens, not per token.

int8 and packed int4 run micro-kernels written as explicit 16-lane LLVM
vector code (``lowmem.simd_kernels``): a call takes 16 (int8) or 32 (int4) rows x
64 columns and up to 6 (int8) or 8 (int4) tokens, keeps one fp32 register
accumulator per (token, 16 columns), decodes each weight exactly (int8: sign-extend, convert;
int4: a 16-entry table lookup, the weight's levels or the uniform grid, see
``_operand``) and multiplies by the scale once per call: at the read floor at
one token, FMA-bound from 2-4 tokens (figures: docs/PERFORMANCE.md section 3).
``act_int8=True`` (opt-in, a numerics change) quantizes the activations to
int8 per 32 and runs int8 dot products instead (``lowmem.act8_kernels``;
int4 level tables decoded by a byte shuffle, the dot products as exact).
Other dtypes (bf16, fp32) and the columns after the last 64-column strip
decode 4 rows at a time into an L1 buffer applied to every token of the block.

Floating point: ``fastmath={'contract'}`` only lets LLVM fuse ``a * b + c`` into
one FMA (one rounding instead of two, never less accurate); it does not reorder
sums, so the column kernels sum rows in a fixed order: groups of 4 rows are
added pairwise, then scaled, then added to the accumulator; micro-kernels sum
up to 16 (int8) or 32 (int4) rows of one scale group in an FMA chain (int4, one
token: even and odd rows in two chains, then added), then scale and add. ``matmul_nt``
(dot products along contiguous rows) additionally allows ``reassoc`` so LLVM
can vectorize the reduction with many partial sums, which is what makes it run
at memory bandwidth (1.4x faster in our measurement) and is at least as
accurate as a sequential sum. Results are deterministic for a given machine.

numba's on-disk cache (``cache=True``) is keyed on this file: after editing
only ``lowmem/simd_kernels.py`` or ``lowmem/act8_kernels.py``, delete
``lowmem/__pycache__/*.nb[ic]`` or the old micro-kernels stay compiled in.
"""
from __future__ import annotations

import os

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from lowmem import act8_kernels
from lowmem.activations import geglu
from lowmem.simd_kernels import _hi, _lo, _pass_tokens, _prefer_512, _strip, _tiles_strips
from quant.qweight import BF16, TILE_COLS, TILE_ROWS, QWeight, level_table, tile_stored_rows

_FM = {"contract"}
_FM_REDUCE = {"contract", "reassoc"}
_ACC_BYTES = 1 << 20      # fp32 accumulators of one work item (one token block), at most
_ACC_SPLIT = 1 << 18      # ... and once that is reached, per column block (a quarter of L2)
_TOKEN_BLOCK = 8          # tokens processed per pass over a weight tile
_A8_TOKEN_BLOCK = 16      # the same with int8 activations (their kernels decode a block once)
_ROW_TILE = 256           # input rows per weight tile when T > _TOKEN_BLOCK
_SUB = 512               # columns decoded per L1 buffer when T > 1
_NT_ROWS = 64             # embedding rows per work item in matmul_nt
_PARTIAL_SHARE = 16       # row-chunk partial sums stay under weight bytes / this
_Q4_ROWS = 32             # int4 weight rows (16 packed rows) per micro-kernel call
_I8_ROWS = 16             # int8 weight rows per micro-kernel call (32 or 64: 1.2-1.6x slower)
_STRIP = 64               # columns per micro-kernel strip (int4 and int8)
# Default of matmul's act_int8 (int8 activations, lowmem.act8_kernels): opt-in.
ACT_INT8 = os.environ.get("LOWMEM_ACT_INT8", "") == "1"


# ----------------------------------------------------------------------------
# element decoding helpers
# ----------------------------------------------------------------------------

def _f32(v):
    """One stored weight element -> float32 (typed by the element's dtype)."""
    raise NotImplementedError("only callable from numba code")


@overload(_f32, inline="always")
def _f32_overload(v):
    if v == types.uint16:  # bf16 bit pattern
        return lambda v: np.uint32(np.uint32(v) << 16).view(np.float32)
    return lambda v: np.float32(v)


# ----------------------------------------------------------------------------
# Tiles: acc[t, a0:a0+m] += x[t, k0:k1] @ W[k0:k1, n0:n0+m] for t in [t0, t1)
#
# Every path sums the same way: 4 input rows at a time, pairwise, then times
# the group's scale, then into the accumulator (one accumulator load/store
# per 4 weight rows). Float weights get scales of 1.0 so they share the code.
# ----------------------------------------------------------------------------

@njit(fastmath=_FM, cache=True)
def _tile_rows(x, w, sc, g, k0, k1, n0, m, t, acc, a0, lv):
    """One token, one stored value per weight (int8, bf16 bits or fp32):
    decode in registers straight from the four row streams (lv: unused, the
    call of _tile_q4)."""
    k = k0
    a = acc[t, a0:a0 + m]
    while k < k1:
        gi = k // g
        kend = min(k1, (gi + 1) * g)  # this scale group's rows within the tile
        s = sc[gi, n0:n0 + m]
        while k + 4 <= kend:
            w0 = w[k, n0:n0 + m]
            w1 = w[k + 1, n0:n0 + m]
            w2 = w[k + 2, n0:n0 + m]
            w3 = w[k + 3, n0:n0 + m]
            x0, x1, x2, x3 = x[t, k], x[t, k + 1], x[t, k + 2], x[t, k + 3]
            for j in range(m):
                a[j] += _f32(s[j]) * ((x0 * _f32(w0[j]) + x1 * _f32(w1[j]))
                                      + (x2 * _f32(w2[j]) + x3 * _f32(w3[j])))
            k += 4
        while k < kend:
            w0 = w[k, n0:n0 + m]
            x0 = x[t, k]
            for j in range(m):
                a[j] += _f32(s[j]) * (x0 * _f32(w0[j]))
            k += 1


@njit(fastmath=_FM, cache=True)
def _tile_q4(x, p, sc, g, k0, k1, n0, m, t, acc, a0, lv):
    """One token, packed int4 (uint8 (K // 2, N)); k0, k1 and g are even;
    lv: level table or None (see lowmem.simd_kernels._lo)."""
    k = k0
    a = acc[t, a0:a0 + m]
    while k < k1:
        gi = k // g
        kend = min(k1, (gi + 1) * g)
        s = sc[gi, n0:n0 + m]
        while k + 4 <= kend:
            p0 = p[k // 2, n0:n0 + m]
            p1 = p[k // 2 + 1, n0:n0 + m]
            x0, x1, x2, x3 = x[t, k], x[t, k + 1], x[t, k + 2], x[t, k + 3]
            for j in range(m):
                a[j] += _f32(s[j]) * ((x0 * _lo(p0[j], lv) + x1 * _hi(p0[j], lv))
                                      + (x2 * _lo(p1[j], lv) + x3 * _hi(p1[j], lv)))
            k += 4
        while k < kend:
            p0 = p[k // 2, n0:n0 + m]
            x0, x1 = x[t, k], x[t, k + 1]
            for j in range(m):
                a[j] += _f32(s[j]) * (x0 * _lo(p0[j], lv) + x1 * _hi(p0[j], lv))
            k += 2


def _strip_tail(x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv):
    """Columns after the last whole strip: the generic tiles."""
    raise NotImplementedError("only callable from numba code")


@overload(_strip_tail, inline="always")
def _strip_tail_overload(x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv):
    one = _tile_q4 if w.dtype == types.uint8 else _tile_rows

    def tail(x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv):
        if t1 - t0 == 1:
            one(x, w, sc, g, k0, k1, n0, m, t0, acc, a0, lv)
        else:
            _tile_tokens(x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv)
    return tail


@njit(fastmath=_FM, cache=True)
def _tile_strips(x, p, sc, g, k0, k1, n0, m, t0, t1, acc, a0, d, rows, lv):
    """Packed int4 (d = 2 weight rows per stored row) or int8 (d = 1),
    tokens t0..t1: for each block of `rows` weight rows within a scale group,
    micro-kernels walk the 64-column strips in order (one row stream per
    stored row, the prefetch-friendly pattern); columns after the last whole
    strip go through the generic tiles."""
    _prefer_512()
    m_main = m - m % _STRIP
    tb = _pass_tokens(t1 - t0, d)  # tokens per pass, once (not per strip)
    k = k0
    while k < k1:
        gi = k // g
        kend = min(k1, (gi + 1) * g)
        while k < kend:
            k2 = min(kend, k + rows)
            for j in range(0, m_main, _STRIP):
                for t in range(t0, t1, tb):
                    _strip(min(tb, t1 - t), p, k // d, (k2 - k) // d, n0 + j, x, t, k,
                           sc, gi, acc, a0 + j, lv)
            k = k2
    if m_main < m:
        _strip_tail(x, p, sc, g, k0, k1, n0 + m_main, m - m_main, t0, t1, acc, a0 + m_main, lv)


def _tiled_strips(x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv, ts):
    """_tiles_strips by stored dtype (only int8 and packed int4 are ever tiled)."""
    raise NotImplementedError("only callable from numba code")


@overload(_tiled_strips)
def _tiled_strips_overload(x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv, ts):
    d, rows = (2, _Q4_ROWS) if w.dtype == types.uint8 else (1, _I8_ROWS)
    if w.dtype in (types.uint8, types.int8):
        return lambda x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv, ts: _tiles_strips(
            x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, d, rows, lv, ts)
    return lambda x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv, ts: None


def _tile1(x, w, sc, g, k0, k1, n0, m, t, acc, a0, lv):
    """One-token tile, dispatched on the stored dtype (uint8 = packed int4)."""
    raise NotImplementedError("only callable from numba code")


@overload(_tile1)
def _tile1_overload(x, w, sc, g, k0, k1, n0, m, t, acc, a0, lv):
    if w.dtype == types.uint8:
        return lambda x, w, sc, g, k0, k1, n0, m, t, acc, a0, lv: _tile_strips(
            x, w, sc, g, k0, k1, n0, m, t, t + 1, acc, a0, 2, _Q4_ROWS, lv)
    if w.dtype == types.int8:
        return lambda x, w, sc, g, k0, k1, n0, m, t, acc, a0, lv: _tile_strips(
            x, w, sc, g, k0, k1, n0, m, t, t + 1, acc, a0, 1, _I8_ROWS, lv)
    return lambda x, w, sc, g, k0, k1, n0, m, t, acc, a0, lv: _tile_rows(
        x, w, sc, g, k0, k1, n0, m, t, acc, a0, lv)


def _decode(w, k, r, n0, jn, buf, lv):
    """buf[:r, :jn] = integer/float values of rows k..k+r of W, columns n0..n0+jn
    (int4: through the level table lv, or two's complement for None)."""
    raise NotImplementedError("only callable from numba code")


@overload(_decode, inline="always")
def _decode_overload(w, k, r, n0, jn, buf, lv):
    if w.dtype == types.uint8:
        def decode_q4(w, k, r, n0, jn, buf, lv):
            for i in range(r // 2):
                p = w[k // 2 + i, n0:n0 + jn]
                lo = buf[2 * i]
                hi = buf[2 * i + 1]
                for j in range(jn):
                    lo[j] = _lo(p[j], lv)
                    hi[j] = _hi(p[j], lv)
        return decode_q4

    def decode_rows(w, k, r, n0, jn, buf, lv):
        for i in range(r):
            row = w[k + i, n0:n0 + jn]
            out = buf[i]
            for j in range(jn):
                out[j] = _f32(row[j])
    return decode_rows


@njit(fastmath=_FM, cache=True)
def _accumulate_4x4(x, k, t, buf, s, jn, acc, a0):
    """Tokens t..t+3, rows k..k+3: each decoded weight loaded once for 4
    tokens (the loop is bound by L1 loads, not by arithmetic)."""
    b0, b1, b2, b3 = buf[0], buf[1], buf[2], buf[3]
    p0, p1, p2, p3 = x[t, k], x[t, k + 1], x[t, k + 2], x[t, k + 3]
    q0, q1, q2, q3 = x[t + 1, k], x[t + 1, k + 1], x[t + 1, k + 2], x[t + 1, k + 3]
    r0, r1, r2, r3 = x[t + 2, k], x[t + 2, k + 1], x[t + 2, k + 2], x[t + 2, k + 3]
    u0, u1, u2, u3 = x[t + 3, k], x[t + 3, k + 1], x[t + 3, k + 2], x[t + 3, k + 3]
    ap = acc[t, a0:a0 + jn]
    aq = acc[t + 1, a0:a0 + jn]
    ar = acc[t + 2, a0:a0 + jn]
    au = acc[t + 3, a0:a0 + jn]
    for j in range(jn):
        w0, w1, w2, w3, sj = b0[j], b1[j], b2[j], b3[j], s[j]
        ap[j] += sj * ((p0 * w0 + p1 * w1) + (p2 * w2 + p3 * w3))
        aq[j] += sj * ((q0 * w0 + q1 * w1) + (q2 * w2 + q3 * w3))
        ar[j] += sj * ((r0 * w0 + r1 * w1) + (r2 * w2 + r3 * w3))
        au[j] += sj * ((u0 * w0 + u1 * w1) + (u2 * w2 + u3 * w3))


@njit(fastmath=_FM, cache=True)
def _accumulate_buffer(x, k, r, t0, t1, buf, s, jn, acc, a0):
    """acc[t, a0:a0+jn] += s * (x[t, k:k+r] @ buf[:r, :jn]) for every token."""
    t = t0
    if r == 4:
        while t + 4 <= t1:
            _accumulate_4x4(x, k, t, buf, s, jn, acc, a0)
            t += 4
    for t in range(t, t1):
        a = acc[t, a0:a0 + jn]
        if r == 4:
            x0, x1, x2, x3 = x[t, k], x[t, k + 1], x[t, k + 2], x[t, k + 3]
            b0, b1, b2, b3 = buf[0], buf[1], buf[2], buf[3]
            for j in range(jn):
                a[j] += s[j] * ((x0 * b0[j] + x1 * b1[j]) + (x2 * b2[j] + x3 * b3[j]))
        else:
            for i in range(r):
                xi = x[t, k + i]
                bi = buf[i]
                for j in range(jn):
                    a[j] += s[j] * (xi * bi[j])


@njit(fastmath=_FM, cache=True)
def _tile_tokens(x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv):
    """Several tokens: decode 4 rows x _SUB columns once into an L1 buffer,
    then apply them to every token, so decode work is paid once per tile."""
    buf = np.empty((4, _SUB), np.float32)
    s = np.empty(m, np.float32)
    k = k0
    while k < k1:
        gi = k // g
        kend = min(k1, (gi + 1) * g)
        for j in range(m):
            s[j] = _f32(sc[gi, n0 + j])
        while k < kend:
            r = min(4, kend - k)  # even for int4: k, kend, g are even
            for j0 in range(0, m, _SUB):
                jn = min(_SUB, m - j0)
                _decode(w, k, r, n0 + j0, jn, buf, lv)
                _accumulate_buffer(x, k, r, t0, t1, buf, s[j0:j0 + jn], jn, acc, a0 + j0)
            k += r


def _tile_n(x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv):
    """Several-token tile, dispatched on the stored dtype (uint8 = packed int4)."""
    raise NotImplementedError("only callable from numba code")


@overload(_tile_n)
def _tile_n_overload(x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv):
    if w.dtype == types.uint8:
        return lambda x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv: _tile_strips(
            x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, 2, _Q4_ROWS, lv)
    if w.dtype == types.int8:
        return lambda x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv: _tile_strips(
            x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, 1, _I8_ROWS, lv)
    return lambda x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv: _tile_tokens(
        x, w, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv)


@njit(fastmath=_FM, cache=True)
def _accumulate(x, w, sc, g, k0, k1, n0, m, acc, a0, lv, ts):
    """acc[:, a0:a0+m] += x[:, k0:k1] @ W[k0:k1, n0:n0+m], all tokens; ts: stored
    rows per tile of tiled values, 0 for the row layout.

    With more tokens than one block, tiles of _ROW_TILE rows are reused for
    every token block while they are still in cache.
    """
    T = x.shape[0]
    if T == 1 and ts == 0:
        _tile1(x, w, sc, g, k0, k1, n0, m, 0, acc, a0, lv)
        return
    step = k1 - k0 if T <= _TOKEN_BLOCK else _ROW_TILE
    for kk in range(k0, k1, step):
        kk1 = min(k1, kk + step)
        for t0 in range(0, T, _TOKEN_BLOCK):
            t1 = min(T, t0 + _TOKEN_BLOCK)
            if ts:
                _tiled_strips(x, w, sc, g, kk, kk1, n0, m, t0, t1, acc, a0, lv, ts)
            else:
                _tile_n(x, w, sc, g, kk, kk1, n0, m, t0, t1, acc, a0, lv)


# ----------------------------------------------------------------------------
# Parallel drivers
# ----------------------------------------------------------------------------

@njit(parallel=True, fastmath=_FM, cache=True)
def _matmul_kernel(x, w, sc, g, nb, kchunk, parts, lv, ts):
    """parts[c] (T, N) += x[:, rows of chunk c] @ W[those rows]; parts is zeroed;
    lv: the int4 level table or None (see matmul); ts: see _accumulate."""
    K = x.shape[1]
    nk, _, N = parts.shape
    ncb = (N + nb - 1) // nb
    for item in prange(ncb * nk):
        cb = item // nk
        c = item - cb * nk
        n0 = cb * nb
        k0 = c * kchunk
        _accumulate(x, w, sc, g, k0, min(K, k0 + kchunk), n0, min(nb, N - n0), parts[c], n0,
                    lv, ts)


@njit(fastmath=_FM, cache=True)
def _accumulate_a8(x, xq, dx, bs, w, sc, g, k0, k1, n0, m, acc, a0, lv, ts):
    """_accumulate with int8 activations (lowmem.act8_kernels) for the whole
    64-column strips; the columns after them get the fp32 tiles on x = the
    dequantized int8 activations (same numbers); k0, k1, g multiples of 32;
    lv: the int4 level table or None; ts: see _accumulate. Token blocks of
    _A8_TOKEN_BLOCK (16), not 8: tile_strips decodes a weight block once for all its tokens, so 9
    tokens as 8 + 1 decoded it twice and ran a one-token pass (the serving
    step's experts see 8-12 tokens each); 9 tokens 0.83x the time (Grok-1
    int4 expert, median of 4 interleaved runs), 12 and 16 about equal."""
    T = x.shape[0]
    step = k1 - k0 if T <= _A8_TOKEN_BLOCK else _ROW_TILE  # token blocks: accumulators in L2
    m_main = m - m % _STRIP
    for kk in range(k0, k1, step):
        kk1 = min(k1, kk + step)
        for t0 in range(0, T, _A8_TOKEN_BLOCK):
            t1 = min(T, t0 + _A8_TOKEN_BLOCK)
            act8_kernels.tile_strips(xq, dx, bs, w, sc, g, kk, kk1, n0, m, t0, t1, acc, a0, lv,
                                     ts)
            if m_main < m:
                _strip_tail(x, w, sc, g, kk, kk1, n0 + m_main, m - m_main, t0, t1, acc,
                            a0 + m_main, lv)
    act8_kernels.natural_order(acc, 0, T, a0, m, w, ts)  # the strips' lanes, once per item


@njit(parallel=True, fastmath=_FM, cache=True)
def _matmul_a8_kernel(x, xq, dx, bs, w, sc, g, nb, kchunk, parts, lv, ts):
    """_matmul_kernel with int8 activations (xq, dx, bs from quantize_activations)."""
    K = x.shape[1]
    nk, _, N = parts.shape
    ncb = (N + nb - 1) // nb
    for item in prange(ncb * nk):
        cb = item // nk
        c = item - cb * nk
        n0 = cb * nb
        k0 = c * kchunk
        _accumulate_a8(x, xq, dx, bs, w, sc, g, k0, min(K, k0 + kchunk), n0,
                       min(nb, N - n0), parts[c], n0, lv, ts)


@njit(parallel=True, fastmath=_FM_REDUCE, cache=True)
def _matmul_nt_kernel(x, e, out):
    """out (T, V) = x (T, D) @ e.T for e (V, D) row-major, 4 rows of e at a time."""
    T, D = x.shape
    V = e.shape[0]
    for b in prange((V + _NT_ROWS - 1) // _NT_ROWS):
        v1 = min(V, (b + 1) * _NT_ROWS)
        v = b * _NT_ROWS
        while v + 4 <= v1:
            r0 = e[v]
            r1 = e[v + 1]
            r2 = e[v + 2]
            r3 = e[v + 3]
            for t in range(T):
                xt = x[t]
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2 = np.float32(0.0)
                s3 = np.float32(0.0)
                for d in range(D):
                    xd = xt[d]
                    s0 += xd * _f32(r0[d])
                    s1 += xd * _f32(r1[d])
                    s2 += xd * _f32(r2[d])
                    s3 += xd * _f32(r3[d])
                out[t, v] = s0
                out[t, v + 1] = s1
                out[t, v + 2] = s2
                out[t, v + 3] = s3
            v += 4
        for vv in range(v, v1):
            r0 = e[vv]
            for t in range(T):
                s0 = np.float32(0.0)
                for d in range(D):
                    s0 += x[t, d] * _f32(r0[d])
                out[t, vv] = s0


# ----------------------------------------------------------------------------
# Python API
# ----------------------------------------------------------------------------

def _c_contiguous(a: np.ndarray, what: str) -> np.ndarray:
    """The array as a plain ndarray view (a memmap stays mapped); never copies."""
    if not a.flags.c_contiguous:
        raise ValueError(f"{what}: expected a C-contiguous array (a zero-copy view), "
                         f"got strides {a.strides} for shape {a.shape}")
    return np.asarray(a)


def _operand(w, what: str = "weight"):
    """(stored values, uint16 scale bits, group_size, (K, N), levels, ts) of a weight.

    Accepts a QWeight (int8, or int4 packed in uint8, with bf16 scales) or a
    2-D float32 / bf16 ndarray (given one group of scales 1.0). bf16 goes to
    numba as its uint16 bits. Views only: the weight bytes are never copied.
    levels: an int4 level table as float32 (16,), else None. The kernels take
    it as one more argument rather than a new stored dtype or a table folded
    into the scales: numba specializes on its type, so None compiles exactly
    the uniform code (same speed, same bits) and an array the table variant.
    ts: stored rows per tile of tiled values (QWeight.tiled), passed as their
    (R * N / 64, 64) view, the view the micro-kernels address; 0 for rows.
    """
    if isinstance(w, QWeight):
        want = np.int8 if w.bits == 8 else np.uint8
        if w.values.dtype != want or w.values.ndim != 2:
            raise ValueError(f"{what}: int{w.bits} QWeight values must be 2-D "
                             f"{np.dtype(want).name}, got {w.values.ndim}-D {w.values.dtype}")
        if w.scales.dtype != BF16 or w.scales.ndim != 2:
            raise ValueError(f"{what}: scales must be 2-D bfloat16, "
                             f"got {w.scales.ndim}-D {w.scales.dtype}")
        if w.bits == 4 and w.group_size % 2:
            raise ValueError(f"{what}: int4 needs an even group_size, got {w.group_size}")
        values = _c_contiguous(w.values, f"{what} values")
        scales = _c_contiguous(w.scales, f"{what} scales").view(np.uint16)
        ts = 0
        if w.tiled:
            ts = tile_stored_rows(w.bits)
            values = values.reshape(-1, TILE_COLS)
        return values, scales, w.group_size, w.shape, \
            None if w.levels is None else level_table(w.levels), ts
    if isinstance(w, np.ndarray) and w.ndim == 2 and w.dtype in (np.float32, BF16):
        values = _c_contiguous(w, what)
        if values.dtype == BF16:
            values = values.view(np.uint16)
        ones = np.full((1, w.shape[1]), 0x3F80, np.uint16)  # bf16 1.0: shares the scaled code
        return values, ones, max(1, w.shape[0]), w.shape, None, 0
    desc = f"{w.ndim}-D {w.dtype} array" if isinstance(w, np.ndarray) else type(w).__name__
    raise TypeError(f"{what}: expected a QWeight or a 2-D float32/bfloat16 array, got {desc}")


def _activations(x, k: int, what: str) -> tuple[np.ndarray, bool]:
    """x as C-contiguous float32 (T, K) and whether it was a single vector."""
    x = np.asarray(x)
    vector = x.ndim == 1
    x2 = np.ascontiguousarray(x.reshape(1, -1) if vector else x, dtype=np.float32)
    if x2.ndim != 2 or x2.shape[1] != k:
        raise ValueError(f"{what}: x must be (K,) or (T, K) with K={k}, got shape {x.shape}")
    if not x2.flags.writeable:  # e.g. a jax buffer: one numba signature for activations
        x2 = x2.copy()
    return x2, vector


def _plan(t: int, k: int, n: int, weight_bytes: int, a8: bool = False, tiled: bool = False):
    """(columns per block, rows per chunk, number of chunks) for matmul.

    Measured on the 2-core target: reading whole weight rows in order (the
    most prefetch-friendly pattern) beats column blocks of 2-8 KiB per row by
    10-30%, so a work item takes all N columns while its accumulators (one
    token block) fit in _ACC_BYTES, and the parallel split is over chunks of
    input rows, whose partial sums are added at the end. Column blocks only
    appear when a token block's accumulators over a whole row reach L2's size
    (_ACC_BYTES; then in blocks of _ACC_SPLIT of them: Grok-1's gate at 16
    tokens 14.6 ms against 21.3, docs/PERFORMANCE.md section 3, session 9) or
    when the partial sums would grow too big.
    a8 (int8 activations): chunks of whole 32-row activation blocks and
    column blocks of whole 64-column strips where N allows (a block's last
    N % 64 columns take the fp32 tiles, ~4x slower per column).
    tiled (QWeight.tiled): whole tiles, both ways.
    One token: two row chunks a thread, not four (the same rows, half the partial
    sums to zero and add): int4 decode 0.96-0.98x the time (PERFORMANCE.md 3, s. 25).
    """
    threads = numba.get_num_threads()
    items = 4 * threads
    t, n = max(t, 1), max(n, 1)
    acc = n * min(t, _A8_TOKEN_BLOCK if a8 else _TOKEN_BLOCK) * 4   # one token block's
    ncb = -(-acc // (_ACC_SPLIT if acc >= _ACC_BYTES else _ACC_BYTES))
    nk = max(1, min(-(-items // ncb), k // 256, weight_bytes // _PARTIAL_SHARE // (4 * t * n)))
    if ncb * nk < items:  # rows could not be split further: narrow the columns
        ncb = max(ncb, min(-(-items // nk), -(-n // 64)))
    if t == 1:
        nk = min(nk, 2 * threads)
    nb = -(-n // ncb)
    nb = min(n, nb + (-nb) % (_STRIP if a8 or tiled else 16))
    kchunk = -(-k // nk)
    kchunk += (-kchunk) % (TILE_ROWS if tiled else act8_kernels.BLOCK if a8 else 8)
    return nb, kchunk, -(-k // kchunk)


def matmul(x, w, *, col_block: int | None = None, k_chunk: int | None = None,
           act_int8: bool | None = None) -> np.ndarray:
    """x @ dequantize(w) in fp32: x (T, K) -> (T, N), or (K,) -> (N,).

    w: QWeight (int8 or packed int4, bf16 scales, any group size dividing K)
    or a float32 / bf16 (K, N) array, typically a view into an np.memmap; it
    is read in place. col_block / k_chunk override the parallel split (tests
    and benchmarks; k_chunk must be a multiple of 8). act_int8 (default
    ACT_INT8): x quantized to int8 per block of 32 and int8 dot products
    (lowmem.act8_kernels), for QWeights whose K and group size are multiples
    of 32, int4 level tables included (others stay fp32, on x as given); a
    numerics change, hence opt-in. int4 levels: see _operand.
    """
    values, scales, g, (k, n), lv, ts = _operand(w)
    x2, vector = _activations(x, k, "matmul")
    if k == 0 or n == 0:
        out = np.zeros((x2.shape[0], n), np.float32)
        return out[0] if vector else out
    a8 = (ACT_INT8 if act_int8 is None else act_int8) and isinstance(w, QWeight) \
        and k % act8_kernels.BLOCK == 0 and g % act8_kernels.BLOCK == 0
    step = TILE_ROWS if ts else 8
    if k_chunk is not None:
        if k_chunk <= 0 or k_chunk % step:
            raise ValueError(f"matmul: k_chunk must be a positive multiple of {step}, "
                             f"got {k_chunk}")
        a8 = a8 and k_chunk % act8_kernels.BLOCK == 0
    nb, kchunk, nk = _plan(x2.shape[0], k, n, values.nbytes, a8, ts > 0)
    if col_block is not None:
        if ts and col_block % TILE_COLS:
            raise ValueError(f"matmul: col_block of tiled values must be a multiple of "
                             f"{TILE_COLS}, got {col_block}")
        nb = max(1, min(n, col_block))
    if k_chunk is not None:
        kchunk, nk = k_chunk, -(-k // k_chunk)
    parts = np.zeros((nk, x2.shape[0], n), np.float32)  # (chunks, T, N)
    if a8:
        xq, dx, bs = act8_kernels.quantize_activations(x2)  # (T, K) int8, (T, K/32) x2
        xd = x2 if nb % _STRIP == 0 and n % _STRIP == 0 else (  # x of the fp32 tail tiles
            xq.reshape(len(xq), -1, 32) * dx[:, :, None]).reshape(xq.shape)  # (T, K) f32
        _matmul_a8_kernel(xd, xq, dx, bs, values, scales, g, nb, kchunk, parts, lv, ts)
    else:
        _matmul_kernel(x2, values, scales, g, nb, kchunk, parts, lv, ts)
    out = parts[0] if nk == 1 else parts.sum(axis=0, dtype=np.float32)  # (T, N)
    return out[0] if vector else out


def matmul_nt(x, e) -> np.ndarray:
    """x @ e.T in fp32 for e (V, D) float32 or bf16 stored row-major (the tied
    embedding table): x (T, D) -> (T, V), or (D,) -> (V,)."""
    if not (isinstance(e, np.ndarray) and e.ndim == 2 and e.dtype in (np.float32, BF16)):
        desc = f"{e.ndim}-D {e.dtype} array" if isinstance(e, np.ndarray) else type(e).__name__
        raise TypeError(f"matmul_nt: expected a 2-D float32/bfloat16 (V, D) array, got {desc}")
    table = _c_contiguous(e, "matmul_nt table")
    if table.dtype == BF16:
        table = table.view(np.uint16)
    x2, vector = _activations(x, e.shape[1], "matmul_nt")
    out = np.empty((x2.shape[0], e.shape[0]), np.float32)  # (T, V)
    _matmul_nt_kernel(x2, table, out)
    return out[0] if vector else out


def expert_ffn(x, gate, up, down, round_bf16: bool = True,
               act_int8: bool | None = None) -> np.ndarray:
    """One Grok-1 expert (GeGLU): down(gelu_tanh(x @ gate) * (x @ up)).

    gate, up: (D, F); down: (F, D); QWeights or float arrays. With round_bf16
    (the reference's bf16 mode, SPEC section 2 item 7) the gate and up outputs
    are rounded to bf16 before gelu; gelu, the product and down run in fp32.
    round_bf16=False is the all-fp32 mode. x (T, D) or (D,) -> same shape.
    act_int8: see matmul.
    """
    d, f = _operand(gate, "expert gate")[3]
    shape_u = _operand(up, "expert up")[3]
    shape_d = _operand(down, "expert down")[3]
    if shape_u != (d, f) or shape_d != (f, d):
        raise ValueError(f"expert_ffn: expected gate/up ({d}, {f}) and down ({f}, {d}), "
                         f"got up {shape_u} and down {shape_d}")
    x2, vector = _activations(x, d, "expert_ffn")
    h = matmul(x2, gate, act_int8=act_int8)  # (T, F)
    geglu(h, matmul(x2, up, act_int8=act_int8), bool(round_bf16))
    out = matmul(h, down, act_int8=act_int8)  # (T, D)
    return out[0] if vector else out
