"""The dense reference forward pass against independent float64 computations.

Everything checked here is recomputed inside this file in a different style:
float64, per-head / per-token loops, RoPE via complex numbers, GQA by explicit
index, softmax via logsumexp. Each check also shows that the mistake it guards
against (interleaved RoPE, exact-erf gelu, no soft-cap, ...) would be caught at
the tolerance used.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from lowmem import reference as ref
from quant.config import preset
from quant.checkpoint import QuantizedWeight8bit, write_tensor_file
from quant.spec import checkpoint_specs

CFG = preset("tiny")


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def to_bf16(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


# --- well-conditioned synthetic params (SPEC.md section 7) --------------------------

def make_params(cfg, seed=0) -> dict:
    """Random fp32 params with the statistics that keep bf16 and fp32 runs close."""
    rng = np.random.default_rng(seed)
    d, f, e, k = cfg.emb_size, cfg.ffn_size, cfg.num_experts, cfg.key_size

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def gains(mean, spread):
        return (mean + normal((d,), spread)).astype(np.float32)

    def experts(fan_in, fan_out, std):  # experts share ~90% of their weight variance
        shared = normal((fan_in, fan_out), std)
        return (np.sqrt(0.9) * shared + normal((e, fan_in, fan_out), np.sqrt(0.1) * std)
                ).astype(np.float32)

    # A spread of head sharpness so that some heads reach the 30 * tanh cap.
    sharp = np.repeat(np.linspace(1.0, 6.0, cfg.num_q_heads), k).astype(np.float32)
    layers = []
    for _ in range(cfg.num_layers):
        layers.append({
            "q": normal((d, cfg.q_width), 1 / np.sqrt(d)) * sharp[None, :],
            "k": normal((d, cfg.kv_width), 1 / np.sqrt(d)),
            "v": normal((d, cfg.kv_width), 1 / np.sqrt(d)),
            "o": normal((cfg.q_width, d), 1 / np.sqrt(cfg.q_width)),
            "gate": experts(d, f, 1.5 / np.sqrt(d)),
            "up": experts(d, f, 1.5 / np.sqrt(d)),
            "down": experts(f, d, 1 / np.sqrt(f)),
            "router": normal((d, e), 3 / np.sqrt(d)),
            "attn_norm": gains(1.0, 0.1), "moe_norm": gains(1.0, 0.1),
            "attn_post_norm": gains(0.4, 0.05), "moe_post_norm": gains(0.4, 0.05),
        })
    return {"embed": normal((cfg.vocab_size, d), 2.0 / cfg.embedding_multiplier_scale),
            "final_norm": gains(2.0, 0.2), "layers": layers}


@pytest.fixture(scope="module")
def params():
    return make_params(CFG)


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(1)
    toks = rng.integers(4, CFG.vocab_size, size=(2, 9))
    toks[1, :2] = 0  # left padding in the second row
    return toks


# --- independent float64 implementation --------------------------------------------

def rms64(x, scale, eps):
    d = x.shape[-1]
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x * np.sqrt(d) / np.sqrt(norm ** 2 + d * eps) * scale


def rope64(x, positions, base):
    """x (T, K): pairs (i, i + K/2) as complex numbers, rotated by pos * base^(-2i/K)."""
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    theta = np.outer(positions, base ** (-2.0 * np.arange(half) / x.shape[-1]))
    z = z * np.exp(1j * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def rope64_interleaved(x, positions, base):
    """The GPT-J pairing (2i, 2i+1): the wrong one for Grok-1."""
    z = x[..., 0::2] + 1j * x[..., 1::2]
    half = x.shape[-1] // 2
    theta = np.outer(positions, base ** (-2.0 * np.arange(half) / x.shape[-1]))
    z = z * np.exp(1j * theta)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def logsumexp_softmax(s):
    shifted = s - np.max(s)  # (s - logsumexp(s)) without losing log(n) next to -1e30
    return np.exp(shifted - np.log(np.sum(np.exp(shifted))))


def attention64(x, wq, wk, wv, wo, tokens, cfg, softcap=True, kv_of=None, rnd=None):
    """Per batch row, per query head, per query position; kv head by explicit index.

    ``rnd`` (e.g. to_bf16) is applied where the release's bf16 run rounds: the q, k,
    v projections, the keys after RoPE and the attention output."""
    r = rnd or (lambda a: a)
    x, wq, wk, wv, wo = (np.asarray(a, np.float64) for a in (x, wq, wk, wv, wo))
    b_size, t_len, _ = x.shape
    k = cfg.key_size
    kv_of = kv_of or (lambda h: h // cfg.q_group)
    out = np.zeros((b_size, t_len, cfg.q_width))
    pos = np.arange(t_len)
    for b in range(b_size):
        for h in range(cfg.num_q_heads):
            kvh = kv_of(h)
            q = rope64(r(x[b] @ wq[:, h * k:(h + 1) * k]), pos, cfg.rope_base)
            kk = r(rope64(r(x[b] @ wk[:, kvh * k:(kvh + 1) * k]), pos, cfg.rope_base))
            v = r(x[b] @ wv[:, kvh * k:(kvh + 1) * k])
            for t in range(t_len):
                s = (kk @ q[t]) * cfg.attn_output_multiplier
                if softcap:
                    s = 30.0 * np.tanh(s / 30.0)
                visible = [j <= t and tokens[b, j] > 0 for j in range(t_len)]
                s = np.where(visible, s, -1e30)
                out[b, t, h * k:(h + 1) * k] = r(logsumexp_softmax(s) @ v)
    return out @ wo


def gelu64_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu64_erf(x):
    return np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.ravel()]
                    ).reshape(x.shape)


def ffn64(x, wg, wu, wd, gelu=gelu64_tanh):
    wg, wu, wd = (np.asarray(a, np.float64) for a in (wg, wu, wd))
    return (gelu(x @ wg) * (x @ wu)) @ wd


def moe64(x, p, cfg):
    """Per token: softmax via logsumexp, the two largest by sorting, raw gates."""
    out = np.zeros_like(x)
    router = np.asarray(p["router"], np.float64)
    for idx in np.ndindex(*x.shape[:-1]):
        probs = logsumexp_softmax(x[idx] @ router)
        chosen = sorted(range(cfg.num_experts), key=lambda e: -probs[e])
        for e in chosen[:cfg.num_selected_experts]:
            out[idx] += probs[e] * ffn64(x[idx][None], p["gate"][e], p["up"][e], p["down"][e])[0]
    return out


def forward64(cfg, params, tokens):
    eps = cfg.rms_norm_eps
    table = np.asarray(params["embed"], np.float64)
    h = table[tokens] * cfg.embedding_multiplier_scale
    for p in params["layers"]:
        a = attention64(rms64(h, p["attn_norm"], eps), p["q"], p["k"], p["v"], p["o"],
                        tokens, cfg)
        h = h + rms64(a, p["attn_post_norm"], eps)
        m = moe64(rms64(h, p["moe_norm"], eps), p, cfg)
        h = h + rms64(m, p["moe_post_norm"], eps)
    return rms64(h, params["final_norm"], eps) @ table.T * cfg.output_multiplier_scale


# --- components ---------------------------------------------------------------------

def test_rms_norm_uses_scale_as_stored():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32) * 3
    scale = (0.5 + rng.random(64)).astype(np.float32)
    got = ref.rms_norm(x, scale, 1e-5, "fp32")
    want = rms64(x.astype(np.float64), scale, 1e-5)
    assert got.dtype == np.float32
    assert rel_err(got, want) < 1e-6
    assert rel_err(rms64(x.astype(np.float64), 1 + scale, 1e-5), want) > 0.1
    # bf16 mode (the release as executed under jit): norm outputs stay fp32.
    assert np.array_equal(ref.rms_norm(x, scale, 1e-5, "bf16"), got)


def test_rope_is_rotate_half_not_interleaved():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)  # (B, T, H, K)
    pos = np.arange(7)
    got = ref.rope(x, pos, 10000.0, "fp32")
    want = np.stack([np.stack([rope64(x[b, :, h].astype(np.float64), pos, 10000.0)
                               for h in range(3)], axis=1) for b in range(2)])
    assert rel_err(got, want) < 1e-6
    interleaved = np.stack([np.stack([rope64_interleaved(x[b, :, h].astype(np.float64), pos,
                                                         10000.0) for h in range(3)], axis=1)
                            for b in range(2)])
    assert rel_err(interleaved, want) > 0.1
    assert np.array_equal(got[:, 0], x[:, 0])  # position 0 is the identity


def _attention_inputs(seed, q_scale):
    rng = np.random.default_rng(seed)
    d = CFG.emb_size
    x = rng.standard_normal((2, 8, d)).astype(np.float32)
    wq = (rng.standard_normal((d, CFG.q_width)) * q_scale / np.sqrt(d)).astype(np.float32)
    wk = (rng.standard_normal((d, CFG.kv_width)) / np.sqrt(d)).astype(np.float32)
    wv = (rng.standard_normal((d, CFG.kv_width)) / np.sqrt(d)).astype(np.float32)
    wo = (rng.standard_normal((CFG.q_width, d)) / np.sqrt(CFG.q_width)).astype(np.float32)
    tokens = rng.integers(4, CFG.vocab_size, size=(2, 8))
    tokens[0, 3] = 0   # a padding key in the middle
    tokens[1, :2] = 0  # left padding: query 0 sees no key at all
    return x, wq, wk, wv, wo, tokens


def test_attention_gqa_mask_and_softcap():
    x, wq, wk, wv, wo, tokens = _attention_inputs(4, q_scale=12.0)
    mask = ref.attention_mask(tokens, CFG.pad_token_id)
    got = ref.attention(x, wq, wk, wv, wo, mask, CFG, "fp32")
    want = attention64(x, wq, wk, wv, wo, tokens, CFG)
    tol = 1e-5
    assert rel_err(got, want) < tol
    # Each ingredient is visible at this tolerance.
    assert rel_err(attention64(x, wq, wk, wv, wo, tokens, CFG, softcap=False), want) > 100 * tol
    wrong_gqa = attention64(x, wq, wk, wv, wo, tokens, CFG, kv_of=lambda h: h % CFG.num_kv_heads)
    assert rel_err(wrong_gqa, want) > 100 * tol
    no_pad = np.where(tokens > 0, tokens, 5)
    assert rel_err(attention64(x, wq, wk, wv, wo, no_pad, CFG), want) > 100 * tol
    # bf16 mode rounds only the q/k/v projections, the keys after RoPE, the values
    # and the attention output (the release as executed); the output is fp32.
    got16 = ref.attention(x, wq, wk, wv, wo, mask, CFG, "bf16")
    assert not np.array_equal(got16, to_bf16(got16))
    r16 = lambda a: to_bf16(a).astype(np.float64)  # noqa: E731
    want16 = attention64(x, wq, wk, wv, wo, tokens, CFG, rnd=r16)
    # measured 7e-7 (a rare tie rounded the other way) against 8e-3 without the roundings
    assert rel_err(got16, want16) < 1e-5 and 1e-3 < rel_err(got16, want) < 3e-2


def test_attention_mask_is_causal_and_hides_padding():
    tokens = np.array([[0, 7, 0, 9]])
    want = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 1]], dtype=bool)
    assert np.array_equal(ref.attention_mask(tokens, 0)[0], want)


def test_router_and_top2_raw_gates():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 64)).astype(np.float32)
    w = (rng.standard_normal((64, 8)) * 3 / 8).astype(np.float32)
    probs = ref.router_probs(x, w)
    gates, experts = ref.top2(probs, 2)
    for idx in np.ndindex(3, 4):
        p64 = logsumexp_softmax(x[idx].astype(np.float64) @ w.astype(np.float64))
        assert np.max(np.abs(probs[idx] - p64)) < 1e-6
        order = sorted(range(8), key=lambda e: -p64[e])[:2]
        assert list(experts[idx]) == order
        assert np.max(np.abs(gates[idx] - p64[order])) < 1e-6
    assert np.all(gates.sum(-1) < 0.999)  # not renormalized


def test_top2_ties_go_to_lower_expert():
    gates, experts = ref.top2(np.array([[0.1, 0.3, 0.3, 0.3]], np.float32), 2)
    assert experts.tolist() == [[1, 2]] and np.allclose(gates, 0.3)


def _expert_weights(seed):
    rng = np.random.default_rng(seed)
    d, f = 64, 256
    x = rng.standard_normal((10, d)).astype(np.float32)
    wg = (rng.standard_normal((d, f)) * 1.5 / np.sqrt(d)).astype(np.float32)
    wu = (rng.standard_normal((d, f)) * 1.5 / np.sqrt(d)).astype(np.float32)
    wd = (rng.standard_normal((f, d)) / np.sqrt(f)).astype(np.float32)
    return x, wg, wu, wd


def test_expert_ffn_geglu_tanh_gelu():
    x, wg, wu, wd = _expert_weights(6)
    got = ref.expert_ffn(x, wg, wu, wd, "fp32")
    want = ffn64(x.astype(np.float64), wg, wu, wd)
    tol = 1e-5
    assert rel_err(got, want) < tol
    erf = ffn64(x.astype(np.float64), wg, wu, wd, gelu=gelu64_erf)
    assert rel_err(erf, want) > 5 * tol  # exact-erf gelu would be caught
    swapped = ffn64(x.astype(np.float64), wu, wg, wd)  # gelu on the wrong projection
    assert rel_err(swapped, want) > 100 * tol


def test_expert_ffn_bf16_precision():
    """bf16 mode: the expert FFN is the fp32 one (the release's casts do not survive jit)."""
    x, wg, wu, wd = _expert_weights(7)
    got = ref.expert_ffn(x, wg, wu, wd, "bf16")
    assert np.array_equal(got, ref.expert_ffn(x, wg, wu, wd, "fp32"))
    assert rel_err(got, ffn64(x.astype(np.float64), wg, wu, wd)) < 1e-5


def test_moe_matches_per_token_loop(params):
    p = params["layers"][0]
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5, CFG.emb_size)).astype(np.float32)
    got = ref.moe(x, p["router"], p["gate"], p["up"], p["down"], 2, "fp32")
    want = moe64(x.astype(np.float64), p, CFG)
    assert rel_err(got, want) < 1e-5
    got16 = ref.moe(x, p["router"], p["gate"], p["up"], p["down"], 2, "bf16")
    assert np.array_equal(got16, got)   # bf16 mode: gates, products and sum unrounded


