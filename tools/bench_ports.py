"""How many 512-bit operations of each kind one core retires per cycle.

Why: the host kernels (lowmem.act8_kernels, lowmem.simd_kernels) are bound, at
a fast read, by the vector instructions they issue per byte, and which of them
compete for the same execution ports decides what a layout or kernel change
can gain. On the Zen 5 VM here VNNI vpdpbusd, vpshufb, vpmultishiftqb and FMA
each retire about 1 per cycle and share ports (vpdpbusd with vpshufb: about
1.3 together), so the int4 kernels' byte transposes cost what their dot
products do (docs/PERFORMANCE.md, section 3, session 23).

Each figure is a loop of 12 independent chains of one operation (or of a mix,
the operations alternating across the chains), timed against a scalar
dependent chain of 3 single-cycle operations for the clock, on one thread.
Needs AVX-512 (and VNNI, VBMI for those rows; rows the CPU lacks are skipped).

    python tools/bench_ports.py
"""
from __future__ import annotations

import time

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.registry import cpu_target
from numba.extending import intrinsic

I8, I32 = ir.IntType(8), ir.IntType(32)
V16I, V64B, V16F = ir.VectorType(I32, 16), ir.VectorType(I8, 64), ir.VectorType(ir.FloatType(), 16)
CHAINS = 12


def _call(builder, name, ty, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [a.type for a in args]),
                                        name)
    return builder.call(fn, args)


def vnni(b, acc, y):
    return _call(b, "llvm.x86.avx512.vpdpbusd.512", V16I, [acc, y, y])


def pshufb(b, acc, y):
    return b.bitcast(_call(b, "llvm.x86.avx512.pshuf.b.512", V64B,
                           [b.bitcast(y, V64B), b.bitcast(acc, V64B)]), V16I)


def multishift(b, acc, y):
    return b.bitcast(_call(b, "llvm.x86.avx512.pmultishift.qb.512", V64B,
                           [b.bitcast(y, V64B), b.bitcast(acc, V64B)]), V16I)


def fma(b, acc, y):
    f = b.bitcast(acc, V16F)
    return b.bitcast(_call(b, "llvm.fma.v16f32", V16F, [f, f, b.bitcast(y, V16F)]), V16I)


OPS = {"vpdpbusd": (vnni, "avx512vnni"), "vpshufb": (pshufb, "avx512bw"),
       "vpmultishiftqb": (multishift, "avx512vbmi"), "vfmadd (fp32)": (fma, "avx512f")}
MIXES = [("vpdpbusd",), ("vpshufb",), ("vpmultishiftqb",), ("vfmadd (fp32)",),
         ("vpdpbusd", "vpshufb"), ("vpdpbusd", "vfmadd (fp32)"), ("vpshufb", "vfmadd (fp32)"),
         ("vpdpbusd", "vpdpbusd", "vpshufb")]


def _loop(ops):
    """An njit loop(n): n rounds of CHAINS independent operations, ops alternating."""
    @intrinsic
    def rounds(typingctx, n):
        def codegen(context, builder, sig, args):
            accs = [cgutils.alloca_once_value(builder, ir.Constant(V16I, [i + 1] * 16))
                    for i in range(CHAINS)]
            y = ir.Constant(V16I, [0x01020304] * 16)
            with cgutils.for_range(builder, args[0]):
                for i, a in enumerate(accs):
                    builder.store(ops[i % len(ops)](builder, builder.load(a), y), a)
            out = builder.load(accs[0])
            for a in accs[1:]:
                out = builder.xor(out, builder.load(a))
            return builder.extract_element(out, ir.Constant(I32, 0))
        return types.int32(types.int64), codegen

    return njit(lambda n: rounds(n))


@njit
def _scalar_chain(n, x):
    for i in range(n):
        x = x + (x >> 7) + i     # sar, add, lea: 3 dependent single-cycle operations
    return x


def cycle_seconds() -> float:
    _scalar_chain(10, 1)
    n = 200_000_000
    start = time.perf_counter()
    _scalar_chain(n, 1)
    return (time.perf_counter() - start) / n / 3


def main() -> int:
    features = cpu_target.target_context.codegen().magic_tuple()[2].split(",")
    cycle = cycle_seconds()
    print(f"clock about {1 / cycle / 1e9:.2f} GHz (a dependent scalar chain); "
          f"{CHAINS} independent 512-bit chains a loop, one thread")
    for mix in MIXES:
        missing = [OPS[o][1] for o in mix if "+" + OPS[o][1] not in features]
        name = " + ".join(mix)
        if missing:
            print(f"{name:40s} skipped (no {', '.join(missing)})")
            continue
        loop = _loop([OPS[o][0] for o in mix])
        loop(10)
        n = 20_000_000
        start = time.perf_counter()
        loop(n)
        per_cycle = CHAINS * n / (time.perf_counter() - start) * cycle
        print(f"{name:40s} {per_cycle:5.2f} per cycle")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
