"""Opt-in int8-activation micro-kernels: int8 dot products on the stored weights.

The fp32 micro-kernels of lowmem.simd_kernels decode every weight to a float
and spend one FMA lane per weight per token, so from 2 tokens on they are
bound by the FMA ports, not by memory (Zen 5, one core: int4 6144 x 32768 at
8 tokens ~16 ms against a ~3 ms read). Here, as llama.cpp does for Q4_0/Q8_0,
the activations are quantized to int8 per block of 32 inputs (a numerics
change, hence opt-in: ``cpu_kernels.matmul(..., act_int8=True)`` or
``LOWMEM_ACT_INT8=1``) and each VNNI ``vpdpbusd`` multiplies 64 weight bytes
by 64 activation bytes and sums them by 4 into 16 int32 lanes: 4x the
multiply-adds of an FMA, exactly, in integers.

A call takes one block of 32 weight rows x 64 columns (one 64-column strip)
for up to _MAX_TB tokens. The weights stay in their stored layout: each group
of 4 rows is turned into 16-column dword vectors of those 4 rows' bytes by
two levels of in-lane byte/word unpacks (int4: the nibbles are split in
between; int4 tiles, quant.qweight.tile_values, hold those dwords already, a
mask and a shift split their nibbles, and their sums stay in column order),
as unsigned bytes (int4 nibble q + 8, int8 byte q + 128; int4 with
a level table (QWeight.levels, the default of int4 models) levels[nibble] +
128, one vpshufb per 64 nibbles, or with AVX-512 VBMI a vpermb that needs no
mask, _Perm); each token's int32 sums start at -offset
times the block's activation sum, so they end exact whatever the table.
The sums are converted, times the activation scale, and added into the fp32
accumulators with the weight scale, all in the unpacks' lane order (the
scales are permuted to it once per call): the accumulators of a strip stay
permuted over all the blocks of a call of tile_strips and its caller puts
them back in column order once (natural_order), instead of 4 64-lane
shuffles per token and block. Without AVX-512 VNNI the same dot product (and
the table lookup, a select chain) is plain LLVM vector code (correct on any
CPU, slower).

Measured (Zen 5 VM, idle, tools/bench_kernels.py --act-int8; ratio to a read
of the same bytes): int4 one token 0.78-0.91 with 2 threads, 1.01-1.14 with
one (fp32 kernels: 1.76-1.83), 8 tokens 1.9-2.3 (fp32 3.0-3.3). Lane order
and 6 tokens a call (shared 2-core VM, load average 0.8-0.9, against the
previous kernels interleaved in one process, Grok-1 gate/down int4, int4
levels g32, int8 gate): time 0.96-1.00x at T = 1, 0.83-1.01x at 4, 0.74-0.81x
at 5, 0.77-0.83x at 6, 0.90-0.98x at 8 with 2 threads (one thread: 0.97-1.09x,
0.80-0.98x, 0.68-0.80x, 0.66-0.82x, 0.87-1.00x); read ratio at 8 tokens
1.34-1.93 (previous 1.56-2.12, same runs). Numerics and
why it is off by default: docs/PERFORMANCE.md, issue 10 section.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from lowmem.simd_kernels import _Mat, _has_feature, _prefetch_ahead, _splat, _tile_row

BLOCK = 32                 # weight rows (= activations) per int8 activation scale
_MAX_TB = 6                # tokens per call (24 int32 register accumulators; see tile_strips)
_PREFETCH = 256            # bytes ahead along a row that a call prefetches
# Tiled values: this far ahead in the tiles' stream, and into L2 only (prefetcht1, rows
# too), not simd_kernels.TILE_PREFETCH's 4096 into L1. Measured on the Zen 5 VM, 2 threads,
# Grok-1's gate, up and down, the two prefetches alternated matrix by matrix: int8
# 1.05-1.64x the GB/s at 2-6 tokens (0.98x at one); int4 with levels 1.00-1.18x at
# one token, 1.0-1.25x at 2-6; no prefetch at all: int8 1.13-1.42x at 1-3 tokens but
# 0.92x at 6, int4 0.82-0.91x (docs/PERFORMANCE.md, section 3, session 22).
_TILE_PREFETCH = 8192
# ... except int8 weights for up to this many tokens: they are not prefetched at all
# (the hardware's own stream prefetch keeps up when a byte costs this little work):
# 1.11-1.22x the GB/s at 2 tokens in 3 runs of 4 (one equal), 1.0-1.11x at 3 (Grok-1's
# int8 gate, up and down, alternated); at 4-6 tokens the L2 prefetch is 1.0-1.7x as
# fast as none.
_I8_UNPREFETCHED_TOKENS = 3
_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_V64B = ir.VectorType(_I8, 64)
_V16I = ir.VectorType(_I32, 16)
_V16F = ir.VectorType(ir.FloatType(), 16)
# A compiler-only memory fence (no instruction) between a kernel's quads of
# rows. Without it LLVM's scheduler hoists the later quads' row loads above
# the earlier quads' dot products and, with 4 x tb accumulators live, spills
# the loaded rows to the stack: Grok-1's int8 gate and down at 6 tokens ran
# 1.5x slower inside tile_strips than the same kernel called alone, and int4
# at 4 tokens 1.1x (docs/PERFORMANCE.md, section 3, session 19). The CPU still
# runs ahead out of order; only the compiled order is kept.
_BARRIER = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "", "~{memory}", side_effect=True)


@njit(cache=True)
def quantize_activations(x):
    """x (T, K) float32, K % 32 == 0 -> (xq int8 (T, K), scale float32
    (T, K // 32), sum of xq int32 (T, K // 32)): per block of 32,
    scale = max |x| / 127 and xq = round(x / scale) (half to even)."""
    T, K = x.shape
    nb = K // BLOCK
    xq = np.empty((T, K), np.int8)
    dx = np.empty((T, nb), np.float32)
    bs = np.empty((T, nb), np.int32)
    for t in range(T):
        for b in range(nb):
            m = np.float32(0.0)
            for i in range(b * BLOCK, (b + 1) * BLOCK):
                m = max(m, abs(x[t, i]))
            inv = np.float32(127.0) / m if m > 0 else np.float32(0.0)
            s = 0
            for i in range(b * BLOCK, (b + 1) * BLOCK):
                q = min(127, max(-127, int(np.rint(x[t, i] * inv))))
                xq[t, i] = q
                s += q
            dx[t, b] = m / np.float32(127.0)
            bs[t, b] = s
    return xq, dx, bs


def _unpack_mask(lanes, high):
    """shufflevector mask of x86 punpckl/h (per 128-bit lane) on `lanes` elements."""
    per = lanes // 4  # elements per 128-bit lane
    out = []
    for lane in range(4):
        for i in range(per // 2):
            src = per * lane + i + (per // 2 if high else 0)
            out += [src, lanes + src]
    return ir.Constant(ir.VectorType(_I32, lanes), out)


def _unpack(builder, a, b, high, elem):
    """punpckl/h of two 512-bit values viewed as `elem` lanes (8 or 16 bits)."""
    lanes = 512 // elem.width
    ty = ir.VectorType(elem, lanes)
    r = builder.shuffle_vector(builder.bitcast(a, ty), builder.bitcast(b, ty),
                               _unpack_mask(lanes, high))
    return builder.bitcast(r, _V16I)


class _Perm:
    """A table for vpermb (AVX-512 VBMI): 64 bytes, each index byte's low 6 bits
    pick one, and the 16 entries repeat 4 times, so the 2 bits above a nibble do
    not matter: a nibble needs no mask (per 64 bytes a shift and two vpermb
    instead of two masks, a shift and two vpshufb or xors)."""

    def __init__(self, vec):
        self.vec = vec


def _nibbles(builder, w, table):
    """64 bytes (as <16 x i32>) -> their low and their high nibbles, one per
    byte, as the unsigned operands u (nibble q + 8, or with a level table, see
    _table, levels[nibble] + 128)."""
    if isinstance(table, _Perm):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            _V64B, [_V64B, _V64B]), "llvm.x86.avx512.permvar.qi.512")
        return [builder.bitcast(builder.call(fn, [table.vec, builder.bitcast(n, _V64B)]), _V16I)
                for n in (w, builder.lshr(w, _splat(_I32, 4)))]
    lo = builder.and_(w, _splat(_I32, 0x0F0F0F0F))
    hi = builder.and_(builder.lshr(w, _splat(_I32, 4)), _splat(_I32, 0x0F0F0F0F))
    if table is None:
        return [builder.xor(n, _splat(_I32, 0x08080808)) for n in (lo, hi)]
    return [_lookup(builder, table, n) for n in (lo, hi)]


def _quad_q4(builder, p0, p1, table=None):
    """Packed rows p0 (weight rows k, k+1) and p1 (k+2, k+3), 64 columns ->
    4 dword vectors [u_k, u_k+1, u_k+2, u_k+3] (u: see _nibbles); vector
    2v + h, dword 4l + m = column 16l + 8v + 4h + m."""
    out = []
    for v in (False, True):
        lo, hi = _nibbles(builder, _unpack(builder, p0, p1, v, _I8), table)  # [p0[c], p1[c]]
        out += [_unpack(builder, lo, hi, h, _I8) for h in (False, True)]
    return out


def _quad_q4_tiles(builder, p0, p1, table=None):
    """The two stored rows of a quad of an int4 tile (quant.qweight: in each, byte
    4d + i holds row k + i of columns 16n + d of its 32, nibble n) -> the 4
    dword vectors [u_k, u_k+1, u_k+2, u_k+3] of columns 0-15, 16-31, 32-47 and
    48-63 (u: see _nibbles): two masks, a shift and two lookups per 64 bytes,
    no byte transpose, the columns in order."""
    return [u for p in (p0, p1) for u in _nibbles(builder, builder.bitcast(p, _V16I), table)]


def _table(context, builder, ty, value, vnni, vbmi=False):
    """The level table argument (float32 (16,) or None) as the bytes
    levels[n] + 128 (unsigned, in [1, 255]), loaded once per call: for
    vpshufb the <64 x i8> of the 16 bytes in each 128-bit lane, for the
    portable select chain the 16 bytes each splat to <64 x i8>. vbmi (with
    vnni): the vpshufb table as a _Perm, and for None too (nibble n -> n ^ 8,
    the two's complement nibble plus 8)."""
    if isinstance(ty, types.NoneType):
        return _Perm(ir.Constant(_V64B, [(i % 16) ^ 8 for i in range(64)])) if vbmi else None
    data = context.make_array(ty)(context, builder, value).data  # float* (16,)
    lv = builder.load(builder.bitcast(data, _V16F.as_pointer()), align=4)
    b = builder.trunc(builder.add(builder.fptosi(lv, _V16I), _splat(_I32, 128)),
                      ir.VectorType(_I8, 16))                      # (16,) levels + 128
    if vnni:
        rep = builder.shuffle_vector(b, ir.Constant(b.type, ir.Undefined), ir.Constant(
            ir.VectorType(_I32, 64), [i % 16 for i in range(64)]))        # (64,) 4 x the 16
        return _Perm(rep) if vbmi else rep
    return [builder.shuffle_vector(b, ir.Constant(b.type, ir.Undefined), _splat(_I32, n, 64))
            for n in range(16)]


def _lookup(builder, table, nib):
    """Each byte n (< 16) of nib (<16 x i32>) -> the table's byte n."""
    nib = builder.bitcast(nib, _V64B)
    if not isinstance(table, list):  # AVX-512BW vpshufb: the low 4 bits index the lane
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            _V64B, [_V64B, _V64B]), "llvm.x86.avx512.pshuf.b.512")
        return builder.bitcast(builder.call(fn, [table, nib]), _V16I)
    out = table[0]
    for n in range(1, 16):
        out = builder.select(builder.icmp_unsigned("==", nib, _splat(_I8, n, 64)), table[n], out)
    return builder.bitcast(out, _V16I)


def _quad_i8(builder, r0, r1, r2, r3):
    """int8 rows k..k+3, 64 columns -> 4 dword vectors [u_k, ..., u_k+3]
    (u = q + 128), in the column order of _quad_q4."""
    out = []
    for v in (False, True):
        a, b = _unpack(builder, r0, r1, v, _I8), _unpack(builder, r2, r3, v, _I8)
        out += [builder.xor(_unpack(builder, a, b, h, ir.IntType(16)), _splat(_I32, 0x80808080))
                for h in (False, True)]
    return out


def _dot(builder, vnni, acc, u, xb):
    """acc + sum over each 4 bytes of u (unsigned) * xb (signed): vpdpbusd."""
    if vnni:
        # The dword-typed declaration: LLVM <= 17 knows only it, and newer LLVMs
        # (operands now <64 x i8>) upgrade it when they parse the IR.
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            _V16I, [_V16I, _V16I, _V16I]), "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, builder.bitcast(u, _V16I), builder.bitcast(xb, _V16I)])
    v64 = ir.VectorType(_I32, 64)
    prod = builder.mul(builder.zext(builder.bitcast(u, _V64B), v64),
                       builder.sext(builder.bitcast(xb, _V64B), v64))
    for j in range(4):
        acc = builder.add(acc, builder.shuffle_vector(
            prod, ir.Constant(v64, ir.Undefined), ir.Constant(_V16I, [4 * i + j for i in range(16)])))
    return acc


