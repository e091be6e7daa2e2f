"""Negative int4 scales and code -8, through every consumer of a packed int4 weight.

The int4 search (quant/int4.py) now also tries Q4_0's signed scale
``extreme / -8``: a group whose largest-magnitude value is positive gets a
NEGATIVE bf16 scale, and that value is stored as code -8. Each consumer must
take the scale's sign as it is (no abs, no unsigned bf16 decode, no
``scale > 0`` test): checked here against numpy sums of ``code * scale``
written independently, on a hand-built block (every scale negative in half
the columns, code -8 in every group and column) and end to end on a tiny model.
"""
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lowmem import cpu_kernels as kernels
from lowmem import model as M
from lowmem import reference as R
from lowmem.decoding import prompt_logits
from lowmem.engine import Engine, EngineOptions
from lowmem.requant import dense_params
from quant.int4 import POSITIVE, quantize_int4
from quant.packed import PackedModel, QuantSettings
from quant.pipeline import DEFAULT_GROUP_SIZE, quantize_checkpoint
from quant.qweight import QWeight, dequantize, pack_int4, unpack_int4

BF16 = ml_dtypes.bfloat16
K, N, G = 128, 70, 32


def _signed_block(seed=0):
    """(QWeight, codes int64 (K, N), scales float64 (K/G, N)): codes over [-8, 7] with
    a -8 in every (group, column); scales negative in the even columns."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-8, 8, (K, N))
    cols = np.arange(N)
    for g0 in range(0, K, G):
        q[g0 + cols % G, cols] = -8
    mag = rng.uniform(0.01, 0.1, (K // G, N))
    s = np.where(cols % 2 == 0, -mag, mag).astype(BF16)                     # (K/G, N)
    w = QWeight(pack_int4(q.astype(np.int8)), s, 4, G)
    return w, q, s.astype(np.float64)


def _dense(q, s):
    return (q.reshape(K // G, G, N) * s[:, None, :]).reshape(K, N)        # float64 (K, N)


def test_block_really_has_negative_scales_and_minus8():
    w, q, s = _signed_block()
    assert (s < 0).sum() == s.size // 2 and np.all(np.abs(s) > 0)
    assert np.all((unpack_int4(w.values) == -8).reshape(K // G, G, N).any(axis=1))
    np.testing.assert_array_equal(dequantize(w), _dense(q, s))          # exact in fp32


@pytest.mark.parametrize("t", [1, 3, 8])
@pytest.mark.parametrize("act_int8", [False, True])
def test_host_kernels_take_the_scale_sign(t, act_int8):
    w, q, s = _signed_block(t)
    x = np.random.default_rng(10 + t).standard_normal((t, K)).astype(np.float32)
    ref = x.astype(np.float64) @ _dense(q, s)                              # (T, N)
    y = kernels.matmul(x, w, act_int8=act_int8)
    aw = np.abs(_dense(q, s))
    tol = 1e-5 * (np.abs(x) @ aw)             # fp32 accumulation (as tests/test_kernels.py)
    if act_int8:    # each activation off by at most half a step of its block's max / 127
        half_step = np.abs(x).reshape(t, K // 32, 32).max(-1) / 254               # (T, K/32)
        tol += np.repeat(half_step, 32, axis=1) @ aw
    assert np.all(np.abs(y - ref) <= tol)
    dropped = x.astype(np.float64) @ aw                      # what a sign-dropping bug gives
    assert not np.all(np.abs(dropped - ref) <= tol)


def test_device_dequantize_takes_the_scale_sign():
    w, q, s = _signed_block(1)
    jw = QWeight(jnp.asarray(w.values), jnp.asarray(w.scales), 4, G)
    got = np.asarray(M.dequantize(jw, jnp.float32))
    np.testing.assert_array_equal(got, _dense(q, s))


def test_signed_anchor_stores_the_extreme_exactly():
    """Groups equal to q * scale with a POSITIVE extreme 8|scale|: only a negative
    scale (code -8 for the extreme) represents them exactly."""
    w, q, s = _signed_block(2)
    exact = _dense(-q, np.abs(s)).astype(np.float32)      # extreme +8|s| in every group
    res = quantize_int4(exact, None, G)
    assert res.sq_error == 0.0
    np.testing.assert_array_equal(res.weight.scales.astype(np.float64), -np.abs(s))
    np.testing.assert_array_equal(unpack_int4(res.weight.values), q)
    assert quantize_int4(exact, None, G, anchors=POSITIVE).sq_error > 0


@pytest.fixture(scope="module")
def default_int4(tiny_cfg, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("signed") / "int4"
    quantize_checkpoint(tiny_ckpt, out, tiny_cfg, QuantSettings(4, DEFAULT_GROUP_SIZE))
    return PackedModel.open(out)


def test_default_model_has_negative_scales(default_int4):
    block = default_int4.expert(0, 0)
    scales = np.concatenate([getattr(block, r).scales.astype(np.float32).ravel()
                             for r in ("gate", "up", "down")])
    assert 0.2 < np.mean(scales < 0) < 0.8


@pytest.mark.parametrize("backend", ["host", "device"])
def test_fp32_engine_equals_dense_numpy_on_signed_int4(default_int4, tiny_cfg, backend):
    """The engine on a model with negative scales equals the dense numpy forward of
    the stored values (quant.qweight.dequantize); with the scales' signs dropped
    the forward moves far beyond that tolerance. (The bf16 output table and fp32
    activations: the int8 ones, host defaults for int4 models, round on purpose.)"""
    prompt = [5, 17, 99, 3, 250, 42, 7, 300]
    engine = Engine(default_int4, EngineOptions(backend=backend, precision="fp32",
                                                output_table="bf16", act_int8=False))
    got = prompt_logits(engine, prompt)                                     # (T, V)
    params = dense_params(default_int4)
    ref = R.forward(tiny_cfg, params, np.array(prompt), mode="fp32")[0]
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel <= 2e-6
    for layer in params["layers"]:
        for role in ("gate", "up", "down"):
            layer[role] = np.abs(layer[role])   # not the model: sign dropped everywhere
    wrong = R.forward(tiny_cfg, params, np.array(prompt), mode="fp32")[0]
    assert np.abs(wrong - ref).max() / np.abs(ref).max() > 1e3 * 2e-6
