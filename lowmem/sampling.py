"""Token sampling: temperature, top-k and nucleus (top-p), as pure JAX functions.

The semantics follow the release's reference runner (SPEC.md section 3):
logits are divided by the temperature, then a nucleus filter sorts them
ascending, takes the softmax, finds the threshold index
``argmax(cumsum >= 1 - p)`` and keeps every logit ``>=`` the logit at that
index (so ties at the threshold are kept); the others are set to ``-1e10``
(the reference's value for tokens it rules out), and a token is drawn with
``jax.random.categorical``.

Additions of ours, off by default so the defaults reproduce the reference:

- ``top_k`` (0 = off) keeps the k largest logits, ties at the k-th value kept,
  and is applied before the nucleus filter.
- temperature 0 means greedy (argmax). It is selected with ``jnp.where``, so
  it does not recompile.
- When ``1 - p`` exceeds the float32 total of the sorted probabilities (p
  below about 1e-7), no index satisfies ``cumsum >= 1 - p``; the reference's
  ``argmax`` then returns 0 and keeps *every* token. We keep only the largest
  logit(s) instead, which is what a vanishing p means.

Temperature, top_p and top_k are traced values (Python scalars, 0-d arrays or
per-row arrays of shape (B,)), so changing them between calls of a jitted
caller does not recompile; only the logits' shape and the argument dtypes are
part of the compiled signature. ``SamplingParams.as_args`` gives them fixed
dtypes for that reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

# The reference runner's logit for tokens it rules out (not -inf, so a row
# never becomes all -inf and the softmax stays finite).
DISALLOWED_LOGIT = -1e10

# How many of the largest logits the filters select before falling back to a full
# sort: lax.top_k of 1024 of 131072 takes about 0.6 ms on a 2-core CPU (a sort
# 50 ms), and a top-p 0.95 nucleus of a language model rarely holds 1000 tokens.
SELECTION_CAP = 1024


@dataclass(frozen=True)
class SamplingParams:
    """User-facing sampling settings, validated once on construction.

    ``temperature == 0`` means argmax decoding (greedy). The
    defaults (temperature 1, top_p 1, top_k 0) sample from the full softmax.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        problems = []
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, (int, np.integer)) and not isinstance(self.top_k, bool)
                and self.top_k >= 0):
            problems.append(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def as_args(self) -> tuple[np.float32, np.float32, np.int32]:
        """(temperature, top_p, top_k) with fixed dtypes for ``sample``.

        Fixed dtypes keep a jitted caller on one compiled version whatever the
        values (a Python int temperature would otherwise trace differently
        from a float one).
        """
        return np.float32(self.temperature), np.float32(self.top_p), np.int32(self.top_k)


def _per_row(value, batch: int, dtype) -> jax.Array:
    """A scalar or (B,) setting as a (B, 1) column that broadcasts over the vocab."""
    value = jnp.asarray(value, dtype)
    if value.ndim > 1:
        raise ValueError(f"sampling settings must be scalars or shape ({batch},), got {value.shape}")
    return jnp.broadcast_to(jnp.reshape(value, (-1, 1)), (batch, 1))  # (B, 1)


def _top_k_mask(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """True for the k largest logits per row (ties at the k-th kept); all True when k == 0."""
    vocab = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)  # (B, V)
    kth_index = jnp.clip(top_k - 1, 0, vocab - 1)  # (B, 1)
    kth_value = jnp.take_along_axis(descending, kth_index, axis=-1)  # (B, 1)
    return (top_k <= 0) | (logits >= kth_value)  # (B, V)


def _top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """The reference nucleus filter's keep-mask: logits >= the threshold logit."""
    ascending = jnp.sort(logits, axis=-1)  # (B, V)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)  # (B, V)
    reached = cumulative >= 1 - top_p  # (B, V)
    # Reference: argmax(reached). If nothing is reached (p ~ 0 in float32), keep the max only.
    threshold_index = jnp.where(jnp.any(reached, axis=-1, keepdims=True),
                                jnp.argmax(reached, axis=-1, keepdims=True),
                                logits.shape[-1] - 1)  # (B, 1)
    threshold = jnp.take_along_axis(ascending, threshold_index, axis=-1)  # (B, 1)
    return logits >= threshold  # (B, V)


def _scaled_logits(logits, temperature, top_p, top_k):
    """Validated (B, V) float32 logits / temperature and the per-row settings as (B, 1)."""
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim != 2:
        raise ValueError(f"filter_logits: expected logits of shape (B, V), got {logits.shape}")
    batch = logits.shape[0]
    temperature = _per_row(temperature, batch, jnp.float32)  # (B, 1)
    top_p = _per_row(top_p, batch, jnp.float32)  # (B, 1)
    top_k = _per_row(top_k, batch, jnp.int32)  # (B, 1)
    greedy = temperature <= 0  # (B, 1)
    scaled = logits / jnp.where(greedy, 1.0, temperature)  # (B, V)
    top_k = jnp.where(greedy, 1, top_k)  # (B, 1): greedy keeps the max (and its ties)
    return scaled, top_p, top_k


def filter_logits_sorted(logits: jax.Array, temperature, top_p, top_k) -> jax.Array:
    """``filter_logits`` by two full sorts of the vocabulary: the direct reading of
    SPEC section 3 that the faster ``filter_logits`` is tested against."""
    scaled, top_p, top_k = _scaled_logits(logits, temperature, top_p, top_k)
    scaled = jnp.where(_top_k_mask(scaled, top_k), scaled, DISALLOWED_LOGIT)  # (B, V)
    return jnp.where(_top_p_mask(scaled, top_p), scaled, DISALLOWED_LOGIT)  # (B, V)


def _capped_thresholds(scaled, top_p, top_k, cap: int):
    """Top-k and nucleus thresholds from the ``cap`` largest logits only, and whether
    each is exact for every row (its top-k, its nucleus lie inside the cap).

    The nucleus threshold is the reference's: in ascending order, the first logit
    whose cumulative probability reaches ``1 - p``. Everything below the cap is one
    block of mass (``tail``) that comes first in that order, so when ``tail < 1 - p``
    the threshold is among the cap's logits and equals the full sort's (up to the
    float32 rounding of the cumulative sum, which differs in summation order).
    """
    # The barrier keeps XLA from folding later slices into the selection, which turns
    # it back into a full sort (0.6 ms -> 22 ms at V = 131072).
    top = jax.lax.optimization_barrier(jax.lax.top_k(scaled, cap)[0])  # (B, C) descending
    kth = jnp.take_along_axis(top, jnp.clip(top_k - 1, 0, cap - 1), axis=-1)  # (B, 1)
    k_fits = (top_k <= 0) | (top_k <= cap)  # (B, 1)
    kth = jnp.where(top_k <= 0, -jnp.inf, kth)  # (B, 1)
    kept = jnp.where(scaled >= kth, scaled, DISALLOWED_LOGIT)  # (B, V)
    peak = top[:, :1]  # (B, 1)
    total = jnp.sum(jnp.exp(kept - peak), axis=-1, keepdims=True)  # (B, 1)
    ascending = jnp.where(top >= kth, top, DISALLOWED_LOGIT)[:, ::-1]  # (B, C)
    weights = jnp.exp(ascending - peak)  # (B, C)
    tail = jnp.maximum(total - jnp.sum(weights, axis=-1, keepdims=True), 0.0)  # (B, 1)
    cumulative = (tail + jnp.cumsum(weights, axis=-1)) / total  # (B, C)
    reached = cumulative >= 1 - top_p  # (B, C)
    index = jnp.where(jnp.any(reached, axis=-1, keepdims=True),
                      jnp.argmax(reached, axis=-1, keepdims=True), cap - 1)  # (B, 1)
    nucleus = jnp.where(top_p >= 1, -jnp.inf, jnp.take_along_axis(ascending, index, axis=-1))
    p_fits = (top_p >= 1) | (tail / total < 1 - top_p)  # (B, 1)
    return kth, nucleus, jnp.all(k_fits), jnp.all(k_fits & p_fits)


def _float_keys(values: jax.Array) -> jax.Array:
    """int32 keys in the order of the float32 values (-0.0 folded into +0.0)."""
    bits = jax.lax.bitcast_convert_type(values + 0.0, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _key_value(keys: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ 0x7FFFFFFF, keys), jnp.float32)


def _smallest_key(keys: jax.Array, reaches) -> jax.Array:
    """Per row, the smallest key K (B, 1) with ``reaches(K)`` (monotone in K), found by
    bisection over the int32 key range in 32 passes over the row; the row's largest
    key when none reaches. This is a selection without a sort."""
    def step(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # (B, 1) floor midpoint, no overflow
        ok = reaches(mid)  # (B, 1)
        return jnp.where(ok, lo, jnp.minimum(mid + 1, hi)), jnp.where(ok, mid, hi)
    bounds = (jnp.min(keys, axis=-1, keepdims=True), jnp.max(keys, axis=-1, keepdims=True))
    return jax.lax.fori_loop(0, 32, step, bounds)[1]  # (B, 1)


def _bisected_kth(scaled, top_k):
    """The k-th largest value per row (B, 1): the smallest key K with fewer than k
    logits above it, found by bisection; -inf where k is 0 (no top-k)."""
    keys = _float_keys(scaled)  # (B, V)
    above = lambda k: jnp.sum(keys > k, axis=-1, keepdims=True) <= top_k - 1  # noqa: E731
    return jnp.where(top_k <= 0, -jnp.inf, _key_value(_smallest_key(keys, above)))  # (B, 1)


def _bisected_nucleus(scaled, top_p, kth):
    """The reference's nucleus threshold among the logits >= ``kth``, by bisection:
    the smallest value v whose mass at or below it reaches ``1 - p`` (a tie group
    is entered at its first member in the reference's ascending order, so this is
    the value at the reference's index); -inf where p is 1."""
    kept = jnp.where(scaled >= kth, scaled, DISALLOWED_LOGIT)  # (B, V)
    keys = _float_keys(kept)  # (B, V)
    weights = jnp.exp(kept - jnp.max(kept, axis=-1, keepdims=True))  # (B, V)
    target = (1 - top_p) * jnp.sum(weights, axis=-1, keepdims=True)  # (B, 1)
    mass = lambda k: jnp.sum(jnp.where(keys <= k, weights, 0.0), axis=-1, keepdims=True)  # noqa: E731
    nucleus = _key_value(_smallest_key(keys, lambda k: mass(k) >= target))  # (B, 1)
    return jnp.where(top_p >= 1, -jnp.inf, nucleus)


def filter_logits(logits: jax.Array, temperature, top_p, top_k) -> jax.Array:
    """Temperature-scaled logits with filtered-out tokens set to ``DISALLOWED_LOGIT``.

    logits: float32 (B, V). temperature/top_p/top_k: scalars or (B,) arrays.
    ``softmax`` of the result is exactly the distribution ``sample`` draws
    from. Rows with temperature 0 keep only their largest logit(s), unscaled
    (a point mass on the argmax, up to ties), so the result stays finite.

    A full sort of a 131072 vocabulary costs about 50 ms on a CPU, so nothing
    here sorts: the thresholds come from the ``SELECTION_CAP`` largest logits
    (``lax.top_k``, under 1 ms), and when a row's top_k exceeds the cap or its
    nucleus needs more tokens than the cap holds, from a bisection on the
    values (32 passes over the row for each threshold that needs it). The cap never changes a result,
    only the time; the kept set can differ from ``filter_logits_sorted`` only
    where a cumulative probability lies within float32 rounding (about 1e-7 of
    the total) of ``1 - p``, as the summation order differs.
    """
    scaled, top_p, top_k = _scaled_logits(logits, temperature, top_p, top_k)
    cap = min(SELECTION_CAP, scaled.shape[-1])
    kth, nucleus, k_fits, fits = _capped_thresholds(scaled, top_p, top_k, cap)
    kth = jax.lax.cond(k_fits, lambda: kth, lambda: _bisected_kth(scaled, top_k))  # (B, 1)
    nucleus = jax.lax.cond(fits, lambda: nucleus,
                           lambda: _bisected_nucleus(scaled, top_p, kth))  # (B, 1)
    return jnp.where((scaled >= kth) & (scaled >= nucleus), scaled, DISALLOWED_LOGIT)  # (B, V)


def argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` as int32 (B,): the first index of each row's maximum
    (or of its first NaN, as ``jnp.argmax``).

    Two plain reductions instead of ``jnp.argmax``'s (value, index) reduce, which
    XLA:CPU runs about 4x slower (1.27 vs 0.28 ms on 4 x 131072): greedy decoding
    and every draw end in one of these.
    """
    peak = jnp.max(x, axis=-1, keepdims=True)  # (B, 1)
    hit = (x == peak) | jnp.isnan(x)  # (B, V)
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)  # (V,)
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)  # (B,)


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """``jax.random.categorical(key, logits, axis=-1)``, the same draws: it is
    ``argmax(logits + gumbel(key, logits.shape))``, with the faster ``argmax``."""
    return argmax(logits + jax.random.gumbel(key, logits.shape, logits.dtype))  # (B,)


def sample(logits: jax.Array, key: jax.Array, temperature, top_p, top_k) -> jax.Array:
    """Draw one token id per row: int32 (B,). Jit-friendly, nothing static but shapes.

    logits: float32 (B, V); key: one PRNG key for the whole batch (typed or
    raw). Rows whose temperature is 0 return ``argmax(logits)`` (first index
    on ties); the choice is a ``jnp.where``, so it costs no recompilation.
    A ``lax.switch`` skips the filters when every row is greedy or unfiltered
    (top_k 0, top_p 1): the same draws, without the selection.
    """
    logits = jnp.asarray(logits, jnp.float32)
    batch = logits.shape[0]
    temp = _per_row(temperature, batch, jnp.float32)  # (B, 1)
    greedy = temp[:, 0] <= 0  # (B,)
    unfiltered = (_per_row(top_k, batch, jnp.int32) <= 0) & (_per_row(top_p, batch, jnp.float32) >= 1)

    def full(_):
        filtered = filter_logits(logits, temperature, top_p, top_k)  # (B, V)
        return categorical(key, filtered)

    def plain(_):
        return categorical(key, logits / jnp.where(temp <= 0, 1.0, temp))

    best = argmax(logits)  # (B,)
    branch = jnp.where(jnp.all(greedy), 0, jnp.where(jnp.all(unfiltered), 1, 2))
    drawn = jax.lax.switch(branch, [lambda _: best, plain, full], None)  # (B,)
    return jnp.where(greedy, best, drawn).astype(jnp.int32)  # (B,)
