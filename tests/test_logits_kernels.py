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

from lowmem.logits_kernels import Int8Table, logits_int8, quantize_table


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


@pytest.mark.parametrize("v,d", [(1000, 64), (131, 200), (77, 1031), (3, 6144)])
def test_table_matches_numpy_reference(v, d):
    rng = np.random.default_rng(v * d)
    table = _table(rng, v, d)
    got = quantize_table(table)
    q, s = _reference_table(table)
    np.testing.assert_array_equal(got.values, q)
    np.testing.assert_array_equal(got.scales.view(np.uint16), s.view(np.uint16))
    err = np.abs(got.dequantize() - table.astype(np.float32)).max(axis=1)
    assert np.all(err <= s.astype(np.float32) / 2)                          # rounding only
    used = np.abs(got.values).max(axis=1)
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


def test_each_row_of_a_batch_equals_that_row_alone():
    """The per-lane sums run in the same order for every token block: a row's
    logits do not depend on the other rows of the batch (bit for bit)."""
    rng = np.random.default_rng(1)
    table = quantize_table(_table(rng, 300, 6144 + 40))
    x = rng.standard_normal((15, 6144 + 40)).astype(np.float32)
    batch = logits_int8(x, table)                                           # (15, V)
    for t in (0, 7, 8, 12, 14):
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
