"""The int8 output table (lowmem.logits_kernels): building it and its logits kernel.

References are written here independently: the table with numpy (bf16 scales
through ml_dtypes, rounded up by one bf16 step where they rounded down), the
logits as a float64 matmul of the dequantized table. The kernel's only
difference from that is fp32 accumulation (q * x is exact in fp32 only up
to rounding of each FMA): bounded here at 1e-5 of the largest |logit|, while
a wrong row, scale, token or tail moves logits by O(1).
"""
import ml_dtypes
import numpy as np
import pytest

from lowmem.logits_kernels import Int8Table, act16_qmax, logits_int8, quantize_table


def _reference_table(table):
    """(q int8 (V, D), scales bf16 (V,)): amax / 127 in bf16, one step up if it
    rounded down (so no code needs clipping), 1.0 for a zero row."""
    e = table.astype(np.float32)                                            # (V, D)
    amax = np.abs(e).max(axis=1)
    s = (amax / np.float32(127)).astype(ml_dtypes.bfloat16)
    bits = s.view(np.uint16).copy()
    bits[s.astype(np.float32) * np.float32(127) < amax] += 1
    s = bits.view(ml_dtypes.bfloat16)
    s[amax == 0] = 1
    q = np.rint(e / s.astype(np.float32)[:, None])
    assert np.abs(q).max() <= 127                                           # never clips
    return q.astype(np.int8), s


def _table(rng, v, d, scale=2.0):
    t = (rng.standard_normal((v, d)) * scale).astype(ml_dtypes.bfloat16)   # (V, D)
    t[min(5, v - 1)] = 0
    return t


