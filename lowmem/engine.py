"""The streaming engine: resident attention and embeddings, routed experts streamed.

``load(model_dir)`` opens a packed model directory. Attention weights,
embeddings, norms and routers are placed once (on the accelerator, or left in
the mapped files on the host path), the KV cache is preallocated, and experts
stay in the mapped files until a step is routed to them. One forward step is a
Python loop over layers of jitted, fixed-shape functions, because the experts a
layer needs are known only after its router runs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lowmem import model as M
from lowmem.experts import DeviceExperts, ExpertCache, HostExperts, Stager
from lowmem.host import HostWeight, make_host_linear, make_host_logits, register_host_weight_pytree
from lowmem.timing import StepTimer
from quant.packed import PackedModel
from quant.qweight import QWeight
from quant.spec import ATTENTION_ROLES

log = logging.getLogger(__name__)
GB = 1 << 30


class EngineError(ValueError):
    """Bad engine settings or inputs (too small a cache, too long a prompt, ...)."""


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "auto"                 # 'auto', 'host' (numba on the mapped files), 'device'
    expert_cache_gb: float | None = None  # device backend; None = what fits
    prefetch: bool = True
    cache_policy: str = "lru"             # 'lru', or 'layer' (cyclic-layer aware; see experts.py)
    context: int | None = None            # KV cache length; None = the model's sequence_len
    prefill_buckets: tuple[int, ...] = (16, 64, 256)
    staging_buffers: int = 2
    headroom_gb: float = 2.0              # left free on the device by the default budget
    profile: bool = False                 # per-section timing (synchronizes each section)
    record_routing: bool = False          # keep (layer, experts of real tokens) per layer step


@dataclass
class State:
    """Per-sequence state: the KV cache (donated to each step), key validity, position."""
    caches: list
    valid: jax.Array     # (S,) bool
    pos: int = 0


def _pick_backend(name: str, device) -> str:
    if name == "auto":
        return "host" if device.platform == "cpu" else "device"
    if name not in ("host", "device"):
        raise EngineError(f"backend must be 'auto', 'host' or 'device', got {name!r}")
    return name


@dataclass
class Engine:
    model: PackedModel
    options: EngineOptions = field(default_factory=EngineOptions)
    device: object = None

    def __post_init__(self):
        M.register_qweight_pytree()
        register_host_weight_pytree()
        self.cfg = cfg = self.model.cfg
        self.device = self.device or jax.devices()[0]
        self.backend = _pick_backend(self.options.backend, self.device)
        self.context = self.options.context or cfg.sequence_len
        chunk = max(self.options.prefill_buckets)
        self.cache_len = -(-self.context // chunk) * chunk   # whole chunks always fit
        self.timer = StepTimer(self.options.profile)
        self.routing_trace: list[tuple[int, np.ndarray]] = []
        self._place_resident()
        self._build_functions()
        self.state = self.new_state()          # before sizing the cache: the KV cache counts
        self.experts = self._make_experts()

    # --- set-up -----------------------------------------------------------
    def _place_resident(self) -> None:
        put = partial(jax.device_put, device=self.device)
        self.layers = []
        for layer in range(self.cfg.num_layers):
            weights = self.model.layer(layer)
            lp = {}
            for role, w in weights.items():
                if role in ATTENTION_ROLES and self.backend == "host":
                    lp[role] = HostWeight(np.int32(layer), role, w.shape[1])
                elif isinstance(w, QWeight):
                    lp[role] = QWeight(put(w.values), put(w.scales), w.bits, w.group_size)
                else:
                    lp[role] = put(w)
            self.layers.append(lp)
        self.final_norm = put(self.model.final_norm())
        self.embed_host = self.model.embed()                 # bf16 (V, D) memmap
        self.embed_dev = None if self.backend == "host" else put(self.embed_host)

    def _build_functions(self) -> None:
        cfg = self.cfg
        if self.backend == "host":
            weights = [self.model.layer(i) for i in range(cfg.num_layers)]
            linear = make_host_linear(lambda layer, role: weights[layer][role])
            logits_fn = make_host_logits(self.embed_host)
        else:
            linear = M.dense_linear
            logits_fn = None
        self._attn = jax.jit(partial(M.attention_block, cfg, linear), donate_argnames=("cache",))
        self._route = jax.jit(partial(_route_block, cfg))
        self._residual = jax.jit(partial(M.moe_residual, cfg))
        self._mark_valid = jax.jit(M.mark_valid, donate_argnums=(0,))
        self._embed = jax.jit(partial(M.embed, cfg))
        self._logits = jax.jit(partial(_last_logits, cfg, logits_fn))

    def _expert_capacity(self) -> int:
        nbytes = self.model.expert_block_nbytes
        total = self.cfg.num_layers * self.cfg.num_experts
        if self.options.expert_cache_gb is not None:
            budget = int(self.options.expert_cache_gb * GB)
        else:
            budget = _free_device_bytes(self.device) - int(self.options.headroom_gb * GB)
        capacity = min(total, max(budget, 0) // nbytes)
        need = self.cfg.num_selected_experts
        if capacity < need:
            raise EngineError(
                f"expert cache budget of {budget / GB:.3f} GB holds {capacity} experts of "
                f"{nbytes / 1e6:.1f} MB; one decode step needs {need} (raise --expert-cache-gb)")
        return capacity

    def _make_experts(self):
        if self.backend == "host":
            return HostExperts(self.model)
        stager = Stager(self.model, self.device, self.options.staging_buffers)
        cache = ExpertCache(stager, self.model.expert_block_nbytes, self._expert_capacity(),
                            policy=self.options.cache_policy, num_layers=self.cfg.num_layers)
        log.info("expert cache: %d slots of %.1f MB", cache.capacity,
                 self.model.expert_block_nbytes / 1e6)
        return DeviceExperts(self.model, cache, prefetch_enabled=self.options.prefetch)

    def new_state(self) -> State:
        caches = M.init_kv_cache(self.cfg, self.cache_len, self.device)
        valid = jax.device_put(jnp.zeros((self.cache_len,), bool), self.device)
        return State(caches, valid, 0)

    @property
    def expert_stats(self):
        exp = self.experts
        return exp.cache.stats if isinstance(exp, DeviceExperts) else exp.stats

    # --- forward ----------------------------------------------------------
    def _bucket(self, n: int) -> int:
        for b in self.options.prefill_buckets:
            if n <= b:
                return b
        return max(self.options.prefill_buckets)

    def forward(self, state: State, tokens) -> tuple[jax.Array, State]:
        """Feed tokens (prompt chunk(s) or one decode token); logits (V,) of the last one.

        Lengths are padded to a few fixed buckets (1 for decode) so that each
        shape compiles once; padded positions are marked invalid keys.
        """
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        if state.pos + len(tokens) > self.context:
            raise EngineError(f"sequence of {state.pos + len(tokens)} tokens exceeds the "
                              f"context of {self.context}")
        logits = None
        chunk = max(self.options.prefill_buckets)
        for start in range(0, len(tokens), chunk):
            part = tokens[start:start + chunk]
            size = 1 if len(part) == 1 else self._bucket(len(part))
            padded = np.zeros(size, np.int32)
            padded[:len(part)] = part
            last = start + chunk >= len(tokens)
            logits, state = self._forward_chunk(state, padded, len(part), last)
        return logits, state

    def _forward_chunk(self, state: State, tokens: np.ndarray, n: int, want_logits: bool):
        timer, pos = self.timer, state.pos
        rows = self.embed_host[tokens] if self.backend == "host" else self.embed_dev[tokens]
        h = self._embed(rows)                                             # (T, D) bf16
        valid = self._mark_valid(state.valid, tokens, pos, n)
        timer.mark("embedding", h, valid)
        caches = list(state.caches)
        for layer, lp in enumerate(self.layers):
            nxt = self.layers[min(layer + 1, len(self.layers) - 1)]
            h, caches[layer] = self._attn(lp, h, caches[layer], valid, pos)
            timer.mark("attention", h)
            moe_in, gates, experts, next_experts = self._route(
                lp["moe_norm"], lp["router"], nxt["moe_norm"], nxt["router"], h)
            experts_host = np.asarray(experts)                              # sync point
            timer.mark("routing")
            if self.options.record_routing:
                self.routing_trace.append((layer, experts_host[:n].copy()))
            guess = (layer + 1, np.asarray(next_experts)[:n]) if layer + 1 < len(self.layers) else None
            waited = self.expert_stats.wait_s
            moe = self.experts.moe(layer, moe_in, gates, experts_host, experts, n, guess)
            h = self._residual(h, moe, lp["moe_post_norm"])
            timer.mark("experts", h)
            timer.add("experts", -(self.expert_stats.wait_s - waited))
            timer.add("transfer_wait", self.expert_stats.wait_s - waited)
        logits = None
        if want_logits:   # only the last chunk's: the output embedding is 1.6 GB to read
            logits = self._logits(h, self.final_norm, self.embed_dev, n - 1)
            timer.mark("logits", logits)
        return logits, State(caches, valid, pos + n)


def _route_block(cfg, norm, router, next_norm, next_router, h):
    """MoE input and routing of this layer, plus a guess at the next layer's experts."""
    moe_in = M.rms_norm(cfg, h, norm)                                      # (T, D) bf16
    _, gates, experts = M.route(cfg, moe_in, router)
    _, _, next_experts = M.route(cfg, M.rms_norm(cfg, h, next_norm), next_router)
    return moe_in, gates, experts, next_experts


def _last_logits(cfg, host_logits, h, final_norm, embed, index):
    """Final norm and tied output logits for one row of h -> fp32 (V,)."""
    hn = M.final_hidden(cfg, jax.lax.dynamic_slice_in_dim(h, index, 1, 0), final_norm)
    if host_logits is None:
        return M.output_logits(cfg, hn, embed)[0]
    return M.bf16_mul(host_logits(hn), cfg.output_multiplier_scale).astype(jnp.float32)[0]


def _free_device_bytes(device) -> int:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    import psutil
    return int(psutil.virtual_memory().available * 0.5)   # CPU "device": half of free RAM


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache (kept between runs)."""
    path = Path(path or os.environ.get("LOWMEM_JAX_CACHE",
                                       Path.home() / ".cache" / "lowmem" / "jax"))
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path
