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
from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lowmem import model as M
from lowmem import row_kernels as R
from lowmem.backends import BackendError, make_backend
from lowmem.timing import StepTimer
from quant.hostmem import HostMemoryError
from quant.packed import PackedFormatError, PackedModel

log = logging.getLogger(__name__)
PREFILL_BUCKETS = (16, 64, 256)   # prompt chunk lengths compiled; the largest is the chunk
DEFAULT_PRECISION = "fp32"        # the exact math: decode cost within noise of bf16 (docs/FIDELITY.md)


class EngineError(ValueError):
    """Bad engine settings or inputs (too small a cache, too long a prompt, ...)."""


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs a model (``lowmem.load(model_dir, **fields)``).

    backend: 'auto' (device when JAX sees an accelerator, else host), 'host'
        (numba kernels read the memory-mapped expert files in place) or 'device'
        (expert blocks streamed into an accelerator-side cache).
    expert_cache_gb: device backend only; the expert cache budget in GiB (2^30
        bytes); None = what fits after resident weights, KV cache and headroom_gb.
    prefetch: device backend only; fetch the next layer's likely experts while
        this layer computes.
    cache_policy: 'lru', 'layer' (evict the layer whose turn comes last; far
        better when the cache holds less than one token's experts), or 'auto'
        ('layer' below two tokens' experts, else 'lru'; the choice is logged).
    context: KV cache length in tokens, 1 .. the model's sequence_len; None =
        sequence_len. Prompt plus generated tokens must fit.
    prefill_buckets: prompt chunk lengths in tokens compiled for prefill; the
        largest is the chunk size.
    staging_buffers: device backend only; chunk buffers in the host staging
        ring, allocated and registered once (count); None = 2 per worker.
    staging_workers: device backend only; threads filling staging chunks from
        the mapped files while earlier chunks are transferred (count, >= 1).
    staging_chunk_mb: device backend only; bytes per staging chunk in MiB.
    headroom_gb: device memory in GiB the default expert budget leaves to the
        steps' temporaries; None = measured at start-up on an accelerator by
        compiling every step at the configured shapes (lowmem.step_memory),
        2 GiB on a CPU "device".
    profile: per-section timing (synchronizes at each section; slower).
    record_routing: keep (layer, experts of the real tokens) per layer step in
        ``Engine.routing_trace`` (for cache simulators).
    verify: check each tensor's CRC-32 the first time it is read (about 0.4 s
        per GiB, once per process).
    output_table: host backend only; 'bf16' (the stored table), or a copy built
        at load that the logits read instead: 'int8' (one bf16 scale per
        vocabulary row; half the bytes per token, 0.8 GB instead of 1.6 GB for
        Grok-1) or 'int4' (groups of 32 with the int4 experts' level table;
        0.45 GB), each a measured change of the logits (docs/FIDELITY.md). None
        (auto): int8 for models with int4 experts, bf16 for int8 ones
        (``backends.output_table_choice``).
    precision: 'fp32' (activations in fp32, weights dequantized exactly: the
        model's exact math) or 'bf16' (the release's bf16 mode).
    act_int8: host backend only; the quantized matmuls (experts and attention)
        quantize their inputs to int8 per 32 values and multiply in int8 (AVX-512 VNNI, as
        llama.cpp's quantized matmuls do), and the int8 output table's logits take int16
        activations (one scale per row), the int4 table's int8 ones: 1.5-2.3x faster
        wherever several tokens share a weight (prefill, serving), a measured change of
        the logits (docs/FIDELITY.md). True: every matmul; False: none. None (auto), on a
        CPU with AVX-512 VNNI: every matmul for models with int4 experts; for int8 models
        those of 2 rows or more (prompt chunks, batched steps), decode computed
        exactly (``backends.act_int8_rows``).
    mlock: lock the model's files in RAM at load (``PackedModel.lock``, as llama.cpp's
        --mlock): the OS can no longer page out experts a while unused, at the price of
        RAM for the whole model and a memlock limit that allows it.
    mmap: map the model's files (zero-copy: pages read from the page cache as they are
        needed). False: read them into anonymous huge-page memory at load
        (``PackedModel.read_into_memory``, as llama.cpp's --no-mmap): the host kernels
        stream experts through 2 MiB pages instead of mostly 4 KiB ones, at the price
        of the model's size in private RAM and its read before the first token.
    """
    backend: str = "auto"                 # 'auto', 'host' (numba on the mapped files), 'device'
    expert_cache_gb: float | None = None  # device backend, GiB; None = what fits
    prefetch: bool = True                 # device backend: guess and fetch the next layer's experts
    cache_policy: str = "auto"            # 'auto', 'lru' or 'layer' (see expert_cache.choose_policy)
    context: int | None = None            # KV cache length in tokens; None = the model's sequence_len
    prefill_buckets: tuple[int, ...] = PREFILL_BUCKETS
    staging_buffers: int | None = None    # device backend: staging ring chunk buffers
    staging_workers: int = 4              # device backend: threads filling staging chunks
    staging_chunk_mb: float = 32.0        # device backend: MiB per staging chunk
    headroom_gb: float | None = None      # GiB left to step temporaries; None = measured
    profile: bool = False                 # per-section timing (synchronizes each section)
    record_routing: bool = False          # keep (layer, experts of real tokens) per layer step
    verify: bool = True                   # check each tensor's CRC-32 when first read (packed.py)
    precision: str = DEFAULT_PRECISION    # 'fp32' (exact math) or 'bf16' (the release's run)
    output_table: str | None = None       # host: 'bf16', 'int8', 'int4'; None = auto
    act_int8: bool | None = None          # host: int8 activations; None = auto (VNNI)
    mlock: bool = False                   # lock the model's files in RAM (PackedModel.lock)
    mmap: bool = True                     # map the files; False: read into RAM (--no-mmap)


def cache_length(context: int, buckets: tuple[int, ...] = PREFILL_BUCKETS) -> int:
    """KV cache rows for a context: whole prefill chunks, so a last chunk always fits."""
    chunk = max(buckets)
    return -(-context // chunk) * chunk


@dataclass
class SequenceState:
    """Per-sequence state: the KV cache (donated to each step), key validity, position.

    The engine holds one; batched decode (``lowmem.batch``) holds one per slot."""
    caches: list
    valid: jax.Array     # (S,) bool (numpy after a host decode row: Engine._row_input)
    pos: int = 0


# Module-level jitted steps: static (config, backend functions), so shared by engines.
# The precision (a string) is static too: one compiled step per (config, precision).
_attention = jax.jit(M.attention_block, static_argnums=(0, 1, 2), static_argnames=("key_block",),
                     donate_argnames=("cache",))
_residual = jax.jit(M.moe_residual, static_argnums=(0, 1))
# the host backend's attention block and logits in jitted pieces around its kernels
_norm = jax.jit(M.rms_norm, static_argnums=(0, 3))
_attention_core = jax.jit(M.attention_core, static_argnums=(0, 1), static_argnames=("key_block",),
                          donate_argnames=("cache",))
_heads_into_cache = jax.jit(M.heads_into_cache, static_argnums=(0, 1), donate_argnames=("cache",))


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _chunk_input(cfg, precision, rows, valid, tokens, pos, n, norm):
    """A chunk's activations from its embedding rows (T, D) and its real keys marked
    valid (S,), plus, when ``norm`` is given, its rows' first attention norm (T, D)
    (the host backend's, see _Ahead; None: none)."""
    h = M.embed(cfg, precision, rows)                                       # (T, D)
    x = None if norm is None else M.rms_norm(cfg, h, norm, precision)
    return h, M.mark_valid(valid, tokens, pos, n), x


def _route_rows(cfg, precision, norm, router, next_norm, next_router, h):
    """MoE input and routing of this layer, plus a guess at the next layer's experts.

    The experts and the guess come back as one (T, 2k) array: the step reads
    it to the host once per layer.
    """
    moe_in = M.rms_norm(cfg, h, norm, precision)                           # (T, D) activations
    _, gates, experts = M.route(cfg, moe_in, router)                       # (T, k), (T, k)
    _, _, next_experts = M.route(cfg, M.rms_norm(cfg, h, next_norm, precision), next_router)
    return moe_in, gates, experts, jnp.concatenate([experts, next_experts], axis=1)


_route = jax.jit(_route_rows, static_argnums=(0, 1))


@partial(jax.jit, static_argnums=(0, 1))
def _attention_route(cfg, precision, post_norm, h, out, norm, router, next_norm, next_router):
    """The host backend's attention residual (T, D) and, ahead, its rows' routing
    (``_route_rows``) in one call."""
    h = M.attention_residual(cfg, precision, post_norm, h, out)             # (T, D)
    return h, _route_rows(cfg, precision, norm, router, next_norm, next_router, h)


@partial(jax.jit, static_argnums=(0, 1))
def _residual_norm(cfg, precision, h, moe_sum, post_norm, next_norm):
    """The host backend's MoE residual (T, D) and, ahead, its rows' next norm (T, D):
    the next layer's attention norm, or after the last layer the final norm."""
    h = M.moe_residual(cfg, precision, h, moe_sum, post_norm)               # (T, D)
    return h, M.rms_norm(cfg, h, next_norm, precision)


class _Ahead:
    """Values a jitted piece of a host step computed ahead for the next piece, each
    kept with the array it belongs to and handed out only for that very array.

    An XLA call mid-step costs ~0.1 ms more than warm (the kernels between the
    calls stream hundreds of MB through the caches), so the host engine makes
    fewer: the MoE residual also computes the next layer's attention norm (or
    the final norm), the attention residual the routing, the chunk input the
    first norm (docs/PERFORMANCE.md, section 3, session 26). A piece given any
    other array (a sliced last row, a batched step's rows) computes its own.
    """

    def __init__(self):
        self._values: dict = {}

    def put(self, kind: tuple, h: jax.Array, value) -> None:
        # h is kept with its value: while it lives no other array can take its id
        self._values[kind, id(h)] = (h, value)

    def take(self, kind: tuple, h: jax.Array):
        """The value of this kind computed for h (removed), or None."""
        return self._values.pop((kind, id(h)), (None, None))[1]

    def drop(self, name: str) -> None:
        """Forget the values of kinds named ``name``: the engine drops each kind at
        the point of a step where the pieces it was for have run, so at most a
        group's worth of values is ever kept."""
        self._values = {key: v for key, v in self._values.items() if key[0][0] != name}


@partial(jax.jit, static_argnums=(0, 1, 2))
def _last_logits(cfg, logits_fn, precision, h, final_norm, table, index):
    """Final norm and tied output logits for one row of h -> fp32 (V,)."""
    row = jax.lax.dynamic_slice_in_dim(h, index, 1, 0)                     # (1, D)
    hn = M.final_hidden(cfg, row, final_norm, precision)
    return logits_fn(cfg, hn, table, precision)[0]


@partial(jax.jit, static_argnums=(0, 1))
def _last_hidden(cfg, precision, h, final_norm, index):
    """Final norm of one row of h -> (1, D): the host backend's logits input."""
    return M.final_hidden(cfg, jax.lax.dynamic_slice_in_dim(h, index, 1, 0), final_norm,
                          precision)


@jax.jit
def _row(h, index):
    """Row ``index`` of h (T, D) -> (1, D), the index dynamic (one compile per T)."""
    return jax.lax.dynamic_slice_in_dim(h, index, 1, 0)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _all_logits(cfg, logits_fn, precision, h, final_norm, table):
    """Final norm and tied output logits of every row of h -> fp32 (T, V)."""
    return logits_fn(cfg, M.final_hidden(cfg, h, final_norm, precision), table, precision)


class Engine:
    """One model on one device: resident weights placed, KV cache allocated, experts ready."""

    def __init__(self, model: PackedModel, options: EngineOptions | None = None, device=None):
        self.model, self.options = model, options or EngineOptions()
        self.cfg = model.cfg
        if self.options.precision not in M.PRECISIONS:
            raise EngineError(f"precision must be one of {M.PRECISIONS}, "
                              f"got {self.options.precision!r}")
        self.precision = self.options.precision
        if self.options.staging_workers < 1 or not self.options.staging_chunk_mb > 0:
            raise EngineError(f"staging needs >= 1 worker and a positive chunk, got "
                              f"{self.options.staging_workers} workers of "
                              f"{self.options.staging_chunk_mb} MiB")
        self.device = device or jax.devices()[0]
        try:
            if not self.options.mmap:
                model.read_into_memory()
            if self.options.mlock:
                model.lock()
        except (HostMemoryError, PackedFormatError) as e:
            raise EngineError(str(e)) from None
        try:
            self.backend = make_backend(self.options.backend, model, self.device, self.options)
        except BackendError as e:
            raise EngineError(str(e)) from None
        self.context = self.options.context or self.cfg.sequence_len
        self.cache_len = cache_length(self.context, self.options.prefill_buckets)
        self.timer = StepTimer(self.options.profile)
        self.routing_trace: list[tuple[int, np.ndarray]] = []
        self.host_syncs = 0                 # device -> host reads that block (to_host)
        self.dispatches = 0                 # jitted calls of the steps (eager ops included)
        self.slot_writes = 0                # expert blocks written into device slots
        self._first_experts = None          # layer 0's experts of the last row: next-token guess
        self._ahead = _Ahead()              # host: values the last jitted piece computed ahead
        self.layers = self.backend.place_layers()
        self.final_norm = jax.device_put(model.final_norm(), self.device)
        self._state = self.new_state()     # before sizing the cache: the KV cache counts
        self.experts = self._make_moe()

    # --- set-up and lifetime ------------------------------------------------
    def new_state(self) -> SequenceState:
        """A fresh sequence state: its own preallocated KV cache, every key invalid."""
        caches = M.init_kv_cache(self.cfg, self.cache_len, self.device, self.precision)
        valid = jax.device_put(jnp.zeros((self.cache_len,), bool), self.device)
        return SequenceState(caches, valid, 0)

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
        self._state = SequenceState(self._state.caches, jnp.zeros_like(self._state.valid), 0)

    def feed(self, tokens) -> jax.Array | np.ndarray:
        """Append tokens (a prompt or one decode token); fp32 logits (V,) of the last one
        (a jax array; numpy on the host backend, which computes them in numpy).

        Lengths are padded to a few fixed buckets (1 for decode) so that each
        shape compiles once; padded positions are marked invalid keys. If a
        step fails midway, its donated KV buffers are gone: the sequence is
        reset onto a fresh cache so that later calls still work.
        """
        return self._feed(tokens, all_logits=False)

    def feed_all(self, tokens) -> np.ndarray:
        """Append tokens like ``feed``; fp32 logits (T, V) after EACH of them.

        Teacher forcing for quality checks (``lowmem.eval``): one batched
        prefill that also reads the output embedding for every position.
        """
        return self._feed(tokens, all_logits=True)

    def _feed(self, tokens, all_logits: bool):
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        if self.position + len(tokens) > self.context:
            raise EngineError(f"sequence of {self.position + len(tokens)} tokens exceeds the "
                              f"context of {self.context}")
        chunk = max(self.options.prefill_buckets)
        logits, rows = None, []
        try:
            for start in range(0, len(tokens), chunk):
                part = tokens[start:start + chunk]
                want = "all" if all_logits else ("last" if start + chunk >= len(tokens) else None)
                logits, self._state = self._forward_chunk(self._state, self._padded(part),
                                                          len(part), want)
                if all_logits:
                    rows.append(np.asarray(logits)[:len(part)])
        except BaseException:
            self._state = self.new_state()
            raise
        return np.concatenate(rows) if all_logits else logits

    # --- sequences held outside the engine (lowmem.batch) ---------------------
    def advance(self, state, tokens):
        """Feed one prompt chunk to a sequence state held by the caller -> (logits, state).

        Continuous batching keeps one state per KV cache slot and prefills a
        new request chunk by chunk between decode steps; the state's KV
        cache is donated. A chunk is at most the largest prefill bucket.
        """
        padded, n = self.chunk_tokens(state, tokens)
        return self._forward_chunk(state, padded, n, "last")

    def chunk_tokens(self, state, tokens) -> tuple[np.ndarray, int]:
        """Check one prompt chunk for a sequence state -> (the chunk padded to its
        bucket, its real length); EngineError if it is empty, longer than the largest
        bucket or past the context."""
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        if not 0 < len(tokens) <= max(self.options.prefill_buckets):
            raise EngineError(f"a chunk holds 1 to {max(self.options.prefill_buckets)} tokens, "
                              f"got {len(tokens)}")
        if state.pos + len(tokens) > self.context:
            raise EngineError(f"sequence of {state.pos + len(tokens)} tokens exceeds the "
                              f"context of {self.context}")
        return self._padded(tokens), len(tokens)

    def moe_layer(self, layer: int, h: jax.Array, n: int, next_rows=None) -> jax.Array:
        """Route rows h (T, D) of one layer and add their experts' outputs -> (T, D).

        The rows may belong to one sequence (a prompt chunk) or to several
        (batched decode): one routing read, one MoE call, each needed expert
        fetched once for all rows. Rows >= n are padding. next_rows: the real
        rows the next layer's MoE will run (None: all), whose guessed experts
        are prefetched.
        """
        return self.moe_layers(layer, [(h, n)], next_rows)[0]

    def moe_layers(self, layer: int, groups: list[tuple], next_rows=None) -> list[jax.Array]:
        """``moe_layer`` for several groups of rows (h (T_i, D), real rows n_i) at once:
        each group is routed in its own jitted call (shapes compiled already), and ONE
        MoE call applies each needed expert to the rows of every group routed to it
        (a continuous-batching step: its prompt chunks and its decode rows).
        next_rows: indices into the groups' real rows, in order (see moe_layer)."""
        cfg, k, timer = self.cfg, self.cfg.num_selected_experts, self.timer
        lp, nxt = self.layers[layer], self.layers[min(layer + 1, len(self.layers) - 1)]
        moe_groups, real = [], []
        self._ahead.drop("norm")            # the attention they were for has run
        for h, n in groups:
            route = self._ahead.take(("route", layer), h)
            if route is None:
                route = self._piece(h, _route, R.route_rows)(
                    cfg, self.precision, lp["moe_norm"], lp["router"], nxt["moe_norm"],
                    nxt["router"], h)
            moe_in, gates, experts, routing = route
            routing = self.to_host(routing)                                 # (T, 2k) sync
            moe_groups.append((moe_in, gates, routing[:, :k], experts, n))
            real.append(routing[:n])
        real = np.concatenate(real)                                         # (R, 2k) real rows
        timer.mark("routing")
        if self.options.record_routing:
            self.routing_trace.append((layer, real[:, :k].copy()))
        guess = self._guess(layer, real, len(real), next_rows)
        waited, calls, writes = (self.expert_stats.wait_s, self.experts.dispatches,
                                 self.experts.slot_writes)
        moes = self.experts.moe_groups(layer, moe_groups, guess)
        self._ahead.drop("route")
        out = [self._residual(layer, h, moe) for (h, _), moe in zip(groups, moes)]
        self.dispatches += self.experts.dispatches - calls
        self.slot_writes += self.experts.slot_writes - writes
        timer.mark("experts", *out)
        timer.add("experts", -(self.expert_stats.wait_s - waited))
        timer.add("transfer_wait", self.expert_stats.wait_s - waited)
        return out

    def _piece(self, h, jitted: Callable, row: Callable) -> Callable:
        """The piece of a step to run on h (T, D): on the host, for one row, ``row`` (numba,
        lowmem.row_kernels: the same arguments and values, to fp32 rounding, without
        an XLA call), else ``jitted`` (an XLA call, counted)."""
        if h.shape[0] == 1 and self.backend.calls_back:
            return row
        self.dispatches += 1
        return jitted

    def _residual(self, layer: int, h: jax.Array, moe: jax.Array) -> jax.Array:
        """h + the normed MoE sum; on the host, with the next norm of its rows ahead."""
        post = self.layers[layer]["moe_post_norm"]
        if not self.backend.calls_back:
            self.dispatches += 1
            return _residual(self.cfg, self.precision, h, moe, post)
        last = layer + 1 == len(self.layers)
        following = self.final_norm if last else self.layers[layer + 1]["attn_norm"]
        out, x = self._piece(h, _residual_norm, R.residual_norm)(self.cfg, self.precision, h,
                                                                moe, post, following)
        self._ahead.put(("norm", "final" if last else layer + 1), out, x)
        return out

    def _guess(self, layer: int, routing: np.ndarray, n: int, next_rows=None):
        """Experts to prefetch while this layer computes: the next layer's guess for the
        rows it will run (next_rows, None: all n; none: no guess), and at the last layer
        the next token's layer 0 (this token's layer-0 experts, last row)."""
        k = self.cfg.num_selected_experts
        if layer == 0:
            self._first_experts = routing[n - 1:n, :k].copy()
        if layer + 1 < len(self.layers):
            if next_rows is None:
                return layer + 1, routing[:n, k:]
            if not len(next_rows):
                return None
            return layer + 1, routing[np.asarray(next_rows, np.intp), k:]
        return None if self._first_experts is None else (0, self._first_experts)

    # --- forward ----------------------------------------------------------
    def _padded(self, part: np.ndarray) -> np.ndarray:
        """A chunk padded with pad tokens to its bucket (1 for one decode token), so that
        each shape compiles once."""
        n = len(part)
        size = 1 if n == 1 else next((b for b in self.options.prefill_buckets if n <= b),
                                     max(self.options.prefill_buckets))
        padded = np.zeros(size, np.int32)
        padded[:n] = part
        return padded

    def chunk_input(self, state: SequenceState, tokens: np.ndarray, n: int):
        """Embed a padded chunk of a sequence and mark its real keys valid -> (h (T, D)
        activations, valid (S,)): the start of ``_forward_chunk``, public for the
        batched steps of ``lowmem.batch``, which run chunks beside decode rows."""
        cfg, prec, backend = self.cfg, self.precision, self.backend
        rows = backend.embed_rows(tokens)                                  # (T, D) bf16
        norm = self.layers[0]["attn_norm"] if backend.calls_back else None
        valid = state.valid           # numpy after _row_input: placed, as every step's is
        valid = jax.device_put(valid, self.device) if type(valid) is np.ndarray else valid
        h, valid, x = _chunk_input(cfg, prec, rows, valid, tokens, state.pos, n, norm)
        if x is not None:                                                   # (T, D)
            self._ahead.put(("norm", 0), h, x)
        self.dispatches += 1 + isinstance(rows, jax.Array)
        self.timer.mark("embedding", h, valid)
        return h, valid

    def _row_input(self, state: SequenceState, tokens: np.ndarray, n: int):
        """chunk_input of one host row with no XLA call (numpy and row_kernels): that
        call, the first after the last step's logits kernel, took 0.45-0.6 ms. The key
        validity comes back as numpy (a copy: the state's own stays as it was)."""
        h = R.embed(self.cfg, self.precision, self.backend.embed_rows(tokens))  # (1, D)
        self._ahead.put(("norm", 0), h, R.rms_norm(self.cfg, h, self.layers[0]["attn_norm"]))
        valid = np.array(state.valid)                                       # (S,) bool
        valid[state.pos] = n >= 1 and tokens[0] > 0          # as model.mark_valid
        self.timer.mark("embedding", h)
        return h, valid

    def attention_layer(self, layer: int, h: jax.Array, cache, valid: jax.Array, pos: int,
                        n: int):
        """One layer's attention block on a chunk of one sequence, n real rows then
        padding -> (h (T, D), the updated cache; the cache passed in is donated)."""
        if self.backend.calls_back:
            return self._host_attention(layer, h, cache, valid, pos, n)
        self.dispatches += 1
        out = _attention(self.cfg, self.backend.linear, self.precision, self.layers[layer], h,
                         cache, valid, pos, np.int32(n), key_block=self.backend.key_block)
        self.timer.mark("attention", out[0])
        return out

    def _host_attention(self, layer: int, h: jax.Array, cache, valid: jax.Array, pos: int,
                        n: int):
        """model.attention_block on the host backend: its four products called from here,
        around two jitted pieces (the attention core; the residual with the routing
        ahead), its norm taken from the piece before (_Ahead), instead of through
        callbacks inside one jitted step. The same numbers; XLA on CPU spent 0.5-1.6
        ms more a layer around callbacks that run for milliseconds
        (docs/PERFORMANCE.md, section 3, session 21). A decode row that sees a key
        attends in numba (HostBackend.attend_row) after XLA has written its key and
        value: the same arithmetic to fp32 rounding, about 0.3 ms a layer less mid-step
        (session 27); its norm, residual and routing too (``_piece``, session 28)."""
        cfg, prec, lp, backend = self.cfg, self.precision, self.layers[layer], self.backend
        x = self._ahead.take(("norm", layer), h)
        if x is None:
            x = self._piece(h, _norm, R.rms_norm)(cfg, h, lp["attn_norm"], prec)
        q, k, v = backend.products(layer, ("q", "k", "v"), self.to_host(x), n)  # (T, N) each
        if n == h.shape[0] == 1 and np.asarray(valid)[:pos + 1].any():      # a decode row
            q, cache = _heads_into_cache(cfg, prec, q, k, v, cache, pos)       # (1, Hq, K)
            attn = backend.attend_row(q, cache, valid, pos, prec)             # (1, Hq*K)
        else:
            attn, cache = _attention_core(cfg, prec, q, k, v, cache, valid, pos,
                                          key_block=backend.key_block)       # (T, Hq*K)
        (o,) = backend.products(layer, ("o",), self.to_host(attn), n)       # (T, D)
        nxt = self.layers[min(layer + 1, len(self.layers) - 1)]
        out, route = self._piece(h, _attention_route, R.attention_route)(
            cfg, prec, lp["attn_post_norm"], h, o, lp["moe_norm"], lp["router"], nxt["moe_norm"],
            nxt["router"])
        self._ahead.put(("route", layer), out, route)
        self.dispatches += 1                            # heads into the cache, or the core
        self.timer.mark("attention", out)
        return out, cache

    def last_logits(self, h: jax.Array, index: int) -> jax.Array | np.ndarray:
        """Final norm and output logits of row ``index`` of h -> fp32 (V,); on the host
        the numba kernel called from here (see _host_attention) on the final norm
        the last MoE residual computed ahead (a decode row), the multiplier applied
        in numpy: no XLA call, and numpy logits (making them a jax array took 0.4 ms
        mid-step: an int4 decode step 0.98-0.99x the time without; PERFORMANCE.md,
        section 3, session 28)."""
        if self.backend.calls_back:
            hn = self._ahead.take(("norm", "final"), h) if h.shape[0] == 1 else None
            if hn is None:
                hn = self._piece(h, _last_hidden, R.last_hidden)(self.cfg, self.precision, h,
                                                                self.final_norm, index)
            logits = self.backend.scaled_logits(self.to_host(hn), self.precision)[0]  # (V,)
        else:
            logits = _last_logits(self.cfg, self.backend.logits_fn, self.precision, h,
                                  self.final_norm, self.backend.logits_table, index)
            self.dispatches += 1
        self.timer.mark("logits", logits)
        return logits

    def last_row(self, h: jax.Array, n: int) -> jax.Array:
        """The last real row of a chunk's activations h (T, D), n real rows -> (1, D).

        The last layer's MoE runs on it alone when only that row's logits are
        wanted: the other rows' keys and values are in the cache already and
        nothing reads their outputs (llama.cpp prunes its last layer so too).
        A prefill then reads that layer's experts of one token, not of the
        whole chunk: in a 2-layer model of Grok-1's width an 11-token prompt
        reads 10 experts instead of 16 (docs/PERFORMANCE.md, section 3,
        session 24); in the 64-layer model a 64th of a prefill's experts.
        """
        if h.shape[0] == 1:
            return h
        self.dispatches += 1
        return _row(h, np.int32(n - 1))

    def _forward_chunk(self, state: SequenceState, tokens: np.ndarray, n: int, want: str | None):
        """One padded chunk through every layer; logits of its last real row ('last'),
        of every row ('all', (T, V) padded rows included) or none. Only 'all' runs
        the last layer's MoE on every row: 'last' on the last real row (``last_row``),
        none on no row."""
        host_row = self.backend.calls_back and tokens.shape[0] == 1
        h, valid = (self._row_input if host_row else self.chunk_input)(state, tokens, n)
        caches = list(state.caches)
        rows, last = n, len(self.layers) - 1
        for layer in range(len(self.layers)):
            h, caches[layer] = self.attention_layer(layer, h, caches[layer], valid, state.pos,
                                                    n)
            if layer == last and want != "all":
                if want is None:   # a chunk before the last: only its keys and values count
                    break
                h, rows = self.last_row(h, n), 1                             # (1, D)
            nxt = None                      # rows whose next-layer experts to prefetch: all
            if layer + 1 == last and want != "all":
                nxt = [n - 1] if want == "last" else []
            h = self.moe_layer(layer, h, rows, next_rows=nxt)
        logits = None
        if want == "last":   # only the last chunk's: the output embedding is 1.6 GB to read
            logits = self.last_logits(h, rows - 1)
        elif want == "all":
            logits = _all_logits(self.cfg, self.backend.logits_fn, self.precision, h,
                                 self.final_norm, self.backend.logits_table)
            self.timer.mark("logits", logits)
            self.dispatches += 1
        if logits is not None and self.backend.calls_back:
            # its callback looks the backend up by handle in a weak registry: an engine
            # dropped before an asynchronous step ends would take the backend with it
            jax.block_until_ready(logits)
        return logits, SequenceState(caches, valid, state.pos + n)

