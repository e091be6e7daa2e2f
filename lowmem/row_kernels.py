"""A host decode row's residual adds, RMSNorms and routing in numba (and its
embedding, in numpy).

Why: between its kernels a host decode step called XLA for these small pieces
(``engine._attention_route``, ``engine._residual_norm``: the residuals, the
next norm, the router's softmax and top-k), and right after the kernels have
streamed the weights through the caches each such call took about 0.3 ms, for
a few microseconds of arithmetic; these functions take the same arguments and
give the same values without an XLA call (0.03 ms warm): an int4 decode step
0.983-0.986x the time, int8 0.989x (docs/PERFORMANCE.md, section 3, session
28). The engine uses them for one row (``Engine._piece``, ``Engine._row_input``);
chunks keep the jitted pieces.

Numerics: ``model.rms_norm``, ``model.attention_residual``,
``model.moe_residual`` and ``model.route`` are fp32 in both precisions; these
are the same operations (the mean of squares, its reciprocal square root, the
scale; the router's fp32 dot, softmax, the k largest probabilities, ties to
the lower index as ``lax.top_k``), summed in an order of their own, so they
agree with XLA's to fp32 rounding, not bit for bit (tests/test_row_kernels.py).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from quant.qweight import BF16

_FM = {"contract", "reassoc"}   # reassoc: the sums vectorize (as XLA's do)


@njit(fastmath=_FM, cache=True)
def _norm(x, scale, eps, out):
    """out (D,) = x * 1/sqrt(mean(x^2) + eps) * scale, fp32 throughout."""
    n = x.shape[0]
    s = np.float32(0.0)
    for i in range(n):
        s += x[i] * x[i]
    r = np.float32(1.0) / np.sqrt(s / np.float32(n) + eps)
    for i in range(n):
        out[i] = x[i] * r * scale[i]


@njit(fastmath=_FM, cache=True)
def _router_logits(x, router):
    """x (D,) @ router (D, E) in fp32 -> (E,): 8 columns at a time in 8 scalars, which
    LLVM keeps in one vector register (8 µs at Grok-1's width; summed into an array
    element by element, through memory, 25 µs)."""
    n, count = router.shape
    logits = np.zeros(count, np.float32)
    e = 0
    while e + 8 <= count:
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
        for d in range(n):
            xd, r = x[d], router[d]
            a0 += xd * r[e]
            a1 += xd * r[e + 1]
            a2 += xd * r[e + 2]
            a3 += xd * r[e + 3]
            a4 += xd * r[e + 4]
            a5 += xd * r[e + 5]
            a6 += xd * r[e + 6]
            a7 += xd * r[e + 7]
        logits[e:e + 8] = (a0, a1, a2, a3, a4, a5, a6, a7)
        e += 8
    for d in range(n):                          # columns past the last 8
        for c in range(e, count):
            logits[c] += x[d] * router[d, c]
    return logits


@njit(cache=True)
def _top_k(logits, gates, experts):
    """Softmax of logits (E,), then its k = len(gates) largest probabilities into gates
    and their indices into experts, largest first; of equal ones the lower index
    first (lax.top_k); distinct indices even if a probability is NaN."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    taken = np.zeros(p.shape[0], np.bool_)
    for j in range(gates.shape[0]):
        best = -1
        for e in range(p.shape[0]):
            if not taken[e] and (best < 0 or p[e] > p[best]):
                best = e
        taken[best] = True
        gates[j], experts[j] = p[best], best


@njit(cache=True)
def _route_row(h, norm, router, next_norm, next_router, eps, moe_in, gates, experts, routing):
    """engine._route_rows for one row h (D,): moe_in (D,), gates (k,), experts (k,),
    routing (2k,) = this layer's experts, then the next layer's guess."""
    k = gates.shape[0]
    _norm(h, norm, eps, moe_in)
    _top_k(_router_logits(moe_in, router), gates, experts)
    nxt = np.empty_like(moe_in)
    _norm(h, next_norm, eps, nxt)
    next_gates, next_experts = np.empty_like(gates), np.empty_like(experts)
    _top_k(_router_logits(nxt, next_router), next_gates, next_experts)
    routing[:k] = experts
    routing[k:] = next_experts


@njit(cache=True)
def _residual_row(h, out, post_norm, eps, new_h):
    """new_h (D,) = h + rms_norm(out, post_norm): an attention or MoE residual."""
    _norm(out, post_norm, eps, new_h)
    for i in range(h.shape[0]):
        new_h[i] += h[i]


