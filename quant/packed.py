"""The packed model directory: layout, manifest, zero-copy views, verification.

One description drives both sides: ``tensor_layout(cfg, settings)`` derives,
from ``quant.spec.checkpoint_specs``, every tensor's file, byte offset, shape
and dtype. The quantizer writes bytes at those places; the runtime maps the
same places as ``numpy.memmap`` views. The manifest records the settings and
the table (with checksums), and opening a directory checks the table against
the derived layout, so nothing is ever inferred from file names.
The format is specified in docs/FORMAT.md (pinned by tests/test_format.py).

Files in a model directory:
  manifest.json              magic, version, config, settings, tensor table
  global.bin                 embeddings (bf16) and the final norm
  layer_LL.resident.bin      attention (int8 + bf16 scales, or bf16), norms, router
  layer_LL.experts.bin       num_experts blocks; block e holds expert e's gate, up
                             and down values and scales contiguously, aligned to
                             ALIGN, so fetching an expert is one read of one range
  tokenizer.model            optional, copied from the release
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from quant import hostmem
from quant.config import GrokConfig
from quant.qweight import BF16, QWeight, check_levels, check_tiles
from quant.spec import (ATTENTION_ROLES, EXPERT_ROLES, WeightSpec, expert_tensor_name, global_specs,
                        layer_specs, layers_in_file_order)

FORMAT_MAGIC = "lowmem-grok1-packed"
FORMAT_VERSION = 7         # 7: int4 tiles hold each 4 rows of a column in one 32-bit word
READABLE_VERSIONS = (2, 3, 4, 5, 6, 7)  # 2-6 read as 7 (5-6 but int4 tiles, a byte order 7
# changed: refused), 2-5 with untiled attention, 2-4 untiled experts; 2 and 3 with
# row_pad 0, 2 with no levels
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
SEAL = "manifest_sha256"   # SHA-256 of the manifest's canonical JSON without this key
ALIGN = 4096       # file-level alignment: expert blocks and resident tensors
PART_ALIGN = 256   # alignment of the parts inside an expert block
ROW_PAD = 64       # bytes of padding after each stored row of expert values (QuantSettings.row_pad)
DTYPES = {"int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
          "bfloat16": BF16, "float32": np.dtype(np.float32)}


log = logging.getLogger(__name__)


class PackedFormatError(ValueError):
    """A model directory is missing, incomplete or does not match its manifest."""


class IntegrityError(PackedFormatError):
    """Stored bytes (a tensor, the manifest, the tokenizer) differ from their checksum."""


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def check_row_pad(row_pad) -> int:
    """A valid QuantSettings.row_pad: a multiple of 64 (rows stay 64-byte aligned) below
    one page; ValueError otherwise."""
    if type(row_pad) is not int or not 0 <= row_pad < 4096 or row_pad % 64:
        raise ValueError(f"row_pad must be a multiple of 64 in [0, 4096), got {row_pad!r}")
    return row_pad


@dataclass(frozen=True)
class QuantSettings:
    """How the experts (and attention) are stored. Recorded in the manifest."""
    bits: int = 8                 # expert bits: 8 (release values) or 4
    group_size: int | None = None  # int4: input rows per scale; None = per output channel
    attention: str = "int8"        # 'int8' as released, or 'bf16'
    int4_levels: tuple[int, ...] | None = None  # int4 groups: nibble -> level (QWeight.levels)
    row_pad: int = ROW_PAD         # zero bytes after each stored row of expert values
    tiles: bool = False            # expert values in tiles (QWeight.tiled); row_pad must be 0
    attention_tiles: bool = False  # int8 attention values in tiles where a matrix allows

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {self.bits}")
        if self.int4_levels is not None:
            if self.bits != 4 or self.group_size is None:
                raise ValueError("int4 levels apply to --bits 4 with groups (not per channel)")
            # a JSON list from the manifest becomes the hashable tuple QWeight keeps
            object.__setattr__(self, "int4_levels", check_levels(self.int4_levels))
        if self.bits == 8 and self.group_size is not None:
            raise ValueError("--group-size applies to --bits 4 only (int8 keeps the release scales)")
        if self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"group size must be an even number >= 2, got {self.group_size}")
        if self.attention not in ("int8", "bf16"):
            raise ValueError(f"attention must be 'int8' or 'bf16', got {self.attention!r}")
        check_row_pad(self.row_pad)
        if type(self.tiles) is not bool:
            raise ValueError(f"tiles must be true or false, got {self.tiles!r}")
        if self.tiles and self.row_pad:
            raise ValueError(f"tiled expert values carry no row padding: row_pad must be 0 "
                             f"with tiles, got {self.row_pad}")
        if type(self.attention_tiles) is not bool:
            raise ValueError(f"attention_tiles must be true or false, got "
                             f"{self.attention_tiles!r}")
        if self.attention_tiles and self.attention != "int8":
            raise ValueError(f"attention_tiles applies to int8 attention, got attention "
                             f"{self.attention!r}")

    def expert_group_size(self, spec: WeightSpec) -> int:
        """Rows per scale for one expert matrix (K = spec.shape[-2])."""
        k = spec.shape[-2]
        if self.bits == 8:
            return k // spec.row_blocks
        group = self.group_size or k
        if k % group:
            raise ValueError(f"group size {group} does not divide {spec.name} input width {k}")
        return group


@dataclass(frozen=True)
class TensorEntry:
    """One stored array: where it lives and what it is."""
    name: str                 # release path (experts: .../decoder_layer_L/<role>[e]),
                              # plus .values/.scales for quantized parts
    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: str
    role: str
    layer: int | None = None
    expert: int | None = None
    part: str = "data"        # 'values', 'scales' or 'data'
    bits: int | None = None
    group_size: int | None = None
    levels: tuple[int, ...] | None = None  # int4 values with a level table (QWeight.levels)
    tiled: bool = False       # values stored in tiles (QWeight.tiled, docs/FORMAT.md section 7)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


def _quantized_parts(spec: WeightSpec, bits: int, group: int, row_pad: int = 0):
    """(part, stored shape, dtype) of a quantized matrix; ``row_pad`` columns of
    padding after each row of values (int8 or uint8: a column is a byte)."""
    k, n = spec.shape[-2:]
    vshape, vdtype = ((k // 2, n + row_pad), "uint8") if bits == 4 else ((k, n + row_pad), "int8")
    return [("values", vshape, vdtype), ("scales", (k // group, n), "bfloat16")]


class _FileBuilder:
    """Appends aligned entries to one file."""

    def __init__(self, file: str, align: int):
        self.file, self.align, self.size, self.entries = file, align, 0, []

    def add(self, **kw) -> TensorEntry:
        entry = TensorEntry(file=self.file, offset=self.size, **kw)
        self.entries.append(entry)
        self.size = _round_up(self.size + entry.nbytes, self.align)
        return entry


def expert_file(layer: int) -> str:
    return f"layer_{layer:02d}.experts.bin"


def resident_file(layer: int) -> str:
    return f"layer_{layer:02d}.resident.bin"


@lru_cache(maxsize=32)
def expert_block_layout(cfg: GrokConfig, settings: QuantSettings) -> tuple[tuple[TensorEntry, ...], int]:
    """The parts of one expert block (offsets relative to the block) and its size."""
    specs = layer_specs(cfg, 0)
    block = _FileBuilder("", PART_ALIGN)
    for role in EXPERT_ROLES:
        spec = specs[role]
        group = settings.expert_group_size(spec)
        if settings.tiles:
            check_tiles(spec.shape[-2:], group, f"expert {role} {spec.shape[-2:]}",
                        settings.bits)
        for part, shape, dtype in _quantized_parts(spec, settings.bits, group, settings.row_pad):
            values = part == "values"
            block.add(name=f"{role}.{part}", shape=shape, dtype=dtype, role=role, part=part,
                      bits=settings.bits, group_size=group,
                      levels=settings.int4_levels if values else None,
                      tiled=settings.tiles and values)
    return tuple(block.entries), _round_up(block.size, ALIGN)


def attention_tiled(spec: WeightSpec, settings: QuantSettings) -> bool:
    """Whether an int8 attention matrix's values are in tiles: with attention_tiles,
    each one whose shape and group allow it (all of Grok-1's; not tiny's 32-column
    k, v). Why: docs/FORMAT.md section 6 (one read stream instead of 32)."""
    if not settings.attention_tiles:
        return False
    try:
        check_tiles(spec.shape[-2:], spec.shape[-2] // spec.row_blocks, spec.name)
    except ValueError:
        return False
    return True


def _layer_entries(cfg: GrokConfig, settings: QuantSettings, layer: int,
                   specs: list[WeightSpec]) -> list[TensorEntry]:
    res = _FileBuilder(resident_file(layer), ALIGN)
    for spec in specs:
        if spec.per_expert:
            continue
        if spec.role in ATTENTION_ROLES and settings.attention == "int8":
            group = spec.shape[-2] // spec.row_blocks
            for part, shape, dtype in _quantized_parts(spec, 8, group):
                res.add(name=f"{spec.name}.{part}", shape=shape, dtype=dtype, role=spec.role,
                        layer=layer, part=part, bits=8, group_size=group,
                        tiled=part == "values" and attention_tiled(spec, settings))
        else:
            dtype = "bfloat16" if spec.role in ATTENTION_ROLES else "float32"
            res.add(name=spec.name, shape=spec.shape, dtype=dtype, role=spec.role, layer=layer)
    parts, block_nbytes = expert_block_layout(cfg, settings)
    experts = []
    for e in range(cfg.num_experts):
        for p in parts:
            name = expert_tensor_name(layer, p.role, e, p.part)
            experts.append(TensorEntry(**{**asdict(p), "name": name, "file": expert_file(layer),
                                          "offset": e * block_nbytes + p.offset,
                                          "layer": layer, "expert": e, "shape": p.shape}))
    return res.entries + experts


@lru_cache(maxsize=32)
def tensor_layout(cfg: GrokConfig, settings: QuantSettings) -> tuple[TensorEntry, ...]:
    """Every tensor of a packed model, in write order (global, then layers in file order).

    Computed once per (config, settings): both are frozen, so they key the cache.
    """
    specs = global_specs(cfg)
    glob = _FileBuilder("global.bin", ALIGN)
    glob.add(name=specs["embed"].name, shape=specs["embed"].shape, dtype="bfloat16", role="embed")
    glob.add(name=specs["final_norm"].name, shape=specs["final_norm"].shape, dtype="float32",
             role="final_norm")
    entries = list(glob.entries)
    for layer, specs_of_layer in layers_in_file_order(cfg):
        entries += _layer_entries(cfg, settings, layer, specs_of_layer)
    return tuple(entries)


def file_sizes(entries: list[TensorEntry]) -> dict[str, int]:
    """Each file's size: the end of its last entry, rounded up to ALIGN."""
    sizes: dict[str, int] = {}
    for e in entries:
        sizes[e.file] = max(sizes.get(e.file, 0), _round_up(e.offset + e.nbytes, ALIGN))
    return sizes


