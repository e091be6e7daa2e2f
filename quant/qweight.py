"""The one quantized-weight type: integer values, scales, bits, group size.

A weight is stored (K, N) = (in_features, out_features), ``y = x @ W``.
Scales have shape (K // group_size, N): one scale per group of ``group_size``
consecutive input rows and per output column. That single layout covers
per-channel scales (group_size = K), the release's 8-row-block scales
(group_size = K // 8) and group-wise int4 (group_size = 32, 64, 128, ...).

int4 values are packed two per byte along K: byte [i, n] holds row 2i in its
low nibble and row 2i+1 in its high nibble, both two's complement in [-8, 7].
(``jnp.int4`` would take a whole byte per value on CPU, so we pack ourselves.)
Scales are bf16, as in the release; quantization is symmetric (no zero point).

The values may be stored wider than N (``row_pad`` columns of padding after
each row: packed expert matrices, docs/FORMAT.md): N is the scales' width and
the columns past it mean nothing. The padding exists only so that stored rows
are not a multiple of 4 KiB apart (16 such rows read together share one L1
set; Grok-1's gate and up run 1.1-1.3x faster padded, docs/PERFORMANCE.md).

Expert matrices may instead be stored in tiles (``tiled``, docs/FORMAT.md
section 7): the values keep their (K or K/2, N) shape and bytes, in another
order: tiles of TILE_ROWS weight rows x TILE_COLS columns (32 x 64: 2 KiB of
int8, 1 KiB of packed int4), the tiles of a band of rows left to right, the
bands top to bottom. An int8 tile holds its 32 rows of 64 bytes one after
another. An int4 tile holds, for each 4 weight rows k..k+3 (a quad) and each
half of 32 columns, 64 bytes in which byte 4d + i carries row k + i of
columns 16 n + d of the half (n = 0 in its low nibble, 1 in its high one):
the 4 consecutive rows of a column that one int8 dot product (VNNI vpdpbusd)
sums are one 32-bit word, so the int8-activation kernels turn 64 stored
bytes into their operands with 2 masks, a shift and 2 table lookups
instead of also transposing bytes (docs/PERFORMANCE.md section 3, session
23). A matmul then reads one sequential stream instead of 16 or 32 row
streams: Grok-1's expert matmuls run 1.1-1.3x faster on the Zen 5 VM
(docs/PERFORMANCE.md, session 16). ``untile`` gives the row layout back.

An int4 weight may instead carry ``levels``: 16 integers in [-127, 127], the
value each nibble stands for (nibble n means ``levels[n] * scale``). A
non-uniform table puts more levels where weights are dense (near zero) and
fewer in the tails: at the same 4.5 bits per weight it loses markedly less
than the uniform grid on heavy-tailed weights (docs/FIDELITY.md). ``None``
is the uniform two's complement grid above (nibble n means n, or n - 16 from
8 on). Either way ``int_values`` gives the integer each weight stands for.

QWeight is a JAX pytree (values and scales are leaves; bits and group size
static), registered here where it is defined, so it travels through ``jax.jit``
as numpy views, device arrays or tracers alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class QWeight:
    values: np.ndarray  # int8 (K, N + pad) for bits=8; uint8 (K // 2, N + pad) for bits=4
    scales: np.ndarray  # bf16 (K // group_size, N)
    bits: int
    group_size: int
    levels: tuple[int, ...] | None = None  # int4: nibble -> integer level; None = two's complement
    tiled: bool = False  # values in TILE_ROWS x TILE_COLS tiles (no row padding), see above

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.levels is not None and (self.bits != 4 or len(self.levels) != 16):
            # the values themselves are checked where a table comes in (check_levels: the
            # manifest's QuantSettings, quantize_levels), not again at every construction
            raise ValueError(f"levels: 16 for int4 weights only, got {len(self.levels)} "
                             f"for int{self.bits}")
        if not (hasattr(self.values, "shape") and hasattr(self.scales, "shape")):
            return   # JAX rebuilds pytrees with placeholder leaves: nothing to check
        k, n = self.shape
        if self.group_size <= 0 or k % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide K={k}")
        if self.scales.shape[-2] != k // self.group_size:
            raise ValueError(f"scales shape {self.scales.shape}: expected {k // self.group_size} "
                             f"rows (K={k} / group_size {self.group_size})")
        if self.values.shape[-1] < n:
            raise ValueError(f"values shape {self.values.shape} is narrower than the scales' "
                             f"{n} columns")
        if self.tiled:
            check_tiles((k, n), self.group_size, f"{self.values.shape} values", self.bits)
            if self.row_pad:
                raise ValueError(f"tiled values carry no row padding, got {self.row_pad} columns")

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N): N is the scales' width (the values may carry row padding past it)."""
        rows = self.values.shape[-2]
        return (rows * 2 if self.bits == 4 else rows), self.scales.shape[-1]

    @property
    def row_pad(self) -> int:
        """Stored columns of padding after each row of values (0: dense)."""
        return self.values.shape[-1] - self.scales.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes


