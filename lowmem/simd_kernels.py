"""Packed-int4 and int8 micro-kernels for lowmem.cpu_kernels, as explicit LLVM vector code.

Packed int4 is compute-bound where int8 is not (two weights per byte), and
numba's own loops widen every integer operation to 64 bits, halving the vector
width of the nibble decode. So each micro-kernel is written as 16-lane LLVM
IR: a call takes 32 rows x 64 columns and up to 8 tokens, keeps one fp32
register accumulator per (token, 16 columns), decodes each nibble exactly (a
table lookup with AVX-512, else ``bitcast(n ^ 0x4B000008) - 8388616.0``) and
multiplies by the scale once per call; ``_prefer_512`` asks LLVM for 512-bit
vectors where it would otherwise prefer 256. Measured on the 2-core target
(6144 x 32768 and 32768 x 6144): one token 3.4-3.6 ms per matrix, at the
memory floor; 8 tokens 11-13 ms, FMA-bound.

An int4 weight with a level table (``QWeight.levels``) passes the table,
float32 (16,), as one more argument ``lv`` (``None`` for the uniform grid):
numba types it, so the uniform code is compiled exactly as without tables.
The table is loaded once per call: AVX-512 looks it up with the same
vpermps as the uniform constant table (measured 1.00-1.02x the uniform time,
Zen 5, 2 threads, T = 1 and 8); AVX2 with two 8-entry vpermps and a blend;
other targets with a gather (exact, slower).

int8 (``_i8_kernel``) has the same call and accumulators: 16 bytes of a row
are sign-extended to i32 lanes and converted to float32 (exact), 2 uops per
16 weights. A call takes 1 to I8_MAX_TOKENS = 6 tokens over all 64 columns
(24 accumulators, 4 weight vectors; 7 tokens spill and ran 0.85x); more
tokens are balanced passes (_pass_tokens). Measured on the same
target, 6144 x 32768, 2 threads: one token 5.3 ms per matrix (the read),
4 tokens 6.5 ms, 6 tokens 8.3-8.7 ms (was 10.4 as two 32-column halves);
in cache, one thread, 5-16 tokens 85-98 G multiply-adds/s (was 70-85).
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_Q4_PREFETCH = 256        # bytes ahead along a row that a micro-kernel prefetches
_I8_PREFETCH = 256        # the same for int8
# Tiled values (quant.packed TILE_ROWS x TILE_COLS tiles, one sequential stream): a
# kernel sees them as rows of 64 bytes and prefetches this far ahead in the stream
# instead (256 bytes ahead would fall inside the tile being read). Measured on the
# Zen 5 VM, Grok-1's gate on 2 threads: 1024 bytes 7.6 ms at 4 tokens, 2048 6.0,
# 4096 4.7 (rows: 5.6-6.3); 8192 and 16384 no faster (docs/PERFORMANCE.md, session 16).
TILE_PREFETCH = 4096

@intrinsic
def _prefer_512(typingctx):
    """Lets the calling function use 512-bit vectors. LLVM prefers 256-bit
    ones on this CPU family and would split the micro-kernels' 16-lane
    vectors in two; measured 1.3x slower for int4. Elsewhere (no AVX-512)
    the attribute means nothing. A string attribute is not in llvmlite's
    list of known ones, hence the plain set.add."""
    def codegen(context, builder, sig, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return types.none(), codegen


def _nibble_codegen(shift_left):
    """LLVM for one signed nibble of a byte -> float32, in 32-bit lanes.

    numba widens every integer operation to 64 bits, which halves the SIMD
    width of the int4 decode; this emits sext i8->i32, shl, ashr, sitofp.
    """
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        v = builder.sext(args[0], i32)
        v = builder.shl(v, ir.Constant(i32, shift_left))
        v = builder.ashr(v, ir.Constant(i32, 28))
        return builder.sitofp(v, ir.FloatType())
    return codegen


@intrinsic
def _lo4(typingctx, v):
    """Signed low nibble (even row) of a packed int4 byte, as float32."""
    if isinstance(v, types.Integer) and v.bitwidth == 8:
        return types.float32(v), _nibble_codegen(28)
    return None


@intrinsic
def _hi4(typingctx, v):
    """Signed high nibble (odd row) of a packed int4 byte, as float32."""
    if isinstance(v, types.Integer) and v.bitwidth == 8:
        return types.float32(v), _nibble_codegen(24)
    return None


def _lo(v, lv):
    """Low nibble (even row) of a packed int4 byte as float32: lv[n] for a
    level table lv (float32 (16,)), the two's complement value for lv None."""
    raise NotImplementedError("only callable from numba code")


