"""Logits from an int8 output table: one int8 row per vocabulary entry, fp32 activations.

The tied output matrix of Grok-1 is 131072 x 6144: 1.6 GB of bf16 read for
every decode step, more than half of a token's bytes on the host backend.
``Int8Table`` stores it as int8 with one bf16 scale per vocabulary row, in the
table's own (V, D) row order, so each logit is one dot product of a
contiguous int8 row with the fp32 activation, times the row's scale:

    logits[t, v] = scale[v] * sum_d x[t, d] * q[v, d]        (fp32, no int8 activations)

Why a kernel of its own: the generic int8 matmul needs (K, N) = (D, V) and
splits the work along K with all N columns per item, which on this
(1 x 6144) @ (6144 x 131072) shape reached only 17-19 GB/s where a core reads
~33. Here the threads split V into blocks of rows, and the micro-kernel
(LLVM vector code, as ``lowmem.simd_kernels``) takes R rows x tb tokens:
each 16 int8 weights are sign-extended and converted to fp32 once (exact) and
used for every token of the block, each 16 activations are loaded once for
the R rows. Accumulators are 16-lane fp32 vectors, one per (row, token),
kept in registers over a chunk of D and in a small per-block buffer between
chunks (the chunk keeps tb x chunk activations within L1 for many tokens);
the 16 lanes are summed and the scale applied once per logit. Token counts
are split into blocks of 8, 4, 2, 1 (T = 16: two blocks of 8, see the
variants below for why not one of 16). Activation rows are copied 256 bytes
off 4 KiB alignment first: at D = 6144 their natural 24 KiB stride put every
token's activations into the same L1 sets.

Floating point: FMAs in a fixed order per lane (``contract`` only), then the
16 lanes in order, then the D % 64 tail: deterministic, and independent of
the thread count (a logit is computed by one thread).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from lowmem.simd_kernels import _Mat, _prefer_512, _prefetch
from quant.bf16 import round_bf16_bits
from quant.qweight import BF16

_FM = {"contract"}
_BLOCK_ROWS = 64          # vocabulary rows per parallel work item
_X_L1_BYTES = 32768       # activations of one token block x one D chunk kept in L1
_PREFETCH = 1024          # bytes ahead along each row that the micro-kernel prefetches
_ROW_STAGGER = 256        # activation rows start this many bytes apart modulo 4 KiB
_BUILD_ROWS = 64          # vocabulary rows per work item when building the table


@dataclass(frozen=True)
class Int8Table:
    """The tied output matrix as int8 values (V, D) and one bf16 scale per row (V,)."""
    values: np.ndarray    # (V, D) int8
    scales: np.ndarray    # (V,) bf16

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    def dequantize(self) -> np.ndarray:
        """(V, D) fp32: q * scale (exact in fp32); for tests and references."""
        return self.values.astype(np.float32) * self.scales.astype(np.float32)[:, None]


# ----------------------------------------------------------------------------
# the micro-kernel: R rows x tb tokens over 64-byte steps of D
# ----------------------------------------------------------------------------

def _rows_codegen(rows, tb):
    """Codegen of _rows_kernel(rows, tb): see there."""
    def codegen(context, builder, sig, args):
        i8, i32, i64, f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
        vf, vi = ir.VectorType(f32, 16), ir.VectorType(i32, 16)
        em, xm, pm = (_Mat(context, builder, sig.args[j], args[j]) for j in (0, 4, 6))
        v0, d0, n64, t0, p0 = (context.cast(builder, args[j], sig.args[j], types.intp)
                               for j in (1, 2, 3, 5, 7))
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vf, [vf, vf, vf]), "llvm.fma.v16f32")
        c = [ir.Constant(i64, n) for n in range(max(rows, tb, 64) + 1)]
        slots = [[pm.vec(pm.at(builder.add(p0, c[r]), builder.mul(builder.add(t0, c[t]), c[16])),
                         0, f32) for t in range(tb)] for r in range(rows)]
        acc = [[cgutils.alloca_once_value(builder, builder.load(slots[r][t], align=4))
                for t in range(tb)] for r in range(rows)]
        with cgutils.for_range(builder, n64) as loop:
            d = builder.add(d0, builder.mul(loop.index, c[64]))
            rowp = [em.at(builder.add(v0, c[r]), d) for r in range(rows)]
            for r in range(rows):
                _prefetch(builder, builder.gep(rowp[r], [ir.Constant(i64, _PREFETCH)]))
            xrow = [xm.at(builder.add(t0, c[t]), d) for t in range(tb)]
            for q in range(4):
                w = [builder.sitofp(builder.sext(builder.load(em.vec(rowp[r], 16 * q, i8),
                                                              align=1), vi), vf)
                     for r in range(rows)]
                for t in range(tb):
                    xv = builder.load(xm.vec(xrow[t], 16 * q, f32), align=4)
                    for r in range(rows):
                        a = acc[r][t]
                        builder.store(builder.call(fma, [xv, w[r], builder.load(a)]), a)
        for r in range(rows):
            for t in range(tb):
                builder.store(builder.load(acc[r][t]), slots[r][t], align=4)
        return context.get_dummy_value()
    return codegen


def _rows_kernel(rows, tb):
    """An intrinsic k(e, v0, d0, n64, x, t0, part, p0) doing, for r < rows,
    t < tb and the 16 lanes l:

        part[p0+r, 16(t0+t)+l] += sum_{i < n64, j < 4} x[t0+t, d] * e[v0+r, d],
                                  d = d0 + 64i + 16j + l

    e int8 (V, D), x and part float32, all C-contiguous 2-D; the caller
    guarantees the ranges (no bounds checks)."""
    def typer(typingctx, e, v0, d0, n64, x, t0, part, p0):
        arrays = (e, x, part)
        if all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays):
            return types.none(e, v0, d0, n64, x, t0, part, p0), _rows_codegen(rows, tb)
        return None
    typer.__name__ = typer.__qualname__ = f"_rows_r{rows}_t{tb}"
    return intrinsic(typer)


# (rows per call, tokens) variants, the fastest measured (one core, weights in L2):
# 8 x 1, 4 x 2, 4 x 4, 3 x 8 (124 G multiply-adds/s at T = 8 and 16); rows 1 for
# a block's last rows. 1 x 16 (each weight converted once for 16 tokens) ran at
# 60: one activation load per FMA makes the load ports the limit, so 16 tokens
# are two blocks of 8 (the conversion, 2 uops per 16 weights, is the cheap part).
_r8_t1, _r1_t1 = _rows_kernel(8, 1), _rows_kernel(1, 1)
_r4_t2, _r1_t2 = _rows_kernel(4, 2), _rows_kernel(1, 2)
_r4_t4, _r1_t4 = _rows_kernel(4, 4), _rows_kernel(1, 4)
_r3_t8, _r1_t8 = _rows_kernel(3, 8), _rows_kernel(1, 8)


@njit(inline="always", cache=True)
def _pass(tb, e, v0, nr, d0, n64, x, t0, part):
    """Rows v0..v0+nr, D range d0..d0+64*n64, tokens t0..t0+tb (tb in 1, 2, 4, 8)."""
    r = 0
    if tb == 1:
        while r + 8 <= nr:
            _r8_t1(e, v0 + r, d0, n64, x, t0, part, r)
            r += 8
        for r in range(r, nr):
            _r1_t1(e, v0 + r, d0, n64, x, t0, part, r)
    elif tb == 2:
        while r + 4 <= nr:
            _r4_t2(e, v0 + r, d0, n64, x, t0, part, r)
            r += 4
        for r in range(r, nr):
            _r1_t2(e, v0 + r, d0, n64, x, t0, part, r)
    elif tb == 4:
        while r + 4 <= nr:
            _r4_t4(e, v0 + r, d0, n64, x, t0, part, r)
            r += 4
        for r in range(r, nr):
            _r1_t4(e, v0 + r, d0, n64, x, t0, part, r)
    elif tb == 8:
        while r + 3 <= nr:
            _r3_t8(e, v0 + r, d0, n64, x, t0, part, r)
            r += 3
        for r in range(r, nr):
            _r1_t8(e, v0 + r, d0, n64, x, t0, part, r)


@njit(fastmath=_FM, cache=True)
def _block(x, e, sc, out, v0, v1):
    """out[:, v0:v1] = scale * (x @ e[v0:v1].T) for one block of vocabulary rows."""
    _prefer_512()
    T, D = x.shape[0], e.shape[1]                      # x may be wider than D (staggered)
    nr = v1 - v0
    d64 = D - D % 64
    part = np.zeros((nr, T * 16), np.float32)          # (rows, T x 16 lanes)
    t0 = 0
    tb = 8
    while tb >= 1:                                     # T = 8a + 4b + 2c + d
        while T - t0 >= tb:
            dc = max(64, (_X_L1_BYTES // (4 * tb)) // 64 * 64)
            for d0 in range(0, d64, dc):
                _pass(tb, e, v0, nr, d0, (min(d64, d0 + dc) - d0) // 64, x, t0, part)
            t0 += tb
        tb //= 2
    for r in range(nr):
        s = np.uint32(np.uint32(sc[v0 + r]) << 16).view(np.float32)
        row = e[v0 + r]
        for t in range(T):
            total = np.float32(0.0)
            for lane in range(16):
                total += part[r, 16 * t + lane]
            for d in range(d64, D):                    # D % 64 tail, in order
                total += x[t, d] * np.float32(row[d])
            out[t, v0 + r] = s * total


@njit(parallel=True, fastmath=_FM, cache=True)
def _logits_kernel(x, e, sc, out):
    """out (T, V) = scale[v] * (x[:, :D] @ e (V, D).T), blocks of rows across threads."""
    V = e.shape[0]
    for b in prange((V + _BLOCK_ROWS - 1) // _BLOCK_ROWS):
        v0 = b * _BLOCK_ROWS
        _block(x, e, sc, out, v0, min(V, v0 + _BLOCK_ROWS))


def logits_int8(x, table: Int8Table) -> np.ndarray:
    """x @ dequantize(table).T in fp32: x (T, D) -> (T, V), or (D,) -> (V,).

    fp32 activations and accumulation; the only difference from the exact
    product with the dequantized table is the fp32 summation order.
    """
    values, scales = table.values, table.scales
    if values.dtype != np.int8 or values.ndim != 2 or not values.flags.c_contiguous:
        raise ValueError(f"logits_int8: table values must be C-contiguous 2-D int8, got "
                         f"{values.ndim}-D {values.dtype}")
    if scales.dtype != BF16 or scales.shape != (values.shape[0],):
        raise ValueError(f"logits_int8: scales must be bfloat16 of shape ({values.shape[0]},), "
                         f"got {scales.dtype} {scales.shape}")
    x = np.asarray(x)
    vector = x.ndim == 1
    x2 = np.ascontiguousarray(x.reshape(1, -1) if vector else x, dtype=np.float32)
    if x2.ndim != 2 or x2.shape[1] != values.shape[1]:
        raise ValueError(f"logits_int8: x must be (D,) or (T, D) with D={values.shape[1]}, "
                         f"got shape {x.shape}")
    out = np.empty((x2.shape[0], values.shape[0]), np.float32)       # (T, V)
    if x2.shape[0]:
        _logits_kernel(_staggered(x2), np.asarray(values),
                       np.ascontiguousarray(scales).view(np.uint16), out)
    return out[0] if vector else out


def _staggered(x: np.ndarray) -> np.ndarray:
    """x (T, D) copied into rows _ROW_STAGGER bytes past a multiple of 4 KiB apart:
    (T, stride >= D), the kernel reads the first D of each row. Rows 4 KiB apart (D = 6144: 24 KiB) share L1 sets:
    16 tokens' activations then evicted each other (3.5x slower at T = 16)."""
    t, d = x.shape
    stride = d + ((_ROW_STAGGER - 4 * d) % 4096) // 4                # floats per row
    buf = np.empty((t, stride), np.float32)                          # (T, stride)
    buf[:, :d] = x
    return buf


