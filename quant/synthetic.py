"""Synthetic Grok-1 checkpoints in the exact release format (SPEC.md sections 5, 7).

Real weights are 318 GB; tests and benchmarks need the same files at any size.
``write_checkpoint`` writes ``tensor{i:05d}_000`` pickles exactly as the release
does, with the magnitudes SPEC.md section 7 measured to keep the model well
conditioned (bf16 and fp32 runs of the same weights stay close) while every
feature (soft-cap, top-2 gates, 8-row-block scales, full int8 range) is used.

Values come from a counter-based hash RNG: element ``i`` of a stream with key
``key`` is ``splitmix64(key + i * GOLDEN)``, turned into an approximate
Gaussian by summing its four 16-bit fields. So every value is a pure function
of (seed, layer, role, element index): output bytes do not depend on the thread
count, and a layer's weights do not depend on how many layers are written.

int8 leaves are generated and quantized in one fused numba kernel, one work
unit of (row block, 64 columns) at a time, so no float copy of a whole tensor
exists.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from numba import njit, prange

from quant.config import GrokConfig
from quant.bf16 import round_bf16_inplace
from quant.checkpoint import BF16, QuantizedWeight8bit, write_tensor_file
from quant.spec import LAYER_LEAVES, WeightSpec, checkpoint_specs

log = logging.getLogger(__name__)

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_U_GOLDEN = np.uint64(GOLDEN)
_U_M1 = np.uint64(0xBF58476D1CE4E5B9)
_U_M2 = np.uint64(0x94D049BB133111EB)
_U_16 = np.uint64(0xFFFF)
_S16, _S27, _S30, _S31, _S32, _S48 = (np.uint64(s) for s in (16, 27, 30, 31, 32, 48))
# Sum of four uniform 16-bit fields: mean 131070, std 65536 / sqrt(3) (Irwin-Hall, n=4).
_Z_MEAN = np.float32(131070.0)
_Z_SCALE = np.float32(math.sqrt(3.0) / 65536.0)

ROLES = ("embed", "final_norm") + tuple(role for _, role in LAYER_LEAVES)
TILE_COLS = 64            # columns per kernel work unit (one cache line of int8 per row)
HEAVY_FRACTION = 0.01     # share of output columns drawn 3-4x wider
SHARED_VARIANCE = 0.9     # share of an expert weight's variance common to all experts
SHARPEST_HEAD = 5.0       # logit-std factor of the sharpest query head (reaches the cap)
ATTN_LOGIT_STD = 2.0
ROUTER_LOGIT_STD = 3.0
OUTPUT_LOGIT_STD = 2.5
RESIDUAL_RMS = 2.0
GATE_UP_RMS = 1.5
GAIN_SPREAD = 0.1         # relative spread of the rms-norm gains
PRE_NORM_GAIN, POST_NORM_GAIN = 1.0, 0.4


# --- hash RNG ---------------------------------------------------------------

def mix64(z: int) -> int:
    """splitmix64's output function on a Python int (key derivation)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, layer: int | None, role: str, stream: int) -> int:
    """The 64-bit key of one value stream; layer None = outside the layers."""
    key = mix64(seed * GOLDEN + 0x243F6A8885A308D3)
    for part in (0 if layer is None else layer + 1, ROLES.index(role), stream):
        key = mix64(key ^ ((part + 1) * GOLDEN))
    return key


@njit(inline="always")
def _gauss(state):
    """Approximate N(0, 1) from one splitmix64 output (range +-3.46)."""
    z = (state ^ (state >> _S30)) * _U_M1
    z = (z ^ (z >> _S27)) * _U_M2
    z = z ^ (z >> _S31)
    s = (z & _U_16) + ((z >> _S16) & _U_16) + ((z >> _S32) & _U_16) + (z >> _S48)
    return (np.float32(np.int64(s)) - _Z_MEAN) * _Z_SCALE