def checksum(buf) -> int:
    """CRC32 of an array's bytes (as stored)."""
    return zlib.crc32(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))


def entry_to_json(entry: TensorEntry, crc: int | None) -> dict:
    d = asdict(entry)
    if entry.levels is None:
        del d["levels"]           # format 2 rows have no levels: uniform int4 or int8
    else:
        d["levels"] = list(entry.levels)
    if not entry.tiled:
        del d["tiled"]            # rows before format 5 have no such field
    d["shape"] = list(entry.shape)
    d["nbytes"] = entry.nbytes
    d["crc32"] = crc
    return d


def write_json_atomic(path: Path, data: dict) -> None:
    """Strict JSON (NaN/Infinity refused: they are not JSON) via a temporary name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=False))
    os.replace(tmp, path)


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of all keys but SEAL."""
    body = {k: v for k, v in manifest.items() if k != SEAL}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """The manifest with its SEAL set (the last step before writing it)."""
    return {**manifest, SEAL: manifest_digest(manifest)}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_manifest(cfg: GrokConfig, settings: QuantSettings, table: list[dict],
                  extra: dict | None = None) -> dict:
    """The sealed manifest dict; ``table`` is entry_to_json(...) for every tensor_layout
    entry; ``extra`` (tokenizer, its SHA-256, error figures) is sealed with it."""
    _, block_nbytes = expert_block_layout(cfg, settings)
    return seal_manifest({"magic": FORMAT_MAGIC, "format_version": FORMAT_VERSION,
                          "config": json.loads(cfg.to_json()), "quant": asdict(settings),
                          "expert_block_nbytes": block_nbytes, "tensors": table,
                          **(extra or {})})


