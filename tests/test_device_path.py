"""The accelerator path's structure, exercised on XLA:CPU: slots allocated once, one
host sync per layer, recovery after a failed transfer, the cache policy choice."""
import gc

import jax
import pytest

from helpers import InlinePool, greedy_ids
from lowmem.backends import BackendError, expert_slots, free_device_bytes
from lowmem.engine import Engine, EngineOptions
from lowmem.expert_cache import choose_policy
from quant.packed import PackedModel, QuantSettings
from quant.pipeline import quantize_checkpoint

GIB = 1 << 30
PROMPT = [5, 17, 99, 3, 250, 42, 7, 300]


@pytest.fixture(scope="module")
def model(tiny_cfg, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "int4"
    quantize_checkpoint(tiny_ckpt, out, tiny_cfg, QuantSettings(4, 32))
    return PackedModel.open(out)


def _engine(model, slots, **kw):
    gb = slots * model.expert_block_nbytes / GIB
    return Engine(model, EngineOptions(backend="device", expert_cache_gb=gb, **kw))


def test_slots_are_written_in_place_and_nothing_accumulates(model):
    """32 decode tokens with misses every step: the slot array keeps its one buffer,
    and no device array is left behind. A run may end with one prefetch in flight
    (the next token's layer 0, staged by worker threads: timing decides whether it
    is still held), so the count may move by one between runs, never per token."""
    engine = _engine(model, slots=3, prefetch=True)
    greedy_ids(engine, PROMPT, 2)                                  # compile everything
    slots = engine.experts.cache.slots
    pointer = slots.array.unsafe_buffer_pointer()
    gc.collect()
    live = len(jax.live_arrays())
    misses = engine.expert_stats.misses
    counts = []
    for _ in range(3):
        greedy_ids(engine, PROMPT, 32)
        gc.collect()
        counts.append(len(jax.live_arrays()))
    assert engine.expert_stats.misses - misses > 3 * 32            # slots really were rewritten
    assert slots.array.unsafe_buffer_pointer() == pointer
    assert max(counts) <= live + 1 and max(counts) - min(counts) <= 1, (live, counts)


def test_one_host_sync_per_layer_plus_sampling(model, tiny_cfg):
    engine = _engine(model, slots=4)
    greedy_ids(engine, PROMPT, 2)
    before = engine.host_syncs
    greedy_ids(engine, PROMPT, 6)                  # 1 prefill + 5 decode steps, 6 samples
    steps = 6
    assert engine.host_syncs - before == steps * tiny_cfg.num_layers + 6


class _FailOnce:
    """Wraps the transfer function; the n-th transfer raises."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, fetch):
        def fetch_or_fail(key):
            self.calls += 1
            if self.calls == self.n:
                raise RuntimeError("injected transfer failure")
            return fetch(key)
        return fetch_or_fail


@pytest.mark.parametrize("n", [1, 5, 11])
def test_engine_usable_after_a_failed_transfer(model, n):
    clean = greedy_ids(_engine(model, slots=3), PROMPT, 6)
    engine = _engine(model, slots=3)
    engine.reset_expert_cache(fetch_hook=_FailOnce(n))
    with pytest.raises(RuntimeError, match="injected"):
        greedy_ids(engine, PROMPT, 6)
    assert greedy_ids(engine, PROMPT, 6) == clean                   # cache and KV recovered
    assert greedy_ids(engine, PROMPT[:3], 4) == greedy_ids(_engine(model, slots=3), PROMPT[:3], 4)


def test_interrupt_mid_step_leaves_the_engine_usable(model):
    clean = greedy_ids(_engine(model, slots=3), PROMPT, 5)
    engine = _engine(model, slots=3)

    def interrupt_in_layer_1(fetch):
        def fetch_or_interrupt(key):
            if key[0] == 1:
                raise KeyboardInterrupt
            return fetch(key)
        return fetch_or_interrupt
    engine.reset_expert_cache(fetch_hook=interrupt_in_layer_1)
    with pytest.raises(KeyboardInterrupt):
        greedy_ids(engine, PROMPT, 5)
    engine.reset_expert_cache()
    assert greedy_ids(engine, PROMPT, 5) == clean


def test_auto_policy_is_layer_below_two_tokens_of_experts(model, tiny_cfg):
    per_token = tiny_cfg.num_layers * tiny_cfg.num_selected_experts          # 4
    assert choose_policy("auto", 2 * per_token - 1, tiny_cfg.num_layers, 2) == "layer"
    assert choose_policy("auto", 2 * per_token, tiny_cfg.num_layers, 2) == "lru"
    assert choose_policy("lru", 3, tiny_cfg.num_layers, 2) == "lru"
    assert _engine(model, slots=3).experts.cache.policy == "layer"
    assert _engine(model, slots=16).experts.cache.policy == "lru"


def test_accelerator_without_a_memory_limit_needs_a_budget(model):
    class NoLimitGPU:
        platform = "gpu"

        def memory_stats(self):
            return {}
    assert free_device_bytes(NoLimitGPU()) is None
    with pytest.raises(BackendError, match="reports no memory limit"):
        expert_slots(model, EngineOptions(), None)
    nbytes = model.expert_block_nbytes
    assert expert_slots(model, EngineOptions(expert_cache_gb=5.5 * nbytes / GIB), None) == 5
    assert expert_slots(model, EngineOptions(), 7 * nbytes + 1, headroom=0) == 7
    assert expert_slots(model, EngineOptions(), 9 * nbytes, headroom=2 * nbytes) == 7
    with pytest.raises(BackendError, match="holds 1 experts"):
        expert_slots(model, EngineOptions(), nbytes, headroom=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_expert_call_temporaries_at_grok1_shapes(bits):
    """Compiled from abstract Grok-1 shapes on XLA:CPU: the jitted expert call never
    dequantizes a whole matrix (its temporaries < 25% of one expert block)."""
    import jax.numpy as jnp

    from lowmem import moe
    from quant.config import preset
    from quant.packed import expert_block_layout
    cfg = preset("grok-1")
    parts, nbytes = expert_block_layout(cfg, QuantSettings(bits))
    shape = jax.ShapeDtypeStruct
    k = cfg.num_selected_experts
    for act in (jnp.bfloat16, jnp.float32):          # the activations of either precision
        compiled = moe._experts_accumulate.lower(
            parts, shape((1, cfg.emb_size), jnp.float32), shape((4, nbytes), jnp.uint8),
            shape((k,), jnp.int32), shape((k,), jnp.int32), shape((1, cfg.emb_size), act),
            shape((1, k), jnp.float32), shape((1, k), jnp.int32)).compile()
        assert compiled.memory_analysis().temp_size_in_bytes < 0.25 * nbytes, act


@pytest.mark.parametrize("backend, slots", [("device", 3), ("device", 16), ("host", None)])
def test_dispatches_per_decode_token_are_constant_and_counted(model, tiny_cfg, backend, slots):
    """The engine's own count of its steps' dispatches is the same every decode token
    (embedding rows [device], the chunk input [device; on the host numpy], per layer
    attention [host: only the keys and values into the cache; its one row's attention,
    residuals, norms and routing run in numba], routing [device], experts [device: one call for the k
    experts], residual [device], then the logits [device; on the host numba]) and equals
    the XLA executions JAX's profiler sees on the calling thread, slot writes aside."""
    from lowmem.profiler import xla_executions
    layers = tiny_cfg.num_layers
    if backend == "host":
        engine, expected = Engine(model, EngineOptions(backend="host")), layers
    else:
        engine, expected = _engine(model, slots=slots), 3 + 4 * layers
    tokens = [7, 300, 42, 5, 99, 17]
    engine.feed(PROMPT)  # compile; a big cache then holds every expert the tokens need
    for token in tokens:  # (a prefill's last layer loads its last token's experts only)
        engine.feed([token])
    engine.reset()
    engine.feed(PROMPT)
    per_token, writes = [], 0
    for token in tokens:
        d, w = engine.dispatches, engine.slot_writes
        seen = xla_executions(lambda: jax.block_until_ready(engine.feed([token])))
        assert seen == engine.dispatches - d + engine.slot_writes - w
        per_token.append(engine.dispatches - d)
        writes += engine.slot_writes - w
    assert per_token == [expected] * 6
    assert (writes > 0) == (slots == 3)                            # a small cache misses


def test_next_token_layer0_is_prefetched_when_a_step_ends(model, monkeypatch):
    """At the last layer the engine prefetches this token's layer-0 experts for the next
    token (into the slot the last layer's two pinned experts leave free): after each
    decode step the first of them is in the cache, and greedy decoding (which repeats
    its token here) then hits it; without prefetch the same run hits less. Fetches
    run inline: with worker threads, a wrong guess for the last layer may still be in
    flight in that slot, and a prefetch never evicts one (timing, not the engine)."""
    engine = _engine(model, slots=3, record_routing=True)
    monkeypatch.setattr(engine.experts.cache, "_pool", InlinePool())
    greedy_ids(engine, PROMPT, 2)
    engine.reset()
    engine.feed(PROMPT)
    for token in [7, 300, 42, 5, 99, 17, 7, 7]:
        engine.feed([token])
        layer, first = engine.routing_trace[-2]                     # (layer 0, (1, k))
        assert layer == 0 and (0, int(first[0, 0])) in engine.experts.cache.keys()
    on, off = _engine(model, slots=3), _engine(model, slots=3, prefetch=False)
    for e in (on, off):
        monkeypatch.setattr(e.experts.cache, "_pool", InlinePool())
    assert greedy_ids(on, PROMPT, 16) == greedy_ids(off, PROMPT, 16)
    stats = on.expert_stats
    assert stats.token_prefetches >= 8
    assert stats.token_prefetch_hits >= stats.token_prefetches // 2
    assert off.expert_stats.token_prefetches == 0
    assert stats.hits > off.expert_stats.hits


def test_the_layer_before_the_last_prefetches_for_the_rows_the_last_one_runs(
        model, tiny_cfg, monkeypatch):
    """The last layer's MoE runs a prompt chunk's last row only (Engine.last_row), none
    of a chunk before the last: the layer before it prefetches the guessed experts of
    those rows only (a batched step: its decode rows and the last row of each chunk
    that wants logits), not of every row of the chunk."""
    from lowmem.batch import BatchEngine
    engine = _engine(model, slots=16, prefill_buckets=(4, 8))
    seen, moe_groups = [], engine.experts.moe_groups

    def record(layer, groups, guess=None):
        seen.append((layer, None if guess is None else (guess[0], guess[1].shape)))
        return moe_groups(layer, groups, guess)
    monkeypatch.setattr(engine.experts, "moe_groups", record)
    k, last = tiny_cfg.num_selected_experts, tiny_cfg.num_layers - 1
    engine.feed(list(range(3, 14)))          # 11 tokens: chunks of 8 (no logits) and 3
    assert seen == [(layer, (layer + 1, (8, k))) for layer in range(last - 1)] + [
        (last - 1, None)] + [(layer, (layer + 1, (3, k))) for layer in range(last - 1)] + [
        (last - 1, (last, (1, k))), (last, (0, (1, k)))]
    batch = BatchEngine(engine, 3)
    batch.prefill(0, [5, 6, 7])
    seen.clear()
    batch.step([0], [8], [(1, [9, 10, 11, 12], True), (2, [13, 14], False)])
    assert seen[last - 1] == (last - 1, (last, (1 + 1, k)))   # decode row, chunk 1's last


def test_attention_call_temporaries_at_grok1_shapes():
    """Compiled from abstract Grok-1 shapes on XLA:CPU (decode, a short context so the
    projections dominate): the device attention step reads its weights a chunk of rows
    at a time, temporaries < 10% of the four projections (dequantizing them whole, as
    model.dense_linear does, needs 4x their bytes)."""
    import jax.numpy as jnp

    from lowmem import engine as E
    from lowmem import model as M
    from lowmem.backends import DeviceBackend
    from lowmem.step_memory import SDS, _abstract_layer
    from quant.config import preset
    cfg = preset("grok-1")
    lp = _abstract_layer(cfg, QuantSettings(4))                     # int8 attention
    weights = jax.tree_util.tree_leaves([lp[r] for r in ("q", "k", "v", "o")])
    nbytes = sum(w.size * w.dtype.itemsize for w in weights)
    assert 80e6 < nbytes < 100e6                                    # 88 MB: int8 + scales
    for precision in ("fp32", "bf16"):
        cache = M.KVCache(*[SDS(shape, M.cache_dtype(precision))
                            for shape in M.kv_cache_shapes(cfg, 256)])

        def temp(linear):
            lowered = E._attention.lower(cfg, linear, precision, lp, SDS((1, cfg.emb_size),
                                         jnp.float32), cache, SDS((256,), bool), 0)
            return lowered.compile().memory_analysis().temp_size_in_bytes
        assert temp(DeviceBackend.linear) < 0.10 * nbytes, precision
        assert temp(M.dense_linear) > 2 * nbytes, precision         # what it replaces
