"""The device-side expert cache: preallocated slots, eviction policies, and their simulators.

Decode visits the 64 layers in a cycle and routes each token to 2 of 8 experts
per layer, so which experts stay on the device decides how many bytes cross
the link. ``ExpertCache`` holds at most ``capacity`` expert blocks in a slot
store allocated once (``DeviceSlots``: one ``(capacity, block)`` device array
written in place, so hundreds of 300 MB blocks churning never fragment device
memory), pins the ones a step is using, starts transfers on worker threads and
evicts by a policy (``eviction_order``). A failed transfer is never cached. The simulators at the end replay a routing trace
through the same rule, through plain LRU and through Belady's optimum, so a
policy can be judged offline (``tools/bench_cache.py``).
"""
from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    requests: int = 0
    hits: int = 0             # resident (or already in flight) when requested
    misses: int = 0           # a fetch had to start at request time
    prefetches: int = 0       # fetches started speculatively
    prefetch_hits: int = 0    # requests served by a speculative fetch
    prefetch_dropped: int = 0  # no free slot for a speculative fetch
    token_prefetches: int = 0     # of which: the next token's layer 0, started after a step
    token_prefetch_hits: int = 0  # requests served by such a fetch
    evictions: int = 0
    bytes_moved: int = 0
    wait_s: float = 0.0       # main thread blocked on transfers

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        looked_up = self.hits + self.misses   # 0 where nothing is cached (host backend)
        d["hit_rate"] = self.hits / looked_up if looked_up else None
        d["prefetch_hit_rate"] = self.prefetch_hits / self.prefetches if self.prefetches else 0.0
        d["token_prefetch_hit_rate"] = (self.token_prefetch_hits / self.token_prefetches
                                        if self.token_prefetches else 0.0)
        return d


@dataclass
class _Entry:
    future: Future | None     # the transfer; None once its block is written to the slot
    slot: int
    prefetched: str | None = None   # None, 'layer' (the next layer's guess) or 'token'
    used: bool = False
    pins: int = 0


POLICIES = ("lru", "layer")


def choose_policy(policy: str, capacity: int, num_layers: int, per_token: int) -> str:
    """'auto': 'layer' when the slots hold fewer than two tokens' experts, else 'lru'.

    Below that, decode's cycle through the layers makes LRU evict exactly the
    experts needed next (0% hits); with room for two tokens LRU keeps what
    repeats between tokens.
    """
    if policy != "auto":
        return policy
    return "layer" if capacity < 2 * num_layers * per_token else "lru"


class ListSlots:
    """Slots as a Python list: the store for tests and host-side tools."""

    def __init__(self, capacity: int):
        self.array: list = [None] * capacity

    def write(self, slot: int, block) -> None:
        self.array[slot] = block


@partial(jax.jit, donate_argnums=(0,))
def _write_slot(slots, chunks, slot):
    """slots[slot] = the concatenated chunks, in place (the slot array is donated).

    One dispatch per block. The chunks have equal sizes; the last one's tail past
    the block is dropped (static shapes).
    """
    nbytes, size = slots.shape[1], chunks[0].shape[0]
    for i, chunk in enumerate(chunks):                                   # static: chunks
        n = min(size, nbytes - i * size)
        slots = jax.lax.dynamic_update_slice(slots, chunk[None, :n], (slot, i * size))
    return slots                                                         # (S, nbytes) uint8


