"""lowmem.cpu_kernels against plain numpy float64 references built from
quant.qweight.dequantize (the independent meaning of a QWeight).

Tolerance: the kernels accumulate in fp32. Each output is a K-term dot product
summed in a fixed blocked order (4 rows pairwise, or for int4 a chain of up to
32 rows and for int8 one of up to 16, then into a running sum, per row chunk),
so its rounding error is at most about (K/4 + 8) * 2^-24 (int4:
(32 + K/32 + 8) * 2^-24, int8: (16 + K/16 + 8) * 2^-24) times
sum_k |x_k w_kn|, i.e. about 5e-6 for the K <= 512 used here. We assert
|y - y_ref| <= TOL * (|x| @ |W|) elementwise with TOL = 1e-5: twice that bound,
and 100x below what a layout bug (a swapped nibble, a wrong scale row or an
unrounded bf16 intermediate) produces.
"""
from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
import pytest
from numba import njit
from numba.core.registry import cpu_target

from helpers import ACT8_LANE

from lowmem import act8_kernels
from lowmem import cpu_kernels as kernels
from lowmem import model as M
from lowmem import simd_kernels
from quant.bf16 import round_bf16_inplace, round_bf16_scalar, to_bf16
from quant.int4_levels import STUDENT_T_LEVELS
from quant.qweight import QWeight, dequantize, pack_int4

BF16 = ml_dtypes.bfloat16
TOL = 1e-5
K, N = 256, 333  # N odd and not a multiple of any block width


