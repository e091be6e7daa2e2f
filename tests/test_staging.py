"""The staging ring on CPU: chunked, multi-threaded, allocated once, never corrupting a
block already handed out; and the slot writes and engine runs that go through it."""
import threading
import tracemalloc
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from helpers import greedy_ids
from lowmem.engine import Engine, EngineError, EngineOptions
from lowmem.expert_cache import DeviceSlots
from lowmem.staging import PAGE, Stager, chunk_layout
from quant.packed import PackedModel, QuantSettings
from quant.pipeline import quantize_checkpoint

GIB = 1 << 30
CHUNK = 3 * PAGE             # the tiny int4 block is 10 pages: 4 chunks, the last one short
PROMPT = [5, 17, 99, 3, 250, 42, 7, 300]


@pytest.fixture(scope="module")
def model(tiny_cfg, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("staging") / "int4"
    quantize_checkpoint(tiny_ckpt, out, tiny_cfg, QuantSettings(4, 32))
    return PackedModel.open(out)


def _keys(model):
    cfg = model.cfg
    return [(l, e) for l in range(cfg.num_layers) for e in range(cfg.num_experts)]


def _bytes(chunks, nbytes):
    return np.concatenate([np.asarray(c) for c in chunks])[:nbytes]


def test_chunk_layout_is_equal_page_aligned_chunks_covering_the_block():
    assert chunk_layout(7 * PAGE, 2 * PAGE) == (4, 2 * PAGE)
    assert chunk_layout(7 * PAGE, 32 << 20) == (1, 7 * PAGE)
    assert chunk_layout(302_133_248, 32 << 20) == (10, 30_216_192)  # Grok-1 int4 block
    for nbytes, chunk in [(7 * PAGE, PAGE), (100 * PAGE, 7 * PAGE), (5 * PAGE + 10, PAGE)]:
        count, size = chunk_layout(nbytes, chunk)
        assert size % PAGE == 0 and size <= max(chunk, PAGE)
        assert (count - 1) * size < nbytes <= count * size


@pytest.mark.parametrize("registration", ["pageable", "pinned"])
def test_ring_reuse_never_corrupts_an_earlier_block(model, registration):
    """A block handed out stays intact while the ring's buffers are refilled many times."""
    stager = Stager(model, jax.devices()[0], workers=3, chunk_bytes=CHUNK, buffers=3,
                    registration=registration)
    assert stager.registration == registration and stager.chunks == 4
    keys = _keys(model)
    first = stager(keys[0])                                    # 4 chunks of 3 pages
    later = [stager(key) for key in keys[1:]]                  # 15 blocks, 60 chunk fills
    nbytes = model.expert_block_nbytes
    for key, chunks in zip(keys, [first] + later):
        np.testing.assert_array_equal(_bytes(chunks, nbytes), model.expert(*key).raw)
    assert not any(c.unsafe_buffer_pointer() in stager.ring.pointers for c in first)
    stager.close()


def test_an_aliasing_transfer_is_copied_before_its_buffer_is_reused(model):
    """On a CPU device_put aliases an aligned buffer: the stager sees it and copies."""
    stager = Stager(model, jax.devices()[0], workers=2, chunk_bytes=CHUNK, buffers=2,
                    registration="pageable")
    stager((0, 0))
    assert stager.aliased_chunks == 4                          # every chunk, on a CPU
    stager.close()


class _BigBlocks:
    """The two things a Stager reads of a model, with 4 MiB blocks (the tiny preset's are
    28 KB, the size of Python's own per-fetch bookkeeping)."""
    expert_block_nbytes = 4 << 20

    def __init__(self):
        rng = np.random.default_rng(0)
        self.data = rng.integers(0, 256, (3, self.expert_block_nbytes), np.uint8)

    def expert(self, layer, expert):
        return SimpleNamespace(raw=self.data[(layer + expert) % 3])


def test_no_host_allocation_per_block():
    """The ring is allocated once: 24 fetches of 4 MiB blocks in 1 MiB chunks allocate
    no chunk-sized host memory (tracemalloc sees numpy's allocations; the device copies
    are XLA's) and fill the same buffers."""
    blocks = _BigBlocks()
    stager = Stager(blocks, jax.devices()[0], workers=3, chunk_bytes=1 << 20, buffers=4)
    pointers, views = stager.ring.pointers, [id(v) for v in stager.ring.views]
    jax.block_until_ready(stager((0, 0)))                     # warm: compile the copy
    tracemalloc.start()
    try:
        for i in range(24):
            out = stager((i, 0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stager.chunks == 4
    assert peak < (1 << 20) // 4, peak                        # bookkeeping only
    assert stager.ring.pointers == pointers and [id(v) for v in stager.ring.views] == views
    np.testing.assert_array_equal(_bytes(out, blocks.expert_block_nbytes), blocks.data[23 % 3])
    stager.close()


def test_concurrent_fetches_share_the_ring(model):
    """Two cache threads fetching at once through a 2-buffer ring: every block exact."""
    stager = Stager(model, jax.devices()[0], workers=2, chunk_bytes=CHUNK, buffers=2)
    keys = _keys(model)
    results: dict = {}

    def fetch(part):
        for key in part:
            results[key] = stager(key)
    threads = [threading.Thread(target=fetch, args=(keys[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in keys:
        np.testing.assert_array_equal(_bytes(results[key], model.expert_block_nbytes),
                                      model.expert(*key).raw)
    stager.close()


def test_explicit_registration_the_device_lacks_is_an_error(model):
    """A CPU client has no dma_map: asked for explicitly it fails; 'auto' falls back."""
    with pytest.raises(jax.errors.JaxRuntimeError, match="(?i)dma"):
        Stager(model, jax.devices()[0], registration="dma_map")
    assert Stager(model, jax.devices()[0]).registration == "pageable"
    with pytest.raises(ValueError, match="registration must be one of"):
        Stager(model, jax.devices()[0], registration="mlock")


def test_slot_writes_assemble_chunks_in_place(model):
    stager = Stager(model, jax.devices()[0], workers=2, chunk_bytes=CHUNK)
    nbytes = model.expert_block_nbytes
    slots = DeviceSlots(3, nbytes, jax.devices()[0])
    keys = _keys(model)[:5]
    for i, key in enumerate(keys):                             # slot 2 is written twice
        slots.write(min(i, 2), stager(key))
    got = np.asarray(slots.array)
    for slot, key in [(0, keys[0]), (1, keys[1]), (2, keys[4])]:
        np.testing.assert_array_equal(got[slot], model.expert(*key).raw)
    assert slots.writes == 5
    stager.close()


def test_engine_through_the_ring_equals_the_host_backend(model):
    """Several workers, 4 chunks per block, a 3-slot cache: the device backend's greedy
    tokens equal the host backend's, and every cached slot holds its file's bytes."""
    host = greedy_ids(Engine(model, EngineOptions(backend="host")), PROMPT, 12)
    gb = 3 * model.expert_block_nbytes / GIB
    engine = Engine(model, EngineOptions(backend="device", expert_cache_gb=gb, staging_workers=3,
                                         staging_chunk_mb=CHUNK / (1 << 20)))
    assert engine.experts.stager.chunks == 4
    assert greedy_ids(engine, PROMPT, 12) == host
    cache = engine.experts.cache
    assert cache.stats.misses > 12
    keys = cache.keys()
    cache.acquire(keys)
    for key in keys:
        np.testing.assert_array_equal(np.asarray(cache.block(key)), model.expert(*key).raw)
    cache.release(keys)
    engine.close()


def test_staging_options_are_checked(model):
    with pytest.raises(EngineError, match="staging needs >= 1 worker"):
        Engine(model, EngineOptions(backend="device", staging_workers=0))
    with pytest.raises(EngineError, match="positive chunk"):
        Engine(model, EngineOptions(backend="device", staging_chunk_mb=0))
