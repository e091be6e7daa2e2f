"""Baseline expert quantizers (lowmem.requant) and ``lowmem.eval --requant-experts``."""
import json

import ml_dtypes
import numpy as np
import pytest

from lowmem import eval as EV
from lowmem import reference as R
from lowmem.decoding import prompt_logits
from lowmem.engine import Engine, EngineOptions
from lowmem.requant import dense_params, expert_bytes_per_token, q4_0, q8_0
from quant.packed import PackedModel, QuantSettings
from quant.pipeline import quantize_checkpoint

PROMPT = [5, 17, 99, 3, 250, 42, 7, 300, 11, 12]


def llama_cpp_q4_0_row(x: np.ndarray, scale_dtype=np.float16) -> np.ndarray:
    """quantize_row_q4_0_ref then dequantize_row_q4_0 (ggml-quants.c), one scalar at a time."""
    out = np.empty_like(x, dtype=np.float32)
    for b in range(0, len(x), 32):
        amax, mx = 0.0, 0.0
        for v in x[b:b + 32]:
            if amax < abs(float(v)):
                amax, mx = abs(float(v)), float(v)
        d = np.float32(mx) / np.float32(-8)
        idd = np.float32(1) / d if d else np.float32(0)
        d16 = float(np.asarray(d).astype(scale_dtype).astype(np.float32))
        for j in range(32):
            code = min(15, int(np.float32(x[b + j]) * idd + np.float32(8.5)))  # C (int8_t) cast
            out[b + j] = (code - 8) * d16
    return out


def test_q4_0_is_llama_cpps_reference_quantizer():
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, size=(96, 6)).astype(np.float32)       # K=96: 3 groups per column
    w[32:64, 1] = 0.0                                             # an all-zero group
    w[0:32, 2] = np.linspace(-1, 0.5, 32)                         # max |x| negative
    w[0:32, 3] = 0.25
    w[5, 3], w[9, 3] = 2.0, -2.0                                  # a tie: the first one counts
    want = np.stack([llama_cpp_q4_0_row(w[:, n]) for n in range(w.shape[1])], axis=1)
    got = q4_0(w)
    assert np.array_equal(got, want)
    assert np.all(got[32:64, 1] == 0)
    assert got[5, 3] == pytest.approx(2.0, rel=1e-3) and got[9, 3] == pytest.approx(-2.0, rel=0.2)
    bf = ml_dtypes.bfloat16          # the variant: the scale stored in bf16
    want_bf = np.stack([llama_cpp_q4_0_row(w[:, n], bf) for n in range(w.shape[1])], axis=1)
    assert np.array_equal(q4_0(w, bf), want_bf) and not np.array_equal(want_bf, want)
    with pytest.raises(ValueError, match="divisible by 32"):
        q4_0(w[:40])