def _has_vnni(context):
    """Whether numba compiles for a CPU with AVX-512 VNNI (512-bit vpdpbusd)."""
    return _has_feature(context, "avx512vnni") and _has_feature(context, "avx512bw")


def _has_vbmi(context):
    """Whether numba compiles for a CPU with AVX-512 VBMI (vpermb)."""
    return _has_feature(context, "avx512vbmi")


def fast_on_host() -> bool:
    """Whether these kernels compile to vpdpbusd here (else portable, slower code)."""
    from numba.core.registry import cpu_target
    return _has_vnni(cpu_target.target_context)


def _row(builder, pm, row, n0, prefetch: bool):
    """64 bytes of stored row `row` from column n0, prefetching ahead along it if asked."""
    ptr = pm.at(row, n0)
    if prefetch:
        _prefetch_ahead(builder, pm, ptr, _PREFETCH, _TILE_PREFETCH, locality=2)
    return builder.load(builder.bitcast(ptr, _V64B.as_pointer()), align=1)


def _codegen(bits, tb, vnni, mode, tiles, vbmi):
    """Codegen of _kernel(bits, tb, vnni, mode, tiles, vbmi): see there (the level
    table, argument 13, is typed None or an array, and so compiled in or not)."""
    def codegen(context, builder, sig, args):
        use_vnni = _has_vnni(context) if vnni is None else vnni
        perm = use_vnni and bits == 4 and (_has_vbmi(context) if vbmi is None else vbmi)
        i64 = ir.IntType(64)
        pm, xm, dm, bm, sm, am = (_Mat(context, builder, sig.args[j], args[j])
                                  for j in (0, 3, 6, 7, 8, 10))
        i0, n0, t0, k, gi, a0 = (context.cast(builder, args[j], sig.args[j], types.intp)
                                 for j in (1, 2, 4, 5, 9, 11))
        um = _Mat(context, builder, sig.args[12], args[12])  # (32, 64) decoded quads
        table = None if mode == "read" else _table(context, builder, sig.args[13], args[13],
                                                   use_vnni, perm)
        blk = builder.sdiv(k, ir.Constant(i64, BLOCK))
        offset = 8 if bits == 4 and isinstance(sig.args[13], types.NoneType) else 128
        acc = [[_correction(builder, bm, builder.add(t0, ir.Constant(i64, t)), blk, offset)] * 4
               for t in range(tb)]
        prefetch = not (bits == 8 and tb <= _I8_UNPREFETCHED_TOKENS)
        for q in range(BLOCK // 4):
            builder.call(_BARRIER, [])  # quad q's loads stay below: see _BARRIER
            u = _quad(builder, bits, pm, i0, n0, q, um, mode, table, prefetch, tiles)
            for t in range(tb):
                xp = xm.at(builder.add(t0, ir.Constant(i64, t)), builder.add(k, ir.Constant(i64, 4 * q)))
                x4 = builder.load(builder.bitcast(xp, _I32.as_pointer()), align=1)
                xb = builder.shuffle_vector(builder.insert_element(
                    ir.Constant(_V16I, ir.Undefined), x4, ir.Constant(_I32, 0)),
                    ir.Constant(_V16I, ir.Undefined), _splat(_I32, 0))
                acc[t] = [_dot(builder, use_vnni, a, w, xb) for a, w in zip(acc[t], u)]
        _store(builder, acc, (dm, sm, am), (t0, blk, gi, n0, a0), natural=tiles and bits == 4)
        return context.get_dummy_value()
    return codegen


def _quad(builder, bits, pm, i0, n0, q, um, mode, table, prefetch: bool, tiles: bool):
    """The 4 dword vectors of quad q (weight rows 4q..4q+3 of the block):
    decoded from the stored rows ("fused"; "write" also stores them in um's
    rows 4q..4q+3) or loaded from um ("read"); table: see _quad_q4; tiles: int4
    in tile order (_quad_q4_tiles)."""
    i64 = ir.IntType(64)
    slots = [builder.bitcast(um.at(ir.Constant(i64, 4 * q + v), ir.Constant(i64, 0)),
                             _V16I.as_pointer()) for v in range(4)]
    if mode == "read":
        return [builder.load(ptr, align=1) for ptr in slots]
    step = 2 if bits == 4 else 4  # stored rows per group of 4 weight rows
    rows = [_row(builder, pm, builder.add(i0, ir.Constant(i64, step * q + r)), n0, prefetch)
            for r in range(step)]
    if bits == 8:
        u = _quad_i8(builder, *rows)
    else:
        u = (_quad_q4_tiles if tiles else _quad_q4)(builder, *rows, table)
    if mode == "write":
        for vec, ptr in zip(u, slots):
            builder.store(vec, ptr, align=1)
    return u


def _correction(builder, bm, row, blk, offset):
    """-offset * xsum[row, blk] in all 16 int32 lanes: the start of a token's
    sums, so that they end as sum - offset * xsum (the same integer, mod 2^32,
    as subtracting it at the end, one broadcast instead of 4 subtractions)."""
    corr = builder.mul(builder.load(bm.at(row, blk)), ir.Constant(_I32, -offset))
    return _bcast(builder, corr, _V16I)


def _lane_scales(builder, sm, gi, n0, natural: bool):
    """The strip's 64 bf16 weight scales as 4 fp32 vectors in the lane order of
    the sums (_quad_q4: vector i, lane l = column 16(l // 4) + 4i + l % 4):
    one permutation per call, shared by its tokens; natural (_quad_q4_tiles):
    vector i = columns 16i.. in order."""
    v64 = ir.VectorType(ir.IntType(16), 64)
    raw = builder.load(builder.bitcast(sm.at(gi, n0), v64.as_pointer()), align=2)
    out = []
    for i in range(4):
        sb = builder.shuffle_vector(raw, ir.Constant(v64, ir.Undefined), ir.Constant(
            _V16I, [16 * i + lane if natural else 16 * (lane // 4) + 4 * i + lane % 4
                    for lane in range(16)]))
        out.append(builder.bitcast(builder.shl(builder.zext(sb, _V16I), _splat(_I32, 16)), _V16F))
    return out


def _store(builder, acc, mats, idx, natural: bool):
    """acc_out[t0 + t, a0 + lane] += scale * dx[t, blk] * sums, in lane order:
    acc_out's 64 floats from a0 are the strip's columns permuted as the sums
    (see _lane_scales); natural_order restores them once, after the last block.
    natural: the sums are in column order (int4 tiles), and so is acc_out."""
    dm, sm, am = mats
    t0, blk, gi, n0, a0 = idx
    i64, f32 = ir.IntType(64), ir.FloatType()
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16F, [_V16F, _V16F, _V16F]), "llvm.fma.v16f32")
    scales = _lane_scales(builder, sm, gi, n0, natural)
    for t, sums in enumerate(acc):
        row = builder.add(t0, ir.Constant(i64, t))
        dx = _bcast(builder, builder.load(dm.at(row, blk)), _V16F)
        arow = am.at(row, a0)
        for i, s in enumerate(sums):
            f = builder.fmul(builder.sitofp(s, _V16F), dx)
            ptr = am.vec(arow, 16 * i, f32)
            builder.store(builder.call(fma, [scales[i], f, builder.load(ptr, align=4)]),
                          ptr, align=4)