def test_moe_bf16_keeps_gates_and_sum_fp32(params):
    """bf16 mode: sum of the raw fp32 gate prob * fp32 expert output, not cast to bf16."""
    p = params["layers"][1]
    rng = np.random.default_rng(12)
    x = to_bf16(rng.standard_normal((2, 5, CFG.emb_size))).astype(np.float32)
    got = ref.moe(x, p["router"], p["gate"], p["up"], p["down"], 2, "bf16")

    def expected(round_gate):
        out = np.zeros(x.shape)
        for idx in np.ndindex(2, 5):
            probs = logsumexp_softmax(x[idx].astype(np.float64) @ p["router"].astype(np.float64))
            for e in sorted(range(CFG.num_experts), key=lambda e: -probs[e])[:2]:
                gate = to_bf16(probs[e]) if round_gate else probs[e]
                y = ref.expert_ffn(x[idx][None], p["gate"][e], p["up"][e], p["down"][e], "bf16")
                out[idx] += gate * y[0]  # expert_ffn's bf16 mode is checked above
        return out

    assert rel_err(got, expected(round_gate=False)) < 1e-5
    assert rel_err(got, to_bf16(expected(round_gate=True))) > 1e-3


# --- embedding and output multipliers ---------------------------------------------

def test_embedding_multiplier_rounded_to_bf16_in_bf16_mode():
    grok_mult = preset("grok-1").embedding_multiplier_scale  # 78.38367...
    assert float(to_bf16(grok_mult)) == 78.5
    rng = np.random.default_rng(9)
    table = rng.standard_normal((32, 16)).astype(np.float32) * 0.03
    tokens = np.array([[3, 7, 31], [0, 1, 2]])
    got = ref.embed(tokens, table, grok_mult, "bf16")
    # The constant is a bf16 value; the rows and the product stay fp32 (as executed).
    assert np.array_equal(got, table[tokens] * np.float32(78.5))
    assert not np.array_equal(got, to_bf16(to_bf16(table[tokens]) * 78.5))
    got32 = ref.embed(tokens, table, grok_mult, "fp32")
    assert rel_err(got32, table[tokens].astype(np.float64) * grok_mult) < 1e-6