def llama_cpp_q8_0_row(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0_ref then dequantize_row_q8_0 (ggml-quants.c), one scalar at a time:
    C's roundf (half away from zero) in Python's float64 arithmetic."""
    out = np.empty_like(x, dtype=np.float32)
    for b in range(0, len(x), 32):
        amax = max(abs(float(np.float32(v))) for v in x[b:b + 32])
        d = np.float32(amax) / np.float32(127)
        idd = np.float32(1) / d if d else np.float32(0)
        d16 = float(np.asarray(d).astype(np.float16).astype(np.float32))
        for j in range(32):
            v = float(np.float32(x[b + j]) * idd)                     # the float32 product
            code = int(abs(v) + 0.5) if abs(v) % 1 != 0.5 else int(abs(v)) + 1
            out[b + j] = (code if v >= 0 else -code) * d16
    return out


def test_q8_0_is_llama_cpps_reference_quantizer():
    rng = np.random.default_rng(4)
    w = rng.standard_t(3, size=(96, 5)).astype(np.float32)       # 3 groups per column
    w[32:64, 1] = 0.0                                             # an all-zero group
    w[0:32, 2] = np.arange(32, dtype=np.float32) - 15.5           # codes at exact halves:
    w[0, 2] = 127.0                                               # d = 1, x / d = -14.5 ...
    w[0:32, 3] = 0.49999997                                       # |x| + 0.5 rounds up in f32
    w[1, 3] = 127.0
    want = np.stack([llama_cpp_q8_0_row(w[:, n]) for n in range(w.shape[1])], axis=1)
    got = q8_0(w)
    assert np.array_equal(got, want)
    assert np.all(got[32:64, 1] == 0)
    assert got[1, 2] == -15.0 and got[2, 2] == -14.0              # -14.5 -> -15, -13.5 -> -14
    assert got[0, 3] == 0.0                                       # roundf(0.49999997) = 0
    with pytest.raises(ValueError, match="divisible by 32"):
        q8_0(w[:40])


@pytest.fixture(scope="module")
def models(tiny_cfg, tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("requant")
    for name, settings in (("int8", QuantSettings(8)), ("int4", QuantSettings(4))):
        quantize_checkpoint(tiny_ckpt, root / name, tiny_cfg, settings)
    return root


def test_dense_params_run_the_engines_model(models, tiny_cfg):
    """Without requantization, the dense forward is the engine's fp32 model (<= 2e-6)."""
    model = PackedModel.open(models / "int8")
    dense = R.forward(tiny_cfg, dense_params(model), np.array(PROMPT), "fp32")[0]   # (T, V)
    engine = prompt_logits(Engine(model, EngineOptions(backend="host", precision="fp32")), PROMPT)
    assert np.abs(dense - engine).max() <= 2e-6 * np.abs(engine).max()


def test_eval_requant_q4_0(models, tiny_cfg, tmp_path, capsys):
    ids = ",".join(map(str, PROMPT))
    out = tmp_path / "q.json"
    rc = EV.main(["--model", str(models / "int8"), "--requant-experts", "q4_0", "--reference",
                  str(models / "int8"), "--prompt-ids", ids, "--backend", "host", "--no-progress",
                  "--out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    cfg = tiny_cfg
    assert rep["expert_bytes_per_token"] == (cfg.num_layers * cfg.num_selected_experts * 3
                                             * cfg.emb_size * cfg.ffn_size // 32 * 18)
    # Independent: the requantized experts through the reference, against the int8 engine.
    model = PackedModel.open(models / "int8")
    params = dense_params(model)
    for layer in params["layers"]:
        for role in ("gate", "up", "down"):
            layer[role] = np.stack([np.stack([llama_cpp_q4_0_row(m[:, n]) for n in
                                              range(m.shape[1])], axis=1) for m in layer[role]])
    want = R.forward(cfg, params, np.array(PROMPT), "fp32")[0]
    ref = prompt_logits(Engine(model, EngineOptions(backend="host", precision="fp32")), PROMPT)
    p = np.exp(ref - ref.max(-1, keepdims=True)).astype(np.float64)
    q = np.exp(want - want.max(-1, keepdims=True)).astype(np.float64)
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    kl = np.sum(p * np.log(p / q), axis=-1).mean()
    assert rep["overall"]["kl_mean"] == pytest.approx(kl, rel=1e-3, abs=1e-9)
    assert 1e-5 < kl < 0.1                   # measured 3.3e-3 on the tiny preset
    # An int4 model is refused: one line, exit 2, nothing written.
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    rc = EV.main(["--model", str(models / "int4"), "--requant-experts", "q4_0", "--prompt-ids",
                  ids, "--backend", "host", "--no-progress", "--out", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and not bad.exists() and err.count("\n") == 1
    assert "needs an int8 model, found 4-bit experts" in err


@pytest.mark.parametrize("scheme, fn, group_bytes", [("q8_0", q8_0, 34), ("q4_0_gguf", q4_0, 18)])
def test_whole_file_schemes_requantize_every_matrix_but_the_router(models, tiny_cfg, scheme, fn,
                                                                    group_bytes):
    """A Q8_0 / Q4_0 GGUF's model: experts, attention and the tied table requantized
    (groups along the input dimension; the table's along D), router and norms as stored."""
    model = PackedModel.open(models / "int8")
    plain, req = dense_params(model), dense_params(model, scheme)
    for role in ("q", "k", "v", "o", "router", "attn_norm"):
        want = fn(plain["layers"][0][role]) if role in "qkvo" else plain["layers"][0][role]
        np.testing.assert_array_equal(req["layers"][0][role], want)
    np.testing.assert_array_equal(req["layers"][1]["down"][3], fn(plain["layers"][1]["down"][3]))
    np.testing.assert_array_equal(req["embed"], fn(plain["embed"].T).T)
    assert not np.array_equal(req["embed"], plain["embed"])
    cfg = tiny_cfg
    assert expert_bytes_per_token(model, scheme) == (cfg.num_layers * cfg.num_selected_experts
                                                     * 3 * cfg.emb_size * cfg.ffn_size // 32
                                                     * group_bytes)