def _hi(v, lv):
    """High nibble (odd row) of a packed int4 byte as float32, as _lo."""
    raise NotImplementedError("only callable from numba code")


@overload(_lo, inline="always")
def _lo_overload(v, lv):
    if lv is None or isinstance(lv, types.NoneType):
        return lambda v, lv: _lo4(v)
    return lambda v, lv: lv[v & 15]


@overload(_hi, inline="always")
def _hi_overload(v, lv):
    if lv is None or isinstance(lv, types.NoneType):
        return lambda v, lv: _hi4(v)
    return lambda v, lv: lv[v >> 4]


def _splat(ty, value, lanes=16):
    return ir.Constant(ir.VectorType(ty, lanes), [value] * lanes)


def _broadcast(builder, value):
    """A scalar (float32, i64, ...) in all 16 lanes."""
    vf = ir.VectorType(value.type, 16)
    v = builder.insert_element(ir.Constant(vf, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vf, ir.Undefined), _splat(ir.IntType(32), 0))


class _Mat:
    """Data pointer and row length of a C-contiguous 2-D array argument."""

    def __init__(self, context, builder, ty, value):
        arr = context.make_array(ty)(context, builder, value)
        self.builder, self.data = builder, arr.data
        self.cols = builder.extract_value(arr.shape, 1)

    def at(self, row, col):
        """Pointer to element [row, col] (intp values)."""
        b = self.builder
        return b.gep(self.data, [b.add(b.mul(row, self.cols), col)])

    def vec(self, ptr, offset, elem):
        """Pointer to 16 elements of IR type elem at ptr + offset elements."""
        p = self.builder.gep(ptr, [ir.Constant(ir.IntType(64), offset)])
        return self.builder.bitcast(p, ir.VectorType(elem, 16).as_pointer())


def _has_avx512(context):
    """Whether numba compiles for a CPU with AVX-512F (its cache is keyed on
    the same feature string, so cached code never crosses machines)."""
    return _has_feature(context, "avx512f")


def _has_feature(context, name):
    """Whether numba compiles for a CPU with this feature (e.g. "avx2")."""
    return "+" + name in context.codegen().magic_tuple()[2].split(",")


def _decode_q4(builder, ptr, kind, levels=None):
    """16 packed bytes -> (even rows, odd rows) as exact float32 vectors.

    kind "lut": vpermps, a 16-entry table lookup that reads only the low 4
    bits of each lane (AVX-512; 1 instruction per nibble). "xor", portable,
    the uniform grid only: for a nibble n holding the two's complement q, the
    bits n ^ 0x4B000008 are the float 2^23 + 8 + q (one xor, one
    subtraction). Measured: the table is 1.2x faster at T = 1, 1.05x at T = 8
    on one core.

    levels: None for the uniform grid (a constant table), else the weight's
    level table as IR values (see _level_operand), loaded once per call: for
    "lut" the <16 x float> itself (a non-uniform table costs what the
    constant one does); for "perm8" (AVX2) its two halves as <8 x float>,
    looked up by two 8-entry vpermps and a blend on bit 3; for "gather"
    (any other target) a float* read by llvm.masked.gather. The xor trick
    fits only the uniform grid."""
    i32 = ir.IntType(32)
    w = builder.zext(builder.load(ptr, align=1), ir.VectorType(i32, 16))
    return _nibble_floats(builder, w, builder.lshr(w, _splat(i32, 4)), kind, levels)


def _nibble_floats(builder, lo, hi, kind, levels):
    """Two <16 x i32> whose low 4 bits are nibbles -> their exact float32
    values (see _decode_q4; the bits above are masked off, or ignored by "lut",
    whose vpermps reads only those 4)."""
    i32, f32 = ir.IntType(32), ir.FloatType()
    vf = ir.VectorType(f32, 16)
    if kind == "lut":
        perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            vf, [vf, ir.VectorType(i32, 16)]), "llvm.x86.avx512.permvar.sf.512")
        table = levels if levels is not None else \
            ir.Constant(vf, [float(n - 16 if n > 7 else n) for n in range(16)])
        return builder.call(perm, [table, lo]), builder.call(perm, [table, hi])
    lo, hi = (builder.and_(n, _splat(i32, 15)) for n in (lo, hi))
    if kind == "perm8":
        return _perm8(builder, levels, lo), _perm8(builder, levels, hi)
    if kind == "gather":
        return _gather(builder, levels, lo), _gather(builder, levels, hi)
    lo = builder.xor(lo, _splat(i32, 0x4B000008))
    hi = builder.xor(hi, _splat(i32, 0x4B000008))
    off = _splat(f32, 8388616.0)
    return (builder.fsub(builder.bitcast(lo, vf), off), builder.fsub(builder.bitcast(hi, vf), off))