@dataclass(frozen=True)
class ExpertBlock:
    """One expert's contiguous byte range and its three matrices as views."""
    layer: int
    expert: int
    path: Path
    offset: int
    nbytes: int
    raw: np.ndarray          # uint8 (nbytes,) view of the block
    gate: QWeight            # (D, F)
    up: QWeight              # (D, F)
    down: QWeight            # (F, D)


def expert_weights(buf: np.ndarray, parts: list[TensorEntry]) -> dict[str, QWeight]:
    """QWeight views (gate, up, down) into any uint8 buffer holding one expert block."""
    arrays = {}
    for p in parts:
        arrays[(p.role, p.part)] = (buf[p.offset:p.offset + p.nbytes]
                                    .view(DTYPES[p.dtype]).reshape(p.shape))
    groups = {p.role: (p.bits, p.group_size, p.levels, p.tiled) for p in parts
              if p.part == "values"}
    return {role: QWeight(arrays[(role, "values")], arrays[(role, "scales")], *groups[role])
            for role in EXPERT_ROLES}


def _check_manifest(model_dir: Path, manifest: dict) -> tuple[GrokConfig, QuantSettings]:
    path = model_dir / MANIFEST
    if not isinstance(manifest, dict):
        raise PackedFormatError(f"{path}: expected a JSON object, found a JSON "
                                f"{type(manifest).__name__}")
    if manifest.get("magic") != FORMAT_MAGIC:
        raise PackedFormatError(f"{path}: expected magic {FORMAT_MAGIC!r}, "
                                f"found {manifest.get('magic')!r}")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        *first, last = READABLE_VERSIONS
        raise PackedFormatError(f"{path}: expected format_version "
                                f"{', '.join(map(str, first))} or {last}, "
                                f"found {manifest.get('format_version')!r}")
    try:
        digest = manifest_digest(manifest)
    except ValueError as e:         # NaN/Infinity: not JSON, never written by the quantizer
        raise PackedFormatError(f"{path}: expected strict JSON ({e})") from None
    if manifest.get(SEAL) != digest:
        raise IntegrityError(f"{path}: the manifest does not match its checksum {SEAL} "
                             f"(expected {manifest.get(SEAL)!r}, found {digest}): it was "
                             f"changed or damaged; quantize again")
    if not isinstance(manifest.get("tensors"), list) or not all(
            isinstance(r, dict) for r in manifest["tensors"]):
        raise PackedFormatError(f"{path}: expected 'tensors' to be a list of objects, found "
                                f"{type(manifest.get('tensors')).__name__}")
    try:
        cfg = GrokConfig.from_dict(manifest["config"])
        quant = manifest["quant"]
        if manifest["format_version"] < 4:          # rows were stored dense before version 4
            quant = {**quant, "row_pad": 0}
        if manifest["format_version"] < 5:          # and never in tiles before version 5
            quant = {**quant, "tiles": False}
        if manifest["format_version"] < 6:          # attention never before version 6
            quant = {**quant, "attention_tiles": False}
        settings = QuantSettings(**quant)
        expert_block_layout(cfg, settings)  # group sizes must divide this config's widths
    except (KeyError, TypeError, ValueError) as e:
        raise PackedFormatError(f"{path}: bad config or quant settings ({e})") from None
    if manifest["format_version"] < 7 and settings.bits == 4 and settings.tiles:
        raise PackedFormatError(
            f"{path}: format_version {manifest['format_version']} stores int4 tiles in the "
            f"byte order that version 7 changed (docs/FORMAT.md, Versioning); expected "
            f"format_version 7 for int4 tiles: quantize the checkpoint again")
    return cfg, settings


