"""Where the engine's weights live and how its products run: one object per backend.

- ``HostBackend`` (CPU): weights stay in the memory-mapped files; attention and
  output-logit products run in numba kernels (``lowmem.cpu_kernels``): for one
  sequence the engine calls them between jitted pieces (``products``,
  ``logits``), in batched steps the jitted code reaches them through
  ``jax.pure_callback``; experts are computed in place (``HostMoE``). XLA on CPU
  with the dequantization inside ``jax.jit`` is tens of times slower than a
  numba kernel on int8 weights.
- ``DeviceBackend`` (accelerator): resident weights are placed on the device
  once; products dequantize a chunk of rows at a time inside jit
  (``moe.chunked_linear``); experts
  stream into an ``ExpertCache`` through a ``Stager`` (``DeviceMoE``).

Each backend gives the engine: ``linear`` and ``logits_fn`` (module-level
functions, so every engine of a config shares one trace of each jitted step),
``place_layers()``, ``embed_rows(tokens)``, ``logits_table``, ``make_moe()``,
``close()`` and ``calls_back`` (its steps call back into Python: the engine runs
a sequence's attention and logits in pieces around the host's ``products`` and
``logits``, and waits for a callback step's logits before it returns them).
"""
from __future__ import annotations

import itertools
import logging
import time
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lowmem import model as M
from lowmem.expert_cache import DeviceSlots, ExpertCache, choose_policy
from lowmem.moe import DeviceMoE, HostMoE, chunked_linear
from lowmem.staging import Stager
from quant.packed import PackedModel
from quant.bf16 import round_bf16_inplace
from quant.qweight import BF16, QWeight, untile
from quant.spec import ATTENTION_ROLES

log = logging.getLogger(__name__)
F32 = jnp.float32
GIB = 1 << 30
HEADROOM_GIB = 2.0    # the steps' headroom where it is not measured (a CPU "device")
BACKENDS = ("auto", "host", "device")


class BackendError(ValueError):
    """A backend cannot be set up as asked (unknown name, too small a cache)."""


# --- host ----------------------------------------------------------------------------

_HOST_BACKENDS: "weakref.WeakValueDictionary[int, HostBackend]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


@dataclass(frozen=True)
class HostWeight:
    """Stand-in for a host weight inside jit: traced (backend handle, layer), static shape.

    The handle and the layer are traced, so one compiled attention step serves
    every layer and every engine of the same config.
    """
    handle: jax.Array | int
    layer: jax.Array | int
    role: str
    out_features: int


jax.tree_util.register_pytree_node(
    HostWeight, lambda w: ((w.handle, w.layer), (w.role, w.out_features)),
    lambda aux, children: HostWeight(*children, *aux))


@dataclass(frozen=True)
class _HostMatmul:
    """Hashable callback (role fixed) so that traces of the same role are reused."""
    role: str

    def __call__(self, x, handle, layer, rows):
        backend = _HOST_BACKENDS[int(handle)]
        weight = backend.weights[int(layer)][self.role]
        return _leading_rows(x, rows, weight, backend.a8)


def _leading_rows(x, rows, weight, a8: Callable[[int], bool]) -> np.ndarray:
    """x @ weight for the first ``rows`` rows of x (the real ones, see model._rows_kw),
    zeros after them: fp32 (T, N); int8 activations where a8(real rows) says so
    (``HostBackend.a8``)."""
    from lowmem.cpu_kernels import matmul
    x = np.asarray(x, np.float32)                                           # (T, K)
    n = min(int(rows), len(x))
    act_int8 = a8(n)
    if n == len(x):
        return matmul(x, weight, act_int8=act_int8)
    out = np.zeros((len(x), weight.shape[1]), np.float32)                   # (T, N)
    if n > 0:
        out[:n] = matmul(x[:n], weight, act_int8=act_int8)
    return out


def _rows_operand(x: jax.Array, rows) -> jax.Array:
    """The real-row count for a host callback: rows, or all of x's."""
    return jnp.asarray(x.shape[0] if rows is None else rows, jnp.int32)


def host_linear(x: jax.Array, w: HostWeight, precision: str = "bf16", rows=None) -> jax.Array:
    """``x @ W`` for a HostWeight: the numba kernel (exact weights, fp32 accumulation) on
    the mapped weight; fp32 out in both precisions (the release as executed). rows:
    the real leading rows of x (model._rows_kw), the others' products skipped (0)."""
    shape = jax.ShapeDtypeStruct((x.shape[0], w.out_features), F32)
    out = jax.pure_callback(_HostMatmul(w.role), shape, x.astype(F32), w.handle, w.layer,
                            _rows_operand(x, rows))
    M.act_dtype(precision)
    return out