def _perm8(builder, halves, idx):
    """table[idx] for 16 i32 indices in [0, 16) and the table as two <8 x
    float> halves: AVX2 vpermps (reads the low 3 bits) on each, bit 3 picks."""
    i32, f32 = ir.IntType(32), ir.FloatType()
    v8f, v8i = ir.VectorType(f32, 8), ir.VectorType(i32, 8)
    perm = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(v8f, [v8f, v8i]), "llvm.x86.avx2.permps")
    out = []
    for h in range(2):
        part = builder.shuffle_vector(idx, ir.Constant(idx.type, ir.Undefined),
                                      ir.Constant(v8i, list(range(8 * h, 8 * h + 8))))
        upper = builder.icmp_unsigned("!=", builder.and_(part, _splat(i32, 8, 8)),
                                      _splat(i32, 0, 8))
        out.append(builder.select(upper, builder.call(perm, [halves[1], part]),
                                  builder.call(perm, [halves[0], part])))
    return builder.shuffle_vector(out[0], out[1], ir.Constant(ir.VectorType(i32, 16),
                                                              list(range(16))))


def _gather(builder, base, idx):
    """base[idx] for a float* base and 16 i32 indices in [0, 16): llvm.masked.gather."""
    i1, i32, i64, f32 = ir.IntType(1), ir.IntType(32), ir.IntType(64), ir.FloatType()
    vf, vp = ir.VectorType(f32, 16), ir.VectorType(f32.as_pointer(), 16)
    addr = builder.shl(builder.zext(idx, ir.VectorType(i64, 16)), _splat(i64, 2))  # bytes
    addr = builder.add(addr, _broadcast(builder, builder.ptrtoint(base, i64)))
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
        vf, [vp, i32, ir.VectorType(i1, 16), vf]), "llvm.masked.gather.v16f32.v16p0")
    return builder.call(fn, [builder.inttoptr(addr, vp), ir.Constant(i32, 4),
                             _splat(i1, 1), ir.Constant(vf, ir.Undefined)])


def _prefetch_ahead(builder, mat, ptr, along_row: int, tiled_ahead: int = TILE_PREFETCH,
                    locality: int = 3):
    """Prefetch for a micro-kernel reading 64 bytes at ptr in matrix mat: ``along_row``
    bytes ahead along a stored row, or ``tiled_ahead`` ahead when mat is a tiled view
    (64-byte rows: the tiles' one stream; a row-layout matrix of exactly 64 columns
    is small, and a prefetch past it never faults); locality: see _prefetch. (One
    prefetch whose distance is selected: a branch between two prefetches made the
    int8-activation kernels 0.8-0.9x as fast.)"""
    i64 = ir.IntType(64)
    tiled = builder.icmp_signed("==", mat.cols, ir.Constant(mat.cols.type, 64))
    ahead = builder.select(tiled, ir.Constant(i64, tiled_ahead), ir.Constant(i64, along_row))
    _prefetch(builder, builder.gep(ptr, [ahead]), locality)