jax.tree_util.register_pytree_node(
    QWeight, lambda w: ((w.values, w.scales), (w.bits, w.group_size, w.levels, w.tiled)),
    lambda aux, children: QWeight(*children, *aux))

TILE_ROWS = 32   # weight rows per tile (int8: 32 stored rows; int4: 16 packed rows)
TILE_COLS = 64   # columns (bytes of a stored row) per tile


def check_tiles(shape: tuple[int, int], group_size: int, what: str, bits: int = 8) -> None:
    """ValueError unless a (K, N) weight with this scale group can be tiled: K a
    multiple of TILE_ROWS, N of TILE_COLS, and the group a multiple or a divisor
    of TILE_ROWS (a kernel call then never spans two tiles or two scale groups);
    int4: a multiple of 4 too (a group never splits the 4 rows of a column that
    a 32-bit word of an int4 tile holds)."""
    k, n = shape
    quad = 4 if bits == 4 else 1
    if k % TILE_ROWS or n % TILE_COLS or (group_size % TILE_ROWS and TILE_ROWS % group_size) \
            or group_size % quad:
        four = " and of 4 (int4)" if bits == 4 else ""
        raise ValueError(f"{what}: tiles need K a multiple of {TILE_ROWS}, N of {TILE_COLS} "
                         f"and a scale group dividing or divided by {TILE_ROWS}{four}; found "
                         f"K={k}, N={n}, group {group_size}")


def tile_stored_rows(bits: int) -> int:
    """Stored rows per tile: TILE_ROWS weight rows, two per byte for packed int4."""
    return TILE_ROWS // 2 if bits == 4 else TILE_ROWS


def pad_rows(values: np.ndarray, row_pad: int) -> np.ndarray:
    """Values (R, N) as stored: (R, N + row_pad), the padding zero.

    Why pad: 16 rows read together whose stride is a multiple of 4 KiB share
    one L1 set; Grok-1's gate and up (32768-byte rows) run 1.1-1.3x faster
    with 64 bytes after each row (docs/PERFORMANCE.md section 3, session 10).
    """
    if not row_pad:
        return values
    out = np.zeros((values.shape[0], values.shape[1] + row_pad), values.dtype)
    out[:, :values.shape[1]] = values
    return out