def test_output_multiplier_rounded_to_bf16_in_bf16_mode():
    cfg = preset("tiny", output_multiplier_scale=preset("grok-1").output_multiplier_scale)
    rng = np.random.default_rng(10)
    h = rng.standard_normal((1, 3, cfg.emb_size)).astype(np.float32)
    table = rng.standard_normal((cfg.vocab_size, cfg.emb_size)).astype(np.float32) * 0.25
    norm = np.ones(cfg.emb_size, np.float32)
    got = ref.output_logits(h, norm, table, cfg, "bf16")
    hb = ref.rms_norm(h, norm, cfg.rms_norm_eps, "bf16").astype(np.float64)  # tested above
    raw = hb @ table.T.astype(np.float64)    # fp32 product of the unrounded table
    assert float(to_bf16(cfg.output_multiplier_scale)) == 0.578125
    # The product times the bf16 multiplier, rounded once (up to a rare 1-ulp tie).
    assert np.mean(got == to_bf16(raw * 0.578125)) > 0.99
    assert np.mean(got == to_bf16(raw * cfg.output_multiplier_scale)) < 0.9
    ratio = np.sum(got * raw) / np.sum(raw * raw)  # least-squares multiplier
    assert abs(ratio - 0.578125) < 2e-4 < abs(ratio - cfg.output_multiplier_scale)


