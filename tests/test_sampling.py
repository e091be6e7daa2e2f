"""Sampling against an independent numpy reading of SPEC.md section 3.

The reference below is written as explicit per-row loops (sorted lists, a
running cumulative sum) rather than vectorized masks, so it shares no code or
structure with lowmem.sampling.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowmem import sampling
from lowmem.sampling import DISALLOWED_LOGIT, SamplingParams, filter_logits, sample

NEG = np.float32(-1e10)

# Shared jitted entry points: the settings are traced, so each compiles once per
# shape/dtype signature for the whole module (eager op-by-op dispatch is slow).
jit_filter = jax.jit(lambda *args: filter_logits(*args))
jit_sample = jax.jit(lambda *args: sample(*args))
jit_draw_many = jax.jit(jax.vmap(lambda row, key, t, p, k: sample(row[None, :], key, t, p, k)[0],
                                 in_axes=(None, 0, None, None, None)))


def reference_filter_row(row, temperature, top_p, top_k):
    """One row of SPEC section 3 (+ top-k before top-p), written as plain loops."""
    row = np.asarray(row, np.float32)
    if temperature == 0:  # greedy: a point mass on the maximum (ties kept)
        best = max(row)
        return np.array([x if x == best else NEG for x in row], np.float32)
    scaled = row / np.float32(temperature)
    if top_k > 0:
        kth = sorted(scaled, reverse=True)[min(top_k, len(scaled)) - 1]
        scaled = np.array([x if x >= kth else NEG for x in scaled], np.float32)
    ascending = sorted(float(x) for x in scaled)
    top = ascending[-1]
    weights = [math.exp(x - top) for x in ascending]
    total = sum(weights)
    threshold, running = ascending[-1], 0.0
    for value, weight in zip(ascending, weights):
        running += weight / total
        if running >= 1 - top_p:
            threshold = value
            break
    return np.array([x if x >= threshold else NEG for x in scaled], np.float32)


def reference_filter(logits, temperature, top_p, top_k):
    return np.stack([reference_filter_row(r, temperature, top_p, top_k) for r in logits])


def random_logits(seed, batch=8, vocab=40):
    """Half the rows continuous, half drawn from a coarse grid (many exact ties)."""
    rng = np.random.default_rng(seed)
    smooth = rng.normal(0, 2, (batch // 2, vocab))
    tied = rng.integers(-6, 6, (batch - batch // 2, vocab)) / 2
    return np.concatenate([smooth, tied]).astype(np.float32)


def assert_same_filter(got, want):
    """Same kept set exactly; kept values equal up to 1 ulp (XLA may divide by
    the temperature as a multiply by its reciprocal)."""
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(got > NEG, want > NEG)
    np.testing.assert_array_equal(got[got == NEG], want[got == NEG])
    np.testing.assert_allclose(got, want, rtol=2.5e-7, atol=0)


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------- filter_logits

@pytest.mark.parametrize("top_k", [0, 1, 5])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_filter_logits_matches_reference(temperature, top_p, top_k):
    logits = random_logits(seed=int(temperature * 10) + int(top_p * 100) + top_k)
    got = jit_filter(logits, temperature, top_p, top_k)
    assert_same_filter(got, reference_filter(logits, temperature, top_p, top_k))


def test_filter_logits_hand_computed_nucleus():
    # probabilities 0.1 0.2 0.3 0.4; ascending cumsum 0.1 0.3 0.6 1.0
    logits = np.log(np.array([[0.3, 0.1, 0.4, 0.2]], np.float32))
    for top_p, kept in [(0.35, [2]), (0.5, [0, 2]), (0.75, [0, 2, 3]), (0.95, [0, 1, 2, 3])]:
        got = np.asarray(filter_logits(logits, 1.0, top_p, 0))[0]
        assert sorted(np.flatnonzero(got > DISALLOWED_LOGIT)) == kept, top_p
        np.testing.assert_array_equal(got[kept], logits[0, kept])
        assert np.all(got[[i for i in range(4) if i not in kept]] == NEG)


def test_top_p_one_keeps_tokens_whose_probability_underflows():
    # float32 softmax gives exactly 0 to the -200 logit; cumsum 0 >= 1 - 1.0 still selects it
    logits = np.array([[0.0, -200.0, 0.0, -150.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(jit_filter(logits, 1.0, 1.0, 0)), logits)
    kept = np.asarray(jit_filter(logits, 1.0, 0.999, 0))[0] > DISALLOWED_LOGIT
    np.testing.assert_array_equal(kept, [True, False, True, False])


def test_filter_logits_keeps_ties_at_thresholds():
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 2.0, 0.0]], np.float32)
    kept_k2 = np.asarray(filter_logits(logits, 1.0, 1.0, 2))[0] > DISALLOWED_LOGIT
    np.testing.assert_array_equal(kept_k2, [False, True, False, True, False, False])
    kept_k3 = np.asarray(filter_logits(logits, 1.0, 1.0, 3))[0] > DISALLOWED_LOGIT
    np.testing.assert_array_equal(kept_k3, [False, True, True, True, True, False])
    # the smallest nucleus reaching p = 0.01 lands inside the tie at 3.0: both kept
    kept_p = np.asarray(filter_logits(logits, 1.0, 0.01, 0))[0] > DISALLOWED_LOGIT
    np.testing.assert_array_equal(kept_p, [False, True, False, True, False, False])


def test_filter_logits_per_row_settings_and_greedy_rows():
    logits = random_logits(seed=7, batch=4)
    temperature = np.array([1.0, 0.0, 0.5, 2.0], np.float32)
    top_p = np.array([0.9, 0.5, 1.0, 0.3], np.float32)
    top_k = np.array([0, 3, 5, 1], np.int32)
    got = np.asarray(filter_logits(logits, temperature, top_p, top_k))
    for b in range(4):
        want = reference_filter_row(logits[b], temperature[b], top_p[b], top_k[b])
        assert_same_filter(got[b], want)


def test_vanishing_top_p_keeps_only_the_maximum():
    logits = random_logits(seed=3)
    got = np.asarray(jit_filter(logits, 1.0, 1e-9, 0))
    np.testing.assert_array_equal(got, reference_filter(logits, 0.0, 1.0, 0))


def test_top_k_larger_than_vocab_keeps_everything():
    logits = random_logits(seed=4, vocab=10)
    np.testing.assert_array_equal(np.asarray(jit_filter(logits, 1.0, 1.0, 50)), logits)


def test_filter_logits_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        filter_logits(np.zeros(5, np.float32), 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="scalars or shape"):
        filter_logits(np.zeros((2, 5), np.float32), np.ones((2, 1)), 1.0, 0)


# ---------------------------------------------------------------- distributions

N_SAMPLES = 20000


def draw_many(row, seed, temperature, top_p, top_k, n=N_SAMPLES):
    """n independent draws for one logits row, one key each (vmap over keys)."""
    keys = jax.random.split(jax.random.key(seed), n)
    return np.asarray(jit_draw_many(row, keys, float(temperature), float(top_p), int(top_k)))


def assert_matches_distribution(tokens, probs):
    counts = np.bincount(tokens, minlength=len(probs))
    assert len(counts) == len(probs)
    freq = counts / len(tokens)
    # 5 sigma of a binomial proportion, plus one count for the discreteness
    bound = 5 * np.sqrt(probs * (1 - probs) / len(tokens)) + 1 / len(tokens)
    assert np.all(np.abs(freq - probs) <= bound), (freq, probs)
    assert np.all(counts[probs == 0] == 0), "a filtered-out token was sampled"


ROW = np.array([2.0, 1.5, 1.5, 0.5, 0.0, -0.5, -1.0, -3.0, 1.0, 0.2], np.float32)


@pytest.mark.parametrize("temperature,top_p,top_k", [
    (1.0, 1.0, 0), (1.0, 0.8, 0), (0.7, 0.9, 5), (1.3, 1.0, 3), (1.0, 0.5, 0),
])
def test_sampled_frequencies_match_filtered_softmax(temperature, top_p, top_k):
    probs = softmax64(reference_filter_row(ROW, temperature, top_p, top_k))
    tokens = draw_many(ROW, seed=11, temperature=temperature, top_p=top_p, top_k=top_k)
    assert_matches_distribution(tokens, probs)
    if top_p < 1 or top_k:
        assert np.count_nonzero(probs) < len(ROW)  # the filter really removed tokens


def test_temperature_reshapes_the_distribution():
    top_freq = []
    for temperature in [0.5, 1.0, 2.0]:
        tokens = draw_many(ROW, seed=5, temperature=temperature, top_p=1.0, top_k=0)
        assert_matches_distribution(tokens, softmax64(ROW / temperature))
        top_freq.append(np.mean(tokens == 0))
    assert top_freq[0] > top_freq[1] > top_freq[2]


def test_batch_rows_are_sampled_independently_with_one_key():
    logits = np.broadcast_to(ROW, (N_SAMPLES, len(ROW)))
    tokens = np.asarray(jit_sample(logits, jax.random.key(2), 1.0, 0.9, 0))
    assert_matches_distribution(tokens, softmax64(reference_filter_row(ROW, 1.0, 0.9, 0)))


# ---------------------------------------------------------------- greedy and seeds

def test_greedy_returns_argmax_whatever_the_filters():
    logits = random_logits(seed=9, batch=16, vocab=64)  # tied rows: first max index
    want = [int(np.flatnonzero(r == r.max())[0]) for r in logits]
    for top_p, top_k in [(1.0, 0), (0.1, 1), (0.5, 7)]:
        for seed in range(3):
            got = jit_sample(logits, jax.random.key(seed), 0.0, top_p, top_k)
            assert got.dtype == jnp.int32
            assert np.asarray(got).tolist() == want


def test_per_row_greedy_mixes_with_sampling():
    logits = np.stack([ROW, ROW, ROW[::-1].copy()])
    temperature = np.array([0.0, 1.0, 0.0], np.float32)
    for seed in range(20):
        got = np.asarray(jit_sample(logits, jax.random.key(seed), temperature, 1.0, 0))
        assert got[0] == 0 and got[2] == len(ROW) - 1


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = np.broadcast_to(ROW, (200, len(ROW)))
    run = jit_sample
    a = np.asarray(run(logits, jax.random.key(123), 1.0, 1.0, 0))
    b = np.asarray(run(logits, jax.random.key(123), 1.0, 1.0, 0))
    c = np.asarray(run(logits, jax.random.key(124), 1.0, 1.0, 0))
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.3  # two independent draws differ ~80% of the time here
    raw = np.asarray(run(logits, jax.random.PRNGKey(123), 1.0, 1.0, 0))  # raw uint32 key
    np.testing.assert_array_equal(raw, np.asarray(run(logits, jax.random.PRNGKey(123), 1.0, 1.0, 0)))


# ---------------------------------------------------------------- compilation

def test_changing_settings_does_not_recompile():
    traces = []

    def counted(logits, key, temperature, top_p, top_k):
        traces.append(1)  # runs only while tracing
        return sample(logits, key, temperature, top_p, top_k)

    run = jax.jit(counted)
    logits = random_logits(seed=1)
    settings = [SamplingParams(), SamplingParams(temperature=0.3, top_p=0.5, top_k=5),
                SamplingParams(temperature=0.0, top_k=3), SamplingParams(temperature=0.0, top_p=0.9),
                SamplingParams(temperature=2.0, top_k=1)]
    outputs = [np.asarray(run(logits, jax.random.key(0), *p.as_args())) for p in settings]
    assert len(traces) == 1 and run._cache_size() == 1
    want_greedy = logits.argmax(-1)
    np.testing.assert_array_equal(outputs[2], want_greedy)
    np.testing.assert_array_equal(outputs[3], want_greedy)
    # Python scalars of a consistent kind do not recompile either
    plain = jax.jit(lambda *args: sample(*args))  # jax.jit(sample) shares a cache across tests
    for t, p, k in [(1.0, 1.0, 0), (0.5, 0.2, 3), (0.0, 0.7, 9)]:
        plain(logits, jax.random.key(1), t, p, k)
    assert plain._cache_size() == 1


# ---------------------------------------------------------------- SamplingParams

def test_sampling_params_defaults_and_args():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.is_greedy) == (1.0, 1.0, 0, False)
    t, top_p, k = SamplingParams(temperature=0.01, top_p=0.9, top_k=40).as_args()
    assert (t.dtype, top_p.dtype, k.dtype) == (np.float32, np.float32, np.int32)
    assert (float(t), float(top_p), int(k)) == (np.float32(0.01), np.float32(0.9), 40)
    assert SamplingParams(temperature=0).is_greedy
    assert float(SamplingParams(temperature=0).as_args()[0]) == 0.0


@pytest.mark.parametrize("kwargs,field", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_p=-0.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(temperature="1"), "temperature"),
])
def test_sampling_params_rejects_out_of_range(kwargs, field):
    with pytest.raises(ValueError, match=f"{field} must be"):
        SamplingParams(**kwargs)


# ---------------------------------------------------------------- partial selection

jit_sorted = jax.jit(lambda *args: sampling.filter_logits_sorted(*args))


def filter_with_cap(cap, *example):
    """filter_logits compiled with SELECTION_CAP = cap (read at trace time)."""
    old, sampling.SELECTION_CAP = sampling.SELECTION_CAP, cap
    try:
        return jax.jit(lambda *args: filter_logits(*args)).lower(*example).compile()
    finally:
        sampling.SELECTION_CAP = old


@pytest.mark.parametrize("cap", [4, 64, 1024])
def test_capped_and_bisected_filters_equal_the_full_sort(cap):
    """The selection (top_k within the cap, bisection beyond it) keeps exactly the
    full-sort reference's tokens on random logits, smooth and tied, for many settings."""
    fallbacks, run = 0, None
    for seed in range(12):
        logits = random_logits(seed, batch=4, vocab=3000) * (1 + seed % 3)
        run = run or filter_with_cap(cap, logits, np.float32(1), np.float32(1), np.int32(0))
        rng = np.random.default_rng(seed)
        for _ in range(4):
            t = np.float32(rng.choice([0.0, 0.5, 1.0, 1.7]))
            p = np.float32(rng.choice([0.05, 0.5, 0.9, 0.95, 0.999, 1.0]))
            k = np.int32(rng.choice([0, 1, 3, 40, 500, 5000]))
            want = np.asarray(jit_sorted(logits, t, p, k))
            assert_same_filter(run(logits, t, p, k), want)
            scaled, p_col, k_col = sampling._scaled_logits(logits, t, p, k)
            fallbacks += not bool(sampling._capped_thresholds(scaled, p_col, k_col, cap)[3])
    assert fallbacks > 0 if cap < 1024 else True  # small caps exercise the bisection