def _prefetch(builder, ptr, locality: int = 3):
    """Read prefetch (never faults, even past a mapping): locality 3 into every cache
    level (prefetcht0), 2 into L2 and beyond only (prefetcht1)."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = builder.module.declare_intrinsic(  # llvmlite mangles the pointer type its way
        "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0),
                      ir.Constant(i32, locality), ir.Constant(i32, 1)])


def _q4_codegen(tb, nv, lut, perm8, tiles):
    """Codegen of _q4_kernel(tb, nv, lut, perm8, tiles): see there."""
    chains = 2 if tb == 1 else 1  # one token: even and odd rows in two chains

    def codegen(context, builder, sig, args):
        kind = _decoder(context, isinstance(sig.args[11], types.NoneType), lut, perm8)
        i64, f32 = ir.IntType(64), ir.FloatType()
        vf = ir.VectorType(f32, 16)
        pm, xm, sm, am = (_Mat(context, builder, sig.args[j], args[j]) for j in (0, 4, 7, 9))
        i0, nb, n0, t0, k, gi, a0 = (context.cast(builder, args[j], sig.args[j], types.intp)
                                     for j in (1, 2, 3, 5, 6, 8, 10))
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vf, [vf, vf, vf]), "llvm.fma.v16f32")
        levels = _level_operand(context, builder, sig.args[11], args[11], kind)
        acc = [[[cgutils.alloca_once_value(builder, _splat(f32, 0.0)) for _ in range(chains)]
                for _ in range(nv)] for _ in range(tb)]

        def pair(kk, w):
            """acc += x[kk] * even rows + x[kk + 1] * odd rows, per token and vector."""
            for t in range(tb):
                xp = xm.at(builder.add(t0, ir.Constant(i64, t)), kk)
                xe = _broadcast(builder, builder.load(xp))
                xo = _broadcast(builder, builder.load(builder.gep(xp, [ir.Constant(i64, 1)])))
                for c in range(nv):
                    a_even, a_odd = acc[t][c][0], acc[t][c][-1]
                    v = builder.call(fma, [xe, w[c][0], builder.load(a_even)])
                    if chains == 2:
                        builder.store(v, a_even)
                        v = builder.load(a_odd)
                    builder.store(builder.call(fma, [xo, w[c][1], v]), a_odd)

        step = 2 if tiles else 1  # packed rows a loop step: a tile's quad, or one row
        with cgutils.for_range(builder, builder.sdiv(nb, ir.Constant(i64, step))) as loop:
            i = builder.mul(loop.index, ir.Constant(i64, step))
            row = pm.at(builder.add(i0, i), n0)  # packed row i0 + i
            _prefetch_ahead(builder, pm, row, _Q4_PREFETCH)
            kk = builder.add(k, builder.mul(i, ir.Constant(i64, 2)))
            if tiles:
                words = _quad_words(builder, row, n0, nv)
                for j in range(2):
                    pair(builder.add(kk, ir.Constant(i64, 2 * j)),
                         _tile_pair(builder, words, j, nv, kind, levels))
            else:
                pair(kk, [_decode_q4(builder, pm.vec(row, 16 * c, ir.IntType(8)), kind,
                                     levels) for c in range(nv)])
        _q4_store(builder, fma, acc, sm.at(gi, n0), am, t0, a0, sm)
        return context.get_dummy_value()
    return codegen


def _quad_words(builder, row, n0, nv):
    """The stored rows of a quad of an int4 tile (quant.qweight.tile_values) that hold
    the nv x 16 columns from n0, as <16 x i32>: row is where the quad's first packed
    row would start in the tile view (_tile_row), n0 % 64 (0, or 32 for the second
    half of a strip) into it; half h is stored row 2q + h of the tile."""
    i64 = ir.IntType(64)
    vi = ir.VectorType(ir.IntType(32), 16)
    co = builder.and_(n0, ir.Constant(i64, 63))
    base = builder.gep(row, [co])            # row - co + 64 * (co // 32): the half's row
    return [builder.load(builder.bitcast(builder.gep(base, [ir.Constant(i64, 64 * h)]),
                                         vi.as_pointer()), align=1)
            for h in range((nv + 1) // 2)]


def _tile_pair(builder, words, j, nv, kind, levels):
    """Weight rows 2j, 2j + 1 of a quad (_quad_words) as (even, odd) float32
    vectors of its nv x 16 columns, as _decode_q4 gives them from rows: bytes 2j
    and 2j + 1 of each 32-bit word, columns 16n + d of a half in nibble n, so a
    constant shift per row and nibble, no byte unpack."""
    i32 = ir.IntType(32)
    out = []
    for c in range(nv):
        shift = 16 * j + 4 * (c % 2)
        w = words[c // 2]
        out.append(_nibble_floats(builder, builder.lshr(w, _splat(i32, shift)),
                                  builder.lshr(w, _splat(i32, shift + 8)), kind, levels))
    return out


def _decoder(context, uniform, lut, perm8):
    """The kind of _decode_q4 a kernel uses: lut / perm8 as in _q4_kernel."""
    if _has_avx512(context) if lut is None else lut:
        return "lut"
    if uniform:
        return "xor"
    return "perm8" if (_has_feature(context, "avx2") if perm8 is None else perm8) else "gather"


def _level_operand(context, builder, ty, value, kind):
    """The `levels` of _decode_q4 for a kernel's lv argument, loaded here,
    before the row loop: None (uniform), the 16 floats as one vector
    ("lut"), as two halves ("perm8") or the table's float* ("gather")."""
    if isinstance(ty, types.NoneType):
        return None
    data = context.make_array(ty)(context, builder, value).data  # float* (16,)
    if kind == "gather":
        return data
    lanes = 16 if kind == "lut" else 8
    vp = ir.VectorType(ir.FloatType(), lanes).as_pointer()
    parts = [builder.load(builder.bitcast(builder.gep(data, [ir.Constant(ir.IntType(64), h)]),
                                          vp), align=4) for h in range(0, 16, lanes)]
    return parts[0] if kind == "lut" else parts


