"""A host decode row's residuals, norms and routing in numba (lowmem.row_kernels): the
values of the engine's jitted pieces to fp32 rounding, checked against those pieces
and an independent fp64 numpy model, the experts exactly, ties as lax.top_k."""
from __future__ import annotations

from dataclasses import replace

import jax.numpy as jnp
import numpy as np
import pytest

from lowmem import engine as E
from lowmem import row_kernels as RK


def _norm64(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def _route64(x, router, k):
    """(probs (E,), the k experts largest first, ties to the lower index) in fp64."""
    logits = np.asarray(x, np.float64)[0] @ np.asarray(router, np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return p, np.argsort(-p, kind="stable")[:k]


def _operands(cfg, seed):
    """One row's inputs at cfg's width: h, two products, four norm scales, two routers."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)             # noqa: E731
    d, e = cfg.emb_size, cfg.num_experts
    return dict(h=f(1, d) * 3, out=f(1, d) * 40, moe=f(1, d) * 0.2,
                norms=[1 + f(d) * 0.1 for _ in range(4)], routers=[f(d, e) * 0.05 for _ in range(2)])


def _close(got, want, ulps=8):
    """got equals want to fp32 rounding: within ulps units of its largest value."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=ulps * 2**-23 * np.abs(want).max())


@pytest.mark.parametrize("width", [None, 6144])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_row_pieces_equal_the_jitted_pieces_and_an_fp64_model(tiny_cfg, width, seed):
    cfg = tiny_cfg if width is None else replace(tiny_cfg, emb_size=width)
    o = _operands(cfg, seed)
    h, out, moe, (post, norm, nnorm, mpost), (router, nrouter) = (
        o["h"], o["out"], o["moe"], o["norms"], o["routers"])
    k, eps = cfg.num_selected_experts, cfg.rms_norm_eps

    new_h, (moe_in, gates, experts, routing) = RK.attention_route(
        cfg, "fp32", post, h, out, norm, router, nnorm, nrouter)
    xla_h, (xla_in, xla_gates, xla_experts, xla_routing) = E._attention_route(
        cfg, "fp32", post, h, out, norm, router, nnorm, nrouter)
    want_h = h + _norm64(out, post, eps)
    for got, xla, want in ((new_h, xla_h, want_h), (moe_in, xla_in, _norm64(want_h, norm, eps))):
        _close(got, xla)
        _close(got, want)
    probs, want_experts = _route64(moe_in, router, k)
    # the router's fp32 sums (vectorized, pairwise): each logit within a few roundings of
    # its terms' magnitude, 1.4e-5 measured at D 6144; a gate's relative error about that
    slack = 16 * 2**-24 * (np.abs(moe_in) @ np.abs(router)).max()
    np.testing.assert_allclose(gates, xla_gates, rtol=slack, atol=0)
    np.testing.assert_allclose(gates[0], probs[want_experts], rtol=slack, atol=0)
    np.testing.assert_array_equal(experts, xla_experts)
    np.testing.assert_array_equal(experts[0], want_experts)
    np.testing.assert_array_equal(routing, xla_routing)
    np.testing.assert_array_equal(
        routing[0, k:], _route64(_norm64(new_h, nnorm, eps), nrouter, k)[1])
    for got, xla in zip(RK.route_rows(cfg, "fp32", norm, router, nnorm, nrouter, new_h),
                        (moe_in, gates, experts, routing)):
        np.testing.assert_array_equal(got, xla)     # the same kernel on the same row

    res_h, x = RK.residual_norm(cfg, "bf16", new_h, moe, mpost, norm)
    xla_res, xla_x = E._residual_norm(cfg, "bf16", new_h, moe, mpost, norm)
    want_res = new_h + _norm64(moe, mpost, eps)
    _close(res_h, xla_res)
    _close(res_h, want_res)
    _close(x, xla_x)
    _close(x, _norm64(want_res, norm, eps))
    _close(RK.rms_norm(cfg, h, norm), E._norm(cfg, h, norm, "fp32"))
    assert res_h.dtype == x.dtype == moe_in.dtype == gates.dtype == np.float32
    assert experts.dtype == routing.dtype == np.int32


def test_row_routing_takes_equal_experts_lower_index_first_as_lax_top_k(tiny_cfg):
    """Equal router columns give equal probabilities: lax.top_k takes the lower index
    first, and so does the row kernel; all columns equal: experts 0 and 1."""
    cfg = tiny_cfg
    o = _operands(cfg, 3)
    h, norm = o["h"], o["norms"][0]
    router = np.zeros((cfg.emb_size, cfg.num_experts), np.float32)
    router[:, 5] = router[:, 2] = o["routers"][0][:, 0]
    if (RK.rms_norm(cfg, h, norm) @ router[:, 2]).item() < 0:
        router = -router
    for r, want in ((router, [2, 5]), (np.zeros_like(router), [0, 1])):
        got = RK.route_rows(cfg, "fp32", norm, r, norm, r, h)
        xla = E._route(cfg, "fp32", norm, r, norm, r, h)
        assert got[2].tolist() == np.asarray(xla[2]).tolist() == [want]
        assert got[3].tolist() == [want + want]


def test_row_routing_never_repeats_an_expert_whatever_the_values(tiny_cfg):
    """A NaN activation (a damaged weight) makes every probability NaN: the row still
    names k distinct experts, so the MoE never applies one twice."""
    cfg = tiny_cfg
    o = _operands(cfg, 4)
    h = o["h"].copy()
    h[0, 3] = np.nan
    _, gates, experts, routing = RK.route_rows(cfg, "fp32", o["norms"][0], o["routers"][0],
                                               o["norms"][1], o["routers"][1], jnp.asarray(h))
    assert np.isnan(gates).all()
    assert len(set(experts[0].tolist())) == cfg.num_selected_experts
    assert len(set(routing[0, cfg.num_selected_experts:].tolist())) == cfg.num_selected_experts


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_embed_is_the_jitted_embedding_bit_for_bit(tiny_cfg, precision):
    """The host row input's embedding (Engine._row_input) is model.embed's one
    product, bit for bit, for bf16 rows as the backend gathers them; in 'bf16' the
    multiplier is rounded to bf16 first (here it is not a bf16 value)."""
    from quant.qweight import BF16
    from lowmem import model as M
    cfg = replace(tiny_cfg, embedding_multiplier_scale=78.38367176906169)
    rows = (np.random.default_rng(4).standard_normal((3, cfg.emb_size)) * 0.02).astype(BF16)
    got = RK.embed(cfg, precision, rows)
    assert got.dtype == np.float32 and got.shape == rows.shape
    np.testing.assert_array_equal(got, np.asarray(M.embed(cfg, precision, jnp.asarray(rows))))
    assert not np.array_equal(RK.embed(cfg, "bf16", rows), RK.embed(cfg, "fp32", rows))
