"""The streaming engine: resident attention and embeddings, routed experts streamed.

An ``Engine`` opens nothing itself: it takes a ``PackedModel`` and a backend
(``lowmem.backends``: host or device) that places the resident weights once
and owns the expert computation. The KV cache is preallocated and donated to
every step. One forward step is a Python loop over layers of jitted,
fixed-shape functions, because the experts a layer needs are known only after
its router runs. The jitted functions are module-level, keyed on the config
and the backend's product functions, so engines of one config share their
compiled code.

The engine owns the sequence: ``reset()`` starts one, ``feed(tokens)``
advances it and returns the last token's logits. Nothing outside writes its
state.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lowmem import model as M
from lowmem.backends import BackendError, make_backend
from lowmem.timing import StepTimer
from quant.packed import PackedModel

log = logging.getLogger(__name__)
PREFILL_BUCKETS = (16, 64, 256)   # prompt chunk lengths compiled; the largest is the chunk
HEADROOM_GIB = 2.0                # device memory the default expert budget leaves free


class EngineError(ValueError):
    """Bad engine settings or inputs (too small a cache, too long a prompt, ...)."""


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "auto"                 # 'auto', 'host' (numba on the mapped files), 'device'
    expert_cache_gb: float | None = None  # device backend, GiB; None = what fits
    prefetch: bool = True                 # device backend: guess and fetch the next layer's experts
    cache_policy: str = "auto"            # 'auto', 'lru' or 'layer' (see expert_cache.choose_policy)
    context: int | None = None            # KV cache length in tokens; None = the model's sequence_len
    prefill_buckets: tuple[int, ...] = PREFILL_BUCKETS
    staging_buffers: int = 2              # device backend: expert blocks in host staging at once
    headroom_gb: float = HEADROOM_GIB     # GiB left free on the device by the default budget
    profile: bool = False                 # per-section timing (synchronizes each section)
    record_routing: bool = False          # keep (layer, experts of real tokens) per layer step


def cache_length(context: int, buckets: tuple[int, ...] = PREFILL_BUCKETS) -> int:
    """KV cache rows for a context: whole prefill chunks, so a last chunk always fits."""
    chunk = max(buckets)
    return -(-context // chunk) * chunk


@dataclass
class _State:
    """Per-sequence state: the KV cache (donated to each step), key validity, position."""
    caches: list
    valid: jax.Array     # (S,) bool
    pos: int = 0


# Module-level jitted steps: static (config, backend functions), so shared by engines.
_attention = jax.jit(M.attention_block, static_argnums=(0, 1), donate_argnames=("cache",))
_residual = jax.jit(M.moe_residual, static_argnums=(0,))
_mark_valid = jax.jit(M.mark_valid, donate_argnums=(0,))
_embed = jax.jit(M.embed, static_argnums=(0,))


@partial(jax.jit, static_argnums=(0,))
def _route(cfg, norm, router, next_norm, next_router, h):
    """MoE input and routing of this layer, plus a guess at the next layer's experts.

    The experts and the guess come back as one (T, 2k) array: the step reads
    it to the host once per layer.
    """
    moe_in = M.rms_norm(cfg, h, norm)                                      # (T, D) bf16
    _, gates, experts = M.route(cfg, moe_in, router)                       # (T, k), (T, k)
    _, _, next_experts = M.route(cfg, M.rms_norm(cfg, h, next_norm), next_router)
    return moe_in, gates, experts, jnp.concatenate([experts, next_experts], axis=1)


@partial(jax.jit, static_argnums=(0, 1))
def _last_logits(cfg, logits_fn, h, final_norm, table, index):
    """Final norm and tied output logits for one row of h -> fp32 (V,)."""
    hn = M.final_hidden(cfg, jax.lax.dynamic_slice_in_dim(h, index, 1, 0), final_norm)  # (1, D)
    return logits_fn(cfg, hn, table)[0]


class Engine:
    """One model on one device: resident weights placed, KV cache allocated, experts ready."""

    def __init__(self, model: PackedModel, options: EngineOptions | None = None, device=None):
        self.model, self.options = model, options or EngineOptions()
        self.cfg = model.cfg
        self.device = device or jax.devices()[0]
        try:
            self.backend = make_backend(self.options.backend, model, self.device, self.options)
        except BackendError as e:
            raise EngineError(str(e)) from None
        self.context = self.options.context or self.cfg.sequence_len
        self.cache_len = cache_length(self.context, self.options.prefill_buckets)
        self.timer = StepTimer(self.options.profile)
        self.routing_trace: list[tuple[int, np.ndarray]] = []
        self.host_syncs = 0                 # device -> host reads that block (to_host)
        self.layers = self.backend.place_layers()
        self.final_norm = jax.device_put(model.final_norm(), self.device)
        self._state = self._new_state()     # before sizing the cache: the KV cache counts
        self.experts = self._make_moe()

    # --- set-up and lifetime ------------------------------------------------
    def _new_state(self) -> _State:
        caches = M.init_kv_cache(self.cfg, self.cache_len, self.device)
        valid = jax.device_put(jnp.zeros((self.cache_len,), bool), self.device)
        return _State(caches, valid, 0)

    def _make_moe(self, fetch_hook: Callable | None = None):
        try:
            return self.backend.make_moe(self.options, fetch_hook)
        except BackendError as e:
            raise EngineError(str(e)) from None

    def reset_expert_cache(self, fetch_hook: Callable | None = None) -> None:
        """Start again from an empty expert cache with the same options (policy included).

        ``fetch_hook(fetch) -> fetch`` may wrap the transfer function (profiling
        times each transfer this way).
        """
        self.experts.close()
        self.experts = self._make_moe(fetch_hook)

    def close(self) -> None:
        """Stop transfer threads and release the backend; the engine is unusable after."""
        self.experts.close()
        self.backend.close()

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def expert_stats(self):
        return self.experts.stats

    @property
    def placed_resident_bytes(self) -> int:
        """Bytes of resident weights placed on the device (host-backend weights stay mapped)."""
        leaves = jax.tree_util.tree_leaves([self.layers, self.final_norm, self.backend.placed_table])
        return sum(int(x.nbytes) for x in leaves if isinstance(x, jax.Array))

    @property
    def kv_cache_bytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes for c in self._state.caches)

    def to_host(self, x) -> np.ndarray:
        """Read a device value on the host: the one blocking read, and counted."""
        self.host_syncs += 1
        return np.asarray(x)

    # --- the sequence ---------------------------------------------------------
    @property
    def position(self) -> int:
        """Tokens in the current sequence."""
        return self._state.pos

    def reset(self) -> None:
        """Start a new sequence (the KV cache is reused, every key marked invalid)."""
        self._state = _State(self._state.caches, jnp.zeros_like(self._state.valid), 0)

    def feed(self, tokens) -> jax.Array:
        """Append tokens (a prompt or one decode token); fp32 logits (V,) of the last one.

        Lengths are padded to a few fixed buckets (1 for decode) so that each
        shape compiles once; padded positions are marked invalid keys. If a
        step fails midway, its donated KV buffers are gone: the sequence is
        reset onto a fresh cache so that later calls still work.
        """
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        if self.position + len(tokens) > self.context:
            raise EngineError(f"sequence of {self.position + len(tokens)} tokens exceeds the "
                              f"context of {self.context}")
        chunk = max(self.options.prefill_buckets)
        logits = None
        try:
            for start in range(0, len(tokens), chunk):
                part = tokens[start:start + chunk]
                size = 1 if len(part) == 1 else self._bucket(len(part))
                padded = np.zeros(size, np.int32)
                padded[:len(part)] = part
                last = start + chunk >= len(tokens)
                logits, self._state = self._forward_chunk(self._state, padded, len(part), last)
        except BaseException:
            self._state = self._new_state()
            raise
        return logits

    # --- sequences held outside the engine (lowmem.batch) ---------------------
    def advance(self, state, tokens):
        """Feed one prompt chunk to a sequence state held by the caller -> (logits, state).

        Continuous batching keeps one state per KV cache slot and prefills a
        new request chunk by chunk between decode steps; the state's KV
        cache is donated. A chunk is at most the largest prefill bucket.
        """
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        if not 0 < len(tokens) <= max(self.options.prefill_buckets):
            raise EngineError(f"a chunk holds 1 to {max(self.options.prefill_buckets)} tokens, "
                              f"got {len(tokens)}")
        if state.pos + len(tokens) > self.context:
            raise EngineError(f"sequence of {state.pos + len(tokens)} tokens exceeds the "
                              f"context of {self.context}")
        size = 1 if len(tokens) == 1 else self._bucket(len(tokens))
        padded = np.zeros(size, np.int32)
        padded[:len(tokens)] = tokens
        return self._forward_chunk(state, padded, len(tokens), True)

    def moe_layer(self, layer: int, h: jax.Array, n: int) -> jax.Array:
        """Route rows h (T, D) of one layer and add their experts' outputs -> (T, D).

        The rows may belong to different sequences (batched decode): one
        routing read, one MoE call, each needed expert fetched once for all
        rows. Rows >= n are padding. Keep in step with ``_forward_chunk``.
        """
        cfg, k = self.cfg, self.cfg.num_selected_experts
        lp, nxt = self.layers[layer], self.layers[min(layer + 1, len(self.layers) - 1)]
        moe_in, gates, experts, routing = _route(
            cfg, lp["moe_norm"], lp["router"], nxt["moe_norm"], nxt["router"], h)
        routing = self.to_host(routing)                                     # (T, 2k) sync
        if self.options.record_routing:
            self.routing_trace.append((layer, routing[:n, :k].copy()))
        guess = (layer + 1, routing[:n, k:]) if layer + 1 < len(self.layers) else None
        moe = self.experts.moe(layer, moe_in, gates, routing[:, :k], experts, n, guess)
        return _residual(cfg, h, moe, lp["moe_post_norm"])

    # --- forward ----------------------------------------------------------
    def _bucket(self, n: int) -> int:
        return next((b for b in self.options.prefill_buckets if n <= b),
                    max(self.options.prefill_buckets))

    def _forward_chunk(self, state: _State, tokens: np.ndarray, n: int, want_logits: bool):
        cfg, timer, pos, backend = self.cfg, self.timer, state.pos, self.backend
        h = _embed(cfg, backend.embed_rows(tokens))                       # (T, D) bf16
        valid = _mark_valid(state.valid, tokens, pos, n)
        timer.mark("embedding", h, valid)
        caches = list(state.caches)
        for layer, lp in enumerate(self.layers):
            nxt = self.layers[min(layer + 1, len(self.layers) - 1)]
            h, caches[layer] = _attention(cfg, backend.linear, lp, h, caches[layer], valid, pos)
            timer.mark("attention", h)
            moe_in, gates, experts, routing = _route(
                cfg, lp["moe_norm"], lp["router"], nxt["moe_norm"], nxt["router"], h)
            routing = self.to_host(routing)                                 # (T, 2k) sync
            k = cfg.num_selected_experts
            experts_host = routing[:, :k]                                   # (T, k)
            timer.mark("routing")
            if self.options.record_routing:
                self.routing_trace.append((layer, experts_host[:n].copy()))
            guess = (layer + 1, routing[:n, k:]) if layer + 1 < len(self.layers) else None
            waited = self.expert_stats.wait_s
            moe = self.experts.moe(layer, moe_in, gates, experts_host, experts, n, guess)
            h = _residual(cfg, h, moe, lp["moe_post_norm"])
            timer.mark("experts", h)
            timer.add("experts", -(self.expert_stats.wait_s - waited))
            timer.add("transfer_wait", self.expert_stats.wait_s - waited)
        logits = None
        if want_logits:   # only the last chunk's: the output embedding is 1.6 GB to read
            logits = _last_logits(cfg, backend.logits_fn, h, self.final_norm,
                                  backend.logits_table, n - 1)
            timer.mark("logits", logits)
        return logits, _State(caches, valid, pos + n)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache (kept between runs)."""
    path = Path(path or os.environ.get("LOWMEM_JAX_CACHE",
                                       Path.home() / ".cache" / "lowmem" / "jax"))
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
