"""ExpertCache: LRU order, pins, prefetch accounting, exact counters; the policy simulators."""
import random
import threading

import numpy as np
import pytest

from helpers import InlinePool
from lowmem import expert_cache as C
from lowmem.expert_cache import ExpertCache


class FakeFetch:
    """Records fetched keys; optionally blocks until released (an in-flight transfer)."""

    def __init__(self, block: bool = False):
        self.fetched = []
        self.gate = threading.Event()
        if not block:
            self.gate.set()

    def __call__(self, key):
        self.fetched.append(key)
        self.gate.wait(5)
        return f"block{key}"


def _lru_simulation(requests, slots):
    """Independent LRU model: (hits, misses, evictions) for a list of key groups."""
    order, hits, misses, evictions = [], 0, 0, 0
    for key in requests:
        if key in order:
            hits += 1
            order.remove(key)
        else:
            misses += 1
            if len(order) == slots:
                order.pop(0)
                evictions += 1
        order.append(key)
    return hits, misses, evictions


def _run(cache, steps):
    for keys in steps:
        cache.acquire(keys)
        assert [cache.block(k) for k in keys] == [f"block{k}" for k in keys]
        cache.release(keys)


def test_needed_keeps_first_use_order():
    routed = np.array([[3, 1], [1, 5], [3, 5]])
    assert ExpertCache.needed(7, routed) == [(7, 3), (7, 1), (7, 5)]


@pytest.mark.parametrize("slots", [2, 3, 5, 8])
def test_counters_match_an_lru_model_on_a_constructed_routing(slots):
    rng = np.random.default_rng(slots)
    steps = []
    for _ in range(40):
        for layer in range(3):
            experts = rng.choice(8, size=2, replace=False)
            steps.append([(layer, int(e)) for e in experts])
    fetch = FakeFetch()
    cache = ExpertCache(fetch, block_nbytes=1000, capacity=slots)
    _run(cache, steps)
    hits, misses, evictions = _lru_simulation([k for s in steps for k in s], slots)
    st = cache.stats
    assert (st.requests, st.hits, st.misses, st.evictions) == (80 * 3, hits, misses, evictions)
    assert st.bytes_moved == misses * 1000 and len(fetch.fetched) == misses
    assert st.prefetches == st.prefetch_hits == 0


def test_lru_evicts_least_recently_used():
    cache = ExpertCache(FakeFetch(), block_nbytes=1, capacity=2)
    _run(cache, [[(0, 1)], [(0, 2)], [(0, 1)], [(0, 3)]])   # 2 is older than 1 -> evicted
    assert sorted(cache.keys()) == [(0, 1), (0, 3)]


def test_prefetch_hits_and_drops():
    cache = ExpertCache(FakeFetch(), block_nbytes=10, capacity=3)
    cache.prefetch([(1, 4), (1, 5)])
    _run(cache, [[(1, 4), (1, 6)]])        # 4 was prefetched (hit), 6 is a miss
    st = cache.stats
    assert (st.prefetches, st.prefetch_hits, st.hits, st.misses) == (2, 1, 1, 1)
    assert st.bytes_moved == 30
    cache.acquire([(2, 0), (2, 1), (2, 2)])  # all slots pinned: nothing can be evicted
    cache.prefetch([(3, 0)])
    assert cache.stats.prefetch_dropped == 1 and (3, 0) not in cache
    cache.release([(2, 0), (2, 1), (2, 2)])


def test_a_prefetch_never_evicts_an_earlier_key_of_its_own_list():
    """Room for one of two guesses (best first): the first stays even when its fetch
    has ended before the second is considered (fetches inline), and the second is
    dropped, not swapped in over it; it may evict an older entry."""
    cache = ExpertCache(FakeFetch(), block_nbytes=1, capacity=3)
    cache._pool = InlinePool()
    _run(cache, [[(0, 0)]])
    cache.acquire([(1, 0), (1, 1)])                     # one slot left: (0, 0), done
    cache.prefetch([(0, 4), (0, 6)], kind="token")      # (0, 4) evicts (0, 0)
    assert cache.keys() == [(1, 0), (1, 1), (0, 4)]
    assert (cache.stats.prefetches, cache.stats.prefetch_dropped) == (1, 1)
    cache.release([(1, 0), (1, 1)])
    cache.close()


def test_pinned_entries_are_never_evicted():
    cache = ExpertCache(FakeFetch(), block_nbytes=1, capacity=2)
    cache.acquire([(0, 0)])
    _run(cache, [[(0, 1)], [(0, 2)], [(0, 3)]])   # only the unpinned slot turns over
    assert (0, 0) in cache
    cache.release([(0, 0)])
    with pytest.raises(ValueError, match="3 experts requested at once, cache holds 2"):
        cache.acquire([(0, 0), (0, 1), (0, 2)])