# --- whole model --------------------------------------------------------------------

def test_forward_fp32_matches_float64(params, tokens):
    got = ref.forward(CFG, params, tokens, "fp32")
    assert got.shape == (2, 9, CFG.vocab_size) and got.dtype == np.float32
    assert rel_err(got, forward64(CFG, params, tokens)) < 1e-5


def test_bf16_mode_close_to_fp32_mode(params, tokens):
    l32 = ref.forward(CFG, params, tokens, "fp32")
    l16 = ref.forward(CFG, params, tokens, "bf16")
    assert np.array_equal(l16, to_bf16(l16))
    assert 0 < rel_err(l16, l32) < 5e-2


def test_left_padding_only_shifts_positions(params):
    """RoPE is relative and pad keys are masked: left padding leaves real tokens' logits."""
    seq = np.array([11, 250, 3, 77, 400, 9])
    plain = ref.forward(CFG, params, seq, "fp32")[0]
    padded = ref.forward(CFG, params, np.concatenate([[0, 0, 0], seq]), "fp32")[0, 3:]
    assert rel_err(padded, plain) < 1e-4
    unmasked = ref.forward(CFG, params, np.concatenate([[5, 5, 5], seq]), "fp32")[0, 3:]
    assert rel_err(unmasked, plain) > 1e-2


