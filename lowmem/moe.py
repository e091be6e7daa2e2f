"""The MoE call: each routed expert applied to exactly the tokens routed to it.

Two implementations behind one method, ``moe_groups(layer, groups, next_guess)``:
each group ``(x, gates, experts_host, experts, n_real)`` is a set of rows (a
prompt chunk, or the decode rows of a batch) whose rows >= n_real are padding,
and each gets back its fp32 (T, D) sum of gated expert outputs. Every expert
the groups need is read once for all of them: a continuous-batching step runs
its prompt chunks and its decode rows through one call. ``moe(layer, x, ...)``
is the one-group case.

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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lowmem import model as M
from lowmem.expert_cache import CacheStats, ExpertCache
from quant.packed import DTYPES, PackedModel, TensorEntry
from quant.qweight import TILE_ROWS, QWeight


CHUNK_BYTES = 32 << 20    # dequantized weight rows per step of a chunked expert matmul
LINEAR_CHUNK_BYTES = 4 << 20  # the same for resident projections (a weight ~ 40 MB, not 300)


def _slot_rows(slots, slot, part: TensorEntry, row0, rows: int) -> jax.Array:
    """Stored rows [row0, row0 + rows) of one part of a slot's block, as its dtype (rows, N)."""
    n = part.shape[1]
    itemsize = DTYPES[part.dtype].itemsize
    start = part.offset + row0 * n * itemsize
    raw = jax.lax.dynamic_slice(slots, (slot, start), (1, rows * n * itemsize))[0]
    if itemsize > 1:
        raw = raw.reshape(-1, itemsize)
    return jax.lax.bitcast_convert_type(raw, DTYPES[part.dtype]).reshape(rows, n)


