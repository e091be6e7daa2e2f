"""Writer side of the packed format (quant/packed.py): units, files, records.

The quantizer works in *units*: the global tensors (checkpoint files 0-1),
then each layer (its 12 files), in checkpoint file order. A unit owns whole
output files (``global.bin``; ``layer_LL.resident.bin`` and
``layer_LL.experts.bin``), so redoing a unit never touches another's bytes.

Every stored array is written at the offset ``tensor_layout`` gives with
positioned writes (``os.pwrite``) from a small thread pool that also computes
its CRC32 (both release the GIL, so disk, checksums and quantization overlap).
When a unit's writes are done its files are fsync'ed and a completion record
``<unit>.done.json`` (its manifest rows, with checksums, and its quantization
errors) is written atomically. ``--resume`` trusts a unit only if its record
matches the layout and its bytes still match the record's checksums.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quant.config import GrokConfig
from quant.packed import (DTYPES, QuantSettings, TensorEntry, entry_to_json, file_sizes,
                          tensor_layout, write_json_atomic)
from quant.spec import WeightSpec, global_specs, layers_in_file_order

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".done.json"
MAX_PENDING_WRITES = 8        # queued arrays per unit before the producer waits
_PWRITE_CHUNK = 1 << 30       # Linux writes at most ~2 GiB per call


@dataclass(frozen=True)
class Unit:
    """A resumable piece of work: some checkpoint files and the outputs they fill."""
    name: str                          # 'global' or 'layer_LL'
    specs: tuple[WeightSpec, ...]      # checkpoint files, in file order
    entries: tuple[TensorEntry, ...]   # stored tensors, in layout (manifest) order

    @property
    def record(self) -> str:
        return self.name + RECORD_SUFFIX

    @property
    def files(self) -> dict[str, int]:
        """Output file name -> size, for the files this unit owns."""
        return file_sizes(list(self.entries))


def plan_units(cfg: GrokConfig, settings: QuantSettings) -> list[Unit]:
    """Units in checkpoint file order; their entries concatenated equal tensor_layout."""
    layout = tensor_layout(cfg, settings)
    units = [Unit("global", tuple(global_specs(cfg).values()),
                  tuple(e for e in layout if e.layer is None))]
    for layer, layer_specs in layers_in_file_order(cfg):
        units.append(Unit(f"layer_{layer:02d}", tuple(layer_specs),
                          tuple(e for e in layout if e.layer == layer)))
    assert tuple(e for u in units for e in u.entries) == layout
    return units


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    """Write all of ``buf`` at ``offset`` (pwrite may write less than asked)."""
    done = 0
    while done < len(buf):
        n = os.pwrite(fd, buf[done:done + _PWRITE_CHUNK], offset + done)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} bytes at offset {offset + done}")
        done += n


class UnitWriter:
    """Writes one unit's arrays at their layout offsets; collects their checksums.

    ``write`` hands an array to the pool and returns at once; at most
    MAX_PENDING_WRITES arrays are in flight, which bounds the memory they pin.
    """

    def __init__(self, out_dir: Path, unit: Unit, pool: ThreadPoolExecutor):
        self.unit, self.pool = unit, pool
        self.by_name = {e.name: e for e in unit.entries}
        self.crcs: dict[str, int] = {}
        self.pending: deque[tuple[str, Future]] = deque()
        self.fds: dict[str, int] = {}
        for name, size in unit.files.items():
            fd = os.open(out_dir / name, os.O_RDWR | os.O_CREAT, 0o644)
            self.fds[name] = fd
            os.ftruncate(fd, 0)       # a redone unit starts from zeros (padding included)
            os.ftruncate(fd, size)

    def write(self, name: str, array: np.ndarray) -> None:
        entry = self.by_name[name]
        if array.shape != entry.shape or array.dtype != DTYPES[entry.dtype]:
            raise AssertionError(f"{name}: produced {array.dtype}{list(array.shape)}, layout "
                                 f"says {entry.dtype}{list(entry.shape)}")
        self.pending.append((name, self.pool.submit(self._job, entry, array)))
        while len(self.pending) > MAX_PENDING_WRITES:
            self._collect_one()

    def _job(self, entry: TensorEntry, array: np.ndarray) -> int:
        buf = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        crc = zlib.crc32(buf)
        _pwrite_all(self.fds[entry.file], buf, entry.offset)
        return crc

    def _collect_one(self) -> None:
        name, fut = self.pending.popleft()
        self.crcs[name] = fut.result()

    def drain(self) -> None:
        """Wait until every array handed over so far is written (releases its memory)."""
        while self.pending:
            self._collect_one()

    def finish(self) -> list[dict]:
        """Wait for every write, fsync and close the files; the unit's manifest rows."""
        try:
            self.drain()
            missing = [e.name for e in self.unit.entries if e.name not in self.crcs]
            if missing:
                raise AssertionError(f"{self.unit.name}: tensors never written: {missing[:3]}")
            for fd in self.fds.values():
                os.fsync(fd)
        finally:
            self.close()
        return [entry_to_json(e, self.crcs[e.name]) for e in self.unit.entries]

    def close(self) -> None:
        """Close the files; on failure first cancel queued writes and wait for running
        ones (a write must never outlive its descriptor, whose number may be reused)."""
        for _, fut in self.pending:
            fut.cancel()
        for _, fut in self.pending:
            if not fut.cancelled():
                fut.exception()   # waits; the error, if any, is the caller's to report
        self.pending.clear()
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def write_record(out_dir: Path, unit: Unit, rows: list[dict], errors: dict[str, float]) -> None:
    """Atomically mark a unit complete (written only after its files are fsync'ed)."""
    write_json_atomic(out_dir / unit.record, {"unit": unit.name, "tensors": rows,
                                              "quant_error": errors})


def _crc_of_range(path: Path, offset: int, nbytes: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        crc, left = 0, nbytes
        while left:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                return -1              # file shorter than the layout: never a valid CRC
            crc, left = zlib.crc32(chunk, crc), left - len(chunk)
    return crc


def load_valid_record(out_dir: Path, unit: Unit, pool: ThreadPoolExecutor) -> dict | None:
    """The unit's record if it matches the layout and every byte range still has
    its recorded checksum; None (with the reason logged) otherwise."""
    path = out_dir / unit.record
    try:
        record = json.loads(path.read_text())
        rows = record["tensors"]
        expected = [entry_to_json(e, row.get("crc32")) for e, row in zip(unit.entries, rows)]
        if (len(rows) != len(unit.entries) or rows != expected
                or not isinstance(record["quant_error"], dict)):
            log.info("%s: record does not match the layout; redoing the unit", unit.name)
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.info("%s: no readable completion record; redoing the unit", unit.name)
        return None
    for name, size in unit.files.items():
        if not (out_dir / name).is_file() or (out_dir / name).stat().st_size != size:
            log.info("%s: %s is missing or has the wrong size; redoing the unit", unit.name, name)
            return None
    crcs = pool.map(lambda e: _crc_of_range(out_dir / e.file, e.offset, e.nbytes), unit.entries)
    for entry, row, crc in zip(unit.entries, rows, crcs):
        if crc != row["crc32"]:
            log.info("%s: tensor %s does not match its checksum; redoing the unit",
                     unit.name, entry.name)
            return None
    return record
