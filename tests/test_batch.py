"""Batched decode and continuous batching against solo runs of the same requests.

The reference is ``lowmem.decoding.generate_tokens`` on a plain Engine: a
request run in a batch, joining and leaving between steps, must give exactly
the tokens (and the PRNG draws) it gives alone.
"""
import threading
import time
from functools import partial

import jax
import numpy as np
import pytest

from lowmem.batch import BatchEngine, sample_rows, seed_key_data
from lowmem.decoding import GenerationRequest, generate_tokens
from lowmem.engine import Engine, EngineError, EngineOptions
from lowmem.sampling import SamplingParams, sample
from helpers import Compiles
from lowmem.scheduler import QueueFull, Request, Scheduler
from quant.packed import PackedModel, QuantSettings
from quant.pipeline import quantize_checkpoint

PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 300], [11, 12, 13], [400, 1, 2, 77, 77, 8], [9],
           list(range(20, 60))]   # 40 tokens: three chunks with buckets (4, 16)


@pytest.fixture(scope="module")
def model(tiny_cfg, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "int4"
    quantize_checkpoint(tiny_ckpt, out, tiny_cfg, QuantSettings(4, 32))
    return PackedModel.open(out)


def _engine(model, backend):
    # small prefill buckets: long prompts are prefilled in several chunks
    return Engine(model, EngineOptions(backend=backend, expert_cache_gb=1.0, context=64,
                                       prefill_buckets=(4, 16)))


def _solo(engine, req: Request) -> list[int]:
    gen = GenerationRequest(max_new_tokens=req.max_tokens, sampling=req.sampling, seed=req.seed,
                            stop_at_eos=req.stop_at_eos)
    return list(generate_tokens(engine, list(req.prompt_ids), gen))


def _run_all(sched: Scheduler, reqs, max_steps=500):
    """Submit every request, step the scheduler until all are done (bounded)."""
    events = [[] for _ in reqs]
    seqs = [sched.submit(r, events[i].append) for i, r in enumerate(reqs)]
    for _ in range(max_steps):
        if all(s.finished for s in seqs):
            break
        sched.step()
    assert all(s.finished for s in seqs)
    return [[e[1] for e in ev if e[0] == "token"] for ev in events], events


def _mixed_requests():
    greedy = SamplingParams(temperature=0.0)
    return [Request(tuple(PROMPTS[0]), 6, greedy, 0, False),
            Request(tuple(PROMPTS[1]), 3, SamplingParams(0.9, 0.8, 0), 7, False),
            Request(tuple(PROMPTS[2]), 8, SamplingParams(1.3, 1.0, 5), 123, False),
            Request(tuple(PROMPTS[3]), 5, SamplingParams(0.7), 1, False),
            Request(tuple(PROMPTS[4]), 4, greedy, 0, False),
            Request(tuple(PROMPTS[1]), 7, SamplingParams(1.0), 99, False)]


@pytest.mark.parametrize("backend", ["host", "device"])
def test_identical_greedy_batch_equals_single_runs(model, backend):
    engine = _engine(model, backend)
    req = Request(tuple(PROMPTS[0]), 6, SamplingParams(temperature=0.0), 0, False)
    solo = _solo(engine, req)
    sched = Scheduler(BatchEngine(engine, 4), max_queue=8)
    tokens, events = _run_all(sched, [req] * 4)
    assert tokens == [solo] * 4
    assert all(ev[-1] == ("done", "length", None) for ev in events)


@pytest.mark.parametrize("backend", ["host", "device"])
def test_mixed_lengths_settings_seeds_equal_single_runs(model, backend):
    engine = _engine(model, backend)
    reqs = _mixed_requests()
    solo = [_solo(engine, r) for r in reqs]
    # 5 slots for 6 requests: they queue, join as others leave, prefill between decodes,
    # and steps of 3 sequences are padded to 4 rows with a free slot
    batch = BatchEngine(engine, 5)
    assert batch.batch_sizes == (1, 2, 4, 5)
    tokens, _ = _run_all(Scheduler(batch, max_queue=8), reqs)
    assert tokens == solo
    assert [len(t) for t in tokens] == [r.max_tokens for r in reqs]


def test_logprobs_are_the_models_log_softmax(model):
    engine = _engine(model, "host")
    req = Request(tuple(PROMPTS[1]), 1, SamplingParams(temperature=0.0), 0, False)
    _, events = _run_all(Scheduler(BatchEngine(engine, 1)), [req])
    engine.reset()
    logits = np.asarray(engine.feed(PROMPTS[1]), np.float64)
    expected = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    token, logprob = events[0][0][1], events[0][0][2]
    assert token == int(np.argmax(logits))
    assert logprob == pytest.approx(expected[token], abs=1e-4)


def test_top_logprobs_are_the_likeliest_tokens_of_each_step(model):
    """Requested alternatives: the N largest of the solo run's log-softmax at each position,
    most likely first; a request that asks for none gets none (in the same steps)."""
    engine = _engine(model, "host")
    want_n = 4
    reqs = [Request(tuple(PROMPTS[0]), 3, SamplingParams(temperature=0.9), 5, False, want_n),
            Request(tuple(PROMPTS[2]), 3, SamplingParams(temperature=0.0), 0, False)]
    tokens, events = _run_all(Scheduler(BatchEngine(engine, 2)), reqs)
    assert all(e[3] == () for e in events[1] if e[0] == "token")
    engine.reset()
    logits = engine.feed(PROMPTS[0])
    for token, event in zip(tokens[0], [e for e in events[0] if e[0] == "token"]):
        x = np.asarray(logits, np.float64)
        lsm = x - x.max() - np.log(np.exp(x - x.max()).sum())
        top = event[3]
        assert [t for t, _ in top] == list(np.argsort(-lsm, kind="stable")[:want_n])
        np.testing.assert_allclose([v for _, v in top], lsm[[t for t, _ in top]], atol=1e-4)
        assert event[2] == pytest.approx(lsm[token], abs=1e-4)
        logits = engine.feed([token])
    with pytest.raises(EngineError, match="top_logprobs"):
        Scheduler(BatchEngine(engine, 1)).check(Request((1, 2), 2, top_logprobs=21))


@pytest.mark.parametrize("backend", ["host", "device"])
def test_each_expert_requested_once_per_step_for_the_whole_batch(model, backend):
    engine = Engine(model, EngineOptions(backend=backend, expert_cache_gb=1.0, context=64,
                                         record_routing=True, prefetch=False))
    batch = BatchEngine(engine, 4)
    for slot, prompt in enumerate(PROMPTS[:4]):
        batch.prefill(slot, prompt[:4])
    engine.routing_trace.clear()
    before = engine.expert_stats.requests
    batch.decode([0, 1, 2, 3], [5, 6, 7, 8])
    trace = engine.routing_trace
    assert [layer for layer, _ in trace] == list(range(model.cfg.num_layers))
    assert all(experts.shape == (4, model.cfg.num_selected_experts) for _, experts in trace)
    union = sum(len(np.unique(experts)) for _, experts in trace)
    assert engine.expert_stats.requests - before == union
    assert union < 4 * model.cfg.num_selected_experts * model.cfg.num_layers


def test_queue_bound_and_bad_requests(model):
    sched = Scheduler(BatchEngine(_engine(model, "host"), 1), max_queue=2)
    ok = Request((1, 2, 3), 2, SamplingParams(temperature=0.0))
    sched.submit(ok, lambda e: None)
    sched.submit(ok, lambda e: None)
    with pytest.raises(QueueFull):
        sched.submit(ok, lambda e: None)
    with pytest.raises(EngineError, match="context of 64"):
        sched.check(Request(tuple(range(1, 65)), 2))
    with pytest.raises(EngineError, match="empty"):
        sched.check(Request((), 2))
    with pytest.raises(EngineError, match=r"\[0, 512\)"):
        sched.check(Request((1, 512), 2))


def test_cancelled_sequence_frees_its_slot_within_one_step(model):
    sched = Scheduler(BatchEngine(_engine(model, "host"), 1), max_queue=4)
    events = []
    first = sched.submit(Request((1, 2, 3), 50, SamplingParams(temperature=0.0)), events.append)
    second = sched.submit(Request((4, 5), 2, SamplingParams(temperature=0.0)), lambda e: None)
    for _ in range(3):
        sched.step()
    assert first.slot == 0 and second.slot is None
    sched.cancel(first)
    sched.step()
    assert events[-1] == ("done", "cancelled", None)
    assert second.slot == 0


def test_decode_rejects_bad_slots(model):
    batch = BatchEngine(_engine(model, "host"), 2)
    with pytest.raises(EngineError, match="distinct"):
        batch.decode([0, 0], [1, 2])
    with pytest.raises(EngineError, match="distinct"):
        batch.decode([0, 1, 2], [1, 2, 3])


def test_padded_step_gives_the_rows_of_the_exact_step(model):
    engine = _engine(model, "host")
    exact, padded = BatchEngine(engine, 3), BatchEngine(engine, 4)
    for batch in (exact, padded):
        for slot, prompt in enumerate(PROMPTS[:3]):
            batch.prefill(slot, prompt[:4])
    want = np.asarray(exact.decode([0, 1, 2], [5, 6, 7]))
    got = np.asarray(padded.decode([0, 1, 2], [5, 6, 7], spare=[3]))
    assert got.shape == want.shape == (3, model.cfg.vocab_size)
    np.testing.assert_array_equal(got, want)
    assert [padded.position(s) for s in range(3)] == [5, 4, 5]   # prompts of 4, 3, 4


def test_batched_rows_give_the_logits_of_solo_steps(model):
    """Each row of a batched decode step (per-row attention, shared projections, MoE and
    logits) against the same sequence stepped alone on a plain engine."""
    engine = _engine(model, "host")
    batch = BatchEngine(engine, 4)
    prompts, tokens = [p[:4] for p in PROMPTS[:3]], [5, 6, 7]
    for slot, prompt in enumerate(prompts):
        batch.prefill(slot, prompt)
    got = np.asarray(batch.decode([0, 1, 2], tokens, spare=[3]))                # (3, V)
    assert got.shape == (3, model.cfg.vocab_size)
    for row, (prompt, token) in enumerate(zip(prompts, tokens)):
        engine.reset()
        engine.feed(prompt)
        want = np.asarray(engine.feed([token]))
        # the numba products of B rows accumulate in another order than of one row
        # (measured: up to 3e-6 absolute on logits of magnitude 15), hence a tolerance
        np.testing.assert_allclose(got[row], want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert int(np.argmax(got[row])) == int(np.argmax(want))


def test_fused_qkv_callback_gives_the_three_products_exactly(model):
    """host_qkv (one callback) against the numba kernel called on each weight directly."""
    import jax

    from lowmem.backends import host_qkv
    from lowmem.cpu_kernels import matmul
    engine = _engine(model, "host")
    lp, weights = engine.layers[1], engine.backend.weights[1]
    x = np.random.default_rng(0).standard_normal((3, model.cfg.emb_size)).astype(np.float32)
    got = jax.jit(lambda x: host_qkv(x, lp["q"], lp["k"], lp["v"], "fp32"))(x)
    for role, out in zip("qkv", got):
        np.testing.assert_array_equal(np.asarray(out), matmul(x, weights[role],
                                                              act_int8=engine.backend.a8(3)))


@pytest.mark.parametrize("backend", ["host", "device"])
def test_warm_up_compiles_every_shape_and_leaves_the_slots_clean(model, backend):
    """After ``warm_up``, requests at every concurrency 1..max_batch (mixed prompt lengths,
    settings and top_logprobs, joining while others prefill) compile nothing, and each
    gives exactly the tokens of a fresh engine's solo run (the warmed slots are reset).
    The steps mix decode rows with several prompt chunks (up to 12 prompt tokens a step).
    Buckets and context of its own (5, 12; 48 tokens): no shape is shared with what
    earlier tests compiled, so none can hide a shape the warm-up misses. (Emptying
    JAX's caches instead made every later test compile again: minutes of CI.)"""
    batch = BatchEngine(Engine(model, EngineOptions(backend=backend, expert_cache_gb=1.0,
                                                    context=48, prefill_buckets=(5, 12))), 5)
    with Compiles() as warm:
        seconds = batch.warm_up()
    assert warm.count > 0 and seconds > 0
    assert all(batch.position(s) == 0 for s in range(5))
    sched = Scheduler(batch, max_queue=16)
    reqs = [Request(tuple(PROMPTS[i % 5]), 3 + i % 3, SamplingParams(0.9 * (i % 2), 0.8, i % 4),
                    seed=i, stop_at_eos=False, top_logprobs=i % 3) for i in range(5)]
    with Compiles() as serving:
        got = [_run_all(sched, reqs[:c])[0] for c in range(1, 6)]
    assert serving.count == 0
    fresh = Engine(model, EngineOptions(backend=backend, expert_cache_gb=1.0, context=48,
                                        prefill_buckets=(5, 12)))
    want = [_solo(fresh, r) for r in reqs]
    for c, tokens in enumerate(got, 1):
        assert tokens == want[:c], c


def test_warm_up_stops_when_cancelled(model):
    """A shutdown during the warm-up: the next step is not run (nothing compiles)."""
    batch, asked = BatchEngine(_engine(model, "host"), 3), []
    with Compiles() as warm:
        batch.warm_up(cancelled=lambda: asked.append(1) or True)
    assert warm.count == 0 and len(asked) == 2      # once before the chunks, once before decode
    # padded with free slots to a batch size (1, 2, 4, 5), and unpadded where that differs
    assert BatchEngine(batch.engine, 5)._decode_shapes() == [
        (1, [1, 2, 3, 4]), (2, [2, 3, 4]), (3, [3, 4]), (3, []), (4, [4]), (5, [])]


@pytest.mark.parametrize("backend", ["host", "device"])
def test_step_mixes_prompt_chunks_with_decode_rows(model, backend):
    """One step of 2 decode rows and 2 prompt chunks (one ending its prompt, one not) gives
    the logits of separate decode and prefill calls on the same states, and (host) reads
    each expert once per layer for all rows: the union of the groups' experts."""
    cfg = model.cfg
    mixed, apart = (BatchEngine(Engine(model, EngineOptions(
        backend=backend, expert_cache_gb=1.0, context=64, prefill_buckets=(4, 16),
        record_routing=True, prefetch=False)), 4) for _ in range(2))
    for batch in (mixed, apart):
        for slot in (0, 1):
            batch.prefill(slot, PROMPTS[slot][:4])
    want_dec = np.asarray(apart.decode([0, 1], [5, 6]))                          # (2, V)
    want_end = np.asarray(apart.prefill(2, PROMPTS[2]))                          # (V,)
    apart.step([], [], [(3, PROMPTS[4][:16], False)])
    mixed.engine.routing_trace.clear()
    before = mixed.engine.expert_stats.requests
    got = np.asarray(mixed.step([0, 1], [5, 6], [(2, PROMPTS[2], True),
                                                 (3, PROMPTS[4][:16], False)]))   # (3, V)
    assert got.shape == (3, cfg.vocab_size)
    # the numba products of more rows accumulate in another order (see the test above)
    for g, w in zip(got, list(want_dec) + [want_end]):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())
        assert int(np.argmax(g)) == int(np.argmax(w))
    assert [mixed.position(s) for s in range(4)] == [5, 4, 6, 16]
    trace = mixed.engine.routing_trace
    assert [layer for layer, _ in trace] == list(range(cfg.num_layers))
    # the last layer's MoE runs on the decode rows and the last row of the chunk that
    # wants logits; the other chunk's outputs are never read there (Engine.last_row)
    assert [experts.shape for _, experts in trace] == (
        [(2 + 6 + 16, cfg.num_selected_experts)] * (cfg.num_layers - 1)
        + [(2 + 1, cfg.num_selected_experts)])
    if backend == "host":
        union = sum(len(np.unique(experts)) for _, experts in trace)
        assert mixed.engine.expert_stats.requests - before == union
    # the next decode of every slot goes on from the mixed step's caches exactly
    np.testing.assert_allclose(np.asarray(mixed.decode([2, 3], [7, 8])),
                               np.asarray(apart.decode([2, 3], [7, 8])), rtol=0, atol=1e-4)


def test_step_rejects_shared_slots_and_keeps_the_others(model):
    """A slot twice in a step (decode and chunk), or a chunk past the context, fails
    before anything runs: the other sequences' states are untouched."""
    batch = BatchEngine(_engine(model, "host"), 3)
    batch.prefill(0, PROMPTS[0][:4])
    with pytest.raises(EngineError, match="distinct"):
        batch.step([0], [5], [(0, [1, 2], True)])
    with pytest.raises(EngineError, match="a chunk holds 1 to 16 tokens, got 17"):
        batch.step([0], [5], [(1, [1] * 17, True)])
    for _ in range(4):
        batch.prefill(1, list(range(1, 17)))
    with pytest.raises(EngineError, match="65 tokens exceeds the context of 64"):
        batch.step([0], [5], [(1, [1], True)])
    assert [batch.position(s) for s in (0, 1)] == [4, 64]
    batch.step([0], [5])
    assert batch.position(0) == 5


def test_a_burst_of_prompts_is_read_in_one_step(model):
    """Requests arriving together: their prompts join one step within the scheduler's
    prompt-token budget (oldest first, a chunk cut at the budget), and the first tokens
    equal a solo run's."""
    engine = _engine(model, "host")
    reqs = [Request(tuple(PROMPTS[i]), 2, SamplingParams(temperature=0.0), 0, False)
            for i in (0, 1, 2)]                                   # 8 + 3 + 6 tokens
    sched = Scheduler(BatchEngine(engine, 4), prefill_tokens=12)
    events = [[] for _ in reqs]
    seqs = [sched.submit(r, events[i].append) for i, r in enumerate(reqs)]
    sched.step()
    assert [s.fed for s in seqs] == [8, 3, 1]                    # 12 tokens: the third cut
    assert [len(e) for e in events] == [1, 1, 0]
    sched.step()
    assert [s.fed for s in seqs] == [8, 3, 6]
    assert [len(s.generated) for s in seqs] == [2, 2, 1]
    for _ in range(10):
        sched.step()
    assert all(s.finished for s in seqs)
    assert [s.generated for s in seqs] == [_solo(engine, r) for r in reqs]
    with pytest.raises(EngineError, match="prefill_tokens"):
        Scheduler(BatchEngine(engine, 1), prefill_tokens=0)


def _first_token_steps(sched: Scheduler, reqs, pause: float) -> list[int]:
    """Submit reqs ``pause`` seconds apart to a running worker -> for each, the number
    of steps the worker had finished when the request's first token came."""
    steps, done = [[] for _ in reqs], [threading.Event() for _ in reqs]

    def on_event(i, event):
        if event[0] == "token":
            steps[i].append(sched.steps)
        elif event[0] in ("done", "error"):
            done[i].set()
    sched.start()
    try:
        for i, r in enumerate(reqs):
            if i:
                time.sleep(pause)
            sched.submit(r, partial(on_event, i))
        assert all(d.wait(60) for d in done)
    finally:
        sched.shutdown()
    return [s[0] for s in steps]


def test_an_idle_worker_lets_a_burst_gather_for_its_first_step(model):
    """Requests arriving 200 ms apart at an idle worker: with gather_s their prompts are
    read in the same first step (without it the first starts alone, the second waits
    for the next step); the wait ends as soon as the requests fill the free slots."""
    reqs = [Request(tuple(PROMPTS[i]), 2, SamplingParams(temperature=0.0), 0, False)
            for i in (0, 1)]
    engine = _engine(model, "host")
    gathered = Scheduler(BatchEngine(engine, 4), gather_s=2.0)
    assert _first_token_steps(gathered, reqs, 0.2) == [0, 0]
    apart = Scheduler(BatchEngine(engine, 4))
    first, second = _first_token_steps(apart, reqs, 0.2)
    assert second > first
    full = Scheduler(BatchEngine(engine, 2), gather_s=600.0)
    t0 = time.monotonic()
    assert _first_token_steps(full, reqs, 0.2) == [0, 0]
    assert time.monotonic() - t0 < 300                  # two requests fill both slots
    with pytest.raises(EngineError, match="gather_s"):
        Scheduler(BatchEngine(engine, 1), gather_s=-1.0)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sample_rows_draws_each_row_as_sample_does_alone(top_p):
    """Row i of sample_rows is sampling.sample on that row alone with its key split
    as a solo run splits it (the first key goes on, the second draws), whatever the
    other rows hold: unfiltered rows (top_p 1) and filtered ones, greedy among them."""
    logits = np.random.default_rng(4).standard_normal((5, 1000)).astype(np.float32) * 2
    keys = np.stack([seed_key_data(s) for s in (3, 17, 99, 1000, 5)])           # (5, 2)
    temp = np.array([1.0, 0.7, 1.3, 0.0, 1.0], np.float32)
    p, k = np.full(5, top_p, np.float32), np.zeros(5, np.int32)
    tokens, _, following = sample_rows(logits, keys, temp, p, k)
    for i in range(5):
        key, sub = jax.random.split(jax.random.wrap_key_data(keys[i]))
        assert int(tokens[i]) == int(sample(logits[i:i + 1], sub, temp[i], p[i], k[i])[0])
        np.testing.assert_array_equal(following[i], jax.random.key_data(key))
    assert len(set(np.asarray(tokens).tolist())) > 2                  # the rows really differ
