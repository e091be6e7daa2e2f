"""lowmem.cpu_kernels on int4 weights with a level table (QWeight.levels)
against float64 references built from quant.qweight.dequantize, which maps
each nibble through the table independently of the kernels.

Tolerance as in tests/test_kernels.py (TOL = 1e-5 of |x| @ |W|): the levels
are integers in [-127, 127], exact in fp32, and the kernels sum them in the
same order as the uniform grid's nibbles. A table read in the wrong nibble
order, or the uniform decode left in place, is off by 100x-10000x that
(test_levels_change_the_result checks that the references can tell).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from numba import njit
from numba.core.registry import cpu_target

from helpers import ACT8_LANE

from lowmem import act8_kernels, simd_kernels
from lowmem import cpu_kernels as kernels
from quant.int4_levels import STUDENT_T_LEVELS
from quant.qweight import UNIFORM_LEVELS, QWeight, dequantize, level_table, pack_int4

BF16 = ml_dtypes.bfloat16
TOL = 1e-5
A8_TOL = 1e-6  # act_int8 against its own arithmetic in float64: exact int32 sums, then fp32
# not sorted, not symmetric, both extremes: a nibble-order bug cannot hide
SHUFFLED_LEVELS = (90, -127, 3, 127, -1, 0, -64, 17, -5, 45, -33, 8, 111, -90, 60, -12)
TABLES = {"student_t": STUDENT_T_LEVELS, "shuffled": SHUFFLED_LEVELS}


def _qweight(rng, k, n, group, levels):
    """Random packed int4 (every nibble) with bf16 scales of both signs."""
    q = rng.integers(-8, 8, (k, n), dtype=np.int8)
    scales = (rng.standard_normal((k // group, n)) * 0.02).astype(BF16)
    return QWeight(pack_int4(q), scales, 4, group, levels)


def _with_levels(w, levels):
    """The same bytes and scales read through another table (None: uniform)."""
    return QWeight(w.values, w.scales, 4, w.group_size, levels)


def _error(y, x, w, tol=TOL):
    """max |y - x @ W| / (tol * |x| @ |W|), in float64 against dequantize(w)."""
    x64 = np.atleast_2d(x).astype(np.float64)
    dense = dequantize(w).astype(np.float64)
    y2 = np.atleast_2d(y)
    assert y2.dtype == np.float32 and y2.shape == (x64.shape[0], dense.shape[1])
    return np.max(np.abs(y2 - x64 @ dense) / (tol * (np.abs(x64) @ np.abs(dense)) + 1e-30))


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("t", list(range(1, 10)) + [16])
@pytest.mark.parametrize("k,n,group", [(256, 333, 64), (256, 192, 32), (320, 130, 32)])
def test_matmul_levels_token_counts(t, k, n, group, table):
    """Every micro-kernel token count (1..8, blocks of 8 beyond), 64-column
    strips plus a generic tail (333, 130 columns), the default split and
    forced ones whose row chunks cut scale groups (k_chunk 72, 40)."""
    rng = np.random.default_rng(1000 * t + n + group)
    w = _qweight(rng, k, n, group, TABLES[table])
    x = rng.standard_normal((t, k)).astype(np.float32)
    assert _error(kernels.matmul(x, w), x, w) <= 1.0
    assert _error(kernels.matmul(x, w, col_block=128, k_chunk=72), x, w) <= 1.0
    assert _error(kernels.matmul(x, w, col_block=48, k_chunk=40), x, w) <= 1.0


def test_matmul_levels_many_tokens_and_vector():
    """T > the token block and K > the row tile (prefill tiling); a (K,) x."""
    rng = np.random.default_rng(3)
    w = _qweight(rng, 512, 101, 32, STUDENT_T_LEVELS)
    x = rng.standard_normal((11, 512)).astype(np.float32)
    assert _error(kernels.matmul(x, w), x, w) <= 1.0
    y = kernels.matmul(x[4], w)
    assert y.shape == (101,)
    np.testing.assert_array_equal(y, kernels.matmul(x[4:5], w)[0])


def test_levels_change_the_result():
    """The references can tell the tables apart: the uniform reading of the
    same bytes is far outside the tolerance of the levels reference."""
    rng = np.random.default_rng(4)
    w = _qweight(rng, 256, 333, 32, STUDENT_T_LEVELS)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    assert _error(kernels.matmul(x, _with_levels(w, None)), x, w) > 1000
    assert _error(kernels.matmul(x, _with_levels(w, SHUFFLED_LEVELS)), x, w) > 1000


@pytest.mark.parametrize("t", [1, 2, 5, 8, 9])
def test_uniform_table_is_bit_identical_to_uniform_grid(t):
    """levels = the uniform grid spelled out runs the table code; the
    micro-kernels (the 64-column strips) and the multi-token decode buffer
    (the tail columns for 2..8 tokens) give exactly the bits of levels=None:
    same values, same summation order. The one-token tail loop (_tile_q4) may
    differ in the last bit: LLVM chooses which product it fuses into an FMA
    differently for a table load than for a sign extension; the other tests
    hold it to the tolerance."""
    rng = np.random.default_rng(5 + t)
    w = _qweight(rng, 256, 333, 32, None)
    x = rng.standard_normal((t, 256)).astype(np.float32)
    table = _with_levels(w, UNIFORM_LEVELS)
    for split in ({}, {"col_block": 128, "k_chunk": 40}):
        got, want = kernels.matmul(x, table, **split), kernels.matmul(x, w, **split)
        np.testing.assert_array_equal(got[:, :320], want[:, :320])  # whole strips
        if 2 <= t <= 8:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("lut,perm8", [(True, None), (False, True), (False, False)])
@pytest.mark.parametrize("tb,nv", [(1, 4), (3, 4), (8, 2)])
def test_int4_micro_kernel_levels_every_decoder(tb, nv, lut, perm8):
    """One micro-kernel call at offsets with a level table, with each
    decoder: the AVX-512 vpermps on the loaded table (lut), AVX2's two
    8-entry vpermps (perm8), the gather of other CPUs (tested on any CPU)."""
    ctx = cpu_target.target_context
    if lut and not simd_kernels._has_avx512(ctx):
        pytest.skip("the table decoder needs AVX-512")
    if perm8 and not simd_kernels._has_feature(ctx, "avx2"):
        pytest.skip("the 8-entry tables need AVX2")
    rng = np.random.default_rng(tb * 10 + nv + 7)
    k, n, i0, n0, t0, a0 = 64, 160, 3, 64, 1, 16
    w = _qweight(rng, k, n, k, SHUFFLED_LEVELS)
    x = rng.standard_normal((tb + 2, k)).astype(np.float32)
    kern = simd_kernels._q4_kernel(tb, nv, lut=lut, perm8=perm8)

    @njit
    def run(p, x, sc, acc, lv):
        kern(p, i0, p.shape[0] - i0 - 2, n0, x, t0, 2 * i0, sc, 0, acc, a0, lv)

    acc = np.zeros((tb + 2, 128), np.float32)
    run(w.values, x, w.scales.view(np.uint16), acc, level_table(w.levels))
    rows, cols = slice(2 * i0, k - 4), slice(n0, n0 + 16 * nv)
    dense = dequantize(w).astype(np.float64)[rows, cols]
    xs = x[t0:t0 + tb, rows].astype(np.float64)
    err = np.abs(acc[t0:t0 + tb, a0:a0 + 16 * nv] - xs @ dense)
    assert np.max(err / (TOL * np.abs(xs) @ np.abs(dense) + 1e-30)) <= 1.0
    mask = np.ones(acc.shape, bool)
    mask[t0:t0 + tb, a0:a0 + 16 * nv] = False
    assert not acc[mask].any()  # nothing written outside its block


def _gelu64(v):
    return 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v ** 3)))


def _exact_expert(rng, d, f, levels):
    """Levels times power-of-two scales: gate/up outputs of bf16-valued x
    are exact in fp32, so their bf16 rounding is fully determined."""
    def w(k, n, group):
        q = rng.integers(-8, 8, (k, n), dtype=np.int8)
        scales = (2.0 ** rng.integers(-12, -9, (k // group, n))).astype(BF16)
        return QWeight(pack_int4(q), scales, 4, group, levels)
    return w(d, f, 32), w(d, f, 64), w(f, d, 32)


@pytest.mark.parametrize("round_bf16", [True, False])
@pytest.mark.parametrize("t", [1, 5, 9])
def test_expert_ffn_levels(t, round_bf16):
    """GeGLU of three int4 weights with levels against float64 (gate/up
    rounded to bf16 through ml_dtypes in the bf16 mode)."""
    rng = np.random.default_rng(20 + t)
    d, f = 64, 256
    gate, up, down = _exact_expert(rng, d, f, STUDENT_T_LEVELS)
    x = (rng.integers(-16, 17, (t, d)) / 8.0).astype(np.float32)  # bf16-valued
    x64 = x.astype(np.float64)
    h, u = (x64 @ dequantize(m).astype(np.float64) for m in (gate, up))
    if round_bf16:
        h, u = (v.astype(np.float32).astype(BF16).astype(np.float64) for v in (h, u))
    act = _gelu64(h) * u
    down64 = dequantize(down).astype(np.float64)
    ref, scale = act @ down64, np.abs(act) @ np.abs(down64)
    y = kernels.expert_ffn(x, gate, up, down, round_bf16=round_bf16)
    assert y.shape == (t, d) and y.dtype == np.float32
    assert np.max(np.abs(y - ref) / scale) <= 2 * TOL  # gelu passes gate's error on


def _int8_activations(x):
    """x through act8_kernels.quantize_activations, dequantized in float64."""
    xq, dx, _ = act8_kernels.quantize_activations(np.atleast_2d(x))
    t, k = xq.shape
    return (xq.astype(np.float64).reshape(t, -1, 32) * dx[..., None]).reshape(t, k)


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("t", list(range(1, 9)) + [16])
@pytest.mark.parametrize("k,n,group", [(256, 333, 64), (256, 192, 32), (320, 130, 32)])
def test_act_int8_levels_matmul(t, k, n, group, table):
    """act_int8=True on level weights: the product of the int8-quantized
    activations with the weights read through the table, to A8_TOL (the int32
    dot products are exact, fp32 only after; measured < 1e-7), for every
    token count (1..4 one decode per call, 5..8 and 16 the decoded-block
    reuse), 64-column strips plus fp32 tails (333, 130 columns), default
    and forced splits. It is not the fp32 result: y - matmul(fp32) is the
    activation rounding (xd - x) @ W, which a silent fp32 fallback (or a
    uniform decode) would miss by orders of magnitude."""
    rng = np.random.default_rng(2000 + 10 * t + n + group)
    w = _qweight(rng, k, n, group, TABLES[table])
    x = rng.standard_normal((t, k)).astype(np.float32)
    xd = _int8_activations(x)
    y = kernels.matmul(x, w, act_int8=True)
    assert _error(y, xd, w, A8_TOL) <= 1.0
    assert _error(kernels.matmul(x, w, col_block=128, k_chunk=64, act_int8=True), xd, w,
                  A8_TOL) <= 1.0
    dense = dequantize(w).astype(np.float64)
    rounding = (xd - x) @ dense                               # (T, N) what int8 x changes
    y32 = kernels.matmul(x, w, act_int8=False)
    assert _error(y32, x, w) <= 1.0 and _error(y, x, w) > 30  # about 1/254 of the scale
    bound = TOL * np.abs(x.astype(np.float64)) @ np.abs(dense)
    assert np.all(np.abs((y - y32) - rounding) <= bound)


@pytest.mark.parametrize("t", [1, 3, 6])
def test_act_int8_uniform_table_is_bit_identical_to_uniform_grid(t):
    """act_int8 with levels = the uniform grid spelled out (the vpshufb
    decode, offset 128) gives exactly the bits of levels=None (xor decode,
    offset 8) in the 64-column strips: the same exact int32 sums, the same
    float arithmetic after them."""
    rng = np.random.default_rng(40 + t)
    w = _qweight(rng, 256, 333, 32, None)
    x = rng.standard_normal((t, 256)).astype(np.float32)
    for split in ({}, {"col_block": 128, "k_chunk": 64}):
        got = kernels.matmul(x, _with_levels(w, UNIFORM_LEVELS), act_int8=True, **split)
        want = kernels.matmul(x, w, act_int8=True, **split)
        np.testing.assert_array_equal(got[:, :320], want[:, :320])


@pytest.mark.parametrize("vnni,mode", [(None, "fused"), (False, "fused"), (None, "write"),
                                       (None, "read"), (False, "write"), (False, "read")])
@pytest.mark.parametrize("tb", [1, 4])
@pytest.mark.parametrize("table", list(TABLES))
def test_act_int8_micro_kernel_levels(tb, vnni, mode, table):
    """One int8-activation call on level weights at offsets, with vpshufb
    and vpdpbusd where the CPU has them (None) and the portable select chain
    and dot product of CPUs without AVX-512 VNNI (False), decoding itself or
    reading the block a "write" call decoded: exact against integer dot
    products of the tables' values, nothing written outside its block."""
    rng = np.random.default_rng(60 + tb)
    k, n, n0, t0, a0, kb = 96, 160, 64, 1, 16, 32
    w = _qweight(rng, k, n, 32, TABLES[table])
    x = rng.standard_normal((tb + 2, k)).astype(np.float32)
    xq, dx, bs = act8_kernels.quantize_activations(x)
    kern = act8_kernels._kernel(4, tb, vnni, mode)
    writer = act8_kernels._kernel(4, 1, vnni, "write")

    @njit
    def run(p, xq, dx, bs, sc, acc, u, scratch, lv):
        if mode == "read":  # u from another token's call, into a scratch accumulator
            writer(p, kb // 2, n0, xq, 0, kb, dx, bs, sc, 1, scratch, 0, u, lv)
            p = np.zeros_like(p)  # nothing left to read there
        kern(p, kb // 2, n0, xq, t0, kb, dx, bs, sc, 1, acc, a0, u, lv)

    acc = np.zeros((tb + 2, 128), np.float32)
    run(w.values, xq, dx, bs, w.scales.view(np.uint16), acc, np.zeros((32, 64), np.uint8),
        np.zeros((1, 64), np.float32), level_table(w.levels))
    nib = (w.values[:, None, :] >> np.array([0, 4], np.uint8)[:, None]) & 15  # (K/2, 2, N)
    q = np.asarray(TABLES[table], np.int64)[nib.reshape(k, n)]                # (K, N) levels
    dots = xq[t0:t0 + tb, kb:kb + 32].astype(np.int64) @ q[kb:kb + 32, n0:n0 + 64]  # exact
    ref = dots * dx[t0:t0 + tb, 1:2].astype(np.float64) \
        * w.scales[1, n0:n0 + 64].astype(np.float64)
    got = acc[t0:t0 + tb, a0 + ACT8_LANE]  # the strip is left in lane order
    np.testing.assert_allclose(got, ref, rtol=2e-7, atol=1e-7 * np.abs(ref).max())
    mask = np.ones(acc.shape, bool)
    mask[t0:t0 + tb, a0:a0 + 64] = False
    assert not acc[mask].any()


_AVX2_CHECK = """
import numpy as np, ml_dtypes
from numba.core.registry import cpu_target
from lowmem import act8_kernels, cpu_kernels, simd_kernels
from quant.int4_levels import STUDENT_T_LEVELS
from quant.qweight import QWeight, dequantize, pack_int4
assert not simd_kernels._has_avx512(cpu_target.target_context)
assert not act8_kernels._has_vnni(cpu_target.target_context)
rng = np.random.default_rng(7)
for levels in (STUDENT_T_LEVELS, (90, -127, 3, 127, -1, 0, -64, 17, -5, 45, -33, 8, 111, -90, 60, -12)):
    q = rng.integers(-8, 8, (256, 160 + 37), dtype=np.int8)
    sc = (rng.standard_normal((8, 160 + 37)) * 0.02).astype(ml_dtypes.bfloat16)
    w = QWeight(pack_int4(q), sc, 4, 32, levels)
    dense = dequantize(w).astype(np.float64)
    for t in (1, 3, 9):
        x = rng.standard_normal((t, 256)).astype(np.float32)
        bound = 1e-5 * np.abs(x.astype(np.float64)) @ np.abs(dense)
        for split in ({}, {"col_block": 64, "k_chunk": 40}):
            assert np.all(np.abs(cpu_kernels.matmul(x, w, **split) - x @ dense) <= bound)
print("ok")
"""


def test_levels_on_an_avx2_target(tmp_path):
    """matmul with level tables compiled for a CPU without AVX-512 (numba
    told haswell): AVX2's 8-entry table decoder in the strips, the scalar tails, the
    multi-token buffers, against float64. (act_int8's portable table lookup and dot
    product, the code such a CPU runs, are checked in this process with vnni=False by
    test_act_int8_micro_kernel_levels: compiling the whole act_int8 matmul for another
    target here cost two minutes of CI.)"""
    from helpers import run_on_avx2_target
    run_on_avx2_target(_AVX2_CHECK, tmp_path)
