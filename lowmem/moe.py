"""The MoE call: each routed expert applied to exactly the tokens routed to it.

Two implementations behind one method, ``moe(layer, x, gates, experts, n_real,
next_guess)`` -> fp32 (T, D) sum of gated expert outputs:

- ``DeviceMoE``: expert blocks come through an ``ExpertCache`` (one slot
  array in device memory); one jitted call per layer runs the k routed
  experts straight from their slots, dequantizing a chunk of rows at a time
  so that temporaries stay a fraction of a block. The next layer's guessed
  experts are prefetched while this layer computes.
- ``HostMoE``: numba kernels compute straight from the memory-mapped files.
  On a CPU the "device" is host memory, so a transfer would only copy bytes
  that are already there.

Both count their traffic in a ``CacheStats``.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lowmem import model as M
from lowmem.expert_cache import CacheStats, ExpertCache
from quant.packed import DTYPES, PackedModel, TensorEntry
from quant.qweight import QWeight


CHUNK_BYTES = 32 << 20    # dequantized weight rows per step of a chunked expert matmul


def _slot_rows(slots, slot, part: TensorEntry, row0, rows: int) -> jax.Array:
    """Stored rows [row0, row0 + rows) of one part of a slot's block, as its dtype (rows, N)."""
    n = part.shape[1]
    itemsize = DTYPES[part.dtype].itemsize
    start = part.offset + row0 * n * itemsize
    raw = jax.lax.dynamic_slice(slots, (slot, start), (1, rows * n * itemsize))[0]
    if itemsize > 1:
        raw = raw.reshape(-1, itemsize)
    return jax.lax.bitcast_convert_type(raw, DTYPES[part.dtype]).reshape(rows, n)