def test_in_flight_prefetch_is_waited_for_not_refetched():
    fetch = FakeFetch(block=True)
    cache = ExpertCache(fetch, block_nbytes=1, capacity=2, workers=1)
    cache.prefetch([(0, 7)])
    cache.acquire([(0, 7)])
    threading.Timer(0.05, fetch.gate.set).start()
    assert cache.block((0, 7)) == "block(0, 7)"
    assert fetch.fetched == [(0, 7)] and cache.stats.hits == 1 and cache.stats.wait_s > 0
    cache.release([(0, 7)])
    cache.close()


def test_layer_policy_matches_its_simulator_and_beats_lru_on_cyclic_decode():
    """Decode visits layers cyclically; with fewer slots than one token's experts LRU
    evicts exactly what comes next, the layer-aware order does not."""
    from lowmem.expert_cache import lru_hits, policy_hits
    layers, slots = 6, 8
    rng = np.random.default_rng(1)
    steps = [[(layer, int(e)) for e in rng.choice(8, 2, replace=False)]
             for _ in range(30) for layer in range(layers)]
    flat = [k for s in steps for k in s]
    for policy in ("lru", "layer"):
        cache = ExpertCache(FakeFetch(), 1, slots, policy=policy, num_layers=layers)
        _run(cache, steps)
        assert cache.stats.hits == policy_hits(flat, slots, policy, layers)
    assert policy_hits(flat, slots, "lru", layers) == lru_hits(flat, slots)
    assert policy_hits(flat, slots, "layer", layers) > 2 * max(1, lru_hits(flat, slots))


def test_eviction_order_prefers_the_layer_furthest_ahead():
    from lowmem.expert_cache import eviction_order
    keys = [(2, 4), (0, 1), (3, 2), (1, 5), (3, 0)]     # least recently used first
    assert eviction_order(keys, "lru", 2, 4) == keys
    # current layer 2: layer 1 comes back last, then 0, then 3 (next); layer 2 last resort
    assert eviction_order(keys, "layer", 2, 4) == [(1, 5), (0, 1), (3, 2), (3, 0), (2, 4)]
    with pytest.raises(ValueError, match="cache policy must be one of"):
        ExpertCache(FakeFetch(), 1, 2, policy="fifo")


# --- cache policies ---------------------------------------------------------------------

def test_lru_and_belady_on_hand_computed_trace():
    trace = list("ABCABDABCD")
    # LRU, 3 slots: A B C miss; A B hit; D evicts C; A B hit; C evicts D; D evicts A.
    assert C.lru_hits(trace, 3) == 4
    # Belady: D evicts C (next use farthest); C evicts A or B (never used again); D hits.
    assert C.belady_hits(trace, 3) == 5
    cyclic = [1, 2, 3] * 3
    assert C.lru_hits(cyclic, 2) == 0                      # LRU's worst case
    # Belady, 2 slots: 1 2 m, 3 m (evict 2), 1 h, 2 m (evict 1), 3 h, 1 m (evict 3 or 2) ...
    assert C.belady_hits(cyclic, 2) == 3


def test_everything_fits_means_only_compulsory_misses():
    trace = [(0, 1), (0, 2), (1, 5), (0, 1), (1, 5), (0, 2)]
    assert C.lru_hits(trace, 3) == C.belady_hits(trace, 3) == len(trace) - 3
    with pytest.raises(ValueError):
        C.lru_hits(trace, 0)


def _optimal_hits(trace, slots):
    """Exhaustive search over every eviction choice: the true offline optimum."""
    best = 0

    def go(i, cache, hits):
        nonlocal best
        if i == len(trace):
            best = max(best, hits)
            return
        key = trace[i]
        if key in cache:
            go(i + 1, cache, hits + 1)
        elif len(cache) < slots:
            go(i + 1, cache | {key}, hits)
        else:
            for victim in cache:
                go(i + 1, (cache - {victim}) | {key}, hits)
    go(0, frozenset(), 0)
    return best


def test_belady_is_optimal_and_never_worse_than_lru():
    rng = random.Random(0)
    for _ in range(30):
        trace = [rng.randrange(5) for _ in range(11)]
        for slots in (1, 2, 3):
            best = _optimal_hits(trace, slots)
            assert C.belady_hits(trace, slots) == best, (trace, slots)
            assert C.lru_hits(trace, slots) <= best


def test_trace_keys_follow_engine_order():
    import numpy as np
    routing = [(0, np.array([[3, 1], [1, 4]])), (1, np.array([[2, 2]]))]
    assert C.trace_keys(routing) == [(0, 3), (0, 1), (0, 4), (1, 2)]
    assert C.trace_keys([]) == []