@pytest.mark.parametrize("v,d", [(1000, 64), (131, 200), (77, 1031), (3, 6144), (24, 192)])
def test_table_matches_numpy_reference(v, d):
    """Values and scales as an independent numpy quantizer; grouped (8 rows interleaved
    by 64 values) exactly where the shape allows, in rows elsewhere."""
    rng = np.random.default_rng(v * d)
    table = _table(rng, v, d)
    got = quantize_table(table)
    q, s = _reference_table(table)
    assert got.grouped == (v % 8 == 0 and d % 64 == 0)
    np.testing.assert_array_equal(got.natural(), q)
    if got.grouped:     # row v's values d..d+63 at (v // 8) 8D + (d // 64) 512 + (v % 8) 64
        flat = got.values.reshape(-1)
        for row, col in ((0, 0), (v - 1, d - 64), (9, min(64, d - 64)), (13, max(0, d - 128))):
            at = (row // 8) * 8 * d + (col // 64) * 512 + (row % 8) * 64
            np.testing.assert_array_equal(flat[at:at + 64], q[row, col:col + 64])
    np.testing.assert_array_equal(got.scales.view(np.uint16), s.view(np.uint16))
    err = np.abs(got.dequantize() - table.astype(np.float32)).max(axis=1)
    assert np.all(err <= s.astype(np.float32) / 2)                          # rounding only
    used = np.abs(got.natural()).max(axis=1)
    assert np.all(used[np.arange(v) != min(5, v - 1)] >= 126)               # range used


def test_table_refuses_other_dtypes():
    with pytest.raises(ValueError, match="2-D bfloat16"):
        quantize_table(np.zeros((4, 8), np.float32))


@pytest.mark.parametrize("v,d", [(131, 200), (77, 1031), (64, 64), (515, 6144 // 4 + 5), (9, 3)])
def test_logits_match_float64_matmul_for_1_to_16_tokens(v, d):
    rng = np.random.default_rng(v + d)
    table = quantize_table(_table(rng, v, d))
    exact = table.dequantize().astype(np.float64)                           # (V, D)
    for t in range(1, 17):
        x = rng.standard_normal((t, d)).astype(np.float32)                  # (T, D)
        ref = x.astype(np.float64) @ exact.T                                # (T, V)
        got = logits_int8(x, table)
        assert got.shape == (t, v) and got.dtype == np.float32
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), t


@pytest.mark.parametrize("act16", [False, True])
def test_grouped_table_gives_the_logits_of_rows_bit_for_bit(act16):
    """The same values grouped (one stream) or in rows: the same logits, bit for bit,
    at every token count and both activation modes (the kernels sum in the same order
    whatever the layout); a grouped table of a shape that cannot be grouped is refused."""
    from lowmem.logits_kernels import group_rows
    rng = np.random.default_rng(21)
    grouped = quantize_table(_table(rng, 200, 6144 + 64))                   # (200, 6208)
    assert grouped.grouped
    rows = Int8Table(grouped.natural(), grouped.scales)
    assert not np.array_equal(rows.values, grouped.values)
    np.testing.assert_array_equal(group_rows(rows.values), grouped.values)
    for t in (1, 2, 3, 4, 5, 8, 9, 16, 17):
        x = rng.standard_normal((t, 6144 + 64)).astype(np.float32)
        np.testing.assert_array_equal(logits_int8(x, grouped, act16=act16),
                                      logits_int8(x, rows, act16=act16), err_msg=str(t))
    bad = Int8Table(np.zeros((12, 64), np.int8), np.ones(12, ml_dtypes.bfloat16), True)
    with pytest.raises(ValueError, match="grouped table needs"):
        logits_int8(np.ones(64, np.float32), bad, act16=act16)


def test_each_row_of_a_batch_equals_that_row_alone():
    """The per-lane sums run in the same order for every token block: a row's
    logits do not depend on the other rows of the batch (bit for bit)."""
    rng = np.random.default_rng(1)
    table = quantize_table(_table(rng, 300, 6144 + 40))
    x = rng.standard_normal((21, 6144 + 40)).astype(np.float32)
    batch = logits_int8(x, table)                                           # (21, V)
    for t in (0, 7, 8, 12, 14, 16, 20):   # token blocks 8 + 8 + 4 + 1, chunks of D for 16
        np.testing.assert_array_equal(batch[t], logits_int8(x[t], table))


def test_vector_input_and_bad_shapes():
    rng = np.random.default_rng(2)
    table = quantize_table(_table(rng, 40, 96))
    x = rng.standard_normal(96).astype(np.float32)
    np.testing.assert_array_equal(logits_int8(x, table), logits_int8(x[None], table)[0])
    with pytest.raises(ValueError, match="D=96"):
        logits_int8(np.zeros((2, 95), np.float32), table)
    with pytest.raises(ValueError, match="scales must be bfloat16"):
        logits_int8(x, Int8Table(table.values, table.scales.astype(np.float32)))


_AVX2_CHECK = """
import numpy as np, ml_dtypes
from lowmem.logits_kernels import logits_int8, quantize_table
rng = np.random.default_rng(3)
table = quantize_table((rng.standard_normal((77, 1031)) * 2).astype(ml_dtypes.bfloat16))
exact = table.dequantize().astype(np.float64)
for t in (1, 2, 3, 5, 8, 15):
    x = rng.standard_normal((t, 1031)).astype(np.float32)
    ref = x.astype(np.float64) @ exact.T
    assert np.abs(logits_int8(x, table) - ref).max() <= 1e-5 * np.abs(ref).max(), t
print("ok")
"""


def test_logits_on_an_avx2_target(tmp_path):
    """The same kernel compiled for a CPU without AVX-512 (numba told haswell, its
    own cache): the 16-lane vectors split in two, results as above."""
    from helpers import run_on_avx2_target
    run_on_avx2_target(_AVX2_CHECK, tmp_path)


# --- int16 activations (the int8-activation mode's logits) ------------------------------

def _act16_reference(x, qmax):
    """x (T, D) -> the int16 activations as float64 (T, D): per row scale = max |x| / qmax
    (float32), q = round-half-even(x / scale), written here independently."""
    amax = np.abs(x).max(axis=1).astype(np.float32)                          # (T,)
    scale = np.where(amax > 0, amax / np.float32(qmax), np.float32(0))       # (T,) f32
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint(x / safe[:, None]), -qmax, qmax)                      # (T, D)
    return q.astype(np.float64) * scale.astype(np.float64)[:, None]


@pytest.mark.parametrize("v,d", [(131, 200), (77, 1031), (64, 64), (9, 3), (300, 6144 + 40)])
def test_act16_logits_are_the_int16_activations_times_the_table(v, d):
    """act16: the only rounding is the activations' (to int16, one scale per row);
    sums are exact integers, so the result is the float64 product of the rounded
    activations up to the final fp32 rounding. Against the fp32 path a logit
    moves by at most half an int16 step times the sum of |weights| of its row."""
    rng = np.random.default_rng(v * 7 + d)
    table = quantize_table(_table(rng, v, d))
    exact = table.dequantize().astype(np.float64)                           # (V, D)
    for t in (1, 2, 3, 4, 5, 8, 9, 15, 16):
        x = rng.standard_normal((t, d)).astype(np.float32)                  # (T, D)
        x[0, d // 2] = 40.0                                                  # an outlier
        got = logits_int8(x, table, act16=True)
        ref = _act16_reference(x, act16_qmax(d)) @ exact.T                  # (T, V)
        assert got.shape == (t, v) and got.dtype == np.float32
        big = np.abs(ref).max()
        assert np.abs(got - ref).max() <= 1e-6 * big, t
        fp32 = logits_int8(x, table)                                         # (T, V)
        half_step = np.abs(x).max(axis=1) / act16_qmax(d) / 2                # (T,)
        bound = half_step[:, None] * np.abs(exact).sum(axis=1)[None]         # (T, V)
        assert np.all(np.abs(got - fp32) <= bound + 1e-5 * big), t
        if d >= 64:
            assert np.any(got != fp32)                                       # really int16


def test_act16_rows_are_independent_of_the_batch():
    """A row's logits do not depend on the other rows (a batched step samples what a
    solo run samples): per-row scales and exact integer sums."""
    rng = np.random.default_rng(11)
    table = quantize_table(_table(rng, 200, 6144))
    x = rng.standard_normal((21, 6144)).astype(np.float32)
    x[3] = 0                                                                 # a zero row
    batch = logits_int8(x, table, act16=True)
    for t in (0, 3, 7, 8, 12, 15, 16, 20):
        np.testing.assert_array_equal(batch[t], logits_int8(x[t], table, act16=True))
    np.testing.assert_array_equal(batch[3], np.zeros(200, np.float32))


def test_act16_wide_rows_narrow_the_range_so_no_lane_overflows():
    """D above 8257: qmax shrinks so a 32-bit lane (ceil(D/16) products) cannot
    overflow; the worst case (every weight +-127, every activation at qmax) is exact."""
    d = 9001
    qmax = act16_qmax(d)
    assert act16_qmax(6144) == 32767 and qmax < 32767
    assert -(-d // 16) * 127 * qmax <= 2**31 - 1 < -(-d // 16) * 127 * (qmax + 1)
    values = np.full((3, d), 127, np.int8)
    values[1] = -127
    values[2, ::2] = -127
    table = Int8Table(values, np.ones(3, ml_dtypes.bfloat16))
    x = np.ones((2, d), np.float32)
    x[1] = -2.5
    ref = _act16_reference(x, qmax) @ values.astype(np.float64).T            # (2, 3)
    np.testing.assert_allclose(logits_int8(x, table, act16=True), ref, rtol=1e-7)


def test_act16_portable_micro_kernel_equals_vnni():
    """The portable IR (CPUs without AVX-512 VNNI) and vpdpwssd give the same int32
    lane sums, and both equal numpy's (lane l sums columns 2l, 2l+1 of each 32)."""
    from numba import njit
    from lowmem.logits_kernels import _rows16_kernel
    kernels = {vnni: njit(lambda e, x, p, k=_rows16_kernel(4, 2, vnni): k(e, 1, 1, 32, 3, x, 1, p, 0))
               for vnni in (None, False)}
    rng = np.random.default_rng(5)
    e = rng.integers(-127, 128, (6, 160), dtype=np.int8)                    # (V, D)
    x = rng.integers(-32767, 32768, (3, 160), dtype=np.int16)               # (T, D)
    lanes = e[1:5, 32:128].astype(np.int64)[:, None, :] * x[1:3, 32:128][None]  # (4, 2, 96)
    ref = lanes.reshape(4, 2, 3, 16, 2).sum(axis=(2, 4))                     # (4, 2, 16)
    for vnni, kernel in kernels.items():
        part = np.zeros((4, 3 * 16), np.int32)                              # (rows, T x 16)
        kernel(e, x, part)
        np.testing.assert_array_equal(part[:, 16:48].reshape(4, 2, 16), ref, err_msg=str(vnni))
        assert not part[:, :16].any()


def test_int4_table_is_the_level_quantizer_on_the_whole_transpose():
    """quantize_table4 builds the (D, V) int4 copy a block of vocabulary rows at a
    time (a last block shorter): byte-identical to quant.int4_levels on the whole
    transposed table at once, which dequantizes to within int4's rounding of it."""
    from lowmem.logits_kernels import _TABLE4_ROWS, quantize_table4
    from quant.int4_levels import STUDENT_T_LEVELS, quantize_levels
    from quant.qweight import dequantize, untile
    rng = np.random.default_rng(11)
    e = (rng.standard_t(4, (_TABLE4_ROWS + 100, 64)) * 0.02).astype(ml_dtypes.bfloat16)
    got = quantize_table4(e)
    want = quantize_levels(np.ascontiguousarray(e.astype(np.float32).T), None, 32,
                           STUDENT_T_LEVELS).weight
    assert got.values.shape == (32, _TABLE4_ROWS + 100) and got.levels == STUDENT_T_LEVELS
    np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_array_equal(got.scales.view(np.uint16), want.scales.view(np.uint16))
    err = np.abs(dequantize(got).T - e.astype(np.float32))                 # (V, D)
    assert err.max() < 0.2 * np.abs(e.astype(np.float32)).max()
    assert not got.tiled                              # V % 64: rows; a multiple of 64: tiles
    v = _TABLE4_ROWS + 64
    tiled = quantize_table4(e[:v])
    assert tiled.tiled and tiled.shape == (64, v)
    np.testing.assert_array_equal(untile(tiled.values, 4), want.values[:, :v])
    np.testing.assert_array_equal(tiled.scales.view(np.uint16), want.scales[:, :v].view(np.uint16))
    with pytest.raises(ValueError, match="width 48 is not a multiple of 32"):
        quantize_table4(e[:, :48])
    with pytest.raises(ValueError, match="2-D bfloat16"):
        quantize_table4(e.astype(np.float32))