def _check_table(model_dir: Path, table: list[dict], layout: list[TensorEntry]) -> None:
    path = model_dir / MANIFEST
    if len(table) != len(layout):
        raise PackedFormatError(f"{path}: expected {len(layout)} tensors for this config, "
                                f"found {len(table)}")
    for row, entry in zip(table, layout):
        crc = row.get("crc32")
        if not (type(crc) is int and 0 <= crc < 1 << 32):
            raise PackedFormatError(f"{path}: tensor {entry.name}: expected an unsigned 32-bit "
                                    f"crc32, found {crc!r}")
        want = entry_to_json(entry, crc)
        if row != want:
            diff = sorted(k for k in want.keys() | row.keys() if row.get(k) != want.get(k))
            raise PackedFormatError(f"{path}: tensor {entry.name}: fields {diff} differ from "
                                    f"the layout (expected {[want.get(k) for k in diff]}, "
                                    f"found {[row.get(k) for k in diff]})")


def _check_tokenizer(model_dir: Path, manifest: dict) -> Path | None:
    """The tokenizer's path if the manifest records one and its bytes match its SHA-256."""
    name, digest = manifest.get("tokenizer"), manifest.get("tokenizer_sha256")
    if name is None and digest is None:
        return None
    path = model_dir / TOKENIZER
    if name != TOKENIZER or not isinstance(digest, str):
        raise PackedFormatError(f"{model_dir / MANIFEST}: expected 'tokenizer' "
                                f"{TOKENIZER!r} with a 'tokenizer_sha256', found {name!r}, "
                                f"{digest!r}")
    if not path.is_file():
        raise PackedFormatError(f"{path}: the manifest records a tokenizer, found no file")
    found = file_sha256(path)
    if found != digest:
        raise IntegrityError(f"{path}: expected sha256 {digest} (manifest), found {found}: "
                             f"the tokenizer was changed or damaged")
    return path