def tile_values(values: np.ndarray, bits: int) -> np.ndarray:
    """Stored values (R, N) in row order -> the same shape in tile order (a copy)."""
    ts = tile_stored_rows(bits)
    r, n = values.shape
    if bits == 4:   # the nibbles (K, N) by (band, quad, row i, strip, half, nibble n, d)
        nib = np.stack([values & 0x0F, values >> 4], axis=1).reshape(
            r // ts, 8, 4, n // TILE_COLS, 2, 2, 16)
        q = nib.transpose(0, 3, 1, 4, 6, 2, 5)       # (band, strip, quad, half, d, i, n)
        return np.ascontiguousarray(q[..., 0] | (q[..., 1] << 4)).reshape(r, n)
    tiles = values.reshape(r // ts, ts, n // TILE_COLS, TILE_COLS).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(tiles).reshape(r, n)


def untile(values, bits: int):
    """Inverse of tile_values (numpy or jax arrays; rows a multiple of a tile's)."""
    ts = tile_stored_rows(bits)
    r, n = values.shape
    if bits == 4:
        xp = np if isinstance(values, np.ndarray) else jax.numpy
        b = values.reshape(r // ts, n // TILE_COLS, 8, 2, 16, 4)  # (band, strip, quad, half, d, i)
        nib = xp.stack([b & 0x0F, b >> 4], axis=-1)             # (..., d, i, nibble n)
        rows = nib.transpose(0, 2, 5, 1, 3, 6, 4).reshape(r, 2, n)  # (K/2, pair, N)
        return rows[:, 0] | (rows[:, 1] << 4)
    return values.reshape(r // ts, n // TILE_COLS, ts, TILE_COLS).transpose(0, 2, 1, 3
                                                                          ).reshape(r, n)

UNIFORM_LEVELS = tuple(range(8)) + tuple(range(-8, 0))   # what levels=None means, nibble order


def check_levels(levels) -> tuple[int, ...]:
    """A valid int4 level table as a tuple: 16 distinct integers in [-127, 127]."""
    try:
        table = tuple(int(v) for v in levels)
    except (TypeError, ValueError):
        raise ValueError(f"int4 levels must be 16 integers, got {levels!r}") from None
    if (len(table) != 16 or len(set(table)) != 16 or any(v != lv for v, lv in zip(table, levels))
            or any(not -127 <= v <= 127 for v in table)):
        raise ValueError(f"int4 levels must be 16 distinct integers in [-127, 127], got {levels!r}")
    return table


def level_table(levels: tuple[int, ...] | None) -> np.ndarray:
    """float32 (16,): the value of each nibble (the uniform grid for None)."""
    return np.asarray(UNIFORM_LEVELS if levels is None else levels, np.float32)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7] of shape (..., K, N) -> uint8 (..., K // 2, N)."""
    if q.shape[-2] % 2:
        raise ValueError(f"int4 packing needs an even number of rows, got {q.shape[-2]}")
    u = q.astype(np.uint8) & 0x0F
    return u[..., 0::2, :] | (u[..., 1::2, :] << 4)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 (..., K // 2, N) -> int8 (..., K, N), sign-extending each nibble."""
    p = packed.view(np.int8)
    lo = (p << 4) >> 4
    hi = p >> 4
    out = np.empty(packed.shape[:-2] + (packed.shape[-2] * 2, packed.shape[-1]), np.int8)
    out[..., 0::2, :] = lo
    out[..., 1::2, :] = hi
    return out


def int_values(w: QWeight) -> np.ndarray:
    """The integer values as int8 (K, N), unpacking int4 (through its level table)."""
    values = np.asarray(w.values)[..., :w.shape[1]]            # without the row padding
    if w.tiled:
        values = untile(values, w.bits)                       # (K or K/2, N) in row order
    if w.bits == 8:
        return values
    q = unpack_int4(values)                                  # (K, N) int8 two's complement
    if w.levels is None:
        return q
    return np.asarray(w.levels, np.int8)[q.view(np.uint8) & 0x0F]


def dequantize(w: QWeight) -> np.ndarray:
    """fp32 (K, N): the reference meaning of a QWeight (slow, plain numpy)."""
    q = int_values(w).astype(np.float32)
    k, n = w.shape
    groups = k // w.group_size
    s = np.asarray(w.scales).astype(np.float32)
    return (q.reshape(groups, w.group_size, n) * s[:, None, :]).reshape(k, n)