def _chunk_rows(k: int, group: int, n: int, itemsize: int) -> int:
    """Input rows per chunk: about CHUNK_BYTES dequantized, dividing K, aligned to the
    scale groups (a multiple of the group, or a divisor of it), even (int4 pairs)."""
    rows = max(2, min(k, CHUNK_BYTES // (n * itemsize)))
    while rows > 2 and (k % rows or (group % rows and rows % group) or rows % 2):
        rows -= 1
    return rows if k % rows == 0 else k


def chunked_qmatmul(x: jax.Array, slots, slot, values: TensorEntry,
                    scales: TensorEntry) -> jax.Array:
    """x (T, K) @ W (K, N) -> fp32 (T, N), W read from a slot a chunk of rows at a time.

    W is dequantized exactly in fp32. Only one chunk of it is ever dequantized
    (``CHUNK_BYTES``), so an expert call's temporaries stay a small fraction
    of its block instead of several times it; partial products are summed in
    fp32.
    """
    k, n = x.shape[1], values.shape[1]
    group, bits = values.group_size, values.bits
    rows = _chunk_rows(k, group, n, 4)
    vrows = rows // 2 if bits == 4 else rows                   # stored rows per chunk
    srows = max(rows // group, 1)

    def body(i, acc):
        q = _slot_rows(slots, slot, values, i * vrows, vrows)              # (vrows, N)
        s = _slot_rows(slots, slot, scales, (i * rows) // group, srows)    # (srows, N) bf16
        w = M.dequantize(QWeight(q, s, bits, min(rows, group)), jnp.float32)  # (rows, N)
        xc = jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=1)      # (T, rows)
        return acc + jnp.dot(xc.astype(jnp.float32), w,
                             precision=jax.lax.Precision.HIGHEST)         # (T, N) fp32
    acc = jnp.zeros((x.shape[0], n), jnp.float32)
    return jax.lax.fori_loop(0, k // rows, body, acc)


def expert_ffn_slot(x: jax.Array, slots, slot, parts: tuple[TensorEntry, ...]) -> jax.Array:
    """The GeGLU expert in a slot -> fp32 (T, D), reading its weights in chunks.

    All fp32, weights dequantized exactly, in both engine precisions: the
    release as executed under jit rounds nothing in its MoE (docs/FIDELITY.md).
    """
    p = {(e.role, e.part): e for e in parts}

    def mm(a, role):
        return chunked_qmatmul(a, slots, slot, p[(role, "values")], p[(role, "scales")])
    hidden = jax.nn.gelu(mm(x, "gate"), approximate=True) * mm(x, "up")  # (T, F)
    return mm(hidden, "down")                                             # (T, D)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def _experts_accumulate(parts, acc, slots, slot_ids, expert_ids, x, gates, experts):
    """acc + sum over the group of gate(e) per token * e(x), in fp32.

    One call per group of ``len(slot_ids)`` experts (a decode step's k routed
    experts: one dispatch per layer). An expert id of -1 pads a group: its
    gate is 0 everywhere. Module-level and keyed on the (hashable) block
    layout, so every engine of the same format shares one compiled function.
    """
    for i in range(slot_ids.shape[0]):                                   # static: k
        gate = jnp.sum(jnp.where(experts == expert_ids[i], gates, 0.0), axis=-1)    # (T,)
        out = expert_ffn_slot(x, slots, slot_ids[i], parts)             # (T, D)
        acc = M.gated_sum_update(acc, out, gate)
    return acc


class DeviceMoE:
    """MoE on the accelerator with experts streamed through an ExpertCache."""

    def __init__(self, model: PackedModel, cache: ExpertCache, prefetch: bool = True):
        self.model, self.cache, self.prefetch_enabled = model, cache, prefetch
        self._parts = tuple(model.expert_parts)
        self._group = model.cfg.num_selected_experts        # experts per jitted call

    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    def moe(self, layer: int, x: jax.Array, gates: jax.Array, experts_host: np.ndarray,
            experts: jax.Array, n_real: int, next_guess: tuple | None = None) -> jax.Array:
        """Sum of gated expert outputs, fp32 (T, D); rows >= n_real are padding.

        The step's experts are pinned first, then the next layer's guessed
        experts are prefetched, so transfers overlap this layer's compute.
        """
        acc = jnp.zeros((x.shape[0], self.model.cfg.emb_size), jnp.float32)   # (T, D)
        masked = jnp.where(jnp.arange(x.shape[0])[:, None] < n_real, experts, -1)  # (T, k)
        keys = self.cache.needed(layer, experts_host[:n_real])
        step = self.cache.capacity
        for i in range(0, len(keys), step):   # more experts than slots: in groups
            group = keys[i:i + step]
            self.cache.acquire(group)
            if i == 0 and next_guess is not None and self.prefetch_enabled:
                self.cache.prefetch(self.cache.needed(*next_guess))
            try:
                for j in range(0, len(group), self._group):
                    acc = self._accumulate(acc, group[j:j + self._group], x, gates, masked)
            finally:
                self.cache.release(group)
        return acc

    def _accumulate(self, acc, keys, x, gates, masked):
        """One jitted call for up to k experts; a short group is padded with expert -1."""
        slots = [self.cache.get(key) for key in keys]
        ids = [key[1] for key in keys]
        pad = self._group - len(keys)
        slot_ids = np.array(slots + slots[:1] * pad, np.int32)            # (k,)
        expert_ids = np.array(ids + [-1] * pad, np.int32)                  # (k,)
        return _experts_accumulate(self._parts, acc, self.cache.slots.array, slot_ids,
                                   expert_ids, x, gates, masked)

    def close(self) -> None:
        self.cache.close()


class HostMoE:
    """MoE in numba kernels reading the memory-mapped expert files directly.

    Nothing is cached or transferred: ``stats`` counts requests and the bytes
    read (as ``bytes_moved``); hits and misses stay 0, so the hit rate is None.
    """

    def __init__(self, model: PackedModel):
        self.model, self.stats = model, CacheStats()

    def moe(self, layer: int, x: jax.Array, gates: jax.Array, experts_host: np.ndarray,
            experts: jax.Array, n_real: int, next_guess: tuple | None = None) -> np.ndarray:
        """Like DeviceMoE.moe; nothing to prefetch: the kernels read the mapping."""
        from lowmem.cpu_kernels import expert_ffn
        xs = np.asarray(x[:n_real]).astype(np.float32)                    # (n, D)
        g = np.asarray(gates[:n_real], np.float32)                         # (n, k) unrounded
        routed = experts_host[:n_real]                                      # (n, k)
        acc = np.zeros((x.shape[0], x.shape[1]), np.float32)               # (T, D)
        for _, e in ExpertCache.needed(layer, routed):
            rows, slot = np.nonzero(routed == e)
            block = self.model.expert(layer, e)
            out = expert_ffn(np.ascontiguousarray(xs[rows]), block.gate, block.up, block.down,
                             round_bf16=False)                          # the MoE is fp32
            acc[rows] += g[rows, slot][:, None] * out
            self.stats.requests += 1
            self.stats.bytes_moved += block.nbytes
        return acc

    def close(self) -> None:
        pass
