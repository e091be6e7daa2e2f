"""--no-mmap (quant/hostmem.py, PackedModel.read_into_memory, EngineOptions.mmap): the
model's files read into anonymous huge-page memory compute exactly as their mappings,
are verified as the mappings are, and a shrunk file or too little RAM is one clear
error."""
import os
import shutil

import numpy as np
import pytest

from lowmem.engine import Engine, EngineError, EngineOptions
from quant import hostmem
from quant.packed import IntegrityError, PackedFormatError, PackedModel, QuantSettings, file_sizes
from quant.pipeline import quantize_checkpoint

from helpers import memlock_allows

TOKENS = [5, 17, 99, 3, 250]


@pytest.fixture(scope="module")
def model_dir(tiny_cfg, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostmem") / "model"
    quantize_checkpoint(tiny_ckpt, out, tiny_cfg, QuantSettings(4, 32))
    return out


def _vma_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping holding ``addr`` (Linux /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_huge_page_buffer_is_aligned_advised_and_sized():
    buf = hostmem.huge_page_buffer(3 * hostmem.HUGE_PAGE + 5)
    assert buf.nbytes == 3 * hostmem.HUGE_PAGE + 5 and buf.dtype == np.uint8
    assert buf.ctypes.data % hostmem.HUGE_PAGE == 0 and not buf.any()
    buf[-1] = 7                                         # the last byte is inside the map
    if os.path.exists("/proc/self/smaps") and os.path.exists(
            "/sys/kernel/mm/transparent_hugepage/enabled"):
        assert "hg" in _vma_flags(buf.ctypes.data)      # MADV_HUGEPAGE took


def test_read_into_memory_copies_every_file_exactly(model_dir):
    """Each file's bytes, read-only, at a huge-page-aligned start, no longer a mapping;
    a second call reads nothing."""
    model = PackedModel.open(model_dir)
    sizes = file_sizes(model.entries)
    assert model.unread_bytes() == sum(sizes.values())
    assert model.read_into_memory() == sum(sizes.values())
    assert model.unread_bytes() == 0 and model.read_into_memory() == 0
    for entry in model.entries:
        view = model.view(entry)
        stored = np.fromfile(model_dir / entry.file, np.uint8, entry.nbytes, offset=entry.offset)
        assert view.view(np.uint8).tobytes() == stored.tobytes(), entry.name
        assert not view.flags.writeable
        assert not isinstance(view.base, np.memmap) and not isinstance(view, np.memmap)
        if entry.offset == 0:
            assert view.ctypes.data % hostmem.HUGE_PAGE == 0, entry.file
    block = model.expert(0, 1)
    assert block.raw.ctypes.data % 4096 == 0 and not isinstance(block.raw, np.memmap)


def test_engine_without_mmap_computes_the_same_logits(model_dir):
    """EngineOptions(mmap=False): the same arithmetic on the same bytes: logits bit for bit."""
    logits = {}
    for mmap in (True, False):
        model = PackedModel.open(model_dir)
        engine = Engine(model, EngineOptions(backend="host", mmap=mmap, context=64))
        logits[mmap] = [np.asarray(engine.feed(TOKENS)), np.asarray(engine.feed([7]))]
        assert model.unread_bytes() == (0 if not mmap else sum(file_sizes(model.entries).values()))
        engine.close()
    for a, b in zip(logits[True], logits[False]):
        np.testing.assert_array_equal(a, b)


def test_copies_are_verified_on_first_use(model_dir, tmp_path):
    """A byte damaged in the file is refused from the copy, as from the mapping, even
    where the mapping's bytes were verified before the damage."""
    damaged = tmp_path / "model"
    shutil.copytree(model_dir, damaged)
    model = PackedModel.open(damaged)
    model.expert(0, 2)                                  # verified while mapped
    part = model.expert_parts[0]
    with open(damaged / "layer_00.experts.bin", "r+b") as f:
        f.seek(2 * model.expert_block_nbytes + part.offset + 3)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    model.read_into_memory()
    model.expert(0, 1)                                  # an undamaged block reads
    with pytest.raises(IntegrityError, match="layer_00.experts.bin"):
        model.expert(0, 2)


def test_a_file_shrunk_after_open_is_one_clear_error(model_dir, tmp_path):
    shrunk = tmp_path / "model"
    shutil.copytree(model_dir, shrunk)
    model = PackedModel.open(shrunk)
    size = (shrunk / "layer_01.experts.bin").stat().st_size
    os.truncate(shrunk / "layer_01.experts.bin", size - 4096)
    with pytest.raises(PackedFormatError) as e:
        model.read_into_memory()
    msg = str(e.value)
    assert "layer_01.experts.bin" in msg and f"expected {size} bytes, found {size - 4096}" in msg
    with pytest.raises(EngineError, match="layer_01.experts.bin"):
        Engine(model, EngineOptions(backend="host", mmap=False))


def test_too_little_ram_is_refused_before_reading(model_dir, monkeypatch):
    """The RAM check names the model, the GB needed and available, and the way out."""
    import psutil
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=1000))
    model = PackedModel.open(model_dir)
    with pytest.raises(EngineError) as e:
        Engine(model, EngineOptions(backend="host", mmap=False))
    msg = str(e.value)
    assert str(model_dir) in msg and "0.00 GB is available" in msg and "--no-mmap" in msg
    assert "\n" not in msg and model.unread_bytes() == sum(file_sizes(model.entries).values())


@pytest.mark.skipif(not os.path.exists("/proc/self/status"),
                    reason="VmLck is read from Linux's /proc")
def test_lock_after_read_locks_the_copies(model_dir):
    from test_packed import _locked_kib
    model = PackedModel.open(model_dir)
    total = sum(file_sizes(model.entries).values())
    if not memlock_allows(total):
        pytest.skip("the memlock limit (ulimit -l) is below the tiny model's size")
    model.read_into_memory()
    before = _locked_kib()
    assert model.lock() == total and _locked_kib() - before == total // 1024
    model.unlock()
    assert _locked_kib() == before