def test_bisection_matches_reference_on_hand_ties():
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 2.0, 0.0, -0.0, 0.0]], np.float32)
    for p, k in [(1.0, 2), (1.0, 3), (0.01, 0), (0.5, 0), (0.9, 5), (0.999, 0), (1.0, 20)]:
        scaled, p_col, k_col = sampling._scaled_logits(logits, 1.0, p, k)
        kth = sampling._bisected_kth(scaled, k_col)
        nucleus = sampling._bisected_nucleus(scaled, p_col, kth)
        got = np.where((logits >= kth) & (logits >= nucleus), logits, NEG)
        assert_same_filter(got, reference_filter(logits, 1.0, p, k))


def test_sampling_131072_vocab_same_tokens_as_full_sort():
    """Same key, same token as drawing from the full-sort filter, on a vocabulary-wide
    row whose nucleus fits the cap and one whose nucleus does not."""
    rng = np.random.default_rng(0)
    peaked = (rng.normal(0, 1, 131072) - 8 * (np.arange(131072) > 50)).astype(np.float32)
    flat = rng.normal(0, 1, 131072).astype(np.float32)
    sorted_draw = jax.jit(lambda row, key, t, p, k: jax.random.categorical(
        key, sampling.filter_logits_sorted(row[None], t, p, k), axis=-1)[0])
    for row in (peaked, flat):
        for seed, (t, p, k) in enumerate([(1.0, 0.95, 0), (0.7, 0.9, 40), (1.2, 0.5, 3000)]):
            key = jax.random.key(seed)
            got = int(jit_sample(row[None], key, t, p, k)[0])
            assert got == int(sorted_draw(row, key, np.float32(t), np.float32(p), np.int32(k)))


def test_argmax_and_categorical_equal_jax():
    """The two-reduction argmax is jnp.argmax (first index on ties, first NaN), and
    categorical draws exactly jax.random.categorical's tokens."""
    rng = np.random.default_rng(3)
    rows = rng.normal(0, 2, (5, 4099)).astype(np.float32)
    rows[1, [7, 900, 4000]] = rows[1].max() + 1.0  # ties: the first index wins
    rows[2, [11, 300]] = np.nan
    rows[3] = np.round(rows[3])  # many ties everywhere
    assert np.array_equal(np.asarray(sampling.argmax(jnp.asarray(rows))),
                          np.argmax(rows, axis=-1))
    finite = jnp.asarray(np.nan_to_num(rows))
    for seed in range(20):
        key = jax.random.key(seed)
        assert np.array_equal(np.asarray(sampling.categorical(key, finite)),
                              np.asarray(jax.random.categorical(key, finite, axis=-1)))
