"""The MoE call: each routed expert applied to exactly the tokens routed to it.

Two implementations behind one method, ``moe(layer, x, gates, experts, n_real,
next_guess)`` -> fp32 (T, D) sum of gated expert outputs:

- ``DeviceMoE``: expert blocks come through an ``ExpertCache`` (device
  memory); a jitted function slices and dequantizes a block and runs the
  expert. The next layer's guessed experts are prefetched while this layer
  computes.
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
from quant.spec import EXPERT_ROLES


def expert_weights_device(parts: tuple[TensorEntry, ...], block: jax.Array) -> dict[str, QWeight]:
    """Slice and bitcast a device uint8 block into gate/up/down QWeights (inside jit)."""
    arrays = {}
    for p in parts:
        raw = jax.lax.slice(block, (p.offset,), (p.offset + p.nbytes,))    # (nbytes,) uint8
        itemsize = DTYPES[p.dtype].itemsize
        if itemsize > 1:
            raw = raw.reshape(-1, itemsize)
        arrays[(p.role, p.part)] = jax.lax.bitcast_convert_type(raw, DTYPES[p.dtype]).reshape(p.shape)
    bits = {p.role: (p.bits, p.group_size) for p in parts}
    return {role: QWeight(arrays[(role, "values")], arrays[(role, "scales")], *bits[role])
            for role in EXPERT_ROLES}


def expert_ffn_device(x: jax.Array, w: dict[str, QWeight], precision: str = "bf16"
                      ) -> jax.Array:
    """GeGLU expert -> fp32 (T, D).

    'bf16' (the reference's bf16 mode): gate/up outputs are bf16; gelu (tanh),
    the product and the down projection run in fp32, as the reference's expert
    selection promotes them, on bf16-rounded down weights. 'fp32': all fp32,
    weights dequantized exactly.
    """
    g = M.dense_linear(x, w["gate"], precision).astype(jnp.float32)       # (T, F)
    u = M.dense_linear(x, w["up"], precision).astype(jnp.float32)         # (T, F)
    hidden = jax.nn.gelu(g, approximate=True) * u
    down = M.dequantize(w["down"], M.act_dtype(precision)).astype(jnp.float32)  # (F, D)
    return jnp.dot(hidden, down, precision=jax.lax.Precision.HIGHEST)     # (T, D)


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def _experts_accumulate(parts, precision, acc, slots, slot_ids, expert_ids, x, gates, experts):
    """acc + sum over the group of gate(e) per token (bf16-rounded in 'bf16') * e(x).

    One call per group of ``len(slot_ids)`` experts (a decode step's k routed
    experts: one dispatch per layer). An expert id of -1 pads a group: its
    gate is 0 everywhere. Module-level and keyed on the (hashable) block
    layout and the precision, so every engine of the same format shares one
    compiled function.
    """
    for i in range(slot_ids.shape[0]):                                   # static: k
        block = jax.lax.dynamic_index_in_dim(slots, slot_ids[i], 0, keepdims=False)  # (nbytes,)
        gate = jnp.sum(jnp.where(experts == expert_ids[i], gates, 0.0), axis=-1)    # (T,)
        out = expert_ffn_device(x, expert_weights_device(parts, block), precision)  # (T, D)
        acc = M.gated_sum_update(acc, out, gate, precision)
    return acc


class DeviceMoE:
    """MoE on the accelerator with experts streamed through an ExpertCache."""

    def __init__(self, model: PackedModel, cache: ExpertCache, prefetch: bool = True,
                 precision: str = "bf16"):
        self.model, self.cache, self.prefetch_enabled = model, cache, prefetch
        self._parts = tuple(model.expert_parts)
        self._group = model.cfg.num_selected_experts        # experts per jitted call
        self.precision = precision

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
        return _experts_accumulate(self._parts, self.precision, acc, self.cache.slots.array,
                                   slot_ids, expert_ids, x, gates, masked)

    def close(self) -> None:
        self.cache.close()


class HostMoE:
    """MoE in numba kernels reading the memory-mapped expert files directly.

    Nothing is cached or transferred: ``stats`` counts requests and the bytes
    read (as ``bytes_moved``); hits and misses stay 0, so the hit rate is None.
    """

    def __init__(self, model: PackedModel, precision: str = "bf16"):
        self.model, self.stats = model, CacheStats()
        self.precision = precision

    def moe(self, layer: int, x: jax.Array, gates: jax.Array, experts_host: np.ndarray,
            experts: jax.Array, n_real: int, next_guess: tuple | None = None) -> np.ndarray:
        """Like DeviceMoE.moe; nothing to prefetch: the kernels read the mapping."""
        from lowmem.cpu_kernels import expert_ffn
        xs = np.asarray(x[:n_real]).astype(np.float32)                    # (n, D)
        g = np.asarray(gates[:n_real], np.float32)                         # (n, k)
        bf16 = self.precision == "bf16"
        if bf16:   # the release weights the experts by bf16(gate)
            g = g.astype(jnp.bfloat16).astype(np.float32)
        routed = experts_host[:n_real]                                      # (n, k)
        acc = np.zeros((x.shape[0], x.shape[1]), np.float32)               # (T, D)
        for _, e in ExpertCache.needed(layer, routed):
            rows, slot = np.nonzero(routed == e)
            block = self.model.expert(layer, e)
            out = expert_ffn(np.ascontiguousarray(xs[rows]), block.gate, block.up, block.down,
                             round_bf16=bf16)
            acc[rows] += g[rows, slot][:, None] * out
            self.stats.requests += 1
            self.stats.bytes_moved += block.nbytes
        return acc

    def close(self) -> None:
        pass