@dataclass(frozen=True)
class _HostQKV:
    """Hashable callback: the q, k and v products of one layer in one host call."""

    def __call__(self, x, handle, layer, rows):
        backend = _HOST_BACKENDS[int(handle)]
        weights = backend.weights[int(layer)]
        return tuple(_leading_rows(x, rows, weights[role], backend.a8) for role in "qkv")


def host_qkv(x: jax.Array, wq: HostWeight, wk: HostWeight, wv: HostWeight,
             precision: str = "bf16", rows=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(x @ Wq, x @ Wk, x @ Wv)`` in ONE host callback: the same kernels on the same
    weights as three ``host_linear`` calls (identical results), without two of the
    callbacks' hand-overs between XLA and numba per layer. fp32 (T, N) each; rows:
    as host_linear."""
    shapes = tuple(jax.ShapeDtypeStruct((x.shape[0], w.out_features), F32) for w in (wq, wk, wv))
    out = jax.pure_callback(_HostQKV(), shapes, x.astype(F32), wq.handle, wq.layer,
                            _rows_operand(x, rows))
    M.act_dtype(precision)
    return out


host_linear.qkv = host_qkv   # model.attention_products uses it when the backend's linear has one
host_linear.skips_rows = True  # model._rows_kw passes the real row count


def _host_logits_callback(x, handle):
    return _logits_of(_HOST_BACKENDS[int(handle)], x)


def _logits_of(backend, x) -> np.ndarray:
    """The host backend's output kernels on final hidden rows x (T, D) -> fp32 (T, V)."""
    from lowmem.cpu_kernels import matmul, matmul_nt
    from lowmem.logits_kernels import logits_int8
    x = np.asarray(x, np.float32)                          # (T, D)
    a8 = backend.a8(len(x))
    if isinstance(backend.output_q, QWeight):              # int4 table (D, V): x @ W
        return matmul(x, backend.output_q, act_int8=a8)
    if backend.output_q is not None:                       # int8 table: half the bytes
        return logits_int8(x, backend.output_q, act16=a8)  # int16 activations in that mode
    return matmul_nt(x, backend.embed)


OUTPUT_TABLES = ("bf16", "int8", "int4")   # EngineOptions.output_table (None = auto)


def output_table_choice(options, model: PackedModel) -> str:
    """Which output table the host backend's logits read: 'bf16' (the stored one),
    'int8' or 'int4' (a copy built at load).

    ``options.output_table`` None (auto, the default): int8 for models whose
    experts are int4 (their owners chose bytes over exactness; the table adds a KL
    far below what int4 experts cost, docs/FIDELITY.md), bf16 for int8 models (the
    release's values bit for bit). A name forces it.
    """
    if options.output_table is not None:
        if options.output_table not in OUTPUT_TABLES:
            raise BackendError(f"output_table must be one of {', '.join(OUTPUT_TABLES)} "
                               f"or None (auto), got {options.output_table!r}")
        return options.output_table
    return "int8" if model.settings.bits == 4 else "bf16"


def _build_output_table(embed: np.ndarray, kind: str, auto: bool):
    """The int8 (Int8Table) or int4 (QWeight of the transpose) copy of the bf16
    table, or None for 'bf16'; logged with its size and build time."""
    from lowmem.logits_kernels import quantize_table, quantize_table4
    if kind == "bf16":
        return None
    t0 = time.perf_counter()
    try:
        table = quantize_table(embed) if kind == "int8" else quantize_table4(embed)
    except ValueError as e:
        raise BackendError(f"--output-table {kind}: {e}") from None
    size = table.values.nbytes + table.scales.nbytes
    log.info("output table: %s (%.2f GB, built in %.1f s)%s", kind, size / 1e9,
             time.perf_counter() - t0, " (auto: int4 experts)" if auto else "")
    return table


A8_FROM_ROWS = 2    # auto, int8 models: int8 activations in matmuls of 2 rows or more


def act_int8_rows(options, model: PackedModel) -> int | None:
    """From how many rows the host backend's quantized matmuls take int8 activations
    (None: never, fp32 always).

    ``options.act_int8`` True: 1 (every matmul); False: None. None (auto, the
    default), on a CPU with AVX-512 VNNI (where the int8 kernels are fast):
    - int4 experts: 1. Their owners chose bytes over exactness; the activation
      rounding adds 2-5% to the KL the int4 weights cost (docs/FIDELITY.md).
    - int8 experts: A8_FROM_ROWS. Decode (one token) is computed exactly in fp32,
      whose kernels run at the memory read there. From 2 rows sharing a weight (a
      prompt chunk, a batched step, an expert that 2 tokens of a chunk route to)
      the fp32 kernels are bound by their multiply-adds (one FMA lane per weight
      and row) and int8 activations per 32 values (llama.cpp's own arithmetic for
      Q8_0, everywhere) are faster: a Grok-1 expert matrix at 2 / 3 / 4 rows
      0.92 / 0.67-0.76 / 0.68-0.83x the fp32 time, an 11-token prompt 0.80-0.93x
      against the threshold 4 of session 17, a 256-token prompt 2x faster
      (docs/PERFORMANCE.md, section 3, session 19).
    Other CPUs: None.
    """
    if options.act_int8 is not None:
        return 1 if options.act_int8 else None
    from lowmem.act8_kernels import fast_on_host
    if not fast_on_host():
        return None
    return 1 if model.settings.bits == 4 else A8_FROM_ROWS


def host_logits(cfg, hn: jax.Array, handle: jax.Array, precision: str = "bf16") -> jax.Array:
    """Tied output logits of hn (T, D) with the numba kernel on the mapped table -> fp32 (T, V).

    The kernel accumulates in fp32; ``model.round_logits`` applies the multiplier.
    """
    shape = jax.ShapeDtypeStruct((hn.shape[0], cfg.vocab_size), F32)
    logits = jax.pure_callback(_host_logits_callback, shape, hn.astype(F32), handle)  # (T, V)
    return M.round_logits(cfg, logits, precision)


class HostBackend:
    """Weights stay in the mapped files; numba kernels compute on them in place."""
    name = "host"
    calls_back = True          # its steps call into Python by handle (the engine waits for logits)
    linear = staticmethod(host_linear)
    key_block = M.KEY_BLOCK    # attend loops over the filled blocks of the cache (model.attend)
    logits_fn = staticmethod(host_logits)

    def __init__(self, model: PackedModel, device, options):
        self.model, self.device = model, device
        # int8 activations in the quantized matmuls (attention and experts; int16 in the
        # int8 table's logits) of this many rows or more; None: fp32 always
        self.a8_rows = act_int8_rows(options, model)
        if self.a8_rows is not None:
            log.info("activations: int8 in the quantized matmuls of %d row(s) or more%s",
                     self.a8_rows, " (auto, AVX-512 VNNI)" if options.act_int8 is None else "")
        self.handle = next(_HANDLES)
        self.weights = [model.layer(i) for i in range(model.cfg.num_layers)]
        self.embed = model.embed()                                        # bf16 (V, D) memmap
        # Int8Table or int4 QWeight (D, V) when the logits read a quantized copy
        self.output_table = output_table_choice(options, model)          # 'bf16', 'int8', 'int4'
        self.output_q = _build_output_table(self.embed, self.output_table,
                                            options.output_table is None)
        self.logits_table = jnp.int32(self.handle)   # what host_logits looks the table up by
        self.placed_table = None                     # the table stays in the mapped file
        _HOST_BACKENDS[self.handle] = self

    def place_layers(self) -> list[dict]:
        put = partial(jax.device_put, device=self.device)
        handle = np.int32(self.handle)
        return [{role: HostWeight(handle, np.int32(layer), role, w.shape[1])
                 if role in ATTENTION_ROLES else put(w) for role, w in weights.items()}
                for layer, weights in enumerate(self.weights)]

    def products(self, layer: int, roles: tuple[str, ...], x: np.ndarray, rows: int
                 ) -> list[np.ndarray]:
        """x @ W for each attention role of a layer, the real leading ``rows`` rows
        computed (the rest 0): fp32 (T, N) each, as host_linear's callbacks give."""
        return [_leading_rows(x, rows, self.weights[layer][r], self.a8) for r in roles]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """fp32 logits (T, V) of final hidden rows x (T, D), before the multiplier
        (model.round_logits), as host_logits's callback gives."""
        return _logits_of(self, x)

    def scaled_logits(self, x: np.ndarray, precision: str) -> np.ndarray:
        """``logits`` with the output multiplier, as ``model.round_logits`` gives them
        bit for bit, in numpy: an fp32 product; in 'bf16' by the bf16 constant, then
        rounded to bf16; subnormals flushed to signed zero in and out, as XLA:CPU
        does. A jitted multiply took 0.46 ms mid-step, this ~0.1
        (docs/PERFORMANCE.md, section 3, session 26)."""
        fp32 = M.act_dtype(precision) == M.F32
        scale = self.model.cfg.output_multiplier_scale
        out, tiny = self.logits(x), np.finfo(np.float32).tiny              # (T, V)
        out[np.abs(out) < tiny] *= 0
        out *= np.float32(scale if fp32 else np.asarray(scale, BF16))
        out[np.abs(out) < tiny] *= 0
        if not fp32:
            round_bf16_inplace(out.reshape(-1))
        return out

    def attend_row(self, q: jax.Array, cache: M.KVCache, valid: jax.Array, pos: int,
                   precision: str) -> np.ndarray:
        """model.attend of one decode row (q (1, Hq, K) after RoPE, at position pos)
        in numba (lowmem.attention_kernels) -> (1, Hq*K) fp32. It reads the cache
        through zero-copy views of its buffers, released before returning: a
        buffer with a live view would be copied, not updated in place, when it is
        donated to the next step."""
        from lowmem.attention_kernels import attend_row
        return attend_row(self.model.cfg, np.asarray(q), np.asarray(cache.k),
                          np.asarray(cache.v), np.asarray(valid), pos, precision)

    def a8(self, rows: int) -> bool:
        """Whether a quantized matmul of this many rows takes int8 activations."""
        return self.a8_rows is not None and rows >= self.a8_rows

    @property
    def activations(self) -> str:
        """The activations in words: 'fp32', 'int8', or 'int8 from N rows'."""
        if self.a8_rows is None:
            return "fp32"
        return "int8" if self.a8_rows == 1 else f"int8 from {self.a8_rows} rows"

    def embed_rows(self, tokens: np.ndarray):
        return self.embed[tokens]                                         # (T, D) bf16

    def make_moe(self, options, fetch_hook: Callable | None = None) -> HostMoE:
        return HostMoE(self.model, self.a8)

    def close(self) -> None:
        _HOST_BACKENDS.pop(self.handle, None)


# --- device --------------------------------------------------------------------------

LOGIT_ROWS = 8192   # vocabulary rows per step of the device logits


def device_logits(cfg, hn: jax.Array, table: jax.Array, precision: str = "bf16") -> jax.Array:
    """Tied output logits (T, V) fp32, a block of vocabulary rows at a time.

    Each logit is still one dot over D; blocking only bounds the temporaries
    (fp32 would otherwise upcast the whole 1.6 GB table: 3.2 GB per step).
    """
    v = table.shape[0]
    rows = LOGIT_ROWS if v % LOGIT_ROWS == 0 else v
    bits = jax.lax.bitcast_convert_type(table, jnp.uint16)   # XLA:CPU would upcast a bf16 table

    def body(i, out):
        chunk = jax.lax.dynamic_slice_in_dim(bits, i * rows, rows, 0)        # (rows, D) u16
        chunk = jax.lax.bitcast_convert_type(chunk, jnp.bfloat16)            # (rows, D) bf16
        part = M.output_logits(cfg, hn, chunk, precision)                    # (T, rows) fp32
        return jax.lax.dynamic_update_slice_in_dim(out, part, i * rows, 1)
    return jax.lax.fori_loop(0, v // rows, body, jnp.zeros((hn.shape[0], v), F32))


_untile = jax.jit(untile, static_argnums=1)


def _place_qweight(w: QWeight, put: Callable) -> QWeight:
    """A resident QWeight on the device, its values in row order: tiled values are put
    back in order there once, so no step pays for the tiles' order (model.dequantize
    would untile them on every call)."""
    values = put(w.values)
    if w.tiled:
        values = _untile(values, w.bits)                             # (K or K/2, N)
    return QWeight(values, put(w.scales), w.bits, w.group_size, w.levels)


@jax.jit
def _take_rows(table, tokens):
    """Embedding rows of tokens in one dispatch (eager indexing costs six)."""
    return jnp.take(table, tokens, axis=0)                                # (T, D) bf16


class DeviceBackend:
    """Resident weights on the accelerator; experts streamed into an ExpertCache."""
    name = "device"
    calls_back = False
    linear = staticmethod(chunked_linear)     # no whole-matrix dequantization per token
    key_block = None           # one softmax over the whole cache (model.attend)
    logits_fn = staticmethod(device_logits)
    activations = "fp32"       # fp32 / bf16 activations (act_int8 is refused)

    def __init__(self, model: PackedModel, device, options):
        if options.output_table not in (None, "bf16"):
            raise BackendError(f"output_table {options.output_table!r} (--output-table) is a "
                               "host-backend option; the device backend reads the bf16 output "
                               "table")
        if options.act_int8:
            raise BackendError("act_int8 (--act-int8) is a host-backend option (the numba "
                               "kernels); the device backend computes with fp32/bf16 activations")
        self.model, self.device, self.options = model, device, options
        self.embed_host = model.embed()
        self.logits_table = jax.device_put(self.embed_host, device)       # (V, D) bf16
        self.placed_table = self.logits_table

    def place_layers(self) -> list[dict]:
        put = partial(jax.device_put, device=self.device)
        layers = []
        for layer in range(self.model.cfg.num_layers):
            layers.append({role: _place_qweight(w, put) if isinstance(w, QWeight) else put(w)
                           for role, w in self.model.layer(layer).items()})
        return layers

    def embed_rows(self, tokens: np.ndarray):
        return _take_rows(self.logits_table, tokens)                      # (T, D) bf16

    def make_moe(self, options, fetch_hook: Callable | None = None) -> DeviceMoE:
        """A DeviceMoE with an empty cache; ``fetch_hook(fetch)`` may wrap the transfers."""
        cfg, nbytes = self.model.cfg, self.model.expert_block_nbytes
        fetch = Stager(self.model, self.device, options.staging_workers,
                       int(options.staging_chunk_mb * (1 << 20)), options.staging_buffers)
        capacity = expert_slots(self.model, options, free_device_bytes(self.device),
                                self.headroom_bytes(options))
        policy = choose_policy(options.cache_policy, capacity, cfg.num_layers,
                               cfg.num_selected_experts)
        cache = ExpertCache(fetch_hook(fetch) if fetch_hook else fetch, nbytes, capacity,
                            policy=policy, num_layers=cfg.num_layers,
                            slots=DeviceSlots(capacity, nbytes, self.device))
        log.info("expert cache: %d slots of %.1f MB, policy %s%s; staging %d x %.0f MB %s "
                 "buffers, %d workers", capacity, nbytes / 1e6, policy,
                 " (auto)" if options.cache_policy == "auto" else "", len(fetch.ring.views),
                 fetch.chunk / 1e6, fetch.registration, options.staging_workers)
        return DeviceMoE(self.model, cache, prefetch=options.prefetch, stager=fetch)

    def headroom_bytes(self, options) -> int:
        """Device memory the default expert budget leaves to the steps' temporaries.

        ``options.headroom_gb`` when given; else, on an accelerator, measured by
        compiling every step at the configured shapes (``lowmem.step_memory``);
        on a CPU "device", HEADROOM_GIB.
        """
        if options.headroom_gb is not None:
            return int(options.headroom_gb * GIB)
        if options.expert_cache_gb is not None or self.device.platform == "cpu":
            return int(HEADROOM_GIB * GIB)
        from lowmem.step_memory import measured_headroom
        return measured_headroom(self.model.cfg, self.model.settings, options.precision,
                                 options.context, options.prefill_buckets)

    def close(self) -> None:
        pass


def expert_slots(model: PackedModel, options, free_bytes: int | None,
                 headroom: int = int(2.0 * GIB)) -> int:
    """Expert slots in the budget: the option's GiB, or what is free minus ``headroom``."""
    cfg, nbytes = model.cfg, model.expert_block_nbytes
    if options.expert_cache_gb is not None:
        budget = int(options.expert_cache_gb * GIB)
    elif free_bytes is None:
        raise BackendError("the device reports no memory limit; give the expert cache budget "
                           "(--expert-cache-gb)")
    else:
        budget = free_bytes - headroom
    capacity = min(cfg.num_layers * cfg.num_experts, max(budget, 0) // nbytes)
    if capacity < cfg.num_selected_experts:
        raise BackendError(
            f"expert cache budget of {budget / GIB:.3f} GiB holds {capacity} experts of "
            f"{nbytes / 1e6:.1f} MB; one decode step needs {cfg.num_selected_experts} "
            f"(raise --expert-cache-gb)")
    return capacity


def free_device_bytes(device) -> int | None:
    """Bytes the device's allocator can still hand out; CPU "device": half of free RAM;
    None for an accelerator that reports no limit."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform != "cpu":
        return None
    import psutil
    return int(psutil.virtual_memory().available * 0.5)


def make_backend(name: str, model: PackedModel, device, options):
    """'auto' is the host backend on a CPU, the device backend on an accelerator."""
    if name not in BACKENDS:
        raise BackendError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = "host" if device.platform == "cpu" else "device"
    return (HostBackend if name == "host" else DeviceBackend)(model, device, options)
