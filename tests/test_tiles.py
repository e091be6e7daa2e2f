"""Tiled values (QWeight.tiled): experts (format 5, docs/FORMAT.md section 7) and
int8 attention (format 6, section 6).

Tiles only reorder the stored bytes, and the host kernels walk a tiled matrix
adding each column's partial sums in the same order as in rows, so every
result here is compared bit for bit with the row layout's (itself tested
against float64 references in test_kernels.py), on every kernel family: fp32
micro-kernels (int8, int4, int4 level tables) at 1-17 tokens, int8
activations, other parallel splits. The tile order is checked against an
independent index formula, not against ``tile_values`` itself.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from numba import njit
from numba.core.registry import cpu_target

from helpers import ACT8_LANE, greedy_ids
from lowmem import act8_kernels, simd_kernels
from lowmem import cpu_kernels as kernels
from lowmem import model as M
from lowmem.decoding import prompt_logits
from lowmem.engine import Engine, EngineOptions
from quant.config import preset
from quant.int4_levels import STUDENT_T_LEVELS
from quant.packed import PackedModel, QuantSettings
from quant.pipeline import quantize_checkpoint
from quant.synthetic import write_checkpoint
from quant.qweight import (TILE_COLS, TILE_ROWS, QWeight, check_tiles, dequantize, int_values,
                           pack_int4, tile_values, untile)

BF16 = np.dtype(ml_dtypes.bfloat16)


def _pair(rng, k, n, bits, group, levels=None):
    """(rows, tiled) QWeights of the same random weight."""
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = rng.integers(lo, hi, (k, n), dtype=np.int8)
    values = pack_int4(q) if bits == 4 else q
    scales = (rng.standard_normal((k // group, n)) * 0.02).astype(BF16)
    return (QWeight(values, scales, bits, group, levels),
            QWeight(tile_values(values, bits), scales, bits, group, levels, True))


def test_int8_tile_order_is_the_documented_formula():
    """Byte [r, n] of the rows sits at ((r // 32) * (N / 64) + n // 64) * 2048
    + (r % 32) * 64 + n % 64 of the tiled bytes; untile inverts it (numpy and
    JAX alike)."""
    rng = np.random.default_rng(8)
    r, n = 96, 192
    values = rng.integers(-128, 128, (r, n), dtype=np.int8)
    tiled = tile_values(values, 8)
    rr, nn = np.meshgrid(np.arange(r), np.arange(n), indexing="ij")
    flat = ((rr // 32) * (n // 64) + nn // 64) * 2048 + (rr % 32) * 64 + nn % 64
    np.testing.assert_array_equal(tiled.reshape(-1)[flat], values)
    np.testing.assert_array_equal(untile(tiled, 8), values)
    np.testing.assert_array_equal(np.asarray(untile(jnp.asarray(tiled), 8)), values)
    assert TILE_ROWS == 32 and TILE_COLS == 64


def test_int4_tile_order_is_the_documented_formula():
    """Weight [k, n] (nibble k % 2 of packed byte [k // 2, n] in rows) sits in
    nibble (n % 32) // 16 of byte ((k // 32) * (N / 64) + n // 64) * 1024
    + (k % 32 // 4) * 128 + (n % 64 // 32) * 64 + (n % 16) * 4 + k % 4 of the
    tiled bytes (docs/FORMAT.md section 7): each 4 rows of a column in one
    32-bit word; untile inverts it (numpy and JAX alike)."""
    rng = np.random.default_rng(4)
    k, n = 96, 192
    packed = rng.integers(0, 256, (k // 2, n), dtype=np.uint8)
    tiled = tile_values(packed, 4)
    assert tiled.shape == packed.shape and tiled.dtype == np.uint8
    kk, nn = np.meshgrid(np.arange(k), np.arange(n), indexing="ij")
    flat = (((kk // 32) * (n // 64) + nn // 64) * 1024 + (kk % 32 // 4) * 128
            + (nn % 64 // 32) * 64 + (nn % 16) * 4 + kk % 4)
    got = (tiled.reshape(-1)[flat] >> (4 * (nn % 32 // 16))) & 15
    want = (packed[kk // 2, nn] >> (4 * (kk % 2))) & 15
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(untile(tiled, 4), packed)
    np.testing.assert_array_equal(np.asarray(untile(jnp.asarray(tiled), 4)), packed)


@pytest.mark.parametrize("a8", [False, True])
@pytest.mark.parametrize("bits,group,levels", [(8, 256, None), (8, 64, None), (4, 32, None),
                                               (4, 32, STUDENT_T_LEVELS), (4, 8, None),
                                               (4, 4, STUDENT_T_LEVELS), (4, 192, None)])
def test_matmul_tiled_equals_rows_bit_for_bit(bits, group, levels, a8):
    k = 192 if group == 192 else 256
    rng = np.random.default_rng(100 + bits + group)
    rows, tiled = _pair(rng, k, 320, bits, group, levels)
    for t in (1, 2, 5, 6, 7, 9, 17):
        x = rng.standard_normal((t, k)).astype(np.float32)
        np.testing.assert_array_equal(kernels.matmul(x, tiled, act_int8=a8),
                                      kernels.matmul(x, rows, act_int8=a8), err_msg=f"T={t}")
    x = rng.standard_normal((3, k)).astype(np.float32)
    for split in ({"col_block": 128, "k_chunk": 64}, {"col_block": 64, "k_chunk": 32}):
        np.testing.assert_array_equal(kernels.matmul(x, tiled, act_int8=a8, **split),
                                      kernels.matmul(x, rows, act_int8=a8, **split))


@pytest.mark.parametrize("levels", [None, STUDENT_T_LEVELS])
@pytest.mark.parametrize("lut,perm8", [(True, None), (False, True), (False, False)])
@pytest.mark.parametrize("tb,nv", [(1, 4), (3, 4), (6, 2)])
def test_int4_tile_micro_kernels_every_decoder(tb, nv, lut, perm8, levels):
    """The fp32 int4 micro-kernel on a tile (version 7's order: each quad's 32-bit
    words) gives the row kernel's bits with each nibble decoder: AVX-512's table
    (lut), AVX2's two 8-entry tables (perm8), the gather, the xor of the uniform
    grid (what CPUs without AVX-512 run, tested on any CPU); both halves of a
    strip as the 5-8 token passes call them (nv = 2), from a mid-tile quad."""
    ctx = cpu_target.target_context
    if lut and not simd_kernels._has_avx512(ctx):
        pytest.skip("the table decoder needs AVX-512")
    if perm8 and not simd_kernels._has_feature(ctx, "avx2"):
        pytest.skip("the 8-entry tables need AVX2")
    rng = np.random.default_rng(tb * 10 + nv)
    rows, tiled = _pair(rng, 64, 128, 4, 32, levels)
    kb, j, k = 32, 64, 40                       # band 1, strip 1, from weight row 40 (quad 2)
    base = simd_kernels._tile_row(kb // 2, j, 16, 2)
    kern_r, kern_t = (simd_kernels._q4_kernel(tb, nv, lut, perm8, tiles) for tiles in (0, 1))
    x = rng.standard_normal((tb + 1, 64)).astype(np.float32)
    lv = None if levels is None else np.asarray(levels, np.float32)

    @njit
    def run(p, pt, sc, acc_r, acc_t, lv):
        for h in range(0, 64, 16 * nv):
            kern_r(p, k // 2, 12, j + h, x, 1, k, sc, 1, acc_r, h, lv)
            kern_t(pt, base + (k - kb) // 2, 12, j + h, x, 1, k, sc, 1, acc_t, h, lv)

    acc_r, acc_t = (np.zeros((tb + 1, 64), np.float32) for _ in range(2))
    run(rows.values, tiled.values.reshape(-1, 64), rows.scales.view(np.uint16), acc_r, acc_t,
        lv)
    assert acc_r[1:].all() and not acc_r[0].any()
    np.testing.assert_array_equal(acc_t, acc_r)


_CTX = cpu_target.target_context


@pytest.mark.skipif(not (act8_kernels._has_vnni(_CTX) and act8_kernels._has_vbmi(_CTX)),
                    reason="vpermb needs AVX-512 VNNI and VBMI")
@pytest.mark.parametrize("levels", [None, STUDENT_T_LEVELS])
@pytest.mark.parametrize("tiles", [False, True])
@pytest.mark.parametrize("tb", [1, 5])
def test_int4_act8_vpermb_gives_the_bits_of_vpshufb(tb, tiles, levels):
    """With AVX-512 VBMI the int4 operands come from vpermb on unmasked nibbles
    (act8_kernels._Perm); CPUs without it mask them for vpshufb (a level table) or
    an xor (the uniform grid): the same bits, in rows and in tiles."""
    rng = np.random.default_rng(30 + tb)
    w = _pair(rng, 64, 128, 4, 32, levels)[int(tiles)]
    kb, j = 32, 64
    i0 = simd_kernels._tile_row(kb // 2, j, 16, 2) if tiles else kb // 2
    xq, dx, bs = act8_kernels.quantize_activations(
        rng.standard_normal((tb, 64)).astype(np.float32))
    perm, shuf = (act8_kernels._kernel(4, tb, None, "fused", tiles, vbmi) for vbmi in (None, False))
    lv = None if levels is None else np.asarray(levels, np.float32)

    @njit
    def run(p, sc, acc_p, acc_s, lv):
        u = np.zeros((32, 64), np.uint8)
        perm(p, i0, j, xq, 0, kb, dx, bs, sc, 1, acc_p, 0, u, lv)
        shuf(p, i0, j, xq, 0, kb, dx, bs, sc, 1, acc_s, 0, u, lv)

    acc_p, acc_s = (np.zeros((tb, 64), np.float32) for _ in range(2))
    run(w.values.reshape(-1, 64) if tiles else w.values, w.scales.view(np.uint16), acc_p,
        acc_s, lv)
    assert acc_s.all()
    np.testing.assert_array_equal(acc_p, acc_s)


@pytest.mark.parametrize("levels", [None, STUDENT_T_LEVELS])
@pytest.mark.parametrize("vnni,mode", [(None, "fused"), (False, "fused"), (None, "read"),
                                       (False, "read")])
@pytest.mark.parametrize("tb", [1, 4])
def test_int4_tile_act8_kernels(tb, vnni, mode, levels):
    """The int8-activation kernel on a tile gives the row kernel's bits, in column
    order where the row kernel leaves its lane order (natural_order), with
    vpdpbusd/vpshufb where the CPU has them (None) and the portable dot product
    and select chain (False); "read" takes the block a "write" call decoded."""
    rng = np.random.default_rng(20 + tb)
    rows, tiled = _pair(rng, 64, 128, 4, 32, levels)
    kb, j = 32, 64
    base = simd_kernels._tile_row(kb // 2, j, 16, 2)
    x = rng.standard_normal((tb + 1, 64)).astype(np.float32)
    xq, dx, bs = act8_kernels.quantize_activations(x)
    kern_r, kern_t = (act8_kernels._kernel(4, tb, vnni, mode, tiles) for tiles in (False, True))
    writer_r, writer_t = (act8_kernels._kernel(4, 1, vnni, "write", tiles)
                          for tiles in (False, True))
    lv = None if levels is None else np.asarray(levels, np.float32)

    @njit
    def run(p, pt, sc, acc_r, acc_t, lv):
        u_r, u_t = np.zeros((32, 64), np.uint8), np.zeros((32, 64), np.uint8)
        scratch = np.zeros((1, 64), np.float32)
        if mode == "read":
            writer_r(p, kb // 2, j, xq, 0, kb, dx, bs, sc, 1, scratch, 0, u_r, lv)
            writer_t(pt, base, j, xq, 0, kb, dx, bs, sc, 1, scratch, 0, u_t, lv)
        kern_r(p, kb // 2, j, xq, 1, kb, dx, bs, sc, 1, acc_r, 0, u_r, lv)
        kern_t(pt, base, j, xq, 1, kb, dx, bs, sc, 1, acc_t, 0, u_t, lv)

    acc_r, acc_t = (np.zeros((tb + 1, 64), np.float32) for _ in range(2))
    run(rows.values, tiled.values.reshape(-1, 64), rows.scales.view(np.uint16), acc_r, acc_t,
        lv)
    assert acc_r[1:].all() and not acc_r[0].any()
    np.testing.assert_array_equal(acc_t, acc_r[:, ACT8_LANE])


def test_expert_ffn_and_dequantizations_of_tiles():
    """A whole expert (gate, up, down) and both dequantizations (numpy reference, JAX
    device path) read tiles as the rows they stand for."""
    rng = np.random.default_rng(7)
    (g, gt), (u, ut), (d, dt) = (_pair(rng, *shape, 4, 32, STUDENT_T_LEVELS)
                                 for shape in ((128, 256), (128, 256), (256, 128)))
    x = rng.standard_normal((4, 128)).astype(np.float32)
    np.testing.assert_array_equal(kernels.expert_ffn(x, gt, ut, dt, round_bf16=False),
                                  kernels.expert_ffn(x, g, u, d, round_bf16=False))
    np.testing.assert_array_equal(int_values(dt), int_values(d))
    np.testing.assert_array_equal(dequantize(dt), dequantize(d))
    np.testing.assert_array_equal(np.asarray(M.dequantize(dt, np.float32)), dequantize(d))


def test_tiles_refuse_what_they_cannot_hold():
    """One line each: widths that are not whole tiles, a scale group neither a multiple
    nor a divisor of 32 (a kernel call would span two), row padding; the kernels'
    split overrides must be whole tiles."""
    with pytest.raises(ValueError, match="N of 64 .* found K=64, N=96, group 64"):
        check_tiles((64, 96), 64, "w")
    with pytest.raises(ValueError, match="found K=96, N=64, group 48"):
        check_tiles((96, 64), 48, "w")
    check_tiles((64, 64), 2, "w")          # int8: any divisor of 32
    with pytest.raises(ValueError, match=r"w: .* dividing or divided by 32 and of 4 \(int4\); "
                                         r"found K=64, N=64, group 2"):
        check_tiles((64, 64), 2, "w", bits=4)
    rng = np.random.default_rng(3)
    rows, tiled = _pair(rng, 64, 128, 8, 64)
    padded = np.concatenate([tiled.values, np.zeros((64, 64), np.int8)], axis=1)
    with pytest.raises(ValueError, match="tiled values carry no row padding, got 64"):
        QWeight(padded, tiled.scales, 8, 64, None, True)
    x = np.ones((1, 64), np.float32)
    with pytest.raises(ValueError, match="k_chunk must be a positive multiple of 32, got 16"):
        kernels.matmul(x, tiled, k_chunk=16)
    with pytest.raises(ValueError, match="col_block of tiled values must be a multiple of 64"):
        kernels.matmul(x, tiled, col_block=32)
    np.testing.assert_array_equal(kernels.matmul(x, rows, k_chunk=16), kernels.matmul(x, rows))


@pytest.fixture(scope="module")
def wide_attention(tmp_path_factory):
    """tiny with 8 query and 4 KV heads: q (64, 128), k and v (64, 64), o (128, 64),
    int8 attention in tiles and in rows (experts in tiles both). With 64 columns a
    tile order is the row order; with 128 it is not."""
    cfg = preset("tiny", num_q_heads=8, num_kv_heads=4)
    root = tmp_path_factory.mktemp("wide")
    ckpt = write_checkpoint(cfg, root / "ckpt-0", seed=3)
    out = {}
    for name, attention_tiles in (("tiles", True), ("rows", False)):
        settings = QuantSettings(8, row_pad=0, tiles=True, attention_tiles=attention_tiles)
        quantize_checkpoint(ckpt, root / name, cfg, settings)
        out[name] = PackedModel.open(root / name)
    return out


@pytest.mark.parametrize("backend,act_int8", [("device", None), ("host", False),
                                              ("host", True)])
def test_attention_in_tiles_computes_what_rows_do_bit_for_bit(wide_attention, backend,
                                                              act_int8):
    """Tiled attention values (stored in another byte order here) give the rows'
    logits bit for bit: the host kernels read them in place (fp32 and int8
    activations), the device backend puts them back in row order when it places
    them; prefill and greedy decode."""
    tiled, rows = wide_attention["tiles"], wide_attention["rows"]
    for role in "qkvo":
        t, r = tiled.layer(1)[role], rows.layer(1)[role]
        assert t.tiled and not r.tiled and t.values.shape == r.values.shape
        np.testing.assert_array_equal(t.values, tile_values(np.asarray(r.values), 8))
    assert not np.array_equal(tiled.layer(1)["q"].values, rows.layer(1)["q"].values)

    def engine(model):
        kw = {} if act_int8 is None else {"act_int8": act_int8}
        return Engine(model, EngineOptions(backend=backend, precision="bf16", **kw))
    prompt = [5, 17, 99, 3, 250, 42, 7, 300]
    np.testing.assert_array_equal(prompt_logits(engine(tiled), prompt),
                                  prompt_logits(engine(rows), prompt))
    assert greedy_ids(engine(tiled), prompt, 4) == greedy_ids(engine(rows), prompt, 4)
