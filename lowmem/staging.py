"""Host -> device staging of expert blocks.

An expert block is one contiguous byte range of a memory-mapped file
(``quant.packed``). ``Stager`` is the expert cache's fetch function: it moves
one block to the device through a bounded set of staging buffers, so at most
``num_buffers`` blocks are in host memory at once however many fetches run.
"""
from __future__ import annotations

import threading

import jax
import numpy as np

from quant.packed import PackedModel


class Stager:
    """Copies expert blocks host -> device, at most ``num_buffers`` at a time.

    On an accelerator, ``device_put`` from pageable memory is several times
    slower than the link; page-locked (``pinned_host``) memory is the fast
    path. With pinned memory a block goes mapped file -> pinned host array ->
    device (one host copy); without it, through one of a fixed set of
    page-aligned pageable staging buffers. On a CPU, ``device_put`` of the
    mapped range aliases it: no copy at all. tools/bench_streaming.py measures
    both accelerator paths against a plain copy.
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

    def __call__(self, key: tuple[int, int]) -> jax.Array:
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