# ----------------------------------------------------------------------------
# building the table
# ----------------------------------------------------------------------------

@njit(fastmath={"nnan", "ninf"}, cache=True)
def _quantize_row(row, out):
    """One row of the bf16 table (uint16 bits) -> out (int8); returns the scale's
    bits: bf16(amax / 127), one bf16 step up when it rounded down (so no code
    clips), 1.0 for an all-zero row; q = round-half-even(e / scale), clipped to
    +-127. Finite values only (the quantizer refuses others); no fastmath flag
    that changes a finite result (no arcp)."""
    lim = np.float32(127.0)
    top = np.uint16(0)               # max |e| as bf16 bits: for finite values, |e| orders
    for d in range(row.shape[0]):    # as the bits without the sign (an integer max: 6x
        top = max(top, np.uint16(row[d] & np.uint16(0x7FFF)))      # faster than the float max)
    amax = np.uint32(np.uint32(top) << 16).view(np.float32)
    bits = round_bf16_bits(np.float32(amax / lim).view(np.uint32))
    s = np.uint32(bits).view(np.float32)
    if s * lim < amax:
        bits += np.uint32(0x10000)                     # next bf16 up (s > 0)
        s = np.uint32(bits).view(np.float32)
    if amax == 0:
        bits = np.uint32(0x3F800000)
        s = np.float32(1.0)
    for d in range(row.shape[0]):
        f = np.uint32(np.uint32(row[d]) << 16).view(np.float32)
        out[d] = np.int8(min(lim, max(-lim, np.rint(f / s))))
    return np.uint16(bits >> np.uint32(16))


@njit(parallel=True, cache=True)
def _quantize_rows(e, q, sbits):
    """_quantize_row for every row of e (uint16 (V, D)) into q and sbits, blocks of rows
    across threads."""
    V = e.shape[0]
    for b in prange((V + _BUILD_ROWS - 1) // _BUILD_ROWS):
        for v in range(b * _BUILD_ROWS, min(V, (b + 1) * _BUILD_ROWS)):
            sbits[v] = _quantize_row(e[v], q[v])


def quantize_table(embed: np.ndarray) -> Int8Table:
    """The bf16 (V, D) table (e.g. the mapped embedding) as an Int8Table; numba,
    parallel over rows (one pass over the 1.6 GB at Grok-1 size)."""
    if embed.dtype != BF16 or embed.ndim != 2:
        raise ValueError(f"quantize_table: expected a 2-D bfloat16 table, got "
                         f"{embed.ndim}-D {embed.dtype}")
    v, d = embed.shape
    values = np.empty((v, d), np.int8)                                  # (V, D)
    sbits = np.empty(v, np.uint16)                                       # (V,) bf16 bits
    _quantize_rows(np.ascontiguousarray(embed).view(np.uint16), values, sbits)
    return Int8Table(values, sbits.view(BF16))
