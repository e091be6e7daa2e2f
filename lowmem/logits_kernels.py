"""Logits from an int8 output table: one int8 row per vocabulary entry, fp32 activations
(and the int4 output table's builder, at the end: its logits are the generic int4 matmul).

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

In the int8-activation mode (``act16=True``) the activations are rounded to
int16 per row and the products are exact integer dot products (``vpdpwssd``):
1.3x faster from 8 rows on, where the fp32 path is bound by its FMAs (see the
int16 section below).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from lowmem.act8_kernels import _V16I, _has_vnni
from lowmem.simd_kernels import _Mat, _prefer_512, _prefetch
from quant.bf16 import round_bf16_bits
from quant.int4_levels import STUDENT_T_LEVELS, quantize_levels
from quant.qweight import BF16, TILE_COLS, QWeight, tile_values

_FM = {"contract"}
_BLOCK_ROWS = 64          # vocabulary rows per parallel work item
_X_L1_BYTES = 32768       # activations of the tokens x one D chunk kept in L1
_L1_TOKENS = 16           # ... for up to this many tokens (more tokens: the chunk of 16)
_PREFETCH = 1024          # bytes ahead along each row that the micro-kernel prefetches
_GROUP_PREFETCH = 4096    # the same in a grouped table (its one stream; 1024 there: 1.10x the read)
# Where the fp32 kernel's one-token variants prefetch to: L2 (prefetcht1), not L1. A
# token's weights are converted once and used once, and prefetches into L1 cost the
# loads' own fill buffers: Grok-1's grouped table, one token, 38.3-38.9 GB/s on two
# threads against 31.9-33.4 into L1 (20.5-21.2 against 15.9-16.8 on one), copies of
# the module alternated in one process; the int16 kernel is faster into L1.
_ONE_TOKEN_LOCALITY = 2
_ROW_STAGGER = 256        # activation rows start this many bytes apart modulo 4 KiB
_BUILD_ROWS = 64          # vocabulary rows per work item when building the table


GROUP_ROWS = 8            # vocabulary rows interleaved in a grouped table (Int8Table.grouped)
GROUP_STEP = 64           # ... by this many values (bytes) of each row in turn


@dataclass(frozen=True)
class Int8Table:
    """The tied output matrix as int8 values (V, D) and one bf16 scale per row (V,).

    grouped: the values of each GROUP_ROWS rows interleaved by GROUP_STEP bytes
    (row v's values d..d+63 at (v // 8) * 8D + (d // 64) * 512 + (v % 8) * 64,
    needing V % 8 == 0 and D % 64 == 0): what the kernel reads at one step of
    its 8 rows is then one 512-byte run, and the table one stream instead of 8
    (Grok-1, one token: 16.4 ms against 19.4 in rows, a read of the bytes 16.4;
    docs/PERFORMANCE.md section 3, session 17). Same bytes, same logits.
    """
    values: np.ndarray    # (V, D) int8, rows in order or grouped
    scales: np.ndarray    # (V,) bf16
    grouped: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    def natural(self) -> np.ndarray:
        """(V, D) int8 values, rows in order (a copy when grouped)."""
        if not self.grouped:
            return self.values
        v, d = self.values.shape
        return np.ascontiguousarray(self.values.reshape(
            v // GROUP_ROWS, d // GROUP_STEP, GROUP_ROWS, GROUP_STEP).transpose(0, 2, 1, 3)
        ).reshape(v, d)

    def dequantize(self) -> np.ndarray:
        """(V, D) fp32: q * scale (exact in fp32); for tests and references."""
        return self.natural().astype(np.float32) * self.scales.astype(np.float32)[:, None]


def groupable(v: int, d: int) -> bool:
    """Whether a (v, d) table can be grouped (Int8Table.grouped)."""
    return v % GROUP_ROWS == 0 and d % GROUP_STEP == 0


def group_rows(values: np.ndarray) -> np.ndarray:
    """(V, D) int8 in row order -> the grouped order (Int8Table.grouped), a copy."""
    v, d = values.shape
    return np.ascontiguousarray(values.reshape(
        v // GROUP_ROWS, GROUP_ROWS, d // GROUP_STEP, GROUP_STEP).transpose(0, 2, 1, 3)
    ).reshape(v, d)


# ----------------------------------------------------------------------------
# the micro-kernel: R rows x tb tokens over 64-byte steps of D
# ----------------------------------------------------------------------------

def _row_at(builder, em, g, v, d):
    """Pointer to value d of row v of the table em (a _Mat, (V, D) int8) in rows
    (g = 1) or grouped by g = GROUP_ROWS (Int8Table.grouped); d % 32 == 0."""
    i64 = ir.IntType(64)
    step, gs = ir.Constant(i64, GROUP_STEP), ir.Constant(i64, GROUP_STEP.bit_length() - 1)
    base = builder.add(builder.mul(builder.sdiv(v, g), builder.mul(g, em.cols)),
                       builder.mul(builder.srem(v, g), step))           # row v's first piece
    along = builder.add(builder.mul(builder.ashr(d, gs), builder.mul(g, step)),
                        builder.and_(d, ir.Constant(i64, GROUP_STEP - 1)))
    return builder.gep(em.data, [builder.add(base, along)])


def _ahead(builder, g):
    """The prefetch distance in bytes for a table grouped by g (1: rows)."""
    i64 = ir.IntType(64)
    return builder.select(builder.icmp_signed("==", g, ir.Constant(i64, 1)),
                          ir.Constant(i64, _PREFETCH), ir.Constant(i64, _GROUP_PREFETCH))

def _rows_codegen(rows, tb):
    """Codegen of _rows_kernel(rows, tb): see there."""
    def codegen(context, builder, sig, args):
        i8, i32, i64, f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
        vf, vi = ir.VectorType(f32, 16), ir.VectorType(i32, 16)
        em, xm, pm = (_Mat(context, builder, sig.args[j], args[j]) for j in (0, 5, 7))
        g, v0, d0, n64, t0, p0 = (context.cast(builder, args[j], sig.args[j], types.intp)
                                  for j in (1, 2, 3, 4, 6, 8))
        ahead = _ahead(builder, g)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vf, [vf, vf, vf]), "llvm.fma.v16f32")
        c = [ir.Constant(i64, n) for n in range(max(rows, tb, 64) + 1)]
        slots = [[pm.vec(pm.at(builder.add(p0, c[r]), builder.mul(builder.add(t0, c[t]), c[16])),
                         0, f32) for t in range(tb)] for r in range(rows)]
        acc = [[cgutils.alloca_once_value(builder, builder.load(slots[r][t], align=4))
                for t in range(tb)] for r in range(rows)]
        with cgutils.for_range(builder, n64) as loop:
            d = builder.add(d0, builder.mul(loop.index, c[64]))
            rowp = [_row_at(builder, em, g, builder.add(v0, c[r]), d) for r in range(rows)]
            for r in range(rows):
                _prefetch(builder, builder.gep(rowp[r], [ahead]),
                          _ONE_TOKEN_LOCALITY if tb == 1 else 3)
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
    """An intrinsic k(e, g, v0, d0, n64, x, t0, part, p0) doing, for r < rows,
    t < tb and the 16 lanes l:

        part[p0+r, 16(t0+t)+l] += sum_{i < n64, j < 4} x[t0+t, d] * e[v0+r, d],
                                  d = d0 + 64i + 16j + l

    e int8 (V, D) in rows (g = 1) or grouped (g = GROUP_ROWS, Int8Table.grouped),
    x and part float32, all C-contiguous 2-D; the caller guarantees the ranges
    (no bounds checks)."""
    def typer(typingctx, e, g, v0, d0, n64, x, t0, part, p0):
        arrays = (e, x, part)
        if all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays):
            return types.none(e, g, v0, d0, n64, x, t0, part, p0), _rows_codegen(rows, tb)
        return None
    typer.__name__ = typer.__qualname__ = f"_rows_r{rows}_t{tb}"
    return intrinsic(typer)


# (rows per call, tokens) variants, the fastest measured (one core, weights in L2):
# 8 x 1, 4 x 2, 4 x 4, 3 x 8 (124 G multiply-adds/s at T = 8 and 16); rows 1 for
# a block's last rows. 1 x 16 (each weight converted once for 16 tokens) ran at
# 60: one activation load per FMA makes the load ports the limit, so 16 tokens
# are two blocks of 8 (the conversion, 2 uops per 16 weights, is the cheap part).

def _rows_pass(kernel):
    """An inline njit pass(T, e, g, v0, nr, d0, n, x, part) running kernel(rows, tb)
    (an intrinsic factory: fp32 or int16 activations) over rows v0..v0+nr, n steps of
    D from d0, for tokens 0..T in blocks of tb = 8, 4, 2, 1 (T = 8a + 4b + 2c + d):
    blocks of the variants' rows, then one row at a time for a block's last rows."""
    k8_1, k1_1, k4_2, k1_2 = kernel(8, 1), kernel(1, 1), kernel(4, 2), kernel(1, 2)
    k4_4, k1_4, k3_8, k1_8 = kernel(4, 4), kernel(1, 4), kernel(3, 8), kernel(1, 8)

    @njit(inline="always", cache=True)
    def run(tb, e, g, v0, nr, d0, n, x, t0, part):
        r = 0
        if tb == 1:
            while r + 8 <= nr:
                k8_1(e, g, v0 + r, d0, n, x, t0, part, r)
                r += 8
            for r in range(r, nr):
                k1_1(e, g, v0 + r, d0, n, x, t0, part, r)
        elif tb == 2:
            while r + 4 <= nr:
                k4_2(e, g, v0 + r, d0, n, x, t0, part, r)
                r += 4
            for r in range(r, nr):
                k1_2(e, g, v0 + r, d0, n, x, t0, part, r)
        elif tb == 4:
            while r + 4 <= nr:
                k4_4(e, g, v0 + r, d0, n, x, t0, part, r)
                r += 4
            for r in range(r, nr):
                k1_4(e, g, v0 + r, d0, n, x, t0, part, r)
        elif tb == 8:
            while r + 3 <= nr:
                k3_8(e, g, v0 + r, d0, n, x, t0, part, r)
                r += 3
            for r in range(r, nr):
                k1_8(e, g, v0 + r, d0, n, x, t0, part, r)

    @njit(inline="always", cache=True)
    def run_tokens(T, e, g, v0, nr, d0, n, x, part):
        t0 = 0
        tb = 8
        while tb >= 1:
            while T - t0 >= tb:
                run(tb, e, g, v0, nr, d0, n, x, t0, part)
                t0 += tb
            tb //= 2
    return run_tokens


_pass = _rows_pass(_rows_kernel)     # n = 64-byte steps of D


@njit(inline="always", cache=True)
def _chunk_width(tokens, itemsize, step):
    """Values of D per chunk (a multiple of step): the activations of up to
    _L1_TOKENS tokens over one chunk fill _X_L1_BYTES. A block takes a chunk of
    its rows, then every token block over it, then the next chunk: rows are read
    from memory once and reused from L1/L2 for each token block (token blocks
    outermost read them from L2 again for the second block of 16 tokens: 1.15-1.2x
    slower at T = 16)."""
    return max(step, (_X_L1_BYTES // (itemsize * min(tokens, _L1_TOKENS))) // step * step)


@njit(fastmath=_FM, cache=True)
def _block(x, e, g, sc, out, v0, v1):
    """out[:, v0:v1] = scale * (x @ e[v0:v1].T) for one block of vocabulary rows
    (e in rows, g = 1, or grouped by g: then D % 64 == 0, no tail)."""
    _prefer_512()
    T, D = x.shape[0], e.shape[1]                      # x may be wider than D (staggered)
    nr = v1 - v0
    d64 = D - D % 64
    part = np.zeros((nr, T * 16), np.float32)          # (rows, T x 16 lanes)
    dc = _chunk_width(T, 4, 64)
    for d0 in range(0, d64, dc):                       # each chunk of rows read once
        _pass(T, e, g, v0, nr, d0, (min(d64, d0 + dc) - d0) // 64, x, part)
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
def _logits_kernel(x, e, g, sc, out):
    """out (T, V) = scale[v] * (x[:, :D] @ e (V, D).T), blocks of rows across threads
    (e grouped by g, 1: in rows)."""
    V = e.shape[0]
    for b in prange((V + _BLOCK_ROWS - 1) // _BLOCK_ROWS):
        v0 = b * _BLOCK_ROWS
        _block(x, e, g, sc, out, v0, min(V, v0 + _BLOCK_ROWS))


def logits_int8(x, table: Int8Table, act16: bool = False) -> np.ndarray:
    """x @ dequantize(table).T: x (T, D) -> (T, V), or (D,) -> (V,), fp32.

    act16 False: fp32 activations and accumulation; the only difference from
    the exact product with the dequantized table is the fp32 summation order.
    act16 True (the int8-activation mode): each row of x rounded to int16 with
    one scale, exact integer sums (see the int16 section above).
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
    if table.grouped and not groupable(*values.shape):
        raise ValueError(f"logits_int8: a grouped table needs V % {GROUP_ROWS} == 0 and "
                         f"D % {GROUP_STEP} == 0, got {values.shape}")
    g = GROUP_ROWS if table.grouped else 1
    out = np.empty((x2.shape[0], values.shape[0]), np.float32)       # (T, V)
    if x2.shape[0] and act16:
        t, d = x2.shape
        stride = d + ((_ROW_STAGGER - 2 * d) % 4096) // 2               # int16 per row
        xq, xs = _quantize16(x2, stride, act16_qmax(d))                  # (T, stride), (T,)
        _logits16_kernel(xq, xs, np.asarray(values), g,
                         np.ascontiguousarray(scales).view(np.uint16), out)
    elif x2.shape[0]:
        _logits_kernel(_staggered(x2), np.asarray(values), g,
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
# int16 activations: the int8-activation mode's logits (integer dot products)
# ----------------------------------------------------------------------------
#
# With int8 activations on (EngineOptions.act_int8) the logits of a batched step
# are FMA-bound, not read-bound: 16 rows x 131072 x 6144 fp32 multiply-adds
# (77 ms, the table's read 16 ms). Here each token's activation row is
# quantized to int16 with ONE scale (max |x| / qmax) and each 32 int8 weights,
# sign-extended to int16 once for all tokens, meet 32 activations in one
# ``vpdpwssd`` (AVX-512 VNNI: 32 multiply-adds into 16 int32 lanes, exact; half
# the instructions of the fp32 path and no conversion per token). The int32
# lane sums are exact (qmax is chosen so no lane can overflow) and summed in
# int64; each logit is then float(sum) * scale_w * scale_x. The one rounding is
# the activation's, at most max |x| / (2 qmax) per entry (qmax = 32767 for D up
# to 8257): ~1000x below the int8 activations' of the experts and about 100x
# below what the table's own int8 rounding moves a logit.

_LANE_BOUND = 2**31 - 1    # int32 lane: D / 16 products of |q_w| <= 127 and |q_x| <= qmax


def act16_qmax(d: int) -> int:
    """The int16 activation range for rows of d: 32767, lower for d > 8257 so
    that no int32 lane sum (ceil(d / 16) products) can overflow."""
    return int(min(32767, _LANE_BOUND // (127 * -(-d // 16))))


def _dot16(builder, vnni, acc, w, x):
    """acc (16 x i32) + per lane, the sum of the 2 products of int16 pairs w * x
    (each 16 x i32 viewed as 32 x i16): vpdpwssd, or portable IR."""
    if vnni:
        # dword-typed operands: LLVM <= 19's declaration (newer ones upgrade it on parsing)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            _V16I, [_V16I, _V16I, _V16I]), "llvm.x86.avx512.vpdpwssd.512")
        return builder.call(fn, [acc, w, x])
    v16h, v32 = ir.VectorType(ir.IntType(16), 32), ir.VectorType(ir.IntType(32), 32)
    prod = builder.mul(builder.sext(builder.bitcast(w, v16h), v32),
                       builder.sext(builder.bitcast(x, v16h), v32))       # (32,) i32
    for j in range(2):
        acc = builder.add(acc, builder.shuffle_vector(
            prod, ir.Constant(v32, ir.Undefined), ir.Constant(_V16I, [2 * i + j for i in range(16)])))
    return acc


def _rows16_codegen(rows, tb, vnni):
    """Codegen of _rows16_kernel(rows, tb, vnni): see there."""
    def codegen(context, builder, sig, args):
        use_vnni = _has_vnni(context) if vnni is None else vnni
        i8, i16, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(64)
        em, xm, pm = (_Mat(context, builder, sig.args[j], args[j]) for j in (0, 5, 7))
        g, v0, d0, n32, t0, p0 = (context.cast(builder, args[j], sig.args[j], types.intp)
                                  for j in (1, 2, 3, 4, 6, 8))
        ahead = _ahead(builder, g)
        c = [ir.Constant(i64, n) for n in range(max(rows, tb, 32) + 1)]
        slots = [[builder.bitcast(pm.at(builder.add(p0, c[r]),
                                        builder.mul(builder.add(t0, c[t]), c[16])),
                                  _V16I.as_pointer()) for t in range(tb)] for r in range(rows)]
        acc = [[cgutils.alloca_once_value(builder, builder.load(slots[r][t], align=4))
                for t in range(tb)] for r in range(rows)]
        with cgutils.for_range(builder, n32) as loop:
            d = builder.add(d0, builder.mul(loop.index, c[32]))
            w = []
            for r in range(rows):
                ptr = _row_at(builder, em, g, builder.add(v0, c[r]), d)
                _prefetch(builder, builder.gep(ptr, [ahead]))
                raw = builder.load(builder.bitcast(ptr, ir.VectorType(i8, 32).as_pointer()),
                                   align=1)
                w.append(builder.bitcast(builder.sext(raw, ir.VectorType(i16, 32)), _V16I))
            for t in range(tb):
                xp = builder.bitcast(xm.at(builder.add(t0, c[t]), d), _V16I.as_pointer())
                xv = builder.load(xp, align=4)                          # 32 x i16 as 16 x i32
                for r in range(rows):
                    a = acc[r][t]
                    builder.store(_dot16(builder, use_vnni, builder.load(a), w[r], xv), a)
        for r in range(rows):
            for t in range(tb):
                builder.store(builder.load(acc[r][t]), slots[r][t], align=4)
        return context.get_dummy_value()
    return codegen


def _rows16_kernel(rows, tb, vnni=None):
    """An intrinsic k(e, g, v0, d0, n32, x, t0, part, p0) doing, for r < rows,
    t < tb and the 16 int32 lanes l:

        part[p0+r, 16(t0+t)+l] += sum_{i < n32, j < 2} x[t0+t, d] * e[v0+r, d],
                                  d = d0 + 32i + 2l + j

    e int8 (V, D) in rows or grouped (g, see _rows_kernel), x int16, part int32,
    all C-contiguous 2-D; the caller guarantees the ranges (no bounds checks).
    vnni: None = vpdpwssd where the target has AVX-512 VNNI, False = portable IR
    (the same integers)."""
    def typer(typingctx, e, g, v0, d0, n32, x, t0, part, p0):
        arrays = (e, x, part)
        if all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays) \
                and (e.dtype, x.dtype, part.dtype) == (types.int8, types.int16, types.int32):
            return types.none(e, g, v0, d0, n32, x, t0, part, p0), _rows16_codegen(rows, tb, vnni)
        return None
    typer.__name__ = typer.__qualname__ = f"_rows16_r{rows}_t{tb}_{vnni}"
    return intrinsic(typer)


# (rows, tokens) per call as the fp32 kernel's (3 x 8: 24 int32 accumulators in
# registers with the rows' weights and one activation vector).
_pass16 = _rows_pass(_rows16_kernel)     # n = 32-value steps of D


@njit(cache=True)
def _block16(xq, xs, e, g, sc, out, v0, v1):
    """out[:, v0:v1] = scale_w * scale_x * (xq @ e[v0:v1].T) for one block of rows."""
    _prefer_512()
    T, D = xq.shape[0], e.shape[1]
    nr = v1 - v0
    d32 = D - D % 32
    part = np.zeros((nr, T * 16), np.int32)            # (rows, T x 16 lanes)
    dc = _chunk_width(T, 2, 32)
    for d0 in range(0, d32, dc):                       # each chunk of rows read once
        _pass16(T, e, g, v0, nr, d0, (min(d32, d0 + dc) - d0) // 32, xq, part)
    for r in range(nr):
        s = np.float64(np.uint32(np.uint32(sc[v0 + r]) << 16).view(np.float32))
        row = e[v0 + r]
        for t in range(T):
            total = np.int64(0)
            for lane in range(16):
                total += part[r, 16 * t + lane]
            for d in range(d32, D):                    # D % 32 tail
                total += np.int64(xq[t, d]) * np.int64(row[d])
            out[t, v0 + r] = np.float32(np.float64(total) * (s * np.float64(xs[t])))


@njit(parallel=True, cache=True)
def _logits16_kernel(xq, xs, e, g, sc, out):
    """out (T, V) from int16 activations xq (T, >= D) with scales xs (T,), blocks of
    rows across threads."""
    V = e.shape[0]
    for b in prange((V + _BLOCK_ROWS - 1) // _BLOCK_ROWS):
        v0 = b * _BLOCK_ROWS
        _block16(xq, xs, e, g, sc, out, v0, min(V, v0 + _BLOCK_ROWS))


@njit(cache=True)
def _quantize16(x, stride, qmax):
    """x (T, D) fp32 -> (q int16 (T, stride), first D used; scale float32 (T,)):
    scale = max |x_t| / qmax, q = round-half-even(x / scale) (0 for a zero row)."""
    T, D = x.shape
    q = np.zeros((T, stride), np.int16)
    scale = np.zeros(T, np.float32)
    lim = np.float32(qmax)
    for t in range(T):
        m = np.float32(0.0)
        for d in range(D):
            m = max(m, abs(x[t, d]))
        if m > 0:
            s = m / lim
            scale[t] = s
            for d in range(D):
                q[t, d] = np.int16(min(lim, max(-lim, np.rint(x[t, d] / s))))
    return q, scale


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
def _quantize_rows(e, q, sbits, g):
    """_quantize_row for every row of e (uint16 (V, D)) into q (grouped by g, 1: in
    rows) and sbits, blocks of rows across threads."""
    V, D = e.shape
    flat = q.reshape(-1)
    for b in prange((V + _BUILD_ROWS - 1) // _BUILD_ROWS):
        row = np.empty(D, np.int8)
        for v in range(b * _BUILD_ROWS, min(V, (b + 1) * _BUILD_ROWS)):
            sbits[v] = _quantize_row(e[v], row)
            base = (v // g) * g * D + (v % g) * GROUP_STEP         # see Int8Table.grouped
            for d in range(D):
                flat[base + (d // GROUP_STEP) * GROUP_STEP * g + d % GROUP_STEP] = row[d]


def quantize_table(embed: np.ndarray) -> Int8Table:
    """The bf16 (V, D) table (e.g. the mapped embedding) as an Int8Table, grouped
    where its shape allows (Int8Table.grouped); numba, parallel over rows (one
    pass over the 1.6 GB at Grok-1 size)."""
    if embed.dtype != BF16 or embed.ndim != 2:
        raise ValueError(f"quantize_table: expected a 2-D bfloat16 table, got "
                         f"{embed.ndim}-D {embed.dtype}")
    v, d = embed.shape
    grouped = groupable(v, d)
    values = np.empty((v, d), np.int8)                                  # (V, D)
    sbits = np.empty(v, np.uint16)                                       # (V,) bf16 bits
    _quantize_rows(np.ascontiguousarray(embed).view(np.uint16), values, sbits,
                   GROUP_ROWS if grouped else 1)
    return Int8Table(values, sbits.view(BF16), grouped)


# ----------------------------------------------------------------------------
# the int4 output table (--output-table int4)
# ----------------------------------------------------------------------------

TABLE4_GROUP = 32          # table values (along D) per int4 scale
# vocabulary rows quantized per step (a 195 MB fp32 block at D = 6144): 124 tiles of 64,
# not a power of two, so that the block's rows do not all fall in one L1 set (a width of
# 8192 made the transposing copy 4.5x slower)
_TABLE4_ROWS = 7936


@njit(parallel=True, cache=True)
def _transposed_f32(e, v0, out):
    """out (D, n) float32 <- rows v0 .. v0 + n of e (uint16 bf16 bits (V, D)), transposed
    in 64 x 64 tiles (5x faster than numpy's strided copy of the transpose)."""
    d, n = out.shape
    across = (n + 63) // 64                            # tiles along a row of out
    for tile in prange(((d + 63) // 64) * across):
        a0, b0 = (tile // across) * 64, (tile % across) * 64
        for j in range(b0, min(n, b0 + 64)):
            for a in range(a0, min(d, a0 + 64)):
                out[a, j] = np.uint32(np.uint32(e[v0 + j, a]) << 16).view(np.float32)


def quantize_table4(embed: np.ndarray) -> QWeight:
    """The bf16 (V, D) table as an int4 QWeight of its transpose, (K, N) = (D, V):
    groups of TABLE4_GROUP along D with a bf16 scale each and the int4 experts'
    default level table (STUDENT_T_LEVELS); 0.5625 bytes per value, 0.45 GB at
    Grok-1 size, as llama.cpp's Q4_0.

    Why the transpose: the logits are then ``x @ W`` for the generic quantized
    matmul (lowmem.cpu_kernels.matmul, its int8-activation kernels): at one
    token it reads the 0.45 GB at the read floor, where a kernel of its own
    would repeat those kernels' nibble code. Built at load (6-7 s at Grok-1
    size), a block of rows at a time, with the int4 experts' search
    (quant.int4_levels.quantize_levels). Stored in tiles (QWeight.tiled) when V
    is a multiple of 64, as the experts: one sequential read, 11.1 ms a token
    against 13.3 in rows at Grok-1 size (a read of its bytes: 11.4;
    docs/PERFORMANCE.md section 3, session 16)."""
    if embed.dtype != BF16 or embed.ndim != 2:
        raise ValueError(f"quantize_table4: expected a 2-D bfloat16 table, got "
                         f"{embed.ndim}-D {embed.dtype}")
    v, d = embed.shape
    if d % TABLE4_GROUP:
        raise ValueError(f"quantize_table4: the table's width {d} is not a multiple of "
                         f"{TABLE4_GROUP} (the int4 groups along it)")
    values = np.empty((d // 2, v), np.uint8)                             # (D/2, V) packed
    scales = np.empty((d // TABLE4_GROUP, v), BF16)                      # (D/32, V)
    bits = np.ascontiguousarray(embed).view(np.uint16)                  # (V, D) bf16 bits
    full = np.empty((d, min(_TABLE4_ROWS, v)), np.float32)              # reused (D, n)
    for v0 in range(0, v, _TABLE4_ROWS):
        n = min(_TABLE4_ROWS, v - v0)
        block = full if n == full.shape[1] else np.empty((d, n), np.float32)
        _transposed_f32(bits, v0, block)
        w = quantize_levels(block, None, TABLE4_GROUP, STUDENT_T_LEVELS).weight
        values[:, v0:v0 + block.shape[1]] = w.values
        scales[:, v0:v0 + block.shape[1]] = w.scales
    if v % TILE_COLS:
        return QWeight(values, scales, 4, TABLE4_GROUP, STUDENT_T_LEVELS)
    return QWeight(tile_values(values, 4), scales, 4, TABLE4_GROUP, STUDENT_T_LEVELS, True)