def _unpermute_codegen(context, builder, sig, args):
    """Codegen of _unpermute: 4 loads, 4 shuffles (column 16c + e is lane
    16(e // 4) + 4c + e % 4), 4 stores."""
    am = _Mat(context, builder, sig.args[0], args[0])
    row, col = (context.cast(builder, args[j], sig.args[j], types.intp) for j in (1, 2))
    ptr = am.at(row, col)
    f32 = ir.FloatType()
    vals = [builder.load(am.vec(ptr, 16 * i, f32), align=4) for i in range(4)]
    cat = lambda a, b, n: builder.shuffle_vector(a, b, ir.Constant(
        ir.VectorType(_I32, 2 * n), list(range(2 * n))))
    allv = cat(cat(vals[0], vals[1], 16), cat(vals[2], vals[3], 16), 32)  # (64,) lane order
    for c in range(4):
        nat = builder.shuffle_vector(allv, ir.Constant(allv.type, ir.Undefined), ir.Constant(
            _V16I, [16 * (e // 4) + 4 * c + e % 4 for e in range(16)]))
        builder.store(nat, am.vec(ptr, 16 * c, f32), align=4)
    return context.get_dummy_value()


@intrinsic
def _unpermute(typingctx, acc, row, col):
    """acc[row, col:col + 64] (float32, C-contiguous 2-D) from lane order to
    column order, in place."""
    if isinstance(acc, types.Array) and acc.ndim == 2 and acc.layout == "C" \
            and acc.dtype == types.float32:
        return types.none(acc, row, col), _unpermute_codegen
    return None


def _bcast(builder, value, vty):
    """A scalar in all 16 lanes of vty."""
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), _splat(_I32, 0))


def _kernel(bits, tb, vnni=None, mode="fused", tiles=False, vbmi=None):
    """An intrinsic k(p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv) doing, for
    t < tb tokens, the 64 columns c of one strip and the 32 weight rows
    k..k+31 (k % 32 == 0; stored rows from i0: int4 k // 2, int8 k):

        acc[t0+t, a0+lane(c)] += scale[gi, n0+c] * dx[t0+t, k // 32]
                                 * sum_{i < 32} xq[t0+t, k+i] * w[k+i, n0+c]

    with the dot products in int32 and the 64 accumulators in the lane order
    of the sums (lane(16c + 8v + 4h + m) = 16(2v + h) + 4c + m, see _store).
    p uint8 (packed int4) or int8, xq int8,
    dx float32, bs int32 (sums of xq per block), sc uint16 (bf16 bits), acc
    float32; all C-contiguous 2-D, ranges guaranteed by the caller. vnni:
    None = vpdpbusd where the target has AVX-512 VNNI, False = portable IR.
    u: uint8 (32, 64), the block's decoded weights (best 64-byte aligned): mode
    "fused" ignores it, "write" fills it while computing, "read" takes the
    weights from it instead of p (more tokens, one decode). lv: None (int4
    nibbles are two's complement) or, int4 only, the level table float32 (16,)
    (integers in [-127, 127]; w above is lv[nibble]): vpdpbusd then takes
    lv[n] + 128 (vpshufb, or a select chain without VNNI) and the correction
    128 * xsum, so the int32 sums are the same exact integers. A "read" call
    needs the table of its "write" call (only its type: the offset).
    tiles (int4 only): p holds int4 tiles (quant.qweight.tile_values), whose
    quads are in the sums' order already: the sums, and acc, stay in column
    order (no lane order, no natural_order). vbmi (int4 with vpdpbusd): None =
    vpermb for the nibbles' operands where the target has AVX-512 VBMI (see
    _Perm; Grok-1's int4 experts from DRAM, 2 threads: 1.00-1.02x at 1-2
    tokens, 0.99-1.07x at 4-16, in L2 1.01-1.15x), False = vpshufb or xor; the
    same bits either way."""
    bits_of = {types.uint8: 4, types.int8: 8}

    def typer(typingctx, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv):
        arrays = (p, xq, dx, bs, sc, acc, u)
        table_ok = isinstance(lv, types.NoneType) or (
            bits == 4 and isinstance(lv, types.Array) and lv.ndim == 1 and lv.layout == "C"
            and lv.dtype == types.float32)
        if all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays) \
                and bits_of.get(p.dtype) == bits and table_ok:
            return (types.none(p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv),
                    _codegen(bits, tb, vnni, mode, tiles and bits == 4, vbmi))
        return None
    typer.__name__ = typer.__qualname__ = f"_a8_i{bits}_t{tb}_{mode}{'_tiles' * tiles}"
    return intrinsic(typer)


def _dispatch(ks):
    """An inline njit calling ks[tb - 1] by the (runtime) token count tb
    (the last one for any larger tb)."""
    first = ks[0]
    if len(ks) == 1:
        @njit(inline="always", cache=True)
        def last(tb, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv):
            first(p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv)
        return last
    rest = _dispatch(ks[1:])

    @njit(inline="always", cache=True)
    def run(tb, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv):
        if tb == 1:
            first(p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv)
        else:
            rest(tb - 1, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv)
    return run


_TBS = range(1, _MAX_TB + 1)
_pass_q4 = _dispatch([_kernel(4, t) for t in _TBS])
_pass_i8 = _dispatch([_kernel(8, t) for t in _TBS])
_read_q4 = _dispatch([_kernel(4, t, mode="read") for t in _TBS])
_read_i8 = _dispatch([_kernel(8, t, mode="read") for t in _TBS])
_write_q4 = _dispatch([_kernel(4, _MAX_TB, mode="write")])
_write_i8 = _dispatch([_kernel(8, _MAX_TB, mode="write")])
_pass_q4t = _dispatch([_kernel(4, t, tiles=True) for t in _TBS])        # int4 tiles
_read_q4t = _dispatch([_kernel(4, t, mode="read", tiles=True) for t in _TBS])
_write_q4t = _dispatch([_kernel(4, _MAX_TB, mode="write", tiles=True)])


def _rows_per_byte(p):
    """Weight rows per stored row: 2 for packed int4 (uint8), 1 for int8."""
    raise NotImplementedError("only callable from numba code")


@overload(_rows_per_byte, inline="always")
def _rows_per_byte_overload(p):
    d = 2 if p.dtype == types.uint8 else 1
    return lambda p: d


def _pass(mode, tb, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv, ts):
    """One call for tb <= _MAX_TB tokens (mode 0 fused, 1 write, 2 read), by stored
    dtype and, for int4, by layout (ts: tile rows or 0, see tile_strips)."""
    raise NotImplementedError("only callable from numba code")


def _by_mode(fused, write, read):
    """An inline njit calling, by its (runtime) mode 0 / 1 / 2, fused / write / read."""
    @njit(inline="always", cache=True)
    def run(mode, tb, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv):
        if mode == 0:
            fused(tb, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv)
        elif mode == 1:
            write(tb, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv)
        else:
            read(tb, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv)
    return run


_modes_q4 = _by_mode(_pass_q4, _write_q4, _read_q4)
_modes_q4t = _by_mode(_pass_q4t, _write_q4t, _read_q4t)
_modes_i8 = _by_mode(_pass_i8, _write_i8, _read_i8)


@overload(_pass, inline="always")
def _pass_overload(mode, tb, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv, ts):
    if p.dtype == types.uint8:
        def run(mode, tb, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv, ts):
            if ts:
                _modes_q4t(mode, tb, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv)
            else:
                _modes_q4(mode, tb, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv)
        return run

    def run_i8(mode, tb, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv, ts):
        _modes_i8(mode, tb, p, i0, n0, xq, t0, k, dx, bs, sc, gi, acc, a0, u, lv)
    return run_i8


@njit(cache=True)
def tile_strips(xq, dx, bs, p, sc, g, k0, k1, n0, m, t0, t1, acc, a0, lv, ts):
    """acc[t0:t1, a0 + j] += the int8-activation product for rows k0..k1
    (multiples of 32, and g too) and the whole 64-column strips j < m - m % 64
    of columns n0 + j, each strip's 64 floats in the kernels' lane order (see
    _store; int4 tiles: in column order): the caller calls natural_order once
    after its last call on those accumulators (so sums across calls need no
    shuffles), and does the columns after the strips itself. Up to _MAX_TB tokens a call decodes
    the weights itself; beyond, the first call also keeps them decoded (2 KB,
    in L1) for the others (measured at T = 5, 6: one call of 6 tokens 0.7-0.8x
    the time of 4 + 1 or 4 + 2; T = 8 as 6 + 2 about as fast as 4 + 4). The
    price is compile time, every size being compiled: a cold cache takes
    62 s instead of 37 s for the act_int8 matmuls of int4, int4 levels and
    int8 (for a Haswell target 436 s instead of 217 s, so the AVX2-target
    tests no longer compile them); _MAX_TB = 4 restores it. lv: int4 level
    table (float32 (16,)) or None, see _kernel.
    ts: stored rows per tile of tiled values (p their 64-byte-row view,
    cpu_kernels._operand; a block of 32 weight rows is one tile), 0 for rows."""
    d = _rows_per_byte(p)
    ns = sc.shape[1] // 64                      # tiles per band
    u = np.empty((BLOCK + 1, 64), np.uint8)
    off = (-u.ctypes.data) % 64  # 64-byte aligned rows
    u = u.reshape(-1)[off:off + BLOCK * 64].reshape(BLOCK, 64)
    for k in range(k0, k1, BLOCK):
        gi = k // g
        for j in range(0, m - m % 64, 64):
            r = _tile_row(k // d, n0 + j, ts, ns) if ts else k // d  # a block: one tile
            if t1 - t0 <= _MAX_TB:
                _pass(0, t1 - t0, p, r, n0 + j, xq, t0, k, dx, bs, sc, gi, acc, a0 + j, u, lv,
                      ts)
                continue
            _pass(1, _MAX_TB, p, r, n0 + j, xq, t0, k, dx, bs, sc, gi, acc, a0 + j, u, lv, ts)
            for t in range(t0 + _MAX_TB, t1, _MAX_TB):
                _pass(2, min(_MAX_TB, t1 - t), p, r, n0 + j, xq, t, k, dx, bs, sc, gi,
                      acc, a0 + j, u, lv, ts)


@njit(cache=True)
def natural_order(acc, t0, t1, a0, m, p, ts):
    """acc[t0:t1, a0 + j] for the whole strips j < m - m % 64, as tile_strips
    leaves them for the weights p (ts: see there) in lane order, back to
    column order, in place: once per accumulator after all its tile_strips
    calls (nothing to do after int4 tiles, whose sums are in column order)."""
    if ts and _rows_per_byte(p) == 2:
        return
    for t in range(t0, t1):
        for j in range(0, m - m % 64, 64):
            _unpermute(acc, t, a0 + j)
