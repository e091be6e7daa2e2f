"""Routed experts: the device-side cache, host staging, and the MoE computation.

Only the experts a step's tokens were routed to are made available and
computed. Two ways to do it, chosen by the engine:

- ``DeviceExperts``: expert blocks (one contiguous byte range each) are copied
  from the memory-mapped files into device memory through a fixed set of
  page-aligned staging buffers, off the main thread, and kept in an LRU
  ``ExpertCache`` under a byte budget; a jitted function slices and
  dequantizes a block and runs the expert. This is the accelerator path.
- ``HostExperts``: numba kernels compute straight from the mapped files, with
  no copy. This is the CPU path: on a CPU the "device" is host memory, so a
  transfer would only copy bytes that are already there.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lowmem import model as M
from quant.packed import DTYPES, PackedModel, TensorEntry
from quant.qweight import QWeight
from quant.spec import EXPERT_ROLES

log = logging.getLogger(__name__)
Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    requests: int = 0
    hits: int = 0             # resident (or already in flight) when requested
    misses: int = 0           # a fetch had to start at request time
    prefetches: int = 0       # fetches started speculatively
    prefetch_hits: int = 0    # requests served by a speculative fetch
    prefetch_dropped: int = 0  # no free slot for a speculative fetch
    evictions: int = 0
    bytes_moved: int = 0
    wait_s: float = 0.0       # main thread blocked on transfers

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["hit_rate"] = self.hits / self.requests if self.requests else 0.0
        d["prefetch_hit_rate"] = self.prefetch_hits / self.prefetches if self.prefetches else 0.0
        return d


@dataclass
class _Entry:
    future: Future
    prefetched: bool = False
    used: bool = False
    pins: int = 0


POLICIES = ("lru", "layer")


def eviction_order(keys_lru_first: list[Key], policy: str, layer: int | None,
                   num_layers: int) -> list[Key]:
    """Candidates for eviction, best victim first.

    'lru': least recently used first. 'layer': decode visits layers in a
    cycle, so plain LRU evicts exactly the experts needed next whenever the
    cache holds less than one token's worth of experts (0% hits on uniform
    routing at 113 of 512 slots). Instead evict from the layer whose turn
    comes round last (the one just computed, then the one before, ...), and
    from the current layer only as a last resort; within a layer, LRU. On
    uniform routing this reaches the slots/experts hit rate (tools/bench_cache.py).
    """
    if policy == "lru" or layer is None:
        return list(keys_lru_first)
    return sorted(keys_lru_first, key=lambda k: -((k[0] - layer - 1) % num_layers)
                  if k[0] != layer else 1)


class ExpertCache:
    """Cache of expert blocks on the device, at most ``capacity`` at once.

    API: ``needed(layer, experts)`` -> keys a step wants; ``acquire(keys)``
    pins them (so nothing evicts them mid-step) and starts missing fetches;
    ``get(key)`` waits for one; ``release(keys)``; ``prefetch(keys)`` starts
    speculative fetches into free or evictable slots only. ``fetch(key)``
    runs on a worker thread.
    """

    def __init__(self, fetch: Callable[[Key], jax.Array], block_nbytes: int, capacity: int,
                 workers: int = 2, policy: str = "lru", num_layers: int = 1):
        if capacity < 1:
            raise ValueError("expert cache needs at least one slot")
        if policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {POLICIES}, got {policy!r}")
        self._fetch, self.block_nbytes, self.capacity = fetch, block_nbytes, capacity
        self.policy, self.num_layers, self._layer = policy, num_layers, None
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # oldest first
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowmem-fetch")
        self.stats = CacheStats()

    @staticmethod
    def needed(layer: int, experts: np.ndarray) -> list[Key]:
        """Distinct (layer, expert) keys of a routing array, in first-use order."""
        return [(layer, int(e)) for e in dict.fromkeys(np.asarray(experts).reshape(-1).tolist())]

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def keys(self) -> list[Key]:
        return list(self._entries)

    def _make_room(self, wait: bool = False) -> bool:
        """Free a slot: evict the least recently used unpinned entry.

        Entries still in flight are evicted only when ``wait`` (a step needs
        the slot): the transfer is waited for first.
        """
        if len(self._entries) < self.capacity:
            return True
        order = eviction_order(list(self._entries), self.policy, self._layer, self.num_layers)
        for done_only in (True, False) if wait else (True,):
            for key in order:
                entry = self._entries[key]
                if entry.pins == 0 and (entry.future.done() or not done_only):
                    self._wait(entry)
                    del self._entries[key]
                    self.stats.evictions += 1
                    return True
        return False

    def _wait(self, entry: _Entry) -> jax.Array:
        start = time.perf_counter()
        out = entry.future.result()
        self.stats.wait_s += time.perf_counter() - start
        return out

    def _start(self, key: Key, prefetched: bool) -> _Entry:
        entry = _Entry(self._pool.submit(self._fetch, key), prefetched=prefetched)
        self._entries[key] = entry
        self.stats.bytes_moved += self.block_nbytes
        return entry

    def prefetch(self, keys: list[Key]) -> None:
        """Start speculative fetches, never evicting pinned or in-flight entries."""
        for key in keys:
            if key in self._entries:
                continue
            if not self._make_room():
                self.stats.prefetch_dropped += 1
                continue
            self._start(key, prefetched=True)
            self.stats.prefetches += 1

    def acquire(self, keys: list[Key]) -> None:
        """Pin ``keys`` for this step and start fetching the missing ones (no waiting)."""
        if len(keys) > self.capacity:
            raise ValueError(f"{len(keys)} experts requested at once, cache holds {self.capacity}")
        for key in keys:
            self._layer = key[0]
            self.stats.requests += 1
            entry = self._entries.get(key)
            if entry is None:
                if not self._make_room(wait=True):
                    raise RuntimeError("expert cache full of pinned entries")
                entry = self._start(key, prefetched=False)
                self.stats.misses += 1
            else:
                self.stats.hits += 1
                self._entries.move_to_end(key)
                if entry.prefetched and not entry.used:
                    self.stats.prefetch_hits += 1
            entry.used = True
            entry.pins += 1

    def get(self, key: Key) -> jax.Array:
        """The device array of an acquired key, waiting for its transfer if needed."""
        return self._wait(self._entries[key])

    def release(self, keys: list[Key]) -> None:
        for key in keys:
            self._entries[key].pins -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Stager:
    """Copies expert blocks host -> device, at most ``num_buffers`` at a time.

    On an accelerator, ``device_put`` from pageable memory is several times
    slower than the link; page-locked (``pinned_host``) memory is the fast
    path. With pinned memory a block goes mapped file -> pinned host array ->
    device (one host copy); without it, through one of a fixed set of
    page-aligned pageable staging buffers. On a CPU, ``device_put`` of the
    mapped range aliases it: no copy at all. Both accelerator paths are
    unverified on real hardware in this repository so far (no GPU was lent):
    tools/bench_streaming.py measures them.
    """

    def __init__(self, model: PackedModel, device, num_buffers: int = 2, pinned: bool = True,
                 force_copy: bool = False):
        self.model, self.device = model, device
        # force_copy: benchmarks only. On a CPU the pageable path's device_put aliases the
        # staging buffer (even with may_alias=False), so a fetched block is overwritten by the
        # next fetch; the pinned path copies.
        self.on_cpu = device.platform == "cpu" and not force_copy
        kinds = {m.kind for m in device.addressable_memories()} if not self.on_cpu else set()
        self.pinned = pinned and "pinned_host" in kinds
        self._target = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
        nbytes = model.expert_block_nbytes
        self._free: list[np.ndarray | None] = [
            None if self.pinned else _aligned_empty(nbytes) for _ in range(num_buffers)]
        self._lock = threading.Condition()

    def __call__(self, key: Key) -> jax.Array:
        raw = self.model.expert(*key).raw                       # uint8 (nbytes,) memmap view
        if self.on_cpu:
            return jax.device_put(raw, self.device)             # aliases the mapping, read-only
        with self._lock:
            while not self._free:
                self._lock.wait()
            buf = self._free.pop()
        try:
            if self.pinned:                                     # page faults / disk reads here
                src = jax.device_put(raw, jax.sharding.SingleDeviceSharding(
                    self.device, memory_kind="pinned_host"))
            else:
                np.copyto(buf, raw)
                src = buf
            # an explicit memory kind: a bare Device target refuses a pinned_host source
            out = jax.device_put(src, self._target)
            out.block_until_ready()                              # buffer reusable only after this
            return out
        finally:
            with self._lock:
                self._free.append(buf)
                self._lock.notify()


def _aligned_empty(nbytes: int, align: int = 4096) -> np.ndarray:
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


def expert_weights_device(parts: tuple[TensorEntry, ...], block: jax.Array) -> dict[str, QWeight]:
    """Slice and bitcast a device uint8 block into gate/up/down QWeights (inside jit)."""
    arrays = {}
    for p in parts:
        raw = jax.lax.slice(block, (p.offset,), (p.offset + p.nbytes,))
        itemsize = DTYPES[p.dtype].itemsize
        if itemsize > 1:
            raw = raw.reshape(-1, itemsize)
        arrays[(p.role, p.part)] = jax.lax.bitcast_convert_type(raw, DTYPES[p.dtype]).reshape(p.shape)
    bits = {p.role: (p.bits, p.group_size) for p in parts}
    out = {}
    for role in EXPERT_ROLES:
        w = object.__new__(QWeight)
        for name, value in zip(("values", "scales", "bits", "group_size"),
                               (arrays[(role, "values")], arrays[(role, "scales")], *bits[role])):
            object.__setattr__(w, name, value)
        out[role] = w
    return out


def expert_ffn_device(x: jax.Array, w: dict[str, QWeight]) -> jax.Array:
    """GeGLU expert in the reference's bf16 mode -> fp32 (T, D).

    gate/up outputs are bf16; gelu (tanh), the product and the down projection
    run in fp32, as the reference's expert selection promotes them.
    """
    g = M.dense_linear(x, w["gate"]).astype(jnp.float32)                  # (T, F)
    u = M.dense_linear(x, w["up"]).astype(jnp.float32)                    # (T, F)
    hidden = jax.nn.gelu(g, approximate=True) * u
    down = M.dequantize(w["down"]).astype(jnp.float32)                    # (F, D)
    return jnp.dot(hidden, down, precision=jax.lax.Precision.HIGHEST)


def _expert_accumulate(parts, acc, block, x, gates, experts, expert):
    """acc + bf16(gate of `expert` per token) * expert(x); gate 0 where not routed."""
    gate = jnp.sum(jnp.where(experts == expert, gates, 0.0), axis=-1)    # (T,)
    out = expert_ffn_device(x, expert_weights_device(parts, block))
    return M.gated_sum_update(acc, out, gate)


@dataclass
class DeviceExperts:
    """MoE on the accelerator with experts streamed through an ExpertCache."""
    model: PackedModel
    cache: ExpertCache
    prefetch_enabled: bool = True
    _fn: Callable = field(init=False)

    def __post_init__(self):
        self._fn = jax.jit(partial(_expert_accumulate, tuple(self.model.expert_parts)),
                           donate_argnums=(0,))

    def moe(self, layer: int, x: jax.Array, gates: jax.Array, experts_host: np.ndarray,
            experts: jax.Array, n_real: int, next_guess: tuple | None = None) -> jax.Array:
        """Sum of gated expert outputs, fp32 (T, D); rows >= n_real are padding.

        The step's experts are pinned first, then the next layer's guessed
        experts are prefetched, so transfers overlap this layer's compute.
        """
        acc = jnp.zeros((x.shape[0], self.model.cfg.emb_size), jnp.float32)
        masked = jnp.where(jnp.arange(x.shape[0])[:, None] < n_real, experts, -1)
        keys = self.cache.needed(layer, experts_host[:n_real])
        step = self.cache.capacity
        for i in range(0, len(keys), step):   # more experts than slots: in groups
            group = keys[i:i + step]
            self.cache.acquire(group)
            if i == 0 and next_guess is not None and self.prefetch_enabled:
                self.cache.prefetch(self.cache.needed(*next_guess))
            try:
                for key in group:
                    acc = self._fn(acc, self.cache.get(key), x, gates, masked, key[1])
            finally:
                self.cache.release(group)
        return acc


@dataclass
class HostExperts:
    """MoE in numba kernels reading the memory-mapped expert files directly."""
    model: PackedModel
    stats: CacheStats = field(default_factory=CacheStats)

    def moe(self, layer: int, x: jax.Array, gates: jax.Array, experts_host: np.ndarray,
            experts: jax.Array, n_real: int, next_guess: tuple | None = None) -> np.ndarray:
        """Like DeviceExperts.moe; nothing to prefetch: the kernels read the mapping."""
        from lowmem.kernels import expert_ffn
        xs = np.asarray(x[:n_real]).astype(np.float32)                    # (n, D)
        g = np.asarray(gates[:n_real]).astype(jnp.bfloat16).astype(np.float32)  # (n, k)
        routed = experts_host[:n_real]                                      # (n, k)
        acc = np.zeros((x.shape[0], x.shape[1]), np.float32)
        for _, e in ExpertCache.needed(layer, routed):
            rows, slot = np.nonzero(routed == e)
            block = self.model.expert(layer, e)
            out = expert_ffn(np.ascontiguousarray(xs[rows]), block.gate, block.up, block.down)
            acc[rows] += g[rows, slot][:, None] * out
            self.stats.requests += 1
            self.stats.hits += 1
            self.stats.bytes_moved += block.nbytes
        return acc