def _q4_store(builder, fma, acc, srow, am, t0, a0, sm):
    """acc_out[t0 + t, a0 + 16c:...] += bf16 scales * register sums."""
    i32, f32, i64 = ir.IntType(32), ir.FloatType(), ir.IntType(64)
    vf = ir.VectorType(f32, 16)
    scales = []
    for c in range(len(acc[0])):
        bits = builder.load(sm.vec(srow, 16 * c, ir.IntType(16)), align=2)
        bits = builder.zext(bits, ir.VectorType(i32, 16))
        scales.append(builder.bitcast(builder.shl(bits, _splat(i32, 16)), vf))
    for t, per_token in enumerate(acc):
        arow = am.at(builder.add(t0, ir.Constant(i64, t)), a0)
        for c, chains in enumerate(per_token):
            total = builder.load(chains[0])
            if len(chains) == 2:
                total = builder.fadd(total, builder.load(chains[1]))
            ptr = am.vec(arow, 16 * c, f32)
            builder.store(builder.call(fma, [scales[c], total, builder.load(ptr, align=4)]),
                          ptr, align=4)


def _q4_kernel(tb, nv, lut=None, perm8=None, tiles=False):
    """An intrinsic k(p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv) doing, for
    t < tb tokens and c < 16 * nv columns:

        acc[t0+t, a0+c] += scale[gi, n0+c] * sum_{i < nb} (x[t0+t, k+2i] * even(p[i0+i, n0+c])
                                                         + x[t0+t, k+2i+1] * odd(p[i0+i, n0+c]))

    with the tb * nv accumulators in registers. All arrays C-contiguous 2-D
    (p uint8 packed int4, sc uint16 bf16 bits, x and acc float32); the caller
    guarantees the ranges (no bounds checks). lv: None (nibbles are two's
    complement) or the level table, float32 (16,) C-contiguous (even/odd
    above are lv[nibble]). Nibble decoder (see _decode_q4): lut True the
    AVX-512 table, False the others, None the table where the target has
    AVX-512; perm8, for a level table without lut: True AVX2's two 8-entry
    tables, False the gather, None AVX2's where the target has it. tiles: p
    is the 64-byte-row view of int4 tiles (quant.qweight.tile_values) and
    p[i0 + i, n0 + c] stands for where packed row i would be in rows
    (_tile_row), from a quad's first row (k % 4 == 0) for whole quads (nb
    even): int4 tiles have scale groups of 4 rows or more (check_tiles). The
    same sums, in the same order, so the same bits."""
    def typer(typingctx, p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv):
        arrays = (p, x, sc, acc)
        table_ok = isinstance(lv, types.NoneType) or (
            isinstance(lv, types.Array) and lv.ndim == 1 and lv.layout == "C"
            and lv.dtype == types.float32)
        if table_ok and all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C"
                            for a in arrays):
            return (types.none(p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv),
                    _q4_codegen(tb, nv, lut, perm8, tiles))
        return None
    typer.__name__ = typer.__qualname__ = f"_q4_t{tb}{'_tiles' * tiles}"
    return intrinsic(typer)


