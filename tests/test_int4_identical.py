"""The int4 quantizer's speed-ups change no output byte: packed values, bf16
scales and the reported error sums equal those of the implementation before
them (tests/int4_reference.py, a frozen copy), on release-like int8 input
(several row blocks, Gaussian and heavy-tailed) and fp32 input, for groups of
32, 64 and per channel, and for the non-default searches the CLI can ask for."""
import numpy as np
import pytest

import int4_reference as ref
from quant.bf16 import round_bf16_inplace
from quant.int4 import quantize_int4


def release_int8(rng, k, n, blocks, tails):
    """int8 (K, N) with bf16 (blocks, N) scales: heavy tails saturate some rows."""
    w = rng.standard_t(3, (k, n)) * 25 if tails else rng.standard_normal((k, n)) * 30
    q8 = np.clip(np.rint(w), -128, 127).astype(np.int8)
    s8 = (rng.random((blocks, n)) * 0.02 + 1e-3).astype(np.float32)
    round_bf16_inplace(s8.reshape(-1))
    return q8, s8


def assert_same(a, b):
    np.testing.assert_array_equal(a.weight.values, b.weight.values)
    np.testing.assert_array_equal(a.weight.scales.view(np.uint16), b.weight.scales.view(np.uint16))
    assert (a.sq_error, a.sq_norm) == (b.sq_error, b.sq_norm)


@pytest.mark.parametrize("k, n, blocks, group, tails, seed", [
    (256, 600, 8, 32, True, 0),       # 3 column tiles, the last partial; 8 row blocks
    (256, 600, 8, 32, False, 1),
    (512, 300, 4, 64, True, 2),
    (768, 260, 8, None, True, 3),     # per channel, row path (few rows per histogram bin)
    (8192, 70, 2, None, True, 4),     # per channel, histogram path
    (1024, 256, 1, 128, True, 5),     # one row block, longer groups
    (1024, 256, 1, 256, False, 6),    # Gaussian, groups of 256
])
def test_int8_input_is_bit_identical(k, n, blocks, group, tails, seed):
    q8, s8 = release_int8(np.random.default_rng(seed), k, n, blocks, tails)
    assert_same(quantize_int4(q8, s8, group), ref.quantize_int4(q8, s8, group))


@pytest.mark.parametrize("group", [32, 64, None])
def test_fp32_input_is_bit_identical(group):
    rng = np.random.default_rng(7)
    w = (rng.standard_t(4, (512, 384)) * 0.02).astype(np.float32)
    w[::7, ::5] = 0.0                                   # exact zeros, an all-zero column
    w[:, 11] = 0.0
    assert_same(quantize_int4(w, None, group), ref.quantize_int4(w, None, group))


@pytest.mark.parametrize("kwargs", [
    dict(anchors=ref.POSITIVE), dict(anchors=ref.SIGNED), dict(ls_steps=4),
    dict(clip_ratios=ref.CLIP_RATIOS), dict(clip_ratios=ref.AMAX_ONLY, anchors=ref.POSITIVE),
    dict(refine=(), ls_steps=3)])
def test_other_searches_are_bit_identical(kwargs):
    q8, s8 = release_int8(np.random.default_rng(8), 256, 520, 8, True)
    assert_same(quantize_int4(q8, s8, 32, **kwargs), ref.quantize_int4(q8, s8, 32, **kwargs))