def test_forward_1d_tokens_and_bad_input(params):
    seq = np.array([5, 6, 7])
    assert np.array_equal(ref.forward(CFG, params, seq), ref.forward(CFG, params, seq[None]))
    with pytest.raises(ValueError, match="mode"):
        ref.forward(CFG, params, seq, mode="fp16")
    with pytest.raises(ValueError, match=r"ids in \[0, 512\)"):
        ref.forward(CFG, params, np.array([1, 512]))
    with pytest.raises(ValueError, match="integer"):
        ref.forward(CFG, params, np.array([1.0, 2.0]))
    broken = dict(params, layers=[dict(params["layers"][0], q=np.zeros((3, 3)))] * 2)
    with pytest.raises(ValueError, match=r"\['layers'\]\[0\]\['q'\]"):
        ref.forward(CFG, broken, seq)


# --- load_params -----------------------------------------------------------------------

def _write_checkpoint(path, cfg, seed=11):
    """Release-format files; every fp32 leaf of layer L is filled with L as a marker."""
    rng = np.random.default_rng(seed)
    written = {}
    for spec in checkpoint_specs(cfg):
        if spec.quantized:
            value = QuantizedWeight8bit(
                rng.integers(-128, 128, size=spec.shape).astype(np.int8),
                (rng.random(spec.scale_shape) * 0.01 + 0.001).astype(ml_dtypes.bfloat16))
        elif spec.layer is not None:
            value = np.full(spec.shape, spec.layer, np.float32)
        else:
            value = rng.standard_normal(spec.shape).astype(np.float32)
        write_tensor_file(path / spec.filename, value)
        written[(spec.layer, spec.role)] = value
    return written