class DeviceSlots:
    """One ``(capacity, nbytes)`` uint8 device array, allocated once, written in place.

    ``write`` takes a block as one array or as the ``Stager``'s tuple of chunks;
    ``writes`` counts the dispatches it made (one per block).
    """

    def __init__(self, capacity: int, nbytes: int, device):
        sharding = jax.sharding.SingleDeviceSharding(device)
        self.array = jax.jit(lambda: jnp.zeros((capacity, nbytes), jnp.uint8),
                             out_shardings=sharding)()                     # (S, nbytes) uint8
        self.writes = 0

    def write(self, slot: int, block) -> None:
        chunks = tuple(block) if isinstance(block, (tuple, list)) else (block,)
        self.array = _write_slot(self.array, chunks, np.int32(slot))
        self.writes += 1


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
    ``get(key)`` waits for one and returns its slot in ``slots.array``;
    ``release(keys)``; ``prefetch(keys)`` starts speculative fetches into free
    or evictable slots only. ``fetch(key)`` runs on a worker thread; its
    result is written into the slot on the caller's thread by ``get`` (slot
    writes are ordered with the computations that read the slots).
    """

    def __init__(self, fetch: Callable[[Key], jax.Array], block_nbytes: int, capacity: int,
                 workers: int = 2, policy: str = "lru", num_layers: int = 1, slots=None):
        if capacity < 1:
            raise ValueError("expert cache needs at least one slot")
        if policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {POLICIES}, got {policy!r}")
        self._fetch, self.block_nbytes, self.capacity = fetch, block_nbytes, capacity
        self.policy, self.num_layers, self._layer = policy, num_layers, None
        self.slots = slots if slots is not None else ListSlots(capacity)
        self._free = list(range(capacity - 1, -1, -1))            # slot numbers not in use
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

    def _make_room(self, wait: bool = False, keep=()) -> bool:
        """Free a slot: evict the least recently used unpinned entry not in ``keep``.

        Entries still in flight are evicted only when ``wait`` (a step needs
        the slot): the transfer is waited for first.
        """
        if len(self._entries) < self.capacity:
            return True
        order = eviction_order(list(self._entries), self.policy, self._layer, self.num_layers)
        for done_only in (True, False) if wait else (True,):
            for key in order:
                entry = self._entries[key]
                if entry.pins == 0 and key not in keep and (
                        entry.future is None or entry.future.done() or not done_only):
                    if entry.future is not None:
                        entry.future.exception()          # wait; its outcome no longer matters
                    self._drop(key)
                    self.stats.evictions += 1
                    return True
        return False

    def _drop(self, key: Key) -> None:
        self._free.append(self._entries.pop(key).slot)

    def _wait(self, entry: _Entry) -> jax.Array:
        start = time.perf_counter()
        try:
            return entry.future.result()
        finally:
            self.stats.wait_s += time.perf_counter() - start

    def _start(self, key: Key, prefetched: str | None) -> _Entry:
        entry = _Entry(self._pool.submit(self._fetch, key), self._free.pop(),
                       prefetched=prefetched)
        self._entries[key] = entry
        self.stats.bytes_moved += self.block_nbytes
        return entry

    def prefetch(self, keys: list[Key], kind: str = "layer") -> None:
        """Start speculative fetches, never evicting pinned or in-flight entries, nor
        an earlier one of ``keys`` (best first: where there is room for one, the first
        stays, even when its fetch has ended before the second is started).

        ``kind`` 'token': the next token's first layer, guessed when a step ends
        (counted apart, so that its hits can be judged on their own).
        """
        for i, key in enumerate(keys):
            if key in self._entries:
                continue
            if not self._make_room(keep=keys[:i]):
                self.stats.prefetch_dropped += 1
                continue
            self._start(key, prefetched=kind)
            self.stats.prefetches += 1
            self.stats.token_prefetches += kind == "token"

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
                entry = self._start(key, prefetched=None)
                self.stats.misses += 1
            else:
                self.stats.hits += 1
                self._entries.move_to_end(key)
                if entry.prefetched and not entry.used:
                    self.stats.prefetch_hits += 1
                    self.stats.token_prefetch_hits += entry.prefetched == "token"
            entry.used = True
            entry.pins += 1

    def get(self, key: Key) -> int:
        """The slot of an acquired key, its block written there first if it just arrived.

        A transfer that failed (out of memory, interrupted) leaves the cache:
        the error propagates and the next request fetches the block again.
        """
        entry = self._entries[key]
        if entry.future is not None:
            try:
                block = self._wait(entry)
            except BaseException:
                self._drop(key)
                raise
            self.slots.write(entry.slot, block)
            entry.future = None                  # the transferred buffer can go now
        return entry.slot

    def block(self, key: Key):
        """The stored block of an acquired key (tests and tools; device code reads slots)."""
        slot = self.get(key)                     # may write the slot: read the array after
        return self.slots.array[slot]

    def release(self, keys: list[Key]) -> None:
        for key in keys:
            if key in self._entries:             # a failed transfer was dropped in get()
                self._entries[key].pins -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# --- simulators: a policy replayed on a routing trace -------------------------------

def trace_keys(routing_trace) -> list[tuple[int, int]]:
    """(layer, expert) requests in the engine's order: per layer step, distinct experts
    of the real tokens in first-use order (``Engine.routing_trace`` entries)."""
    keys = []
    for layer, experts in routing_trace:
        keys += ExpertCache.needed(layer, experts)
    return keys


def lru_hits(trace, slots: int) -> int:
    """Hits of a least-recently-used cache of ``slots`` entries on a request trace."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, found {slots}")
    cache: dict = {}           # insertion order = recency order, oldest first
    hits = 0
    for key in trace:
        if key in cache:
            hits += 1
            del cache[key]
        elif len(cache) >= slots:
            del cache[next(iter(cache))]
        cache[key] = None
    return hits


def policy_hits(trace, slots: int, policy: str, num_layers: int) -> int:
    """Hits of the engine's own eviction rule (``eviction_order``) on a trace.

    Like the engine, keys of the current layer step (consecutive requests of
    one layer) are pinned: never evicted while the step runs.
    """
    if slots < 1:
        raise ValueError(f"slots must be >= 1, found {slots}")
    cache: dict = {}           # insertion order = recency order, oldest first
    step: set = set()
    hits = 0
    for key in trace:
        if step and next(iter(step))[0] != key[0]:
            step = set()
        if key in cache:
            hits += 1
            del cache[key]
        elif len(cache) >= slots:
            order = eviction_order(list(cache), policy, key[0], num_layers)
            del cache[next(k for k in order if k not in step)]
        cache[key] = None
        step.add(key)
    return hits


def belady_hits(trace, slots: int) -> int:
    """Hits of the offline optimum (Belady): on a miss with a full cache, evict the
    entry whose next use is farthest in the future (or never comes)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, found {slots}")
    trace = list(trace)
    never = len(trace)
    next_use, seen = [never] * len(trace), {}
    for i in range(len(trace) - 1, -1, -1):
        next_use[i] = seen.get(trace[i], never)
        seen[trace[i]] = i
    cache: dict = {}           # key -> its next use
    heap: list = []            # (-next use, tie-break, key); stale entries skipped
    hits = 0
    for i, key in enumerate(trace):
        if key in cache:
            hits += 1
        elif len(cache) >= slots:
            while True:
                neg, _, victim = heapq.heappop(heap)
                if cache.get(victim) == -neg:
                    del cache[victim]
                    break
        cache[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], i, key))
    return hits