class PackedModel:
    """A packed model directory, opened read-only with zero-copy views.

    Opening checks the manifest's own checksum and the tokenizer's. With
    ``verify_experts`` every tensor's CRC-32 is checked the first time it is
    viewed in this process (an expert block when ``expert`` first returns it),
    so damaged bytes are refused before they are computed with, at the cost of
    reading each byte once more (docs/PERFORMANCE.md).
    """

    def __init__(self, model_dir: Path, manifest: dict, verify_experts: bool = True):
        self.model_dir = model_dir
        self.manifest = manifest
        self.cfg, self.settings = _check_manifest(model_dir, manifest)
        self.entries = tensor_layout(self.cfg, self.settings)
        _check_table(model_dir, manifest["tensors"], self.entries)
        self.expert_parts, self.expert_block_nbytes = expert_block_layout(self.cfg, self.settings)
        for name, size in file_sizes(self.entries).items():
            found = (model_dir / name).stat().st_size if (model_dir / name).is_file() else None
            if found is None or found < size:
                raise PackedFormatError(f"{model_dir / name}: expected a file of {size} bytes, "
                                        f"found {'no file' if found is None else found}")
        self._tokenizer = _check_tokenizer(model_dir, manifest)
        self._maps: dict[str, np.ndarray] = {}  # file -> memmap or copy
        self._by_name = {e.name: e for e in self.entries}
        self._crcs = {row["name"]: row["crc32"] for row in manifest["tensors"]}
        self.verify_experts = verify_experts
        self._checked: set = set()    # tensor names and (layer, expert) blocks verified
        self._experts: dict[tuple[int, int], ExpertBlock] = {}   # expert()'s views
        self._check_lock = threading.Lock()

    @classmethod
    def open(cls, model_dir: str | os.PathLike, verify_experts: bool = True) -> "PackedModel":
        """Open a model directory (see the class docstring for ``verify_experts``)."""
        model_dir = Path(model_dir)
        path = model_dir / MANIFEST
        if not path.is_file():
            raise PackedFormatError(f"{path}: not a packed model directory (no {MANIFEST})")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PackedFormatError(f"{path}: expected JSON, found unreadable text ({e})") from None
        return cls(model_dir, manifest, verify_experts)

    @property
    def tokenizer_path(self) -> Path | None:
        """The tokenizer the manifest records (checked at open), else None."""
        return self._tokenizer

    def check_tensor(self, entry: TensorEntry, data: np.ndarray) -> None:
        """Raise IntegrityError unless ``data`` (the stored bytes) has the entry's CRC-32."""
        crc = checksum(data)
        if crc != self._crcs[entry.name]:
            raise IntegrityError(f"{self.model_dir / entry.file}: tensor {entry.name} at offset "
                                 f"{entry.offset}: expected crc32 {self._crcs[entry.name]}, "
                                 f"found {crc}: the file is damaged; quantize again")

    def _check_once(self, key, entries: list[TensorEntry], views: list[np.ndarray]) -> None:
        if not self.verify_experts or key in self._checked:
            return
        for entry, data in zip(entries, views):
            self.check_tensor(entry, data)
        with self._check_lock:
            self._checked.add(key)

    def _map(self, file: str) -> np.ndarray:
        """A file's bytes: its mapping, or its copy after ``read_into_memory``."""
        if file not in self._maps:
            self._maps[file] = np.memmap(self.model_dir / file, np.uint8, mode="r")
        return self._maps[file]

    def lock(self) -> int:
        """Lock every file of the model in RAM (mlock(2), as llama.cpp's --mlock); returns
        the bytes locked. Why: the OS may page out mapped file pages that have not been
        read for a while (memory pressure, or proactive reclaim such as DAMON's pageout on
        this project's VMs, which drops pages idle for 60 s), and a token that routes to
        such an expert then waits for the disk. Reads every page now; needs the RAM and a
        memlock limit (ulimit -l) that allows it, else MemoryLockError (and the files
        locked before the refusal are unlocked again)."""
        total = 0
        for name in sorted(file_sizes(self.entries)):
            buf = self._map(name)
            try:
                hostmem.lock(buf, self.model_dir / name)
            except hostmem.MemoryLockError:
                self.unlock()
                raise
            total += buf.nbytes
        log.info("locked %.2f GB of %s in RAM", total / 1e9, self.model_dir)
        return total

    def unlock(self) -> None:
        """Undo ``lock`` (munlock(2)): the pages stay cached, but the OS may evict them."""
        hostmem.unlock(self._maps.values())

    def read_into_memory(self) -> int:
        """Read every file of the model into anonymous huge-page memory in place of its
        mapping (``hostmem.read_into_memory``; llama.cpp's --no-mmap); returns the bytes
        read, 0 when done before. Why: the kernels stream the experts at the read rate
        of 2 MiB pages instead of the page cache's mostly 4 KiB ones. The price: the
        model's size in private RAM (HostMemoryError if it is not available), and the
        read before the first token. Call it before ``lock``, ``expert`` or any view
        is taken: views taken before keep reading the mapping."""
        unread = self._unread()
        hostmem.check_available(sum(unread.values()), self.model_dir)
        total = 0
        for name, size in sorted(unread.items()):
            path = self.model_dir / name
            try:
                self._maps[name] = hostmem.read_into_memory(path, size)
            except EOFError as e:
                raise PackedFormatError(str(e)) from None
            except OSError as e:
                raise PackedFormatError(f"{path}: could not read ({e.strerror or e})") from None
            total += size
        with self._check_lock:         # the copies are verified on first use, as the maps
            self._experts.clear()
            self._checked.clear()
        log.info("read %.2f GB of %s into memory", total / 1e9, self.model_dir)
        return total

    def unread_bytes(self) -> int:
        """The bytes ``read_into_memory`` would read (0 once it has run)."""
        return sum(self._unread().values())

    def _unread(self) -> dict[str, int]:
        return {name: size for name, size in file_sizes(self.entries).items()
                if isinstance(self._maps.get(name), (np.memmap, type(None)))}

    def view(self, entry: TensorEntry) -> np.ndarray:
        """Zero-copy view of one stored tensor (not verified: see ``_weight``)."""
        buf = self._map(entry.file)[entry.offset:entry.offset + entry.nbytes]
        return buf.view(DTYPES[entry.dtype]).reshape(entry.shape)

    def _weight(self, name: str):
        """A resident weight's views, checked on first use when verifying."""
        if name in self._by_name:
            entry = self._by_name[name]
            data = self.view(entry)
            self._check_once(name, [entry], [data])
            return data
        values, scales = self._by_name[name + ".values"], self._by_name[name + ".scales"]
        views = [self.view(values), self.view(scales)]
        self._check_once(name, [values, scales], views)
        return QWeight(*views, values.bits, values.group_size, values.levels, values.tiled)

    def embed(self) -> np.ndarray:
        return self._weight(global_specs(self.cfg)["embed"].name)  # bf16 (V, D)

    def final_norm(self) -> np.ndarray:
        return self._weight(global_specs(self.cfg)["final_norm"].name)  # f32 (D,)

    def layer(self, layer: int) -> dict[str, np.ndarray | QWeight]:
        """Resident weights of one layer by role (q/k/v/o, norms, router)."""
        return {role: self._weight(s.name) for role, s in layer_specs(self.cfg, layer).items()
                if not s.per_expert}

    def expert(self, layer: int, expert: int) -> ExpertBlock:
        """One expert block's views, verified on first use (see the class docstring).

        Built once per block and kept: the host backend asks for 2 blocks a layer
        every decode step, and building the views (a dozen memmap slices and three
        QWeights) took 0.05 ms warm and 0.18 ms mid-step, with the caches cold
        from streaming the weights: 1% of a Grok-1-width decode step (2 layers).
        """
        block = self._experts.get((layer, expert))
        if block is None:
            block = self._experts[(layer, expert)] = self._expert_views(layer, expert)
        return block

    def _expert_views(self, layer: int, expert: int) -> ExpertBlock:
        file = expert_file(layer)
        offset = expert * self.expert_block_nbytes
        raw = self._map(file)[offset:offset + self.expert_block_nbytes]
        if self.verify_experts and (layer, expert) not in self._checked:
            entries = [self._by_name[expert_tensor_name(layer, p.role, expert, p.part)]
                       for p in self.expert_parts]
            self._check_once((layer, expert), entries,
                             [raw[p.offset:p.offset + p.nbytes] for p in self.expert_parts])
        w = expert_weights(raw, self.expert_parts)
        return ExpertBlock(layer, expert, self.model_dir / file, offset, self.expert_block_nbytes,
                           raw, w["gate"], w["up"], w["down"])


def verify_model(model_dir: str | os.PathLike) -> list[str]:
    """Re-check every tensor's checksum; returns problems (empty when all good).

    Opening already checked the manifest's and the tokenizer's checksums (a
    mismatch there raises IntegrityError: nothing in the table can be trusted).
    """
    model = PackedModel.open(model_dir, verify_experts=False)
    problems = []
    for row, entry in zip(model.manifest["tensors"], model.entries):
        crc = checksum(model.view(entry))
        if crc != row["crc32"]:
            problems.append(f"{model.model_dir / entry.file}: tensor {entry.name} at offset "
                            f"{entry.offset}: expected crc32 {row['crc32']}, found {crc}")
    return problems