def _chunk_rows(k: int, group: int, n: int, itemsize: int, chunk_bytes: int = CHUNK_BYTES,
                step: int = 2) -> int:
    """Input rows per chunk: about ``chunk_bytes`` dequantized, dividing K, aligned to the
    scale groups (a multiple of the group, or a divisor of it), a multiple of ``step``
    (2: int4 pairs; TILE_ROWS: whole tiles of tiled values)."""
    rows = max(step, min(k, chunk_bytes // (n * itemsize)))
    while rows > step and (k % rows or (group % rows and rows % group) or rows % step):
        rows -= 1
    return rows if k % rows == 0 and rows % step == 0 else k


def _chunked_matmul(x: jax.Array, n: int, group: int, bits: int, read,
                    chunk_bytes: int = CHUNK_BYTES, levels=None, tiled: bool = False
                    ) -> jax.Array:
    """x (T, K) @ W (K, N) -> fp32 (T, N), W dequantized one chunk of rows at a time.

    ``read(i, rows)`` returns chunk i of W: ``(values, scales)`` of its ``rows``
    input rows (int4 ``levels``: QWeight.levels; ``tiled``: whole tiles, in tile
    order, QWeight.tiled). W is dequantized exactly in
    fp32; only one chunk of it ever is (``chunk_bytes``), so a call's
    temporaries stay a small fraction of the weight instead of several times
    it; partial products are summed in fp32.
    """
    k = x.shape[1]
    rows = _chunk_rows(k, group, n, 4, chunk_bytes, TILE_ROWS if tiled else 2)

    def body(i, acc):
        q, s = read(i, rows)
        w = M.dequantize(QWeight(q, s, bits, min(rows, group), levels, tiled),
                         jnp.float32)                                      # (rows, N)
        xc = jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=1)      # (T, rows)
        return acc + jnp.dot(xc.astype(jnp.float32), w,
                             precision=jax.lax.Precision.HIGHEST)         # (T, N) fp32
    acc = jnp.zeros((x.shape[0], n), jnp.float32)
    return jax.lax.fori_loop(0, k // rows, body, acc)


def chunked_qmatmul(x: jax.Array, slots, slot, values: TensorEntry,
                    scales: TensorEntry) -> jax.Array:
    """x (T, K) @ W (K, N) -> fp32 (T, N), W read from a slot a chunk of rows at a time."""
    group, bits = values.group_size, values.bits

    def read(i, rows):
        vrows = rows // 2 if bits == 4 else rows                            # stored rows
        q = _slot_rows(slots, slot, values, i * vrows, vrows)              # (vrows, N + pad)
        s = _slot_rows(slots, slot, scales, (i * rows) // group, max(rows // group, 1))
        return q, s                                                         # s (srows, N) bf16
    return _chunked_matmul(x, scales.shape[1], group, bits, read, levels=values.levels,
                           tiled=values.tiled)


def chunked_linear(x: jax.Array, w, precision: str = "bf16") -> jax.Array:
    """x @ W for a resident weight, an int8/int4 QWeight a chunk of rows at a time -> fp32.

    The device backend's ``linear`` (attention projections): the same exact
    math as ``model.dense_linear`` (weights dequantized exactly, fp32
    accumulation, HIGHEST precision) without dequantizing the whole matrix
    every token.
    """
    M.act_dtype(precision)
    if not isinstance(w, QWeight):
        # bf16 weights (QuantSettings.attention='bf16'): XLA:CPU upcasts a bf16 matrix
        # whole inside any loop over it (measured), so chunking buys nothing there
        return M.dense_linear(x, w, precision)
    group, bits = w.group_size, w.bits

    def read(i, rows):
        vrows = rows // 2 if bits == 4 else rows
        q = jax.lax.dynamic_slice_in_dim(w.values, i * vrows, vrows, 0)     # (vrows, N)
        s = jax.lax.dynamic_slice_in_dim(w.scales, (i * rows) // group,
                                         max(rows // group, 1), 0)          # (srows, N) bf16
        return q, s
    return _chunked_matmul(x, w.shape[1], group, bits, read, LINEAR_CHUNK_BYTES, w.levels)


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
    """acc + sum over the group of gate(e) per token * e(x), in fp32 (acc None: zeros).

    One call per group of ``len(slot_ids)`` experts (a decode step's k routed
    experts: one dispatch per layer). An expert id of -1 pads a group: its
    gate is 0 everywhere. Module-level and keyed on the (hashable) block
    layout, so every engine of the same format shares one compiled function.
    """
    if acc is None:                          # the first group: no separate zeros dispatch
        acc = jnp.zeros((x.shape[0], x.shape[1]), jnp.float32)            # (T, D)
    for i in range(slot_ids.shape[0]):                                   # static: k
        gate = jnp.sum(jnp.where(experts == expert_ids[i], gates, 0.0), axis=-1)    # (T,)
        out = expert_ffn_slot(x, slots, slot_ids[i], parts)             # (T, D)
        acc = M.gated_sum_update(acc, out, gate)
    return acc


@jax.jit
def _mask_rows(experts, n_real):
    """Experts of rows >= n_real (padding) set to -1: no expert applies to them."""
    return jnp.where(jnp.arange(experts.shape[0])[:, None] < n_real, experts, -1)  # (T, k)


class DeviceMoE:
    """MoE on the accelerator with experts streamed through an ExpertCache.

    ``dispatches`` counts the jitted calls it has made (a decode step: one per
    layer when the k experts fit the cache); ``slot_writes`` the blocks written
    into slots (one dispatch each, as many as blocks arrive).
    """

    def __init__(self, model: PackedModel, cache: ExpertCache, prefetch: bool = True,
                 stager=None):
        self.model, self.cache, self.prefetch_enabled = model, cache, prefetch
        self.stager = stager                                # closed with the MoE
        self._parts = tuple(model.expert_parts)
        self._group = model.cfg.num_selected_experts        # experts per jitted call
        self.dispatches = 0

    @property
    def slot_writes(self) -> int:
        return getattr(self.cache.slots, "writes", 0)

    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    def moe(self, layer: int, x: jax.Array, gates: jax.Array, experts_host: np.ndarray,
            experts: jax.Array, n_real: int, next_guess: tuple | None = None) -> jax.Array:
        """Sum of gated expert outputs, fp32 (T, D); rows >= n_real are padding.

        The step's experts are pinned first, then the next layer's guessed
        experts are prefetched, so transfers overlap this layer's compute. A
        guess for a layer not after this one is the next token's ('token'
        prefetch: the engine passes layer 0's experts at the last layer).
        """
        acc = None                                                          # zeros in the call
        masked = experts                                                    # (T, k)
        if n_real < x.shape[0]:                                             # padded prefill
            masked = _mask_rows(experts, np.int32(n_real))
            self.dispatches += 1
        keys = self.cache.needed(layer, experts_host[:n_real])
        step = self.cache.capacity
        for i in range(0, len(keys), step):   # more experts than slots: in groups
            group = keys[i:i + step]
            self.cache.acquire(group)
            if i == 0 and next_guess is not None and self.prefetch_enabled:
                kind = "layer" if next_guess[0] > layer else "token"
                self.cache.prefetch(self.cache.needed(*next_guess), kind)
            try:
                for j in range(0, len(group), self._group):
                    acc = self._accumulate(acc, group[j:j + self._group], x, gates, masked)
            finally:
                self.cache.release(group)
        if acc is None:                                                     # no real rows
            acc = jnp.zeros((x.shape[0], x.shape[1]), jnp.float32)
            self.dispatches += 1
        return acc

    def moe_groups(self, layer: int, groups: list[tuple], next_guess: tuple | None = None
                   ) -> list[jax.Array]:
        """``moe`` of each group in turn: an expert the groups share is fetched once and
        hit in the cache after (its slot stays while the cache holds it); the
        device computes each group in its own jitted call, of a shape already
        compiled."""
        return [self.moe(layer, *g, next_guess if i == 0 else None)
                for i, g in enumerate(groups)]

    def _accumulate(self, acc, keys, x, gates, masked):
        """One jitted call for up to k experts; a short group is padded with expert -1."""
        slots = [self.cache.get(key) for key in keys]
        ids = [key[1] for key in keys]
        pad = self._group - len(keys)
        slot_ids = np.array(slots + slots[:1] * pad, np.int32)            # (k,)
        expert_ids = np.array(ids + [-1] * pad, np.int32)                  # (k,)
        self.dispatches += 1
        return _experts_accumulate(self._parts, acc, self.cache.slots.array, slot_ids,
                                   expert_ids, x, gates, masked)

    def close(self) -> None:
        self.cache.close()
        if self.stager is not None:
            self.stager.close()


class HostMoE:
    """MoE in numba kernels reading the memory-mapped expert files directly.

    Nothing is cached or transferred: ``stats`` counts requests and the bytes
    read (as ``bytes_moved``); hits and misses stay 0, so the hit rate is None.
    """

    dispatches = slot_writes = 0        # numba kernels: nothing dispatched to XLA

    def __init__(self, model: PackedModel, a8: Callable[[int], bool] | None = None):
        """a8: whether an expert applied to this many rows takes int8 activations (the
        backend's rule, ``HostBackend.a8``); None: fp32 always."""
        self.model, self.stats, self.a8 = model, CacheStats(), a8

    def moe(self, layer: int, x: jax.Array, gates: jax.Array, experts_host: np.ndarray,
            experts: jax.Array, n_real: int, next_guess: tuple | None = None) -> np.ndarray:
        """Like DeviceMoE.moe; nothing to prefetch: the kernels read the mapping."""
        return self.moe_groups(layer, [(x, gates, experts_host, experts, n_real)])[0]

    def moe_groups(self, layer: int, groups: list[tuple], next_guess: tuple | None = None
                   ) -> list[np.ndarray]:
        """The real rows of every group in ONE pass: each expert is read once and
        applied to all rows routed to it, whichever group they belong to."""
        from lowmem.cpu_kernels import expert_ffn
        real = [n for *_, n in groups]
        xs = np.concatenate([np.asarray(g[0])[:n] for g, n in zip(groups, real)]
                            ).astype(np.float32, copy=False)               # (R, D), R real rows
        gs = np.concatenate([np.asarray(g[1], np.float32)[:n] for g, n in zip(groups, real)])
        routed = np.concatenate([g[2][:n] for g, n in zip(groups, real)])  # (R, k)
        acc = np.zeros(xs.shape, np.float32)                               # (R, D)
        for _, e in ExpertCache.needed(layer, routed):
            rows, slot = np.nonzero(routed == e)
            block = self.model.expert(layer, e)
            a8 = self.a8 is not None and self.a8(len(rows))
            out = expert_ffn(np.ascontiguousarray(xs[rows]), block.gate, block.up, block.down,
                             round_bf16=False, act_int8=a8)  # the MoE is fp32
            acc[rows] += gs[rows, slot][:, None] * out
            self.stats.requests += 1
            self.stats.bytes_moved += block.nbytes
        outs, start = [], 0
        for g, n in zip(groups, real):
            out = np.zeros((g[0].shape[0], acc.shape[1]), np.float32)      # (T, D), padding 0
            out[:n] = acc[start:start + n]
            outs.append(out)
            start += n
        return outs

    def close(self) -> None:
        pass
