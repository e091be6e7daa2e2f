"""The packed format (quant/packed.py) as the quantizer writes it: layout invariants,
the stored bytes against the manifest, zero-copy views, and rejection of damage."""
import json
import os
import shutil

import numpy as np
import pytest

from quant.config import preset
from quant.int4_levels import STUDENT_T_LEVELS
from quant.packed import (ALIGN, MANIFEST, PART_ALIGN, ROW_PAD, IntegrityError,
                          PackedFormatError, PackedModel, QuantSettings, checksum,
                          entry_to_json, expert_block_layout, file_sizes, seal_manifest,
                          tensor_layout, verify_model)
from quant.pipeline import quantize_checkpoint
from quant.qweight import dequantize
from quant.spec import checkpoint_specs

from helpers import memlock_allows

SETTINGS = [QuantSettings(8), QuantSettings(4), QuantSettings(4, 32),
            QuantSettings(8, attention="bf16"),
            QuantSettings(4, 32, int4_levels=STUDENT_T_LEVELS)]


def _ids(s):
    return f"b{s.bits}-g{s.group_size}-{s.attention}" + ("-lv" if s.int4_levels else "")


@pytest.fixture(scope="module")
def model_dir(tiny_cfg, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "model"
    quantize_checkpoint(tiny_ckpt, out, tiny_cfg, QuantSettings(4, 32))
    return out


def damaged_copy(model_dir, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(model_dir, out)
    return out


def flip_a_bit(model_dir, entry):
    """Flip one bit of a stored tensor (bit 2 of its 6th byte) in its file."""
    with open(model_dir / entry.file, "r+b") as f:
        f.seek(entry.offset + 5)
        byte = f.read(1)
        f.seek(entry.offset + 5)
        f.write(bytes([byte[0] ^ 0x04]))


def _round(n, a):
    return -(-n // a) * a


@pytest.mark.parametrize("settings", SETTINGS, ids=_ids)
@pytest.mark.parametrize("name", ["tiny", "grok-1"])
def test_layout_invariants(name, settings):
    cfg = preset(name)
    entries = tensor_layout(cfg, settings)
    names = [e.name for e in entries]
    assert len(set(names)) == len(names)
    parts, block = expert_block_layout(cfg, settings)
    assert block % ALIGN == 0
    for e in entries:
        if e.expert is not None:   # inside its block, at a PART_ALIGN boundary
            rel = e.offset - e.expert * block
            assert 0 <= rel and rel + e.nbytes <= block and rel % PART_ALIGN == 0
        else:
            assert e.offset % ALIGN == 0
    sizes = file_sizes(entries)
    for file, size in sizes.items():
        spans = sorted((e.offset, e.offset + e.nbytes) for e in entries if e.file == file)
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))  # no overlap
        assert size == _round(spans[-1][1], ALIGN)
    for layer in range(cfg.num_layers):    # every expert block starts at a multiple of 4096
        assert sizes[f"layer_{layer:02d}.experts.bin"] == cfg.num_experts * block


def test_grok1_expert_block_sizes():
    """Independent arithmetic from SPEC.md sections 1 and 5; each stored row of values
    carries row_pad bytes after it (64 by default, 0 = the dense rows of versions 2-3)."""
    cfg = preset("grok-1")
    d, f = 6144, 32768
    for pad in (64, 0):
        gu8, dn8 = d * (f + pad), f * (d + pad)                          # int8 values
        gu4, dn4 = d // 2 * (f + pad), f // 2 * (d + pad)                # int4 values
        int8 = [gu8, f * 2, gu8, f * 2, dn8, 8 * d * 2]                  # gate, up, down parts
        int4 = [gu4, f * 2, gu4, f * 2, dn4, d * 2]                      # per-channel scales
        g32 = [gu4, d // 32 * f * 2, gu4, d // 32 * f * 2, dn4, f // 32 * d * 2]
        for settings, parts in ((QuantSettings(8, row_pad=pad), int8),
                                (QuantSettings(4, row_pad=pad), int4),
                                (QuantSettings(4, 32, row_pad=pad), g32)):
            block = _round(sum(_round(p, PART_ALIGN) for p in parts), ALIGN)
            assert expert_block_layout(cfg, settings)[1] == block
    assert expert_block_layout(cfg, QuantSettings(8))[1] / 1e6 == pytest.approx(607, abs=1)
    assert expert_block_layout(cfg, QuantSettings(4))[1] / 1e6 == pytest.approx(303.5, abs=1)


def test_written_files_match_manifest(model_dir, tiny_cfg):
    manifest = json.loads((model_dir / MANIFEST).read_text())
    settings = QuantSettings(4, 32)
    layout = tensor_layout(tiny_cfg, settings)
    sizes = file_sizes(layout)
    assert sorted(p.name for p in model_dir.iterdir()) == sorted([*sizes, MANIFEST])
    for file, size in sizes.items():
        assert (model_dir / file).stat().st_size == size
    covered = {f: np.zeros(s, bool) for f, s in sizes.items()}
    for row, entry in zip(manifest["tensors"], layout, strict=True):
        data = np.fromfile(model_dir / entry.file, np.uint8)[entry.offset:entry.offset
                                                             + entry.nbytes]
        assert row == entry_to_json(entry, checksum(data))
        covered[entry.file][entry.offset:entry.offset + entry.nbytes] = True
    for file, mask in covered.items():    # padding is zeros: deterministic bytes
        assert not np.fromfile(model_dir / file, np.uint8)[~mask].any()


def test_views_are_zero_copy(model_dir):
    model = PackedModel.open(model_dir)

    def mapped(a):
        while a is not None and not isinstance(a, np.memmap):
            a = a.base
        return a

    block = model.expert(1, 3)
    for w in (block.gate, block.up, block.down):
        assert isinstance(mapped(w.values), np.memmap) and np.shares_memory(w.values, block.raw)
        assert isinstance(mapped(w.scales), np.memmap)
    assert isinstance(mapped(model.embed()), np.memmap)
    assert isinstance(mapped(model.layer(0)["q"].values), np.memmap)
    assert verify_model(model_dir) == []


def _edit_manifest(path, fn, seal=True):
    """Edit the manifest; ``seal`` recomputes its checksum (so the edit reaches the
    structural checks behind it)."""
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(seal_manifest(m) if seal else m))


@pytest.mark.parametrize("damage, pattern", [
    (lambda m: m.update(magic="something-else"), "expected magic"),
    (lambda m: m.update(format_version=99), "expected format_version 2, 3, 4, 5, 6 or 7, "
                                             "found 99"),
    (lambda m: m.update(format_version=1), "expected format_version 2, 3, 4, 5, 6 or 7, found 1"),
    (lambda m: m["quant"].update(row_pad=32), "row_pad must be a multiple of 64"),
    (lambda m: m["quant"].update(row_pad=0), r"gate\[0\].values: fields \['nbytes', 'shape'\] differ"),
    (lambda m: m["quant"].update(int4_levels=[0] * 16), "int4 levels must be 16 distinct"),
    (lambda m: m["quant"].update(int4_levels=list(range(-8, 8))), r"fields \['levels'\] differ"),
    (lambda m: m.update(tensors=None), "expected 'tensors' to be a list of objects"),
    (lambda m: m["tensors"].__setitem__(3, [1]), "expected 'tensors' to be a list of objects"),
    (lambda m: m["tensors"][7].update(crc32=-1), "expected an unsigned 32-bit crc32"),
    (lambda m: m["config"].update(emb_size="x"), "emb_size must be a positive integer"),
    (lambda m: m["tensors"][5].update(offset=m["tensors"][5]["offset"] + 4096), "offset"),
    (lambda m: m["tensors"].pop(), "tensors for this config"),
    (lambda m: m["config"].update(emb_size=65), "bad config"),       # 32 does not divide 65
    (lambda m: m["quant"].update(bits=5), "bad config"),
    (lambda m: m["quant"].update(tiles=1), "tiles must be true or false, got 1"),
    (lambda m: m["quant"].update(row_pad=64, tiles=True), "row_pad must be 0 with tiles"),
    (lambda m: m["quant"].update(row_pad=0, tiles=True), r"fields \['nbytes', 'shape', 'tiled'\]"),
    (lambda m: m["quant"].update(attention_tiles=1),
     "attention_tiles must be true or false, got 1"),
    (lambda m: m["quant"].update(attention="bf16", attention_tiles=True),
     "attention_tiles applies to int8 attention, got attention 'bf16'"),
    (lambda m: m["quant"].update(attention_tiles=True),
     r"linear/w.values: fields \['tiled'\] differ from the layout \(expected \[True\], "
     r"found \[None\]\)"),
])
def test_open_rejects_bad_manifest(model_dir, tmp_path, damage, pattern):
    bad = damaged_copy(model_dir, tmp_path)
    _edit_manifest(bad / MANIFEST, damage)
    with pytest.raises(PackedFormatError, match=pattern) as exc:
        PackedModel.open(bad)
    assert str(bad / MANIFEST) in str(exc.value)


@pytest.mark.parametrize("version", [2, 3])
def test_older_manifests_read_with_dense_rows(model_dir, tiny_cfg, tiny_ckpt, tmp_path, version):
    """Versions 2 and 3 stored expert rows dense (row_pad 0) and version 2 had no level
    tables: such a model opens, and its weights equal the padded version 4 model's."""
    old = tmp_path / "dense"
    quantize_checkpoint(tiny_ckpt, old, tiny_cfg, QuantSettings(4, 32, row_pad=0))

    def to_old(m):
        m.update(format_version=version)
        del m["quant"]["row_pad"]
        if version == 2:
            del m["quant"]["int4_levels"]
    _edit_manifest(old / MANIFEST, to_old)
    a, b = PackedModel.open(model_dir).expert(1, 2), PackedModel.open(old).expert(1, 2)
    f, d = b.down.shape
    assert b.gate.levels is None and b.down.values.shape == (f // 2, d)   # dense rows
    assert PackedModel.open(old).settings == QuantSettings(4, 32, row_pad=0)
    assert a.down.values.shape == (f // 2, d + ROW_PAD) and a.down.row_pad == ROW_PAD
    for role in ("gate", "up", "down"):
        np.testing.assert_array_equal(dequantize(getattr(a, role)), dequantize(getattr(b, role)))
    padded = damaged_copy(model_dir, tmp_path)             # a padded model called version 3
    _edit_manifest(padded / MANIFEST, lambda m: m.update(format_version=3))
    with pytest.raises(PackedFormatError, match=r"fields \['nbytes', 'shape'\] differ"):
        PackedModel.open(padded)


@pytest.mark.parametrize("version,key,tiled,rows,first", [
    (4, "tiles", QuantSettings(8, row_pad=0, tiles=True), QuantSettings(8), r"gate\[0\]"),
    (5, "attention_tiles", QuantSettings(8, row_pad=0, tiles=True, attention_tiles=True),
     QuantSettings(8, row_pad=0, tiles=True), "linear/w"),
])
def test_an_older_version_means_rows_whatever_its_quant_says(tiny_cfg, tiny_ckpt, tmp_path,
                                                             version, key, tiled, rows, first):
    """Expert tiles exist from version 5 on, attention tiles from 6: a model with them
    relabelled one version older reads without them, so its table (the rows'
    `tiled`) no longer matches and it is refused, one line; a model of that version
    opens with the setting false, and its weights equal the tiled model's."""
    quantize_checkpoint(tiny_ckpt, tmp_path / "tiled", tiny_cfg, tiled)
    new = PackedModel.open(tmp_path / "tiled")
    assert new.expert(0, 1).up.tiled and new.layer(1)["q"].tiled == tiled.attention_tiles
    assert not new.layer(1)["k"].tiled                    # tiny's 32-column k: rows always
    _edit_manifest(tmp_path / "tiled" / MANIFEST, lambda m: m.update(format_version=version))
    with pytest.raises(PackedFormatError, match=first + r".values: fields \['tiled'\] differ "
                                                r"from the layout \(expected \[None\], found "
                                                r"\[True\]\)"):
        PackedModel.open(tmp_path / "tiled")
    quantize_checkpoint(tiny_ckpt, tmp_path / "rows", tiny_cfg, rows)

    def relabel(m):
        m.update(format_version=version)
        del m["quant"][key]
    _edit_manifest(tmp_path / "rows" / MANIFEST, relabel)
    old = PackedModel.open(tmp_path / "rows")
    assert old.settings == rows and not old.layer(1)["q"].tiled
    for role in "qkvo":
        np.testing.assert_array_equal(dequantize(old.layer(1)[role]),
                                      dequantize(new.layer(1)[role]))
    np.testing.assert_array_equal(dequantize(old.expert(1, 2).down),
                                  dequantize(new.expert(1, 2).down))


@pytest.mark.parametrize("version", [5, 6])
def test_int4_tiles_of_version_5_and_6_are_refused(tiny_cfg, tiny_ckpt, tmp_path, version):
    """Version 7 changed the byte order inside int4 tiles: an int4 tiled model that says
    version 5 or 6 is refused, one line naming the manifest and what to do; int8 tiles
    of those versions (the same bytes in 7) still open."""
    quantize_checkpoint(tiny_ckpt, tmp_path / "int4", tiny_cfg,
                        QuantSettings(4, 32, row_pad=0, tiles=True))
    _edit_manifest(tmp_path / "int4" / MANIFEST, lambda m: m.update(format_version=version))
    with pytest.raises(PackedFormatError, match=rf"int4.*manifest.json: format_version "
                                                rf"{version} stores int4 tiles in the byte "
                                                rf"order that version 7 changed.*quantize the "
                                                rf"checkpoint again") as exc:
        PackedModel.open(tmp_path / "int4")
    assert "\n" not in str(exc.value)
    quantize_checkpoint(tiny_ckpt, tmp_path / "int8", tiny_cfg,
                        QuantSettings(8, row_pad=0, tiles=True))
    _edit_manifest(tmp_path / "int8" / MANIFEST, lambda m: m.update(format_version=version))
    assert PackedModel.open(tmp_path / "int8").expert(1, 2).down.tiled


def test_open_refuses_any_unsealed_edit(model_dir, tmp_path):
    """One changed config number (as a flipped bit would) is refused by the seal."""
    bad = damaged_copy(model_dir, tmp_path)
    _edit_manifest(bad / MANIFEST, lambda m: m["config"].update(
        output_multiplier_scale=m["config"]["output_multiplier_scale"] * 2), seal=False)
    with pytest.raises(IntegrityError, match="does not match its checksum manifest_sha256"):
        PackedModel.open(bad)
    (bad / MANIFEST).write_text("[1, 2]")
    with pytest.raises(PackedFormatError, match="expected a JSON object, found a JSON list"):
        PackedModel.open(bad)


def test_tensors_are_verified_when_first_read(model_dir, tmp_path, tiny_cfg):
    """A damaged expert block is refused (naming the tensor) when first fetched; resident
    weights when first viewed; verify_experts=False maps them unchecked."""
    bad = damaged_copy(model_dir, tmp_path)
    layout = {e.name: e for e in tensor_layout(tiny_cfg, QuantSettings(4, 32))}
    for name in ("transformer/decoder_layer_1/up[5].values",
                 "transformer/decoder_layer_0/router/w"):
        flip_a_bit(bad, layout[name])
    model = PackedModel.open(bad)
    model.expert(1, 4)                                   # an intact block
    with pytest.raises(IntegrityError, match=r"tensor transformer/decoder_layer_1/up\[5\]"):
        model.expert(1, 5)
    with pytest.raises(IntegrityError, match="decoder_layer_0/router/w"):
        model.layer(0)
    model.layer(1)
    unchecked = PackedModel.open(bad, verify_experts=False)
    assert unchecked.expert(1, 5).up.values.shape == layout[
        "transformer/decoder_layer_1/up[5].values"].shape
    unchecked.layer(0)


def test_expert_views_are_built_once_and_a_damaged_block_is_never_kept(model_dir, tmp_path,
                                                                       tiny_cfg):
    """expert() keeps each block's views (a decode step asks for them every layer); a
    block that fails its check is not kept, so every later call refuses it too."""
    model = PackedModel.open(model_dir)
    block = model.expert(1, 4)
    assert model.expert(1, 4) is block
    assert model.expert(1, 3) is not block and model.expert(0, 4) is not block
    assert np.shares_memory(block.up.values, model._map(block.path.name))
    bad = damaged_copy(model_dir, tmp_path)
    flip_a_bit(bad, {e.name: e for e in tensor_layout(tiny_cfg, QuantSettings(4, 32))}[
        "transformer/decoder_layer_1/up[5].values"])
    damaged = PackedModel.open(bad)
    for _ in range(2):
        with pytest.raises(IntegrityError, match=r"tensor transformer/decoder_layer_1/up\[5\]"):
            damaged.expert(1, 5)


def test_open_rejects_truncated_and_missing_files(model_dir, tmp_path):
    bad = damaged_copy(model_dir, tmp_path)
    path = bad / "layer_01.experts.bin"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - ALIGN)
    with pytest.raises(PackedFormatError, match="expected a file of") as exc:
        PackedModel.open(bad)
    assert str(path) in str(exc.value)
    path.unlink()
    with pytest.raises(PackedFormatError, match="found no file"):
        PackedModel.open(bad)
    (bad / MANIFEST).write_text("{not json")
    with pytest.raises(PackedFormatError, match="expected JSON"):
        PackedModel.open(bad)
    with pytest.raises(PackedFormatError, match="no manifest.json"):
        PackedModel.open(tmp_path)


def test_verify_names_the_damaged_tensor(model_dir, tmp_path, tiny_cfg):
    bad = damaged_copy(model_dir, tmp_path)
    entry = next(e for e in tensor_layout(tiny_cfg, QuantSettings(4, 32))
                 if e.name == "transformer/decoder_layer_1/down[6].scales")
    with open(bad / entry.file, "r+b") as f:
        f.seek(entry.offset + 3)
        byte = f.read(1)
        f.seek(entry.offset + 3)
        f.write(bytes([byte[0] ^ 0x10]))
    problems = verify_model(bad)
    assert len(problems) == 1 and entry.name in problems[0] and str(bad / entry.file) in problems[0]


def test_settings_reject_bad_group():
    gate = next(s for s in checkpoint_specs(preset("tiny")) if s.role == "gate")
    with pytest.raises(ValueError, match="group size 96 does not divide"):
        QuantSettings(4, 96).expert_group_size(gate)


def _locked_kib():
    """This process's locked memory (VmLck in /proc/self/status), KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmLck:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"),
                    reason="VmLck is read from Linux's /proc")
def test_lock_pins_every_file_of_the_model(model_dir):
    """--mlock: every file's whole mapping is locked (the kernel counts it in VmLck)."""
    model = PackedModel.open(model_dir)
    if not memlock_allows(sum(file_sizes(model.entries).values())):
        pytest.skip("the memlock limit (ulimit -l) is below the tiny model's size")
    before = _locked_kib()
    locked = model.lock()
    sizes = file_sizes(model.entries)
    assert locked == sum(sizes.values()) and len(sizes) == 1 + 2 * model.cfg.num_layers
    assert _locked_kib() - before == locked // 1024      # files are whole pages (ALIGN)
    model.unlock()
    assert _locked_kib() == before


def test_lock_refused_names_the_file_and_the_limit(model_dir, monkeypatch):
    """When mlock fails (a memlock limit too low), one line: which file, how many
    bytes, the OS's reason, the limit and what to do."""
    import ctypes
    import errno
    from quant import hostmem
    monkeypatch.setattr(hostmem, "_mlock_fn", lambda name="mlock": lambda addr, n: (
        ctypes.set_errno(errno.ENOMEM), -1)[1])
    with pytest.raises(hostmem.MemoryLockError) as e:
        PackedModel.open(model_dir).lock()
    msg = str(e.value)
    assert "global.bin: could not lock" in msg and "Cannot allocate memory" in msg
    assert "ulimit -l" in msg and "--mlock" in msg and "\n" not in msg
    monkeypatch.setattr(hostmem, "_mlock_fn", lambda name="mlock": None)
    with pytest.raises(hostmem.MemoryLockError, match="has no mlock"):
        PackedModel.open(model_dir).lock()
    calls = []      # the first file locks, the second is refused: the first is unlocked

    def fake(name="mlock"):
        def fn(addr, n):
            calls.append((name, addr))
            refused = name == "mlock" and len(calls) > 1
            return (ctypes.set_errno(errno.ENOMEM), -1)[1] if refused else 0
        return fn
    monkeypatch.setattr(hostmem, "_mlock_fn", fake)
    with pytest.raises(hostmem.MemoryLockError, match="layer_00"):
        PackedModel.open(model_dir).lock()
    assert calls[0][0] == "mlock" and ("munlock", calls[0][1]) in calls[2:]
