"""Text streaming, the Python API and the generate CLI (demo preset, real tokenizer)."""
import subprocess
import sys

import jax
import numpy as np
import pytest

import lowmem
from lowmem.decoding import GenerationRequest, generate_tokens
from lowmem.sampling import SamplingParams, sample
from quant.config import preset
from lowmem.tokenizer import BUNDLED, Tokenizer, stream_text
from quant.packed import QuantSettings
from quant.pipeline import quantize_checkpoint
from quant.synthetic import write_checkpoint

TOKENIZER = BUNDLED


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """The demo preset (real vocabulary) with 2 layers, int4 g64, with the tokenizer."""
    root = tmp_path_factory.mktemp("demo")
    cfg = preset("demo", num_layers=2)
    write_checkpoint(cfg, root / "ckpt")
    quantize_checkpoint(root / "ckpt", root / "model", cfg, QuantSettings(4, 64), tokenizer=TOKENIZER)
    return root / "model"


def test_stream_text_keeps_the_leading_space(tok):
    prompt = tok.encode("The answer is")
    cont = tok.encode("The answer is forty two")[len(prompt):]
    assert "".join(stream_text(tok, iter(cont), context=prompt)) == " forty two"


def test_stream_text_stops_at_a_stop_string_and_stops_pulling(tok):
    ids = tok.encode("alpha beta gamma delta")
    pulled = []

    def tokens():
        for t in ids:
            pulled.append(t)
            yield t
    out = "".join(stream_text(tok, tokens(), stops=(" gam",)))
    assert out == "alpha beta"
    assert len(pulled) < len(ids)          # generation ended early


def test_stream_text_multibyte_characters_are_never_split(tok):
    ids = tok.encode("naïve 日本語 ✓")
    pieces = list(stream_text(tok, iter(ids)))
    assert "".join(pieces) == "naïve 日本語 ✓"
    assert all("\ufffd" not in p for p in pieces)


def test_api_generate_is_seeded_and_stops_at_max_tokens(demo_model):
    rt = lowmem.load(demo_model)
    a = list(rt.generate("Hello world", max_new_tokens=6, temperature=1.0, seed=3))
    b = list(rt.generate("Hello world", max_new_tokens=6, temperature=1.0, seed=3))
    c = list(rt.generate("Hello world", max_new_tokens=6, temperature=0.0))
    assert a == b and len(a) == 6 and len(c) == 6
    assert all(0 <= t < rt.engine.cfg.vocab_size for t in a)


@pytest.mark.parametrize("sampling", [dict(temperature=50.0), dict(temperature=50.0, top_p=0.9),
                                      dict(temperature=50.0, top_k=50)])
def test_generate_draws_with_a_fresh_subkey_per_token(demo_model, sampling, monkeypatch):
    """generate_tokens splits the key and draws in one call (on a CPU draw_next, after
    the filters on the host: host_sampling); the tokens are those of splitting the
    seed's key outside and drawing with sampling.sample on each step's logits:
    key, sub = split(key) before every draw. (The demo model's logits are so
    peaked that only a high temperature spreads the draws.)"""
    import lowmem.decoding as D
    monkeypatch.setattr(D, "sample_next", lambda *a: pytest.fail("the jitted filters ran"))
    engine = lowmem.load(demo_model).engine
    params = SamplingParams(**sampling)
    prompt = [5, 17, 300, 41]
    got = list(generate_tokens(engine, prompt, GenerationRequest(
        max_new_tokens=6, sampling=params, seed=11, stop_at_eos=False)))
    engine.reset()
    logits, key, want = engine.feed(prompt), jax.random.key(11), []
    for _ in range(6):
        key, sub = jax.random.split(key)
        want.append(int(sample(np.asarray(logits)[None], sub, *params.as_args())[0]))
        logits = engine.feed([want[-1]])
    assert got == want and len(set(got)) > 1


