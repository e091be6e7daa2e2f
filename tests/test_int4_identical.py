"""The int4 quantizer's speed-ups change no output byte.

Each case's packed values, bf16 scales and reported error sums are hashed and
compared with the digests the implementation before the speed-ups produced on
the same inputs (recorded when it was replaced, 2026-12-01; every search is
deterministic and uses no fast-math, so the bytes do not depend on the CPU).
The inputs are release-like int8 (several row blocks, Gaussian and
heavy-tailed) and fp32, for groups of 32 to 256 and per channel (both the
row-by-row and the histogram search paths), and the non-default searches the
CLI can ask for. A change that means to move the quantizer's choices must
say so and record new digests (print them with ``digest`` below).
"""
import hashlib

import numpy as np
import pytest

from quant.bf16 import round_bf16_inplace
from quant.int4 import AMAX_ONLY, CLIP_RATIOS, POSITIVE, SIGNED, quantize_int4


def release_int8(rng, k, n, blocks, tails):
    """int8 (K, N) with bf16 (blocks, N) scales: heavy tails saturate some rows."""
    w = rng.standard_t(3, (k, n)) * 25 if tails else rng.standard_normal((k, n)) * 30
    q8 = np.clip(np.rint(w), -128, 127).astype(np.int8)
    s8 = (rng.random((blocks, n)) * 0.02 + 1e-3).astype(np.float32)
    round_bf16_inplace(s8.reshape(-1))
    return q8, s8


def digest(res) -> str:
    """The first 16 hex digits of sha256 over values, scale bits and the error sums."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(res.weight.values).tobytes())
    h.update(np.ascontiguousarray(res.weight.scales).view(np.uint16).tobytes())
    h.update(np.float64(res.sq_error).tobytes())
    h.update(np.float64(res.sq_norm).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("k, n, blocks, group, tails, seed, want", [
    (256, 600, 8, 32, True, 0, "f743f4fafba5e788"),    # 3 column tiles, the last partial
    (256, 600, 8, 32, False, 1, "bea2d42eed39adbd"),
    (512, 300, 4, 64, True, 2, "946b2281835ca294"),
    (768, 260, 8, None, True, 3, "169cfd7b2b5dd45a"),  # per channel, row path
    (8192, 70, 2, None, True, 4, "be18d33506b68b72"),  # per channel, histogram path
    (1024, 256, 1, 128, True, 5, "202e1eee6c903482"),  # one row block, longer groups
    (1024, 256, 1, 256, False, 6, "ff7f6e2cd0ba0adc"),
])
def test_int8_input_is_bit_identical(k, n, blocks, group, tails, seed, want):
    q8, s8 = release_int8(np.random.default_rng(seed), k, n, blocks, tails)
    assert digest(quantize_int4(q8, s8, group)) == want


@pytest.mark.parametrize("group, want", [
    (32, "13c45a20433a0232"), (64, "9a9f971bf84e31ec"), (None, "539ce58e8b85f7a8")])
def test_fp32_input_is_bit_identical(group, want):
    rng = np.random.default_rng(7)
    w = (rng.standard_t(4, (512, 384)) * 0.02).astype(np.float32)
    w[::7, ::5] = 0.0                                   # exact zeros, an all-zero column
    w[:, 11] = 0.0
    assert digest(quantize_int4(w, None, group)) == want


@pytest.mark.parametrize("kwargs, want", [
    (dict(anchors=POSITIVE), "6e6d0b2e63dbe1dc"), (dict(anchors=SIGNED), "50014a92907493db"),
    (dict(ls_steps=4), "168b11ca845b04de"), (dict(clip_ratios=CLIP_RATIOS), "93c6e477eef9e1a8"),
    (dict(clip_ratios=AMAX_ONLY, anchors=POSITIVE), "d7edfc2cc2910f50"),
    (dict(refine=(), ls_steps=3), "da2e90b67f066520")])
def test_other_searches_are_bit_identical(kwargs, want):
    q8, s8 = release_int8(np.random.default_rng(8), 256, 520, 8, True)
    assert digest(quantize_int4(q8, s8, 32, **kwargs)) == want