@njit(cache=True)
def _attention_route(h, out, post_norm, norm, router, next_norm, next_router, eps, new_h,
                     moe_in, gates, experts, routing):
    """engine._attention_route for one row (see _residual_row and _route_row)."""
    _residual_row(h, out, post_norm, eps, new_h)
    _route_row(new_h, norm, router, next_norm, next_router, eps, moe_in, gates, experts,
               routing)


@njit(cache=True)
def _residual_norm(h, moe_sum, post_norm, next_norm, eps, new_h, x):
    """engine._residual_norm for one row (see _residual_row)."""
    _residual_row(h, moe_sum, post_norm, eps, new_h)
    _norm(new_h, next_norm, eps, x)


def _row(a) -> np.ndarray:
    """The one row of a (1, D) array (jax or numpy) as fp32 (D,), a view where it can be."""
    return np.asarray(a, np.float32)[0]


def _vector(a) -> np.ndarray:
    """A weight (norm scale, router) as fp32, a view of a jax array where it can be."""
    return np.asarray(a, np.float32)


def _route_outputs(cfg, d: int):
    """Fresh (moe_in (1, D), gates (1, k), experts (1, k), routing (1, 2k)) to fill."""
    k = cfg.num_selected_experts
    return (np.empty((1, d), np.float32), np.empty((1, k), np.float32),
            np.empty((1, k), np.int32), np.empty((1, 2 * k), np.int32))


def embed(cfg, precision: str, rows) -> np.ndarray:
    """model.embed of host rows (T, D), any float dtype -> fp32 (T, D): the rows times
    the multiplier (a bf16 value in 'bf16'), the one product XLA makes, so equal bit
    for bit."""
    c = cfg.embedding_multiplier_scale
    c = np.float32(c) if precision == "fp32" else np.float32(np.asarray(c, BF16))
    return np.asarray(rows).astype(np.float32) * c


def rms_norm(cfg, x, scale, precision: str = "bf16") -> np.ndarray:
    """model.rms_norm of one row x (1, D) -> fp32 (1, D) (fp32 in both precisions)."""
    out = np.empty((1, x.shape[-1]), np.float32)
    _norm(_row(x), _vector(scale), np.float32(cfg.rms_norm_eps), out[0])
    return out


def last_hidden(cfg, precision: str, h, final_norm, index) -> np.ndarray:
    """engine._last_hidden for h of one row (index 0) -> fp32 (1, D)."""
    return rms_norm(cfg, np.asarray(h)[index:index + 1], final_norm)


def route_rows(cfg, precision: str, norm, router, next_norm, next_router, h):
    """engine._route_rows for one row h (1, D) -> (moe_in, gates, experts, routing)."""
    moe_in, gates, experts, routing = outs = _route_outputs(cfg, h.shape[-1])
    _route_row(_row(h), _vector(norm), _vector(router), _vector(next_norm),
               _vector(next_router), np.float32(cfg.rms_norm_eps), moe_in[0], gates[0],
               experts[0], routing[0])
    return outs


def attention_route(cfg, precision: str, post_norm, h, out, norm, router, next_norm,
                    next_router):
    """engine._attention_route for one row h (1, D), out the o product (1, D) ->
    (new h (1, D), route_rows' values for it)."""
    new_h = np.empty((1, h.shape[-1]), np.float32)
    moe_in, gates, experts, routing = outs = _route_outputs(cfg, h.shape[-1])
    _attention_route(_row(h), _row(out), _vector(post_norm), _vector(norm), _vector(router),
                     _vector(next_norm), _vector(next_router), np.float32(cfg.rms_norm_eps),
                     new_h[0], moe_in[0], gates[0], experts[0], routing[0])
    return new_h, outs


def residual_norm(cfg, precision: str, h, moe_sum, post_norm, next_norm):
    """engine._residual_norm for one row h (1, D), moe_sum (1, D) -> (new h, its next
    norm), each fp32 (1, D)."""
    new_h, x = np.empty((2, 1, h.shape[-1]), np.float32)
    _residual_norm(_row(h), _row(moe_sum), _vector(post_norm), _vector(next_norm),
                   np.float32(cfg.rms_norm_eps), new_h[0], x[0])
    return new_h, x