def _i8_codegen(tb, nv):
    """Codegen of _i8_kernel(tb, nv): see there."""
    def codegen(context, builder, sig, args):
        i8, i32, i64, f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
        vf, vi = ir.VectorType(f32, 16), ir.VectorType(i32, 16)
        wm, xm, sm, am = (_Mat(context, builder, sig.args[j], args[j]) for j in (0, 4, 7, 9))
        i0, nb, n0, t0, k, gi, a0 = (context.cast(builder, args[j], sig.args[j], types.intp)
                                     for j in (1, 2, 3, 5, 6, 8, 10))
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vf, [vf, vf, vf]), "llvm.fma.v16f32")
        acc = [[[cgutils.alloca_once_value(builder, _splat(f32, 0.0))] for _ in range(nv)]
               for _ in range(tb)]
        with cgutils.for_range(builder, nb) as loop:
            row = wm.at(builder.add(i0, loop.index), n0)
            _prefetch_ahead(builder, wm, row, _I8_PREFETCH)
            w = [builder.sitofp(builder.sext(builder.load(wm.vec(row, 16 * c, i8), align=1), vi),
                                vf) for c in range(nv)]
            kk = builder.add(k, loop.index)
            for t in range(tb):
                xp = xm.at(builder.add(t0, ir.Constant(i64, t)), kk)
                xv = _broadcast(builder, builder.load(xp))
                for c in range(nv):
                    a = acc[t][c][0]
                    builder.store(builder.call(fma, [xv, w[c], builder.load(a)]), a)
        _q4_store(builder, fma, acc, sm.at(gi, n0), am, t0, a0, sm)
        return context.get_dummy_value()
    return codegen


def _i8_kernel(tb, nv):
    """An intrinsic k(w, i0, nb, n0, x, t0, k, sc, gi, acc, a0) doing, for
    t < tb tokens and c < 16 * nv columns:

        acc[t0+t, a0+c] += scale[gi, n0+c] * sum_{i < nb} x[t0+t, k+i] * w[i0+i, n0+c]

    (the same call as _q4_kernel, one weight row per row of w): int8 lanes
    sign-extended to i32 and converted exactly to float32, an FMA chain per
    (token, 16 columns) in registers, the scale applied once per call."""
    def typer(typingctx, w, i0, nb, n0, x, t0, k, sc, gi, acc, a0):
        arrays = (w, x, sc, acc)
        if all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays):
            return types.none(w, i0, nb, n0, x, t0, k, sc, gi, acc, a0), _i8_codegen(tb, nv)
        return None
    typer.__name__ = typer.__qualname__ = f"_i8_t{tb}"
    return intrinsic(typer)


_Q4_ROWS_KERNELS = [_q4_kernel(t, 4 if t <= 4 else 2) for t in range(1, 9)]
_Q4_TILE_KERNELS = [_q4_kernel(t, 4 if t <= 4 else 2, tiles=True) for t in range(1, 9)]
_i8_t1, _i8_t2, _i8_t3, _i8_t4, _i8_t5, _i8_t6 = (_i8_kernel(t, 4) for t in range(1, 7))
I8_MAX_TOKENS = 6         # int8: 6 x 4 register accumulators + 4 weight vectors (7: spills)


