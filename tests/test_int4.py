"""int4 quantization (quant/int4.py) against independent numpy references.

Error bounds used below, for Gaussian weights (step << sigma, so rounding noise
is uniform): plain amax scaling with scale s gives an error of s^2 / 12 per
element, which the test predicts per column from the scales actually chosen;
no 16-level quantizer can beat the Lloyd-Max optimum for a Gaussian, MSE
0.009497 sigma^2 (relative error 0.0975), and the best *uniform* 16-level
quantizer has MSE 0.01154 (0.107), so a good clip search on per-channel scales
lands at about 0.105-0.112.
"""
import ml_dtypes
import numba
import numpy as np
import pytest

from quant.int4 import (AMAX_ONLY, ANCHORS, CLIP_RATIOS, POSITIVE, REFINE, SIGNED, _histogram,
                        quantize_int4)
from quant.qweight import dequantize, pack_int4, unpack_int4

BF16 = ml_dtypes.bfloat16


def bf16(x):
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def release_like(w, blocks=1):
    """int8 values and bf16 (blocks, N) scales, as the release stores a matrix."""
    k, n = w.shape
    wb = w.reshape(blocks, k // blocks, n)
    s8 = bf16(np.abs(wb).max(1) / 127.0)                          # (B, N)
    q8 = np.clip(np.rint(wb / s8[:, None, :]), -128, 127).astype(np.int8)
    return q8.reshape(k, n), s8


def dequant8(q8, s8):
    k, n = q8.shape
    b = s8.shape[0]
    return (q8.reshape(b, k // b, n).astype(np.float32) * s8[:, None, :]).reshape(k, n)


def col_errors(w, res, group):
    """Squared error per (group, column), float64."""
    k, n = w.shape
    d = w.astype(np.float64) - dequantize(res.weight)
    return (d.reshape(k // group, group, n) ** 2).sum(1)


@pytest.fixture(scope="module")
def gauss():
    """A release-like (2048, 512) Gaussian matrix with per-column int8 scales."""
    rng = np.random.default_rng(1)
    return release_like(rng.standard_normal((2048, 512)).astype(np.float32))


def test_pack_unpack_every_value():
    q = np.tile(np.arange(-8, 8, dtype=np.int8), 4).reshape(4, 16)   # every value, both nibbles
    q = np.concatenate([q, q[:, ::-1], np.roll(q, 3, axis=1)], axis=0)  # (12, 16)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (6, 16)
    assert packed[0, 0] == (0x8 | (0x8 << 4)) and packed[0, 15] == (0x7 | (0x7 << 4))
    np.testing.assert_array_equal(unpack_int4(packed), q)


def test_kernel_packs_every_value_exactly():
    """Groups holding exactly q * s with a -8 in each: clip ratio 7/8 makes the scale
    s (amax 8s * 7/8 / 7), so every value comes back in both nibbles."""
    rng = np.random.default_rng(0)
    k, n = 64, 300                                 # n not a multiple of the column tile
    s = bf16(rng.uniform(0.01, 2.0, size=n))       # (N,) bf16-representable scales
    for group in (k, 16, 2):
        q = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
        cols = np.arange(n)
        for g0 in range(0, k, group):              # one -8 per (group, column), rotating rows
            q[g0 + cols % group, cols] = -8
        w = q.astype(np.float32) * s               # exact products
        res = quantize_int4(w, None, group, clip_ratios=(7 / 8,), refine=(), anchors=POSITIVE)
        assert set(np.unique(q[0::2])) == set(np.unique(q[1::2])) == set(range(-8, 8))
        np.testing.assert_array_equal(res.weight.values, pack_int4(q))
        np.testing.assert_array_equal(unpack_int4(res.weight.values), q)
        np.testing.assert_array_equal(res.weight.scales.astype(np.float32),
                                      np.broadcast_to(s, (k // group, n)))
        np.testing.assert_array_equal(dequantize(res.weight), w)
        assert res.sq_error == 0.0 and res.rel_error == 0.0


def test_amax_matches_numpy_reference(gauss):
    q8, s8 = gauss
    w = dequant8(q8, s8)
    for group in (None, 128, 32):
        g = group or w.shape[0]
        wg = w.reshape(-1, g, w.shape[1])                         # (G, g, N)
        scale = bf16(np.abs(wg).max(1) / np.float32(7))           # (G, N)
        inv = (np.float32(1) / scale).astype(np.float32)
        q = np.clip(np.rint(wg * inv[:, None, :]), -8, 7).astype(np.int8).reshape(w.shape)
        res = quantize_int4(q8, s8, group, clip_ratios=AMAX_ONLY, anchors=POSITIVE)
        np.testing.assert_array_equal(res.weight.scales.astype(np.float32), scale)
        np.testing.assert_array_equal(unpack_int4(res.weight.values), q)


def test_fused_dequantization_equals_float_input():
    """int8 + 8 row-block scales (expert down) quantizes like its exact fp32 product."""
    rng = np.random.default_rng(2)
    q8, s8 = release_like(rng.standard_normal((1024, 96)).astype(np.float32), blocks=8)
    a = quantize_int4(q8, s8.astype(BF16), 64)
    b = quantize_int4(dequant8(q8, s8), None, 64)
    np.testing.assert_array_equal(a.weight.values, b.weight.values)
    np.testing.assert_array_equal(a.weight.scales, b.weight.scales)
    assert a.sq_error == b.sq_error and a.sq_norm == b.sq_norm


def test_reported_error_matches_dequantized(gauss):
    q8, s8 = gauss
    w = dequant8(q8, s8).astype(np.float64)
    for group in (None, 64):
        res = quantize_int4(q8, s8, group)
        ref = np.sqrt(((w - dequantize(res.weight)) ** 2).sum() / (w ** 2).sum())
        assert res.rel_error == pytest.approx(ref, rel=1e-6)


def test_amax_error_is_rounding_noise(gauss):
    """amax scaling never clips, so the error is s^2/12 per element (within sampling)."""
    q8, s8 = gauss
    w = dequant8(q8, s8).astype(np.float64)
    res = quantize_int4(q8, s8, None, clip_ratios=AMAX_ONLY, anchors=POSITIVE)
    s = res.weight.scales.astype(np.float64)[0]                    # (N,)
    predicted = np.sqrt((w.shape[0] * s ** 2 / 12).sum() / (w ** 2).sum())
    assert res.rel_error == pytest.approx(predicted, rel=0.03)
    assert 0.13 < res.rel_error < 0.16   # amax of 2048 Gaussians ~3.5 sigma: s ~ 0.5 sigma


def test_clip_search_error_bounds_and_group_order(gauss):
    q8, s8 = gauss
    errors = {g: quantize_int4(q8, s8, g).rel_error for g in (None, 128, 32)}
    amax = {g: quantize_int4(q8, s8, g, AMAX_ONLY, anchors=POSITIVE).rel_error
            for g in (None, 128, 32)}
    assert 0.0975 * 0.98 < errors[None] < 0.115        # Lloyd-Max bound .. near uniform optimum
    assert errors[32] < errors[128] < errors[None]
    assert amax[32] < amax[128] < amax[None]
    for g in errors:
        assert errors[g] < amax[g]


def test_clip_search_never_worse_than_amax_per_column(gauss):
    q8, s8 = gauss
    w = dequant8(q8, s8)
    for group in (None, 64):
        g = group or w.shape[0]
        best = col_errors(w, quantize_int4(q8, s8, group), g)
        plain = col_errors(w, quantize_int4(q8, s8, group, AMAX_ONLY, anchors=POSITIVE), g)
        assert np.all(best <= plain * (1 + 1e-5))


def test_search_picks_the_best_grid_candidate():
    """The chosen scale beats every stage-1 candidate of both anchors (errors in
    float64, numpy), and in all beats the positive-only search (not in every
    column: stage 2 refines around the stage-1 winner's anchor only)."""
    rng = np.random.default_rng(3)
    w = rng.standard_t(4, size=(256, 40)).astype(np.float32)      # heavy tails: clipping pays
    res = quantize_int4(w, None, 64)
    chosen = col_errors(w, res, 64)                               # (4, 40)
    wg = w.reshape(4, 64, 40).astype(np.float64)
    amax = np.abs(w.reshape(4, 64, 40)).max(1)
    first = np.argmax(np.abs(wg) - 1e-30 * (wg > 0), axis=1)     # ties: the negative one
    ext = np.take_along_axis(w.reshape(4, 64, 40), first[:, None, :], 1)[:, 0, :]
    for r in CLIP_RATIOS:
        for top, div in ((amax, 7), (ext, -8)):
            s = bf16(top * np.float32(r) / np.float32(div)).astype(np.float64)
            q = np.clip(np.rint(wg / s[:, None, :]), -8, 7)
            cand = ((wg - q * s[:, None, :]) ** 2).sum(1)
            assert np.all(chosen <= cand * (1 + 1e-5) + 1e-12)
    positive = col_errors(w, quantize_int4(w, None, 64, anchors=POSITIVE, ls_steps=0), 64)
    assert chosen.sum() < 0.97 * positive.sum()
    assert (res.weight.scales.astype(np.float32) < 0).any() and len(REFINE) > 0


def test_least_squares_step_is_the_projection():
    """One rescaling: the scale is bf16(sum x q / sum q^2) for the codes of the
    search's scale, wherever it lowers the error; never worse per column."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 300)).astype(np.float32)
    base = quantize_int4(w, None, 32, ls_steps=0)
    one = quantize_int4(w, None, 32, ls_steps=1)
    s0 = base.weight.scales.astype(np.float64)                          # (2, N)
    q = unpack_int4(base.weight.values).reshape(2, 32, 300).astype(np.float64)
    wg = w.reshape(2, 32, 300).astype(np.float64)
    ls = bf16((wg * q).sum(1) / (q * q).sum(1)).astype(np.float64)
    ql = np.clip(np.rint(wg / ls[:, None, :]), -8, 7)
    e_ls = ((wg - ql * ls[:, None, :]) ** 2).sum(1)
    e0 = col_errors(w, base, 32)
    expect = np.where(e_ls < e0 * (1 - 1e-6), ls, s0)
    clear = np.abs(e_ls - e0) > 1e-6 * e0       # not a tie (mostly bf16(ls) == the scale)
    np.testing.assert_array_equal(one.weight.scales.astype(np.float64)[clear], expect[clear])
    assert np.all(col_errors(w, one, 32) <= e0 * (1 + 1e-6)) and clear.mean() > 0.5
    assert one.sq_error < base.sq_error


def test_histogram_counts_match_numpy():
    """Counts per (row block, int8 value, column), every value including -128."""
    rng = np.random.default_rng(4)
    q8 = rng.integers(-128, 128, size=(192, 300)).astype(np.int8)
    hist = _histogram(q8, 64, 64, 192, 256, 44)   # row blocks 1 and 2 of 64 rows; last 44 cols
    assert hist.shape == (2, 256, 44)
    for b in range(2):
        rows = q8[64 * (b + 1):64 * (b + 2), 256:].astype(np.int64) + 128    # (64, 44)
        ref = np.stack([np.bincount(rows[:, j], minlength=256) for j in range(44)], axis=1)
        np.testing.assert_array_equal(hist[b], ref)


@pytest.mark.parametrize("k, n, blocks, group, tails", [
    (2048, 300, 1, None, False),   # per channel, one row block, a partial column tile
    (8192, 96, 8, None, True),     # per channel over 8 row blocks (expert down), heavy tails
    (6144, 64, 3, 3072, False),    # groups straddling row blocks
    (4096, 40, 1, 1024, True),     # the smallest group that takes the histogram path
])
def test_histogram_search_equals_row_search(k, n, blocks, group, tails):
    """int8 input with many rows per group is scored from value counts, its exact
    fp32 product by a pass over the rows per candidate: same scales and values,
    and (release data: exact sums) the same error sums to the bit."""
    rng = np.random.default_rng(k + n)
    w = rng.standard_t(4, size=(k, n)) if tails else rng.standard_normal((k, n))
    q8, s8 = release_like(w.astype(np.float32), blocks)
    for ratios, anchors in ((CLIP_RATIOS, ANCHORS), (AMAX_ONLY, SIGNED), (AMAX_ONLY, POSITIVE)):
        a = quantize_int4(q8, s8.astype(BF16), group, ratios, anchors=anchors)
        b = quantize_int4(dequant8(q8, s8), None, group, ratios, anchors=anchors)
        np.testing.assert_array_equal(a.weight.values, b.weight.values)
        np.testing.assert_array_equal(a.weight.scales, b.weight.scales)
        assert a.sq_error == b.sq_error and a.sq_norm == b.sq_norm


def test_long_columns_beyond_uint16_counts():
    """131072 rows of one row block: more equal values per column than the
    histogram's uint16 counts hold, so the row pass must be used."""
    q8 = np.ones((131072, 8), np.int8)
    q8[::1000], q8[1::1000] = 127, -100
    s8 = bf16(np.linspace(0.5, 2.0, 8))[None]                      # (1, 8)
    w = dequant8(q8, s8)
    res = quantize_int4(q8, s8)
    assert res.sq_norm == pytest.approx((w.astype(np.float64) ** 2).sum(), rel=1e-12)
    assert res.rel_error == pytest.approx(
        np.sqrt(col_errors(w, res, 131072).sum() / res.sq_norm), rel=1e-9)


def test_zero_columns_give_zero_scales():
    w = np.zeros((32, 8), np.float32)
    w[:, 3] = np.linspace(-1, 1, 32)
    res = quantize_int4(w, None, 16)
    scales = res.weight.scales.astype(np.float32)
    assert np.all(scales[:, [0, 1, 2, 4, 5, 6, 7]] == 0) and np.all(scales[:, 3] != 0)
    assert not np.signbit(scales[:, [0, 1, 2, 4, 5, 6, 7]]).any()      # +0, never -0
    assert np.all(np.isfinite(dequantize(res.weight)))


def test_independent_of_thread_count(gauss):
    q8, s8 = gauss
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = quantize_int4(q8, s8, None)
    finally:
        numba.set_num_threads(threads)
    many = quantize_int4(q8, s8, None)
    np.testing.assert_array_equal(one.weight.values, many.weight.values)
    np.testing.assert_array_equal(one.weight.scales, many.weight.scales)
    assert one.sq_error == many.sq_error


def test_rejects_bad_group_and_shapes():
    w = np.zeros((64, 8), np.float32)
    with pytest.raises(ValueError, match="group size 48"):
        quantize_int4(w, None, 48)
    with pytest.raises(ValueError, match="scales shape"):
        quantize_int4(w.astype(np.int8), np.ones((3, 8), np.float32))
