"""What the device steps need besides weights, KV cache and expert slots: measured.

The expert cache gets whatever device memory is left after the resident
weights, the KV cache and a headroom for the jitted steps' temporaries. A
fixed guess either wastes gigabytes of slots or runs out of memory on a real
card, so the headroom is measured: every jitted device step is compiled from
abstract shapes (no weights, no device memory touched) at the configured
shapes — each prefill bucket and the decode step — and XLA reports its
temporary bytes. The largest one plus a margin is the headroom.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from lowmem import engine as E
from lowmem import model as M
from lowmem import moe
from lowmem.backends import DeviceBackend, device_logits
from quant.config import GrokConfig
from quant.packed import QuantSettings, expert_block_layout, tensor_layout
from quant.qweight import QWeight

log = logging.getLogger(__name__)
MARGIN = 0.10                   # relative margin on the largest temporary
MARGIN_BYTES = 256 << 20        # plus this (allocator rounding, small buffers)
SDS = jax.ShapeDtypeStruct


def _abstract_layer(cfg: GrokConfig, settings: QuantSettings) -> dict:
    """Layer 0's resident weights as abstract arrays, shaped as the engine places them."""
    entries = {e.name: e for e in tensor_layout(cfg, settings)
               if e.layer == 0 and e.expert is None}
    out = {}
    for e in entries.values():
        if e.part == "scales":
            continue
        arr = SDS(e.shape, jnp.dtype(e.dtype))
        if e.part == "values":
            s = entries[e.name[:-len("values")] + "scales"]
            out[e.role] = QWeight(arr, SDS(s.shape, jnp.bfloat16), e.bits, e.group_size,
                                  e.levels)
        else:
            out[e.role] = arr
    return out


def _temp(lowered) -> int:
    return int(lowered.compile().memory_analysis().temp_size_in_bytes)


def step_temporaries(cfg: GrokConfig, settings: QuantSettings, precision: str = "fp32",
                     context: int | None = None, buckets=E.PREFILL_BUCKETS) -> dict[str, int]:
    """Temporary bytes of each jitted device step, per token count, compiled not run."""
    act = M.cache_dtype(precision)                       # the KV cache's storage dtype
    s = E.cache_length(context or cfg.sequence_len, buckets)
    lp = _abstract_layer(cfg, settings)
    parts, nbytes = expert_block_layout(cfg, settings)
    d, k = cfg.emb_size, cfg.num_selected_experts
    cache = M.KVCache(*[SDS(shape, act) for shape in M.kv_cache_shapes(cfg, s)])
    out = {}
    for t in sorted({1, *buckets}):
        h = SDS((t, d), jnp.float32)                     # activations: fp32 in both precisions
        out[f"attention T={t}"] = _temp(E._attention.lower(
            cfg, DeviceBackend.linear, precision, lp, h, cache, SDS((s,), bool), 0))
        out[f"routing T={t}"] = _temp(E._route.lower(
            cfg, precision, lp["moe_norm"], lp["router"], lp["moe_norm"], lp["router"], h))
        out[f"experts T={t}"] = _temp(moe._experts_accumulate.lower(
            parts, SDS((t, d), jnp.float32), SDS((k, nbytes), jnp.uint8),
            SDS((k,), jnp.int32), SDS((k,), jnp.int32), h, SDS((t, k), jnp.float32),
            SDS((t, k), jnp.int32)))
        out[f"logits T={t}"] = _temp(E._last_logits.lower(
            cfg, device_logits, precision, h, SDS((d,), jnp.float32),
            SDS((cfg.vocab_size, d), jnp.bfloat16), 0))
    return out


def measured_headroom(cfg: GrokConfig, settings: QuantSettings, precision: str = "fp32",
                      context: int | None = None, buckets=E.PREFILL_BUCKETS) -> int:
    """The largest step temporary plus the margin: what the expert budget leaves free."""
    temps = step_temporaries(cfg, settings, precision, context, buckets)
    name = max(temps, key=temps.get)
    headroom = int(temps[name] * (1 + MARGIN)) + MARGIN_BYTES
    log.info("step temporaries: largest %s %.2f GB; headroom %.2f GB", name, temps[name] / 1e9,
             headroom / 1e9)
    return headroom
