"""lowmem.eval: teacher-forced comparison of two models (or a model and saved logits)."""
import json

import numpy as np
import pytest

from lowmem import eval as EV
from lowmem.decoding import prompt_logits
from lowmem.engine import Engine, EngineOptions
from quant.packed import PackedModel, QuantSettings
from quant.pipeline import quantize_checkpoint

PROMPT = [5, 17, 99, 3, 250, 42, 7, 300, 11, 12, 13, 400, 77, 8]
IDS = ",".join(map(str, PROMPT))


@pytest.fixture(scope="module")
def models(tiny_cfg, tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    out = {}
    for name, settings in (("int8", QuantSettings(8)), ("int4", QuantSettings(4)),
                           ("int4g32", QuantSettings(4, 32))):
        quantize_checkpoint(tiny_ckpt, root / name, tiny_cfg, settings)
        out[name] = root / name
    return out


def _logits(model_dir, precision="fp32"):
    """Every position's logits through decode steps (not the eval's batched prefill)."""
    engine = Engine(PackedModel.open(model_dir), EngineOptions(backend="host", precision=precision))
    return prompt_logits(engine, PROMPT)                                      # (T, V)


def _numpy_kl(p_logits, q_logits):
    """KL(p || q) per row, written independently of lowmem.eval (scipy-style xlogy form)."""
    p = np.exp(p_logits.astype(np.float64) - p_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(q_logits.astype(np.float64) - q_logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    return np.sum(p * np.log(p / q), axis=-1)


def _run(tmp_path, *argv):
    out = tmp_path / "report.json"
    rc = EV.main([*argv, "--prompt-ids", IDS, "--backend", "host", "--no-progress",
                  "--out", str(out)])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def test_model_against_itself_is_exact(models, tmp_path):
    """With fp32 activations; by default (auto) an int8 model's prompt chunks take
    int8 ones from 2 rows on a VNNI CPU (the text is fed as a prompt): KL > 0 there."""
    from lowmem.act8_kernels import fast_on_host
    rc, rep = _run(tmp_path, "--model", str(models["int8"]), "--reference", str(models["int8"]))
    assert rc == 0 and rep["activations"] == ("int8 from 2 rows" if fast_on_host() else "fp32")
    assert (rep["overall"]["kl_mean"] > 0) == fast_on_host()
    rc, rep = _run(tmp_path, "--model", str(models["int8"]), "--reference", str(models["int8"]),
                   "--precision", "fp32", "--reference-precision", "fp32", "--activations", "fp32")
    assert rc == 0 and rep["activations"] == "fp32"
    o = rep["overall"]
    assert o["kl_mean"] == 0.0 and o["kl_max"] == 0.0 and o["max_rel_error"] == 0.0
    assert o["top1_agreement"] == 1.0 and o["top5_overlap"] == 1.0
    assert o["perplexity_model"] == o["perplexity_reference"] > 1.0
    assert [p["token"] for p in rep["per_position"]] == PROMPT


def test_act_int8_applies_to_the_model_only(models, tmp_path):
    """--act-int8 (--activations int8) evaluates the int8-activation kernels against the same model with fp32
    activations: the reference keeps them (else this KL would be 0), and the KL is the
    one computed independently from the two engines' own logits."""
    rc, rep = _run(tmp_path, "--model", str(models["int8"]), "--reference", str(models["int8"]),
                   "--act-int8")
    assert rc == 0 and rep["activations"] == "int8"
    engine = Engine(PackedModel.open(models["int8"]), EngineOptions(backend="host",
                                                                    act_int8=True))
    want = _numpy_kl(_logits(models["int8"]), prompt_logits(engine, PROMPT))
    assert rep["overall"]["kl_mean"] > 0
    np.testing.assert_allclose(rep["overall"]["kl_mean"], want.mean(), rtol=1e-3, atol=1e-12)


def test_int4_against_int8_matches_numpy(models, tmp_path):
    rc, rep = _run(tmp_path, "--model", str(models["int4"]), "--reference", str(models["int8"]),
                   "--precision", "fp32")
    assert rc == 0
    a, b = _logits(models["int4"]), _logits(models["int8"])
    kl = _numpy_kl(b, a)                                                      # (T,)
    got = np.array([p["kl"] for p in rep["per_position"]])
    assert kl.mean() > 1e-4
    np.testing.assert_allclose(got, kl, rtol=1e-3, atol=1e-7)
    o = rep["overall"]
    assert o["top1_agreement"] == np.mean(a.argmax(-1) == b.argmax(-1))
    p = np.exp(a - a.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    nll = -np.log(p[np.arange(len(PROMPT) - 1), PROMPT[1:]])
    assert o["perplexity_model"] == pytest.approx(np.exp(nll.mean()), rel=1e-4)
    assert o["max_rel_error"] == pytest.approx(np.abs(a - b).max() / np.abs(b).max(), rel=1e-3)


def test_int4_kl_bounds_on_tiny(models, tmp_path):
    """int4 (per channel, groups of 32) against int8 on the tiny preset: measured
    KL means 4.9e-3 and 6.6e-4 nats (max 6.3e-2 and 3.1e-3), top-1 13/14 and
    14/14; bounds at ~2x. (One 14-token prompt ranks quantizers poorly: before the
    signed-scale search these were 1.1e-3 and 2.2e-3, while over 16 prompts per
    channel is unchanged and groups of 32 improved by 30%; docs/FIDELITY.md.)"""
    bounds = {"int4": (1e-2, 0.13), "int4g32": (1.5e-3, 7e-3)}
    for name, (kl_mean, kl_max) in bounds.items():
        rc, rep = _run(tmp_path, "--model", str(models[name]), "--reference", str(models["int8"]))
        assert rc == 0
        o = rep["overall"]
        assert 1e-5 < o["kl_mean"] < kl_mean and o["kl_max"] < kl_max, (name, o)
        assert o["top1_agreement"] >= 13 / 14 and o["top5_overlap"] >= 0.9, (name, o)


def test_batched_prefill_equals_decode_steps(models):
    for precision in ("fp32", "bf16"):
        engine = Engine(PackedModel.open(models["int8"]),
                        EngineOptions(backend="host", precision=precision, prefill_buckets=(4, 8),
                                      act_int8=False))    # fp32: only the sums' order differs
        batched = EV.teacher_forced_logits(engine, PROMPT, progress=False)
        stepwise = prompt_logits(engine, PROMPT)
        assert batched.shape == stepwise.shape == (len(PROMPT), engine.cfg.vocab_size)
        if precision == "fp32":
            assert np.abs(batched - stepwise).max() <= 1e-6 * np.abs(stepwise).max()
        else:   # fp32 sums in another order flip a rare bf16 rounding of a logit by 1 ulp
            np.testing.assert_allclose(batched, stepwise, rtol=2 ** -6, atol=0)
            assert np.mean(batched == stepwise) > 0.98


def test_release_oracle_logits(models, tmp_path, capsys):
    ref = _logits(models["int8"])
    good = tmp_path / "oracle.npy"
    np.save(good, ref[None])                                                  # (1, T, V) accepted
    rc, rep = _run(tmp_path, "--model", str(models["int8"]), "--release-oracle", str(good),
                   "--precision", "fp32", "--activations", "fp32")
    # the eval's batched prefill against these decode-step logits: fp32 rounding only
    assert rc == 0 and rep["overall"]["kl_max"] < 1e-10 and rep["overall"]["max_rel_error"] < 1e-6
    bad = tmp_path / "bad.npy"
    np.save(bad, ref[:-1])
    out = tmp_path / "bad-report.json"
    rc = EV.main(["--model", str(models["int8"]), "--release-oracle", str(bad), "--prompt-ids",
                  IDS, "--backend", "host", "--no-progress", "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "expected logits of shape (14, 512)" in capsys.readouterr().err


def test_bad_prompt_ids(models, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = EV.main(["--model", str(models["int8"]), "--prompt-ids", "1,x", "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "--prompt-ids: expected comma-separated integers" in capsys.readouterr().err