def test_greedy_on_a_cpu_takes_numpy_argmax_with_the_jitted_samplers_tokens(
        demo_model, monkeypatch):
    """Greedy decoding on a CPU picks each token with numpy's argmax instead of the
    jitted sampler: the tokens ``sampling.sample`` gives at temperature 0 on each
    step's logits, and the two argmaxes agree on ties (first index) and NaN."""
    import lowmem.decoding as D
    engine = lowmem.load(demo_model).engine
    prompt = [5, 17, 300, 41]
    engine.reset()
    logits, key, want = engine.feed(prompt), jax.random.key(0), []
    for _ in range(5):
        want.append(int(sample(np.asarray(logits)[None], key, 0.0, 1.0, 0)[0]))
        logits = engine.feed([want[-1]])
    monkeypatch.setattr(D, "sample_next", lambda *a: pytest.fail("the jitted sampler ran"))
    got = list(generate_tokens(engine, prompt, GenerationRequest(
        max_new_tokens=5, sampling=SamplingParams(temperature=0.0), stop_at_eos=False)))
    assert got == want
    rows = np.array([[1, 3, 3, 0], [np.nan, 5, np.nan, 9], [2, np.nan, 7, 7],
                     [-np.inf, -np.inf, -np.inf, -np.inf]], np.float32)
    jitted = np.asarray(sample(rows, key, 0.0, 1.0, 0))
    assert [int(np.argmax(r)) for r in rows] == list(jitted) == [1, 0, 1, 0]


def test_cli_generates_from_a_model_dir(demo_model):
    cmd = [sys.executable, "-m", "lowmem.generate", "--model", str(demo_model), "--prompt",
           "The answer to life", "--max-new-tokens", "5", "--ignore-eos"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The answer to life") and len(out.stdout) > len("The answer to life\n")


def test_cli_bad_model_dir_is_one_line_error(tmp_path):
    cmd = [sys.executable, "-m", "lowmem.generate", "--model", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "manifest.json" in out.stderr


def test_cli_too_small_cache_budget(demo_model):
    cmd = [sys.executable, "-m", "lowmem.generate", "--model", str(demo_model), "--backend",
           "device", "--expert-cache-gb", "0.0001"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "raise --expert-cache-gb" in out.stderr


def test_generation_stopped_early_leaves_the_engine_usable(demo_model):
    """A consumer that stops reading (a stop string) must not strand donated caches."""
    rt = lowmem.load(demo_model)
    tokens = rt.generate("Hello world", max_new_tokens=8, temperature=0.0)
    first = next(tokens)
    tokens.close()
    again = list(rt.generate("Hello world", max_new_tokens=3, temperature=0.0))
    assert again[0] == first and len(again) == 3


def test_generate_and_generate_text_share_arguments_and_stop(demo_model):
    """Same keywords; text keeps SentencePiece's spacing; a stop string ends both."""
    rt = lowmem.load(demo_model)
    kw = dict(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    ids = list(rt.generate("Hello world", **kw))
    text = "".join(rt.generate_text("Hello world", **kw))
    prompt = rt.tokenizer.encode("Hello world")
    assert text == rt.tokenizer.decode(prompt + ids)[len(rt.tokenizer.decode(prompt)):]
    stop = text.strip()[:2]
    cut = text.find(stop)
    assert "".join(rt.generate_text("Hello world", stop=[stop], **kw)) == text[:cut]
    stopped = list(rt.generate("Hello world", stop=(stop,), **kw))
    assert stopped == ids[:len(stopped)] and len(stopped) < len(ids)
    assert stop not in rt.tokenizer.decode(prompt + stopped)[len(rt.tokenizer.decode(prompt)):]
    with pytest.raises(ValueError, match="top_p"):
        next(rt.generate("Hello", top_p=0))
    assert lowmem.__version__.count(".") == 2


def test_demo_model_is_rebuilt_when_the_default_settings_change(demo_model, tiny_cfg, tiny_ckpt,
                                                                tmp_path):
    """The embedded default runs the quantizer's current int4 defaults: a demo directory
    quantized otherwise (here groups of 64, the old demo setting) is not current."""
    from lowmem import demo
    from quant.pipeline import DEFAULT_GROUP_SIZE, DEFAULT_INT4_LEVELS, INT4_LEVELS
    assert demo._demo_settings() == QuantSettings(4, DEFAULT_GROUP_SIZE, int4_levels=INT4_LEVELS[
        DEFAULT_INT4_LEVELS], row_pad=0, tiles=True, attention_tiles=True)
    assert not demo._current(demo_model)                       # int4 g64
    quantize_checkpoint(tiny_ckpt, tmp_path / "m", tiny_cfg, demo._demo_settings())
    assert demo._current(tmp_path / "m")
    assert not demo._current(tmp_path / "missing")