def _dequant_loops(q):
    """Row-block dequantization written out: block b covers rows [b*K/n, (b+1)*K/n)."""
    w, s = q.weight.astype(np.float64), q.scales.astype(np.float64)
    blocks, rows = s.shape[-2], w.shape[-2] // s.shape[-2]
    out = np.empty_like(w)
    for b in range(blocks):
        block = slice(b * rows, (b + 1) * rows)
        out[..., block, :] = w[..., block, :] * s[..., b:b + 1, :]
    return out


def test_load_params_true_layer_order_and_dequant(tmp_path):
    cfg = preset("tiny", num_layers=11)  # files in order 0, 1, 10, 2, ..., 9
    written = _write_checkpoint(tmp_path, cfg)
    params = ref.load_params(tmp_path, cfg)
    assert np.array_equal(params["embed"], written[(None, "embed")])
    for layer in range(cfg.num_layers):
        p = params["layers"][layer]
        assert np.all(p["attn_norm"] == layer) and np.all(p["router"] == layer)
        for role in ("gate", "down", "o", "q"):
            assert p[role].dtype == np.float32
            assert np.array_equal(p[role], _dequant_loops(written[(layer, role)]))
    logits = ref.forward(cfg, params, np.array([1, 2, 3]), "bf16")
    assert logits.shape == (1, 3, cfg.vocab_size) and np.all(np.isfinite(logits))


def test_synthetic_checkpoint_through_reference(tiny_ckpt, tiny_cfg):
    """The shared synthetic checkpoint: fp32 mode matches float64, bf16 stays close."""
    params = ref.load_params(tiny_ckpt, tiny_cfg)
    tokens = np.array([[1, 422, 303, 356, 180, 333, 72, 360, 217],
                       [0, 0, 5, 9, 391, 359, 18, 5, 11]])
    l32 = ref.forward(tiny_cfg, params, tokens, "fp32")
    assert rel_err(l32, forward64(tiny_cfg, params, tokens)) < 1e-5
    assert 0 < rel_err(ref.forward(tiny_cfg, params, tokens, "bf16"), l32) < 5e-2


def test_reference_cli(tiny_ckpt, tmp_path, capsys):
    from lowmem.reference import main
    assert main(["--checkpoint", str(tiny_ckpt), "--preset", "tiny", "--tokens", "5,17,99"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("position 0 (token 5): top-5 next tokens")
    assert main(["--checkpoint", str(tmp_path)]) == 2
    assert "tensor00000_000: file not found" in capsys.readouterr().err