def _qweight(rng, k, n, bits, group):
    """Random QWeight over the full integer range, bf16 scales of both signs."""
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = rng.integers(lo, hi, (k, n), dtype=np.int8)
    scales = (rng.standard_normal((k // group, n)) * 0.02).astype(BF16)
    return QWeight(pack_int4(q) if bits == 4 else q, scales, bits, group)


def _dense(w):
    """float64 (K, N) meaning of any weight kernels accept."""
    return dequantize(w).astype(np.float64) if isinstance(w, QWeight) else w.astype(np.float64)


def _assert_matmul_close(y, x, w):
    x64 = np.atleast_2d(x).astype(np.float64)
    ref = x64 @ _dense(w)
    bound = TOL * (np.abs(x64) @ np.abs(_dense(w))) + 1e-30
    y2 = np.atleast_2d(y)
    assert y2.dtype == np.float32 and y2.shape == ref.shape
    worst = np.max(np.abs(y2 - ref) / bound)
    assert worst <= 1.0, f"error {worst:.2f}x the tolerance"


# ---------------------------------------------------------------------------- bf16

def _bf16_test_bits():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (bits[:4000] & 0xFFFF0000) | 0x8000  # exactly halfway, even and odd
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F800001, 0xFFC00001,
                        0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00000001, 0x00008000,
                        0x00018000, 0x807FFFFF, 0x3F808000, 0x3F818000, 0xBF808000,
                        0x4B7FFFFF], np.uint32)
    return np.concatenate([bits, ties, special])


def test_round_bf16_inplace_and_to_bf16_bit_exact_vs_ml_dtypes():
    """The project's one numba bf16 rounding primitive, through both of its users."""
    f = _bf16_test_bits().view(np.float32)
    with np.errstate(invalid="ignore"):
        ref = f.astype(BF16).astype(np.float32).view(np.uint32)
    inplace = f.copy()
    njit(lambda a: round_bf16_inplace(a))(inplace)
    assert np.array_equal(inplace.view(np.uint32), ref)
    stored, _ = to_bf16(f[:700].reshape(100, 7))  # any shape, shape kept
    assert stored.shape == (100, 7)
    assert np.array_equal(stored.astype(np.float32).view(np.uint32), ref[:700].reshape(100, 7))


@njit
def _round_loop(a):
    out = np.empty_like(a)
    for i in range(a.size):
        out[i] = round_bf16_scalar(a[i])
    return out


def test_round_bf16_scalar_in_numba_bit_exact():
    f = _bf16_test_bits().view(np.float32)
    with np.errstate(invalid="ignore"):
        ref = f.astype(BF16).astype(np.float32).view(np.uint32)
    assert np.array_equal(_round_loop(f).view(np.uint32), ref)


# ---------------------------------------------------------------------------- matmul

QUANT_CASES = [(8, K), (8, K // 8), (8, 32), (4, K), (4, K // 8), (4, 32), (4, 64)]
SPLITS = [{}, {"col_block": 64, "k_chunk": 40}]  # default plan; ragged blocks + chunks across groups


@pytest.mark.parametrize("bits,group", QUANT_CASES)
@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("split", SPLITS)
def test_matmul_qweight(bits, group, t, split):
    rng = np.random.default_rng(bits * 1000 + group + t)
    w = _qweight(rng, K, N, bits, group)
    x = rng.standard_normal((t, K)).astype(np.float32)
    _assert_matmul_close(kernels.matmul(x, w, **split), x, w)


@pytest.mark.parametrize("dtype", [np.float32, BF16])
@pytest.mark.parametrize("t", [1, 5])
def test_matmul_float_weights(dtype, t):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((K, N)).astype(dtype)
    x = rng.standard_normal((t, K)).astype(np.float32)
    _assert_matmul_close(kernels.matmul(x, w), x, w)
    _assert_matmul_close(kernels.matmul(x, w, col_block=48, k_chunk=16), x, w)


@pytest.mark.parametrize("bits,group,k", [(8, 6, 258), (8, 66, 66), (4, 6, 258), (4, 2, 10)])
def test_matmul_group_remainders(bits, group, k):
    """Groups that are not a multiple of 4 rows take the remainder paths."""
    rng = np.random.default_rng(group)
    w = _qweight(rng, k, 37, bits, group)
    for t in (1, 3):
        x = rng.standard_normal((t, k)).astype(np.float32)
        _assert_matmul_close(kernels.matmul(x, w), x, w)
        _assert_matmul_close(kernels.matmul(x, w, col_block=16, k_chunk=8), x, w)


@pytest.mark.parametrize("t", range(1, 10))
@pytest.mark.parametrize("n,group", [(333, 64), (192, K), (192, 32)])
def test_matmul_int4_token_counts(t, n, group):
    """int4 has a register micro-kernel per token count 1..8 (and blocks of
    8 beyond); 333 columns = 5 whole 64-column strips + a generic tail."""
    rng = np.random.default_rng(100 * t + n + group)
    w = _qweight(rng, K, n, 4, group)
    x = rng.standard_normal((t, K)).astype(np.float32)
    _assert_matmul_close(kernels.matmul(x, w), x, w)
    _assert_matmul_close(kernels.matmul(x, w, col_block=128, k_chunk=72), x, w)


@pytest.mark.parametrize("lut", [False, True])
@pytest.mark.parametrize("tb,nv", [(1, 4), (3, 4), (8, 2)])
def test_int4_micro_kernel_both_decoders(tb, nv, lut):
    """One micro-kernel call at offsets (rows, columns, tokens, accumulator
    columns) with either nibble decoder: the xor one is what machines without
    AVX-512 run, so it is tested here even where matmul uses the table."""
    if lut and not simd_kernels._has_avx512(cpu_target.target_context):
        pytest.skip("the table decoder needs AVX-512")
    rng = np.random.default_rng(tb * 10 + nv)
    k, n, i0, n0, t0, a0 = 64, 160, 3, 64, 1, 16
    w = _qweight(rng, k, n, 4, k)
    x = rng.standard_normal((tb + 2, k)).astype(np.float32)
    kern = simd_kernels._q4_kernel(tb, nv, lut=lut)

    @njit
    def run(p, x, sc, acc):
        kern(p, i0, p.shape[0] - i0 - 2, n0, x, t0, 2 * i0, sc, 0, acc, a0, None)

    acc = np.zeros((tb + 2, 128), np.float32)
    run(w.values, x, w.scales.view(np.uint16), acc)
    rows, cols = slice(2 * i0, k - 4), slice(n0, n0 + 16 * nv)
    dense = _dense(w)[rows, cols]
    ref = np.zeros_like(acc, dtype=np.float64)
    ref[t0:t0 + tb, a0:a0 + 16 * nv] = x[t0:t0 + tb, rows].astype(np.float64) @ dense
    bound = TOL * np.abs(x[t0:t0 + tb, rows]).astype(np.float64) @ np.abs(dense)
    assert np.max(np.abs(acc - ref)[t0:t0 + tb, a0:a0 + 16 * nv] / (bound + 1e-30)) <= 1.0
    mask = np.ones(acc.shape, bool)
    mask[t0:t0 + tb, a0:a0 + 16 * nv] = False
    assert not acc[mask].any()  # nothing written outside its block


@pytest.mark.parametrize("t", [*range(1, 10), 11, 13])
@pytest.mark.parametrize("n,group,k", [(333, K // 8, K), (333, K, K), (192, 24, 264)])
def test_matmul_int8_token_counts(t, n, group, k):
    """int8 has a register micro-kernel per token count 1..6 (and balanced
    passes beyond: 7 = 4 + 3, 11 = 6 + 5, 13 = 5 + 5 + 3), on the release's
    8 row blocks, per-channel scales and groups that are not a multiple of
    its 16 rows; 333 columns = 5 whole 64-column strips + a generic tail;
    the forced split cuts row chunks mid-group."""
    rng = np.random.default_rng(100 * t + n + group + 1)
    w = _qweight(rng, k, n, 8, group)
    x = rng.standard_normal((t, k)).astype(np.float32)
    _assert_matmul_close(kernels.matmul(x, w), x, w)
    _assert_matmul_close(kernels.matmul(x, w, col_block=128, k_chunk=72), x, w)
    _assert_matmul_close(kernels.matmul(x, w, col_block=16, k_chunk=8), x, w)


@pytest.mark.parametrize("tb,nv", [(1, 4), (2, 4), (4, 4), (5, 4), (6, 4), (8, 2)])
def test_int8_micro_kernel(tb, nv):
    """One int8 micro-kernel call at offsets (rows, columns, tokens,
    accumulator columns, x columns), scale group 1: nothing written outside."""
    rng = np.random.default_rng(tb * 10 + nv + 5)
    k, n, i0, n0, t0, a0, kx, gi = 64, 160, 3, 64, 1, 16, 5, 1
    w = _qweight(rng, k, n, 8, k // 2)
    x = rng.standard_normal((tb + 2, k + 8)).astype(np.float32)
    kern = simd_kernels._i8_kernel(tb, nv)
    nb = k - i0 - 4

    @njit
    def run(p, x, sc, acc):
        simd_kernels._prefer_512()
        kern(p, i0, nb, n0, x, t0, kx, sc, gi, acc, a0)

    acc = np.zeros((tb + 2, 128), np.float32)
    run(w.values, x, w.scales.view(np.uint16), acc)
    cols = slice(n0, n0 + 16 * nv)
    dense = w.values[i0:i0 + nb, cols].astype(np.float64) * \
        w.scales[gi, cols].astype(np.float64)
    xs = x[t0:t0 + tb, kx:kx + nb].astype(np.float64)
    ref = np.zeros_like(acc, dtype=np.float64)
    ref[t0:t0 + tb, a0:a0 + 16 * nv] = xs @ dense
    bound = TOL * np.abs(xs) @ np.abs(dense)
    assert np.max(np.abs(acc - ref)[t0:t0 + tb, a0:a0 + 16 * nv] / (bound + 1e-30)) <= 1.0
    mask = np.ones(acc.shape, bool)
    mask[t0:t0 + tb, a0:a0 + 16 * nv] = False
    assert not acc[mask].any()  # nothing written outside its block


# ---------------------------------------------------------------------------- int8 activations

def _act8_reference(x):
    """Independent per-32 int8 quantization: scale max|x| / 127, round half to even."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    m = np.abs(blocks).max(-1)                                             # (T, K/32)
    inv = np.where(m > 0, np.float32(127) / np.where(m > 0, m, 1), 0).astype(np.float32)
    q = np.clip(np.rint(blocks * inv[..., None]), -127, 127).astype(np.int8)
    return q.reshape(x.shape), (m / np.float32(127)).astype(np.float32), q.sum(-1, dtype=np.int32)


def test_quantize_activations():
    rng = np.random.default_rng(31)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    x[1, 32:64] = 0.0                                   # an all-zero block: scale 0, q 0
    x[2, :32] = np.arange(32, dtype=np.float32) - 15.5  # halves: ties to even
    xq, dx, bs = act8_kernels.quantize_activations(x)
    rq, rdx, rbs = _act8_reference(x)
    np.testing.assert_array_equal(xq, rq)
    np.testing.assert_array_equal(dx, rdx)
    np.testing.assert_array_equal(bs, rbs)
    assert dx[1, 1] == 0 and not xq[1, 32:64].any()


def _assert_act8_close(y, x, w):
    """y against float64 (dequantized int8 activations) @ (dequantized weights)."""
    xq, dx, _ = _act8_reference(np.atleast_2d(x))
    xd = (xq.astype(np.float64).reshape(xq.shape[0], -1, 32) * dx[..., None]).reshape(xq.shape)
    _assert_matmul_close(y, xd, w)


@pytest.mark.parametrize("a8", [False, True])
def test_wide_outputs_split_their_columns(a8):
    """The plan of a Grok-1 gate (6144 x 32768): at 16 tokens a token block's
    accumulators over a whole row reach L2's size, so the columns are split into
    blocks of at most _ACC_SPLIT bytes of them (whole strips); at 6 tokens they
    stay whole rows (the rows are split instead). Column blocks' products: SPLITS."""
    k, n = 6144, 32768
    block = kernels._A8_TOKEN_BLOCK if a8 else kernels._TOKEN_BLOCK
    nb, _, _ = kernels._plan(16, k, n, k * n, a8)
    assert nb * block * 4 <= kernels._ACC_SPLIT and nb % (64 if a8 else 16) == 0
    assert kernels._plan(6, k, n, k * n, a8)[0] == n


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("a8,tiled", [(False, False), (True, True)])
def test_one_token_splits_rows_in_two_chunks_a_thread(threads, a8, tiled):
    """At one token a thread gets at most two row chunks of whole rows (each chunk
    is one more partial output row to zero and add up), at two tokens four as
    before; Grok-1's gate, down and the output table (6144 x 131072)."""
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for k, n in ((6144, 32768), (32768, 6144), (6144, 131072)):
            nb, kchunk, nk = kernels._plan(1, k, n, k * n // 2, a8, tiled)
            assert (nb, nk) == (n, 2 * threads) and kchunk * nk == k
            if n < 131072:   # two tokens of the table's accumulators split its columns
                assert kernels._plan(2, k, n, k * n // 2, a8, tiled)[1:] == (k // 4 // threads,
                                                                           4 * threads)
    finally:
        numba.set_num_threads(old)


@pytest.mark.parametrize("t", [1, 2, 4, 5, 9, 17])
@pytest.mark.parametrize("bits,group,n", [(4, K, 333), (4, 64, 192), (8, K // 8, 333), (8, 32, 130)])
def test_matmul_act_int8(t, bits, group, n):
    """act_int8=True: the product of the int8-quantized activations with the
    weights (int32 dot products are exact, fp32 after; 17 tokens: two token
    blocks over row tiles); 333 and 130 columns
    leave a tail for the fp32 tiles, forced splits cut the rows at 32-row
    blocks or (k_chunk 72) fall back to fp32 entirely."""
    rng = np.random.default_rng(200 + 10 * t + bits + group)
    w = _qweight(rng, K, n, bits, group)
    x = rng.standard_normal((t, K)).astype(np.float32)
    y = kernels.matmul(x, w, act_int8=True)
    _assert_act8_close(y, x, w)
    assert np.max(np.abs(y - kernels.matmul(x, w, act_int8=False))) > 0  # it did change
    _assert_act8_close(kernels.matmul(x, w, col_block=128, k_chunk=64, act_int8=True), x, w)
    np.testing.assert_array_equal(kernels.matmul(x, w, k_chunk=72, act_int8=True),
                                  kernels.matmul(x, w, k_chunk=72))


@pytest.mark.parametrize("a8", [False, True])
@pytest.mark.parametrize("t", [1, 3, 6, 11])
@pytest.mark.parametrize("bits,group,levels", [(8, K // 8, None), (4, 32, None),
                                               (4, 32, STUDENT_T_LEVELS)])
def test_matmul_padded_rows_equal_dense(bits, group, levels, t, a8):
    """Values stored with row padding (format 4's row_pad: stored columns past the
    scales' width) are the same weight as dense values, whatever the padding holds
    (garbage here, zeros in a file): every kernel family reads rows at the stored
    stride and only the scales' N columns (333: strips and the fp32 tail); the
    numpy and JAX dequantizations ignore the padding too."""
    rng = np.random.default_rng(300 + 10 * t + bits)
    w = _qweight(rng, K, N, bits, group)
    w = QWeight(w.values, w.scales, bits, group, levels)
    junk = rng.integers(-128, 128, (w.values.shape[0], 64), np.int8).view(w.values.dtype)
    padded = QWeight(np.concatenate([w.values, junk], axis=1), w.scales, bits, group, levels)
    assert padded.shape == w.shape == (K, N) and padded.row_pad == 64 and w.row_pad == 0
    x = rng.standard_normal((t, K)).astype(np.float32)
    y = kernels.matmul(x, padded, act_int8=a8)
    (_assert_act8_close if a8 else _assert_matmul_close)(y, x, w)
    for split in ({"col_block": 128, "k_chunk": 64}, {"col_block": 1024, "k_chunk": 256}):
        np.testing.assert_array_equal(kernels.matmul(x, padded, act_int8=a8, **split),
                                      kernels.matmul(x, w, act_int8=a8, **split))
    np.testing.assert_array_equal(dequantize(padded), dequantize(w))
    np.testing.assert_array_equal(np.asarray(M.dequantize(padded, np.float32)), dequantize(w))
    with pytest.raises(ValueError, match="narrower than the scales' 333 columns"):
        QWeight(w.values[:, :N - 1], w.scales, bits, group, levels)


def test_matmul_act_int8_needs_blocks_of_32():
    """Group sizes that are not a multiple of 32 keep the fp32 kernels, exactly."""
    rng = np.random.default_rng(41)
    w = _qweight(rng, 264, 130, 8, 24)
    x = rng.standard_normal((3, 264)).astype(np.float32)
    np.testing.assert_array_equal(kernels.matmul(x, w, act_int8=True), kernels.matmul(x, w))


@pytest.mark.parametrize("vnni,mode", [(None, "fused"), (False, "fused"), (None, "write"),
                                       (None, "read"), (False, "read")])
@pytest.mark.parametrize("bits,tb", [(4, 1), (4, 4), (8, 3)])
def test_act8_micro_kernel(bits, tb, vnni, mode):
    """One call at offsets (stored rows, columns, tokens, accumulator
    columns, scale row), with vpdpbusd where the CPU has it (None) and the
    portable dot product that CPUs without AVX-512 VNNI run (False), decoding
    the weights itself ("fused", "write": then also into u) or taking them
    from a u written by a "write" call of another token ("read"): exact
    against integers, nothing written outside its block."""
    rng = np.random.default_rng(bits * 10 + tb)
    k, n, n0, t0, a0, kb = 96, 160, 64, 1, 16, 32
    w = _qweight(rng, k, n, bits, 32)
    x = rng.standard_normal((tb + 2, k)).astype(np.float32)
    xq, dx, bs = act8_kernels.quantize_activations(x)
    kern = act8_kernels._kernel(bits, tb, vnni, mode)
    writer = act8_kernels._kernel(bits, 1, vnni, "write")
    i0 = kb // 2 if bits == 4 else kb

    @njit
    def run(p, xq, dx, bs, sc, acc, u, scratch):
        if mode == "read":  # u from another token's call, into a scratch accumulator
            writer(p, i0, n0, xq, 0, kb, dx, bs, sc, kb // 32, scratch, 0, u, None)
            p = np.zeros_like(p)  # nothing left to read there
        kern(p, i0, n0, xq, t0, kb, dx, bs, sc, kb // 32, acc, a0, u, None)

    acc = np.zeros((tb + 2, 128), np.float32)
    u = np.zeros((32, 64), np.uint8)
    run(w.values, xq, dx, bs, w.scales.view(np.uint16), acc, u, np.zeros((1, 64), np.float32))
    if mode != "fused":
        assert u.any()  # the decoded block is there
    q = w.values.astype(np.int64) if bits == 8 else \
        ((w.values[..., None] >> np.array([0, 4], np.uint8)) & 15).astype(np.int64)
    q = (q if bits == 8 else np.where(q > 7, q - 16, q).transpose(0, 2, 1).reshape(k, n))
    dots = xq[t0:t0 + tb, kb:kb + 32].astype(np.int64) @ q[kb:kb + 32, n0:n0 + 64]  # exact
    scale = w.scales[kb // 32, n0:n0 + 64].astype(np.float64)
    ref = dots * dx[t0:t0 + tb, 1:2].astype(np.float64) * scale
    got = acc[t0:t0 + tb, a0 + ACT8_LANE]  # the strip is left in lane order
    np.testing.assert_allclose(got, ref, rtol=2e-7, atol=1e-7 * np.abs(ref).max())
    mask = np.ones(acc.shape, bool)
    mask[t0:t0 + tb, a0:a0 + 64] = False
    assert not acc[mask].any()


def test_act8_natural_order():
    """natural_order moves each whole strip's lanes (column 16c + 8v + 4h + m
    at lane 16(2v + h) + 4c + m) back to column order, for rows t0..t1 and
    strips from a0 only: the tail (m % 64) and everything else untouched."""
    acc = np.arange(5 * 200, dtype=np.float32).reshape(5, 200)
    want = acc.copy()
    t0, t1, a0, m = 1, 4, 7, 64 * 2 + 21
    for j in (a0, a0 + 64):
        want[t0:t1, j:j + 64] = acc[t0:t1, j + ACT8_LANE]
    act8_kernels.natural_order(acc, t0, t1, a0, m, np.zeros((32, 64), np.int8), 0)
    np.testing.assert_array_equal(acc, want)
    for w, ts in ((np.zeros((16, 64), np.uint8), 0), (np.zeros((32, 64), np.int8), 32)):
        again = acc.copy()   # int4 rows and int8 tiles: lane order too
        act8_kernels.natural_order(again, t0, t1, a0, m, w, ts)
        np.testing.assert_array_equal(again[t0:t1, a0:a0 + 128],
                                      acc[t0:t1, a0 + np.concatenate([ACT8_LANE, 64 + ACT8_LANE])])
    same = acc.copy()        # int4 tiles: the kernels left the sums in column order
    act8_kernels.natural_order(same, t0, t1, a0, m, np.zeros((16, 64), np.uint8), 16)
    np.testing.assert_array_equal(same, acc)


def test_expert_ffn_act_int8_is_matmuls_composed():
    """expert_ffn passes act_int8 to its three matmuls (and fp32 mode is unchanged)."""
    rng = np.random.default_rng(51)
    gate, up = (_qweight(rng, 64, 256, 4, 64) for _ in range(2))
    down = _qweight(rng, 256, 64, 4, 64)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    h = kernels.matmul(x, gate, act_int8=True).astype(np.float64)
    u = kernels.matmul(x, up, act_int8=True).astype(np.float64)
    act = (_gelu64(h) * u).astype(np.float32)
    want = kernels.matmul(act, down, act_int8=True)
    got = kernels.expert_ffn(x, gate, up, down, round_bf16=False, act_int8=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert not np.array_equal(got, kernels.expert_ffn(x, gate, up, down, round_bf16=False))


@pytest.mark.parametrize("bits", [8, 4])
def test_matmul_many_tokens(bits):
    """T > the token block and K > the row tile: the prefill tiling paths."""
    rng = np.random.default_rng(11)
    w = _qweight(rng, 512, 101, bits, 64)
    x = rng.standard_normal((11, 512)).astype(np.float32)
    _assert_matmul_close(kernels.matmul(x, w), x, w)


def test_matmul_vector_and_errors():
    rng = np.random.default_rng(3)
    w = _qweight(rng, K, N, 8, K)
    x = rng.standard_normal(K).astype(np.float32)
    y = kernels.matmul(x, w)
    assert y.shape == (N,)
    np.testing.assert_array_equal(y, kernels.matmul(x[None], w)[0])
    frozen = x.copy()
    frozen.setflags(write=False)  # as jax hands buffers to callbacks
    np.testing.assert_array_equal(kernels.matmul(frozen.astype(np.float64), w), y)
    np.testing.assert_array_equal(kernels.matmul(frozen, w), y)
    with pytest.raises(ValueError, match="K=256"):
        kernels.matmul(np.ones((2, K + 1), np.float32), w)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.matmul(x[:N], np.ones((K, N), np.float32).T)
    with pytest.raises(TypeError, match="QWeight or a 2-D float32/bfloat16"):
        kernels.matmul(x, np.ones((K, N), np.float64))
    with pytest.raises(ValueError, match="even group_size"):
        kernels.matmul(np.ones(6, np.float32), QWeight(np.zeros((3, 4), np.uint8),
                                                       np.ones((2, 4), BF16), 4, 3))
    with pytest.raises(ValueError, match="int8"):
        kernels.matmul(x, QWeight(w.values.view(np.uint8), w.scales, 8, K))
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.matmul(x, w, k_chunk=12)


# ---------------------------------------------------------------------------- memmap

def _memmap(tmp_path, name, arr, offset=0):
    """A read-only np.memmap of arr's bytes written at `offset` in a file."""
    path = tmp_path / f"{name}.bin"
    with open(path, "wb") as f:
        f.write(b"\0" * offset)
        f.write(np.ascontiguousarray(arr).tobytes())
    return np.memmap(path, dtype=arr.dtype, mode="r", offset=offset, shape=arr.shape)


@pytest.mark.parametrize("bits,group", [(8, K // 8), (4, 64)])
def test_matmul_on_memmap_equals_in_memory(tmp_path, bits, group):
    """Weights read in place from a file: one expert of an (E, K, N) mapping."""
    rng = np.random.default_rng(5)
    experts = [_qweight(rng, K, N, bits, group) for _ in range(3)]
    values = _memmap(tmp_path, "v", np.stack([e.values for e in experts]), offset=64)
    scales = _memmap(tmp_path, "s", np.stack([e.scales for e in experts]))
    mapped = QWeight(values[1], scales[1], bits, group)
    assert not mapped.values.flags.writeable  # really the read-only mapping
    for t in (1, 5):
        x = rng.standard_normal((t, K)).astype(np.float32)
        np.testing.assert_array_equal(kernels.matmul(x, mapped), kernels.matmul(x, experts[1]))
        _assert_matmul_close(kernels.matmul(x, mapped), x, experts[1])


def test_matmul_bf16_memmap(tmp_path):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((K, N)).astype(BF16)
    x = rng.standard_normal((2, K)).astype(np.float32)
    np.testing.assert_array_equal(kernels.matmul(x, _memmap(tmp_path, "w", w)),
                                  kernels.matmul(x, w))


# ---------------------------------------------------------------------------- matmul_nt

@pytest.mark.parametrize("dtype", [BF16, np.float32])
@pytest.mark.parametrize("t", [1, 5])
def test_matmul_nt(tmp_path, dtype, t):
    rng = np.random.default_rng(9)
    e = rng.standard_normal((103, 64)).astype(dtype)  # (V, D), V odd
    x = rng.standard_normal((t, 64)).astype(np.float32)
    y = kernels.matmul_nt(x, e)
    _assert_matmul_close(y, x, np.ascontiguousarray(e.T))
    np.testing.assert_array_equal(kernels.matmul_nt(x, _memmap(tmp_path, "e", e)), y)
    assert kernels.matmul_nt(x[0], e).shape == (103,)
    with pytest.raises(ValueError, match="K=64"):
        kernels.matmul_nt(np.ones((1, 65), np.float32), e)


# ---------------------------------------------------------------------------- expert_ffn

def _gelu64(v):
    return 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v ** 3)))


def _ffn_reference(x, gate, up, down, rounding):
    """float64 GeGLU; gate/up outputs rounded to bf16 through ml_dtypes if rounding."""
    x64 = x.astype(np.float64)
    h, u = x64 @ _dense(gate), x64 @ _dense(up)
    if rounding:
        h = h.astype(np.float32).astype(BF16).astype(np.float64)
        u = u.astype(np.float32).astype(BF16).astype(np.float64)
    act = _gelu64(h) * u
    return act @ _dense(down), np.abs(act) @ np.abs(_dense(down))


def _exact_expert(rng, d, f, bits):
    """Weights whose projections of x are exact in fp32 (integer values times
    power-of-two scales), so bf16 rounding of gate/up is fully determined and
    the reference can be compared tightly."""
    def w(k, n, group):
        lo, hi = (-8, 8) if bits == 4 else (-128, 128)
        q = rng.integers(lo, hi, (k, n), dtype=np.int8)
        scales = (2.0 ** rng.integers(-8, -5, (k // group, n))).astype(BF16)
        return QWeight(pack_int4(q) if bits == 4 else q, scales, bits, group)
    return w(d, f, d), w(d, f, 32), w(f, d, f // 8)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("t", [1, 5])
def test_expert_ffn_bf16_mode_exact_inputs(bits, t):
    rng = np.random.default_rng(bits + t)
    d, f = 64, 256
    gate, up, down = _exact_expert(rng, d, f, bits)
    x = (rng.integers(-16, 17, (t, d)) / 8.0).astype(np.float32)  # bf16-valued
    ref, scale = _ffn_reference(x, gate, up, down, rounding=True)
    ref_fp32, _ = _ffn_reference(x, gate, up, down, rounding=False)
    # the test can tell the modes apart: skipping the rounding moves it far more
    assert np.max(np.abs(ref_fp32 - ref) / scale) > 100 * TOL
    y = kernels.expert_ffn(x, gate, up, down)
    assert y.shape == (t, d) and y.dtype == np.float32
    assert np.max(np.abs(y - ref) / scale) <= TOL
    y32 = kernels.expert_ffn(x, gate, up, down, round_bf16=False)
    assert np.max(np.abs(y32 - ref_fp32) / scale) <= TOL


@pytest.mark.parametrize("kind", ["int8", "int4g64", "bf16"])
def test_expert_ffn_fp32_mode_random(kind):
    """Realistic magnitudes (gate/up rms ~1.5) through the fp32 mode; an erf
    gelu or a missing factor would be 10x-1000x over the tolerance."""
    rng = np.random.default_rng(21)
    d, f = 64, 256
    if kind == "bf16":
        gate, up, down = (rng.standard_normal(s).astype(BF16) * np.float32(1.5 / 8)
                          for s in ((d, f), (d, f), (f, d)))
    else:
        bits, group = (8, d) if kind == "int8" else (4, 64)
        gate, up = (_qweight(rng, d, f, bits, group) for _ in range(2))
        down = _qweight(rng, f, d, bits, 64 if bits == 4 else f // 8)
    x = rng.standard_normal((3, d)).astype(np.float32)
    ref, scale = _ffn_reference(x, gate, up, down, rounding=False)
    y = kernels.expert_ffn(x, gate, up, down, round_bf16=False)
    # 4x TOL: errors of the first matmuls pass through gelu (slope <= 1.13)
    # and the product before the second matmul adds its own
    assert np.max(np.abs(y - ref) / scale) <= 4 * TOL
    np.testing.assert_array_equal(kernels.expert_ffn(x[1], gate, up, down, round_bf16=False),
                                  kernels.expert_ffn(x[1:2], gate, up, down, round_bf16=False)[0])


def test_expert_ffn_shape_errors():
    rng = np.random.default_rng(0)
    gate, up, down = (_qweight(rng, *s, 8, s[0]) for s in ((64, 256), (64, 256), (256, 64)))
    with pytest.raises(ValueError, match="down"):
        kernels.expert_ffn(np.ones(64, np.float32), gate, up, gate)
    with pytest.raises(ValueError, match="K=64"):
        kernels.expert_ffn(np.ones(65, np.float32), gate, up, down)


# ---------------------------------------------------------------------------- AVX2 target

_AVX2_CHECK = """
import numpy as np, ml_dtypes
from numba.core.registry import cpu_target
from lowmem import act8_kernels, cpu_kernels, simd_kernels
from quant.qweight import QWeight, dequantize, pack_int4
ctx = cpu_target.target_context
assert not simd_kernels._has_avx512(ctx) and not act8_kernels._has_vnni(ctx)
rng = np.random.default_rng(7)
for bits in (4, 8):
    q = rng.integers(-8 if bits == 4 else -128, 8 if bits == 4 else 128, (128, 160), dtype=np.int8)
    sc = (rng.standard_normal((2, 160)) * 0.02).astype(ml_dtypes.bfloat16)
    w = QWeight(pack_int4(q) if bits == 4 else q, sc, bits, 64)
    dense = dequantize(w).astype(np.float64)
    for t in (1, 3):
        x = rng.standard_normal((t, 128)).astype(np.float32)
        bound = 1e-5 * np.abs(x.astype(np.float64)) @ np.abs(dense)
        assert np.all(np.abs(cpu_kernels.matmul(x, w) - x @ dense) <= bound)
print("ok")
"""


def test_kernels_on_an_avx2_target(tmp_path):
    """The fp32 kernels compiled for a CPU without AVX-512 (numba told haswell,
    own cache): the xor nibble decoder, 256-bit vectors; results within the
    usual tolerance of float64 references. The int8-activation matmul is not
    compiled here (its 6 token counts x 3 modes took 436 s of CI for Haswell):
    its portable dot product, the code such a CPU runs, is checked in this
    process with vnni=False (test_act8_micro_kernel), as the level tables' is."""
    from helpers import run_on_avx2_target
    run_on_avx2_target(_AVX2_CHECK, tmp_path)