def hash_uniform(key: int, n: int) -> np.ndarray:
    """float64 (n,) uniforms in [0, 1) from stream ``key`` (small auxiliary arrays)."""
    z = np.uint64(key) + np.arange(n, dtype=np.uint64) * _U_GOLDEN
    z = (z ^ (z >> _S30)) * _U_M1
    z = (z ^ (z >> _S27)) * _U_M2
    z = z ^ (z >> _S31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


# --- kernels ----------------------------------------------------------------

@njit(parallel=True, cache=True)
def _fill_normal(out, key, mean, row_scale, col_mult):
    """out[k, n] = mean + (row_scale[k] * col_mult[n]) * z(key, k * N + n), fp32."""
    rows, cols = out.shape
    for k in prange(rows):
        base = key + np.uint64(k) * np.uint64(cols) * _U_GOLDEN
        rs = row_scale[k]
        for n in range(cols):
            out[k, n] = mean + (rs * col_mult[n]) * _gauss(base + np.uint64(n) * _U_GOLDEN)


@njit(inline="always")
def _fill_tile(tile, key, row0, rows_total, cols, c0, e):
    """tile[r, j] = z(key, (e * K + row0 + r) * N + c0 + j)."""
    for r in range(tile.shape[0]):
        base = key + (np.uint64(e * rows_total + row0 + r) * np.uint64(cols)
                      + np.uint64(c0)) * _U_GOLDEN
        for j in range(tile.shape[1]):
            tile[r, j] = _gauss(base + np.uint64(j) * _U_GOLDEN)


@njit(inline="always")
def _quantize_tile(vals, q, s):
    """Symmetric int8 with the full range: s = max(-min/128, max/127) per column, bf16-rounded.

    Fills tile-local q (rows, width) int8 and s (width,): indexing the output
    with runtime offsets here instead defeats vectorization (3x slower).
    """
    rows, width = vals.shape
    lo = np.zeros(width, np.float32)
    hi = np.zeros(width, np.float32)
    for r in range(rows):
        for j in range(width):
            lo[j] = min(lo[j], vals[r, j])
            hi[j] = max(hi[j], vals[r, j])
    for j in range(width):
        s[j] = max(-lo[j] / np.float32(128.0), hi[j] / np.float32(127.0))
    round_bf16_inplace(s)
    inv = np.empty(width, np.float32)
    for j in range(width):
        if s[j] == 0:
            s[j] = np.float32(1.0)
        inv[j] = np.float32(1.0) / s[j]
    for r in range(rows):
        for j in range(width):
            q[r, j] = np.int8(min(max(np.rint(vals[r, j] * inv[j]), np.float32(-128.0)),
                                  np.float32(127.0)))


@njit(cache=True)
def _quantized_unit(out, scales, key, shared_key, own_w, shared_w, col_std, b, c0, width):
    """One work unit: rows of block ``b``, columns c0 .. c0+width, all experts."""
    n_exp, rows, cols = out.shape
    block_rows = rows // scales.shape[1]
    row0 = b * block_rows
    shared = np.zeros((block_rows, width), np.float32)
    if shared_w != 0:
        _fill_tile(shared, shared_key, row0, rows, cols, c0, 0)
    vals = np.empty((block_rows, width), np.float32)
    q = np.empty((block_rows, width), np.int8)
    s = np.empty(width, np.float32)
    cs = col_std[c0:c0 + width]
    for e in range(n_exp):
        _fill_tile(vals, key, row0, rows, cols, c0, e)
        for r in range(block_rows):
            for j in range(width):
                vals[r, j] = cs[j] * (own_w * vals[r, j] + shared_w * shared[r, j])
        _quantize_tile(vals, q, s)
        scales[e, b, c0:c0 + width] = s
        dest = out[e, row0:row0 + block_rows, c0:c0 + width]  # (block_rows, width) view
        for r in range(block_rows):
            for j in range(width):
                dest[r, j] = q[r, j]


@njit(parallel=True, cache=True)
def _fill_quantized(out, scales, key, shared_key, own_w, shared_w, col_std, tile_cols):
    """Generate and quantize one int8 leaf; out (E, K, N) int8, scales (E, B, N) fp32.

    value[e, k, n] = col_std[n] * (own_w * z_own[e, k, n] + shared_w * z_shared[k, n]);
    each work unit is one (row block, ``tile_cols`` columns) for all experts.
    """
    blocks = scales.shape[1]
    cols = out.shape[2]
    n_tiles = (cols + tile_cols - 1) // tile_cols
    for unit in prange(blocks * n_tiles):
        c0 = (unit % n_tiles) * tile_cols
        _quantized_unit(out, scales, key, shared_key, own_w, shared_w, col_std,
                        unit // n_tiles, c0, min(tile_cols, cols - c0))


# --- what each leaf looks like ------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How one leaf's values are drawn (public so tests can rebuild them independently).

    value[e, k, n] = mean + row_scale[k] * col_std[n] * (own_weight * z(key, (e*K + k)*N + n)
                     + shared_weight * z(shared_key, k*N + n)); int8 leaves then quantized.
    fp32 leaves have mean/row_scale and no shared part; int8 leaves have mean 0, row_scale 1.
    """
    key: int
    shared_key: int
    own_weight: float
    shared_weight: float
    mean: float
    row_scale: np.ndarray   # (K,) fp32
    col_std: np.ndarray     # (N,) fp32


def heavy_columns(key: int, n: int) -> np.ndarray:
    """(n,) multipliers: ~1% of columns (at least one) 3-4x, normalized to unit mean square."""
    mult = np.ones(n)
    count = max(1, round(HEAVY_FRACTION * n))
    u = hash_uniform(key, 2 * n)
    chosen = np.argsort(u[:n], kind="stable")[:count]
    mult[chosen] = 3.0 + u[n:][chosen]
    return mult / np.sqrt(np.mean(mult ** 2))


def head_factors(key: int, num_heads: int) -> np.ndarray:
    """(H,) log-normal logit-std factors: median ~1, sharpest = SHARPEST_HEAD, shuffled."""
    dist = statistics.NormalDist()
    z = np.array([dist.inv_cdf((h + 0.5) / num_heads) for h in range(num_heads)])
    sigma = math.log(SHARPEST_HEAD) / z.max() if num_heads > 1 else 0.0
    return np.exp(sigma * z)[np.argsort(hash_uniform(key, num_heads), kind="stable")]


def _final_norm_gain(cfg: GrokConfig) -> float:
    """Gain making logits = norm(h) @ E^T * output_multiplier have std OUTPUT_LOGIT_STD."""
    embed_std = RESIDUAL_RMS / cfg.embedding_multiplier_scale
    return OUTPUT_LOGIT_STD / (math.sqrt(cfg.emb_size) * embed_std * cfg.output_multiplier_scale)


def _matrix_std(cfg: GrokConfig, role: str) -> float:
    """Weight std so each projection's output has the SPEC section 7 magnitude."""
    d = cfg.emb_size
    # Per-component q/k std whose product gives attention logits of std ATTN_LOGIT_STD.
    qk = math.sqrt(ATTN_LOGIT_STD / (math.sqrt(cfg.key_size) * cfg.attn_output_multiplier))
    return {"gate": GATE_UP_RMS / math.sqrt(d), "up": GATE_UP_RMS / math.sqrt(d),
            "down": 1.0 / math.sqrt(cfg.ffn_size), "q": qk / math.sqrt(d),
            "k": qk / math.sqrt(d), "v": 1.0 / math.sqrt(d),
            "o": 1.0 / math.sqrt(cfg.q_width)}[role]


def _fp32_recipe(cfg: GrokConfig, spec: WeightSpec, seed: int) -> Recipe:
    key = stream_key(seed, spec.layer, spec.role, 0)
    rows, cols = (1, spec.shape[0]) if len(spec.shape) == 1 else spec.shape
    gains = {"final_norm": _final_norm_gain(cfg), "attn_norm": PRE_NORM_GAIN,
             "moe_norm": PRE_NORM_GAIN, "attn_post_norm": POST_NORM_GAIN,
             "moe_post_norm": POST_NORM_GAIN}
    row_scale = np.ones(rows)
    col_std = np.ones(cols)
    mean = 0.0
    if spec.role == "embed":
        # Heavy "output columns" of the tied unembedding E^T are vocabulary rows.
        row_scale = heavy_columns(stream_key(seed, None, "embed", 2), rows)
        col_std *= RESIDUAL_RMS / cfg.embedding_multiplier_scale
    elif spec.role == "router":
        col_std *= ROUTER_LOGIT_STD / math.sqrt(cfg.emb_size)
    else:
        mean = gains[spec.role]
        col_std *= GAIN_SPREAD * mean
    return Recipe(key, 0, 1.0, 0.0, mean, row_scale.astype(np.float32), col_std.astype(np.float32))


def _int8_recipe(cfg: GrokConfig, spec: WeightSpec, seed: int) -> Recipe:
    cols = spec.shape[-1]
    col_std = heavy_columns(stream_key(seed, spec.layer, spec.role, 2), cols)
    if spec.role == "q":
        heads = head_factors(stream_key(seed, spec.layer, spec.role, 3), cfg.num_q_heads)
        col_std = col_std * np.repeat(heads, cfg.key_size)
    col_std = col_std * _matrix_std(cfg, spec.role)
    shared = math.sqrt(SHARED_VARIANCE) if spec.per_expert else 0.0
    own = math.sqrt(1.0 - SHARED_VARIANCE) if spec.per_expert else 1.0
    return Recipe(stream_key(seed, spec.layer, spec.role, 0),
                  stream_key(seed, spec.layer, spec.role, 1), own, shared, 0.0,
                  np.ones(spec.shape[-2], np.float32), col_std.astype(np.float32))


@dataclass(frozen=True)
class HeavyTails:
    """Heavy-tailed int8 leaves (an option; the default checkpoint is unchanged).

    Real LLM weights are not Gaussian: they have fat tails and a few input rows
    and output columns far wider than the rest, which is what makes low-bit
    quantization lose quality (issue 14). With this option every int8 leaf
    (attention and experts) draws Student-t values with ``dof`` degrees of
    freedom (scaled to unit variance) in place of the hash Gaussian, and a
    fraction of its input rows and of its output columns is multiplied by
    ``outlier_scale``; then quantized exactly as the default writer does
    (symmetric int8, full range, one bf16 scale per row block and column).
    Values come from numpy's PCG64 seeded with the leaf's stream keys, so they
    are a pure function of (seed, layer, role) too; for small presets only
    (a whole leaf is drawn in fp32 at once).
    """
    dof: float = 4.0
    outlier_rows: float = 0.01
    outlier_cols: float = 0.01
    outlier_scale: float = 6.0

    def __post_init__(self):
        if not self.dof > 2:
            raise ValueError(f"HeavyTails.dof must be > 2 (finite variance), got {self.dof}")
        for name in ("outlier_rows", "outlier_cols"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"HeavyTails.{name} must be in [0, 1), got {getattr(self, name)}")


def _outlier_mult(key: int, n: int, fraction: float, scale: float) -> np.ndarray:
    """(n,) ones, with round(fraction * n) hash-chosen entries set to ``scale``."""
    mult = np.ones(n, np.float32)
    count = round(fraction * n)
    if count:
        mult[np.argsort(hash_uniform(key, n), kind="stable")[:count]] = scale
    return mult


def _student_t(key: int, shape, dof: float) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(key))
    return (rng.standard_t(dof, size=shape) * math.sqrt((dof - 2) / dof)).astype(np.float32)


def quantize_blocks(vals: np.ndarray, blocks: int):
    """(E, K, N) fp32 -> int8 (E, K, N) and fp32 bf16-valued scales (E, blocks, N):
    the release's symmetric full-range int8 (``_quantize_tile``, in numpy)."""
    e, k, n = vals.shape
    v = vals.reshape(e, blocks, k // blocks, n)                            # (E, B, R, N)
    lo, hi = np.minimum(v.min(axis=2), 0), np.maximum(v.max(axis=2), 0)  # (E, B, N)
    s = np.maximum(-lo / np.float32(128.0), hi / np.float32(127.0))
    s = np.asarray(s, np.float32).astype(BF16).astype(np.float32)         # (E, B, N)
    s[s == 0] = 1.0
    q = np.clip(np.rint(v * (np.float32(1.0) / s)[:, :, None, :]), -128, 127).astype(np.int8)
    return q.reshape(e, k, n), s


def _heavy_int8(cfg: GrokConfig, spec: WeightSpec, seed: int, r: Recipe, tails: HeavyTails):
    """One int8 leaf with heavy tails (see HeavyTails)."""
    lead = spec.shape if spec.per_expert else (1,) + spec.shape
    _, k, n = lead
    vals = r.own_weight * _student_t(r.key, lead, tails.dof)                # (E, K, N)
    if r.shared_weight:
        vals += r.shared_weight * _student_t(r.shared_key, (1, k, n), tails.dof)
    rows = _outlier_mult(stream_key(seed, spec.layer, spec.role, 4), k, tails.outlier_rows,
                         tails.outlier_scale)
    cols = _outlier_mult(stream_key(seed, spec.layer, spec.role, 5), n, tails.outlier_cols,
                         tails.outlier_scale)
    vals *= rows[:, None] * (r.col_std * cols)[None, :]
    q, s = quantize_blocks(vals, spec.scale_shape[-2])
    return QuantizedWeight8bit(q.reshape(spec.shape), s.reshape(spec.scale_shape).astype(BF16))


def tensor_recipe(cfg: GrokConfig, spec: WeightSpec, seed: int = 0) -> Recipe:
    """The drawing recipe of one leaf (depends on seed, layer and role, not file index)."""
    return _int8_recipe(cfg, spec, seed) if spec.quantized else _fp32_recipe(cfg, spec, seed)


def generate_tensor(cfg: GrokConfig, spec: WeightSpec, seed: int = 0,
                    tails: HeavyTails | None = None):
    """One leaf as the release stores it: fp32 ndarray or QuantizedWeight8bit."""
    r = tensor_recipe(cfg, spec, seed)
    if tails is not None and spec.quantized:
        return _heavy_int8(cfg, spec, seed, r, tails)
    if not spec.quantized:
        out = np.empty(spec.shape, np.float32)
        out2d = out.reshape(-1, spec.shape[-1])  # (K, N) view
        _fill_normal(out2d, np.uint64(r.key), np.float32(r.mean), r.row_scale, r.col_std)
        return out
    weight = np.empty(spec.shape, np.int8)
    scales = np.empty(spec.scale_shape, np.float32)
    lead = (1,) if not spec.per_expert else ()
    _fill_quantized(weight.reshape(lead + spec.shape), scales.reshape(lead + spec.scale_shape),
                    np.uint64(r.key), np.uint64(r.shared_key), np.float32(r.own_weight),
                    np.float32(r.shared_weight), r.col_std, TILE_COLS)
    return QuantizedWeight8bit(weight, scales.astype(BF16))  # exact: already bf16 values


# --- writing ------------------------------------------------------------------

def write_checkpoint(cfg: GrokConfig, out_dir: str | os.PathLike, seed: int = 0,
                     num_layers: int | None = None,
                     progress: Callable[[WeightSpec, float], None] | None = None,
                     tails: HeavyTails | None = None) -> Path:
    """Write a synthetic ``ckpt-0``-style directory; returns its path.

    ``num_layers`` writes only layers 0..N-1 (the config with num_layers=N, files
    still in lexicographic layer order). Each file is written under a temporary
    name and renamed, so a killed run never leaves a partial file under a final
    name. ``progress(spec, seconds)`` is called after each file. ``tails``
    (HeavyTails) draws heavy-tailed int8 leaves; None is the default model.
    """
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for spec in checkpoint_specs(cfg):
        start = time.perf_counter()
        value = generate_tensor(cfg, spec, seed, tails)
        write_tensor_file(out / spec.filename, value)
        del value
        seconds = time.perf_counter() - start
        log.debug("wrote %s (%s) in %.2f s", spec.filename, spec.name, seconds)
        if progress is not None:
            progress(spec, seconds)
    return out
