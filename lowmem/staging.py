"""Host -> device staging of expert blocks through a persistent ring of chunk buffers.

An expert block is one contiguous byte range of a memory-mapped file
(``quant.packed``; 302 MB for Grok-1 at int4). One thread copying a whole block
into a freshly allocated buffer, then transferring it, caps the link far below
its speed. ``Stager`` instead splits a block into chunks (tens of MB) and has
several worker threads each fill a chunk buffer from the mapping (page faults
and disk reads happen here, in parallel) and start its transfer, so earlier
chunks are on their way while later ones are being filled.

The chunk buffers (``StagingRing``) are page-aligned and allocated and
registered with the runtime ONCE, so a fetch allocates no host memory and
makes no second host copy. Registration, the first that the device supports:

- 'dma_map': plain aligned buffers registered with the client's ``dma_map``
  (a GPU then DMAs straight from them);
- 'pinned': page-locked arrays in the device's ``pinned_host`` memory, filled
  through a numpy view of their host address;
- 'pageable': plain aligned buffers (a CPU; or a device with neither).

On a CPU, ``device_put`` of an aligned buffer ALIASES it: the "device" array
is the ring buffer itself. A ring buffer is reused as soon as its chunk's
transfer is complete, so an aliased chunk is copied first (a CPU's transfer
is that copy); the check is on the buffer addresses, not on the platform.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from quant.packed import PackedModel

log = logging.getLogger(__name__)
PAGE = 4096
CHUNK_BYTES = 32 << 20      # default chunk: tens of MB, so that workers overlap within a block
WORKERS = 4                 # default fill threads
REGISTRATIONS = ("auto", "dma_map", "pinned", "pageable")


def chunk_layout(nbytes: int, chunk_bytes: int) -> tuple[int, int]:
    """(chunks, chunk size): equal page-aligned chunks covering ``nbytes``; the last
    one's tail past ``nbytes`` is never read from the file nor written to a slot."""
    pages = -(-nbytes // PAGE)
    count = max(1, -(-nbytes // max(chunk_bytes, PAGE)))
    size = -(-pages // count) * PAGE
    return -(-nbytes // size), size


def _aligned_empty(nbytes: int, align: int = PAGE) -> np.ndarray:
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


@jax.jit
def _device_copy(chunk):
    """A new device buffer with the chunk's bytes (for a transfer that aliased its source)."""
    return jnp.copy(chunk)                                                  # (C,) uint8


class StagingRing:
    """``count`` page-aligned host buffers of ``chunk`` bytes, allocated and registered once.

    ``acquire()`` blocks until a buffer is free and returns its index;
    ``release(i)`` frees it. ``views[i]`` is the numpy view a worker fills;
    ``sources[i]`` what it hands to ``device_put`` (the view, or the pinned array).
    """

    def __init__(self, device, count: int, chunk: int, registration: str = "auto"):
        if registration not in REGISTRATIONS:
            raise ValueError(f"registration must be one of {REGISTRATIONS}, got {registration!r}")
        self.device, self.chunk = device, chunk
        self._mapped: list[int] = []
        self.registration = self._register(registration, count)
        self.pointers = tuple(v.ctypes.data for v in self.views)
        self._free = list(range(count))
        self._cond = threading.Condition()

    def _register(self, registration: str, count: int) -> str:
        """Allocate the buffers the way asked ('auto': the first the device supports)."""
        on_cpu = self.device.platform == "cpu"
        order = ([registration] if registration != "auto" else
                 ["pageable"] if on_cpu else ["dma_map", "pinned", "pageable"])
        for mode in order:
            try:
                self.views, self.sources = getattr(self, "_alloc_" + mode)(count)
                return mode
            except (jax.errors.JaxRuntimeError, AttributeError, ValueError) as e:
                self.close()
                if registration != "auto":
                    raise
                log.info("staging: %s registration unavailable (%s)", mode, e)
        raise AssertionError("unreachable: pageable allocation cannot fail")

    def _alloc_pageable(self, count: int):
        views = [_aligned_empty(self.chunk) for _ in range(count)]
        return views, views

    def _alloc_dma_map(self, count: int):
        views = [_aligned_empty(self.chunk) for _ in range(count)]
        for v in views:
            self.device.client.dma_map(v.ctypes.data, v.nbytes)
            self._mapped.append(v.ctypes.data)
        return views, views

    def _alloc_pinned(self, count: int):
        if "pinned_host" not in {m.kind for m in self.device.addressable_memories()}:
            raise ValueError(f"{self.device.platform} has no pinned_host memory")
        sharding = jax.sharding.SingleDeviceSharding(self.device, memory_kind="pinned_host")
        sources = [jax.device_put(np.zeros(self.chunk, np.uint8), sharding) for _ in range(count)]
        jax.block_until_ready(sources)
        views = [np.ctypeslib.as_array((ctypes.c_uint8 * self.chunk).from_address(
            s.unsafe_buffer_pointer())) for s in sources]                   # (C,) uint8 host views
        return views, sources

    def acquire(self) -> int:
        with self._cond:
            while not self._free:
                self._cond.wait()
            return self._free.pop()

    def release(self, i: int) -> None:
        with self._cond:
            self._free.append(i)
            self._cond.notify()

    def close(self) -> None:
        for ptr in self._mapped:
            self.device.client.dma_unmap(ptr)
        self._mapped = []


class Stager:
    """The expert cache's fetch function: a block's chunks, filled and sent in parallel.

    ``stager(key)`` returns the block as a tuple of ``chunks`` device arrays of
    ``chunk`` bytes each (uint8); ``DeviceSlots.write`` puts them into a slot.
    Several blocks may be fetched at once (the cache's threads): their chunks
    share the ring and the workers.
    """

    def __init__(self, model: PackedModel, device, workers: int = WORKERS,
                 chunk_bytes: int = CHUNK_BYTES, buffers: int | None = None,
                 registration: str = "auto"):
        if workers < 1:
            raise ValueError(f"staging workers must be >= 1, got {workers}")
        self.model, self.device = model, device
        self.nbytes = model.expert_block_nbytes
        self.chunks, self.chunk = chunk_layout(self.nbytes, chunk_bytes)
        self.ring = StagingRing(device, max(buffers or 2 * workers, workers), self.chunk,
                                registration)
        self._target = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="lowmem-stage")
        self.aliased_chunks = 0            # transfers that aliased a ring buffer (then copied)
        self._count_lock = threading.Lock()

    @property
    def registration(self) -> str:
        return self.ring.registration

    def __call__(self, key: tuple[int, int]) -> tuple[jax.Array, ...]:
        raw = self.model.expert(*key).raw                       # uint8 (nbytes,) memmap view
        futures = [self._pool.submit(self._send, raw, i) for i in range(self.chunks)]
        return tuple(f.result() for f in futures)              # chunks x (C,) uint8

    def _send(self, raw: np.ndarray, i: int) -> jax.Array:
        """Fill a ring buffer with chunk i, transfer it; the buffer is free again on return."""
        start = i * self.chunk
        n = min(self.chunk, self.nbytes - start)
        b = self.ring.acquire()
        try:
            np.copyto(self.ring.views[b][:n], raw[start:start + n])     # page faults here
            out = jax.device_put(self.ring.sources[b], self._target)    # (C,) uint8
            if out.unsafe_buffer_pointer() == self.ring.pointers[b]:   # aliased (a CPU)
                with self._count_lock:
                    self.aliased_chunks += 1
                aliased, out = out, _device_copy(out)
                del aliased
            out.block_until_ready()                             # the buffer is reusable after this
            return out
        finally:
            self.ring.release(b)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.ring.close()