@njit(inline="always", cache=True)
def _pass_tokens(tokens, d):
    """Tokens per micro-kernel pass over a strip (the last pass takes the rest):
    int4 (d = 2) up to 8; int8 up to I8_MAX_TOKENS, in as few passes as that
    allows, evenly filled (11 = 6 + 5, 8 = 4 + 4, 13 = 5 + 5 + 3):
    its kernels keep all 64 columns in registers for up to 6 tokens (7 would
    spill), and 5-16 tokens run 1.15-1.2x faster than as passes of 8 over
    two 32-column halves (docs/PERFORMANCE.md section 3,
    "Session 8")."""
    if d == 2:
        return min(8, tokens)
    passes = -(-tokens // I8_MAX_TOKENS)
    return -(-tokens // passes)


def _q4_strips(kernels):
    """The strip function of 8 int4 micro-kernels (1-8 tokens; rows or tiles)."""
    k1, k2, k3, k4, k5, k6, k7, k8 = kernels

    @njit(inline="always", cache=True)
    def strip(tb, p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv):
        """One 64-column int4 strip for tb <= 8 tokens: up to 16 register
        accumulators (4 vectors x 4 tokens or 2 x 8, in two halves); lv: see _q4_kernel."""
        if tb == 1:
            k1(p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv)
        elif tb == 2:
            k2(p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv)
        elif tb == 3:
            k3(p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv)
        elif tb == 4:
            k4(p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv)
        else:
            for h in range(0, 64, 32):
                if tb == 5:
                    k5(p, i0, nb, n0 + h, x, t0, k, sc, gi, acc, a0 + h, lv)
                elif tb == 6:
                    k6(p, i0, nb, n0 + h, x, t0, k, sc, gi, acc, a0 + h, lv)
                elif tb == 7:
                    k7(p, i0, nb, n0 + h, x, t0, k, sc, gi, acc, a0 + h, lv)
                else:
                    k8(p, i0, nb, n0 + h, x, t0, k, sc, gi, acc, a0 + h, lv)
    return strip


_q4_strip = _q4_strips(_Q4_ROWS_KERNELS)
_q4_tile_strip = _q4_strips(_Q4_TILE_KERNELS)


@njit(inline="always", cache=True)
def _i8_strip(tb, p, i0, nb, n0, x, t0, k, sc, gi, acc, a0):
    """One 64-column int8 strip for tb <= I8_MAX_TOKENS tokens: tb x 4
    register accumulators."""
    if tb == 1:
        _i8_t1(p, i0, nb, n0, x, t0, k, sc, gi, acc, a0)
    elif tb == 2:
        _i8_t2(p, i0, nb, n0, x, t0, k, sc, gi, acc, a0)
    elif tb == 3:
        _i8_t3(p, i0, nb, n0, x, t0, k, sc, gi, acc, a0)
    elif tb == 4:
        _i8_t4(p, i0, nb, n0, x, t0, k, sc, gi, acc, a0)
    elif tb == 5:
        _i8_t5(p, i0, nb, n0, x, t0, k, sc, gi, acc, a0)
    else:
        _i8_t6(p, i0, nb, n0, x, t0, k, sc, gi, acc, a0)


def _strip(tb, p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv):
    """One 64-column micro-kernel strip, dispatched on the stored dtype (lv:
    the int4 level table or None; int8 weights take None)."""
    raise NotImplementedError("only callable from numba code")


def _tile_strip(tb, p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv):
    """_strip for tiled values (int4 tiles have their own kernels; int8 tiles are rows
    of 64 bytes)."""
    raise NotImplementedError("only callable from numba code")


def _strip_overloads(q4):
    """The overload of _strip (q4 = _q4_strip) or _tile_strip (_q4_tile_strip)."""
    def impl(tb, p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv):
        if p.dtype == types.uint8:
            return lambda tb, p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv: q4(
                tb, p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv)
        return lambda tb, p, i0, nb, n0, x, t0, k, sc, gi, acc, a0, lv: _i8_strip(
            tb, p, i0, nb, n0, x, t0, k, sc, gi, acc, a0)
    return impl


overload(_strip, inline="always")(_strip_overloads(_q4_strip))
overload(_tile_strip, inline="always")(_strip_overloads(_q4_tile_strip))


@njit(inline="always", cache=True)
def _tile_row(r, n0, ts, ns):
    """The row argument that makes a micro-kernel read the tile of stored row r
    (a tile's first) and columns n0.. (a multiple of 64) in a tiled view: the
    kernels address row * 64 + n0 bytes, so the tile's first 64-byte row minus
    n0 / 64 (the scales stay at column n0)."""
    s = n0 // 64
    return ((r // ts) * ns + s) * ts - s


@njit(fastmath={"contract"}, cache=True)
def _tiles_strips(x, p, sc, g, k0, k1, n0, m, t0, t1, acc, a0, d, rows, lv, ts):
    """cpu_kernels._tile_strips for tiled values (QWeight.tiled; p: their
    (R * N / 64, 64) view, ts stored rows per tile, d weight rows per stored row;
    k0 and m whole tiles): each tile is read whole, in file order, its weight
    rows in blocks of `rows` as _tile_strips does. A column's sums are added in
    the same order as there, so the results are the same bits."""
    _prefer_512()
    tb = _pass_tokens(t1 - t0, d)
    ns = sc.shape[1] // 64                   # strips (tiles) per band
    for kb in range(k0, k1, ts * d):         # one band of tiles
        kbe = min(k1, kb + ts * d)
        for j in range(0, m, 64):
            base = _tile_row(kb // d, n0 + j, ts, ns)
            k = kb
            while k < kbe:
                gi = k // g
                k2 = min(kbe, (gi + 1) * g, k + rows)
                for t in range(t0, t1, tb):
                    _tile_strip(min(tb, t1 - t), p, base + (k - kb) // d, (k2 - k) // d,
                                n0 + j, x, t, k, sc, gi, acc, a0 + j, lv)
                k = k2
