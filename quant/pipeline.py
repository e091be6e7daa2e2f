"""The quantizer: a release checkpoint (``ckpt-0/``) -> a packed model directory.

Bounded memory: checkpoint files are processed one at a time in file order (a
background thread reads the next one meanwhile), experts one matrix at a time;
nothing is kept per layer but checksums and error figures, so peak memory is
set by the largest file, not by the number of layers.

Nothing half-written is accepted: output goes to ``OUT.partial/``; each unit
(global tensors, then each layer) ends with an atomic completion record
(quant/pack_writer.py); the manifest is written last and the directory is then
renamed to ``OUT``. ``resume=True`` keeps every unit whose record and bytes
check out and redoes the rest, so an interrupted run plus a resumed one gives
the same bytes as an uninterrupted run (all outputs are deterministic).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np

from quant.config import GrokConfig
from quant.bf16 import to_bf16
from quant.checkpoint import QuantizedWeight8bit, dequantize, read_tensor
from quant.ckpt_config import check_finite, resolve_config
from quant.int4 import ANCHORS, LS_STEPS, REFINE, clip_ratios_for, quantize_int4
from quant.int4_levels import CLIP_RATIOS as LEVEL_CLIP_RATIOS
from quant.int4_levels import LS_STEPS as LEVEL_LS_STEPS
from quant.int4_levels import STUDENT_T_LEVELS, quantize_levels
from quant.pack_writer import (RECORD_SUFFIX, Unit, UnitWriter, load_valid_record, plan_units,
                               write_record)
from quant.outlock import OutputLock, OutputLocked
from quant.packed import (MANIFEST, ROW_PAD, TOKENIZER, PackedFormatError, QuantSettings,
                          attention_tiled, check_row_pad, file_sha256, make_manifest,
                          verify_model, write_json_atomic)
from quant.qweight import pad_rows, tile_values
from quant.spec import (ATTENTION_ROLES, WeightSpec, checkpoint_specs, expert_tensor_name,
                        layer_specs)

log = logging.getLogger(__name__)

IO_THREADS = 4                  # concurrent pwrite + CRC32 jobs (both release the GIL)
RUN_FILE = "quantize.run.json"  # the settings a partial directory was started with
FINGERPRINT_WINDOWS = 16        # 64 KiB windows per checkpoint file in its fingerprint
# The int4 default: one scale per 32 input rows (4.5 bits per weight at Grok-1 size).
# Chosen over per-channel scales by lowmem.eval on heavy-tailed weights
# (docs/FIDELITY.md): 0.6x the KL to int8 for 12% more expert bytes per token.
DEFAULT_GROUP_SIZE = 32
PER_CHANNEL = "channel"         # the option value asking for one scale per output channel
# int4 level tables by option name; the default for groups: non-uniform levels
# (quant/int4_levels.py), 0.72x the uniform grid's KL to int8 on heavy-tailed
# weights at the same bytes (docs/FIDELITY.md). Per channel is uniform only.
INT4_LEVELS = {"student-t": STUDENT_T_LEVELS, "uniform": None}
DEFAULT_INT4_LEVELS = "student-t"
# Value layouts (--layout): tiles, the default (QWeight.tiled: one sequential stream
# per matmul, 1.1-1.3x faster on the host; expert and int8 attention values), or
# rows (format 4's: expert rows padded, attention rows dense).
LAYOUTS = ("tiles", "rows")


def settings_group_size(bits: int, requested: int | str | None) -> int | None:
    """QuantSettings.group_size for a ``--group-size`` option: not given (None)
    is DEFAULT_GROUP_SIZE for int4 (int8 keeps the release's scales), and
    PER_CHANNEL is None (one scale per output channel)."""
    if requested == PER_CHANNEL:
        return None
    if requested is None:
        return DEFAULT_GROUP_SIZE if bits == 4 else None
    return int(requested)


def settings_for(bits: int, group_size: int | str | None = None, int4_levels: str | None = None,
                 attention: str = "int8", row_pad: int | None = None,
                 layout: str = "tiles") -> QuantSettings:
    """QuantSettings from the quantize options, defaults applied: int4 groups of
    DEFAULT_GROUP_SIZE with DEFAULT_INT4_LEVELS, expert and int8 attention values
    in tiles (``layout`` 'rows': expert rows padded by ``row_pad``, default ROW_PAD,
    attention rows); ValueError (one line) on a bad mix."""
    if layout not in LAYOUTS:
        raise ValueError(f"--layout: expected one of {', '.join(LAYOUTS)}, found {layout!r}")
    if layout == "tiles" and row_pad:
        raise ValueError(f"--row-pad {row_pad} applies to --layout rows (tiles have no rows "
                         f"to pad)")
    row_pad = 0 if layout == "tiles" else ROW_PAD if row_pad is None else row_pad
    for option, value in (("--group-size", group_size), ("--int4-levels", int4_levels)):
        if bits == 8 and value is not None:
            raise ValueError(f"{option} applies to --bits 4 only (int8 keeps the release "
                             f"values and scales)")
    group = settings_group_size(bits, group_size)
    if int4_levels is not None and int4_levels not in INT4_LEVELS:
        raise ValueError(f"--int4-levels: expected one of {', '.join(INT4_LEVELS)}, "
                         f"found {int4_levels!r}")
    if group is None and INT4_LEVELS.get(int4_levels) is not None:
        raise ValueError(f"--int4-levels {int4_levels} needs groups (--group-size G): per "
                         f"channel uses the uniform grid")
    try:
        check_row_pad(row_pad)
    except ValueError:
        raise ValueError(f"--row-pad: expected a multiple of 64 in [0, 4096), found {row_pad}") \
            from None
    name = int4_levels or (DEFAULT_INT4_LEVELS if bits == 4 and group is not None else "uniform")
    tiles = layout == "tiles"
    return QuantSettings(bits, group, attention, INT4_LEVELS[name], row_pad, tiles,
                         tiles and attention == "int8")


class QuantizeError(ValueError):
    """An input problem found before (or instead of) doing the work: one line."""


class Progress:
    """Progress callbacks (the CLI subclasses this); the base class ignores them."""

    def start(self, total_bytes: int, done_bytes: int) -> None:
        """``total_bytes`` of checkpoint input, of which ``done_bytes`` were done before."""

    def advance(self, nbytes: int) -> None:
        """One checkpoint file of ``nbytes`` was processed."""

    def unit_done(self, unit: str, nbytes: int, seconds: float) -> None:
        """A unit (global tensors or a layer) is complete and recorded."""


def partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


# --- conversion of one checkpoint tensor --------------------------------------

def _expert_outputs(spec: WeightSpec, value: QuantizedWeight8bit, settings: QuantSettings,
                    errors: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of each expert's values and scales; one expert matrix at a time."""
    group = settings.expert_group_size(spec)
    for e in range(spec.shape[0]):
        base = expert_tensor_name(spec.layer, spec.role, e)
        if settings.bits == 8:                  # pass-through: the release's bytes
            values, scales, err = value.weight[e], value.scales[e], 0.0
        else:
            res = (quantize_int4(value.weight[e], value.scales[e], group)
                   if settings.int4_levels is None else
                   quantize_levels(value.weight[e], value.scales[e], group, settings.int4_levels))
            values, scales, err = res.weight.values, res.weight.scales, res.rel_error
        errors[base] = err
        stored = tile_values(values, settings.bits) if settings.tiles else \
            pad_rows(values, settings.row_pad)             # (K or K/2, N + pad), or tiled
        yield base + ".values", stored
        yield base + ".scales", scales          # (K / group, N) bf16


def convert_tensor(spec: WeightSpec, value, settings: QuantSettings,
                   errors: dict) -> Iterator[tuple[str, np.ndarray]]:
    """The stored arrays of one checkpoint tensor, by layout entry name.

    Records each weight's relative quantization error in ``errors`` (0 for
    pass-through).
    """
    if spec.per_expert:
        yield from _expert_outputs(spec, value, settings, errors)
    elif spec.role in ATTENTION_ROLES and settings.attention == "int8":
        errors[spec.name] = 0.0
        yield spec.name + ".values", (tile_values(value.weight, 8) if attention_tiled(
            spec, settings) else value.weight)     # (K, N) int8, or tiled
        yield spec.name + ".scales", value.scales  # (blocks, N) bf16
    elif spec.role in ATTENTION_ROLES or spec.role == "embed":
        stored, errors[spec.name] = to_bf16(dequantize(value))  # nearest even
        yield spec.name, stored
    else:                                          # norms, router: fp32 as released
        errors[spec.name] = 0.0
        yield spec.name, value


def error_summary(cfg: GrokConfig, errors: dict[str, float]) -> dict[str, dict]:
    """Worst and mean relative error per role."""
    roles = {}
    for spec in checkpoint_specs(cfg):
        if spec.per_expert:
            for e in range(cfg.num_experts):
                roles[expert_tensor_name(spec.layer, spec.role, e)] = spec.role
        else:
            roles[spec.name] = spec.role
    by_role: dict[str, list[float]] = {}
    for name, err in errors.items():
        by_role.setdefault(roles[name], []).append(err)
    return {role: {"worst": max(v), "mean": sum(v) / len(v), "count": len(v)}
            for role, v in sorted(by_role.items())}


# --- reading ahead --------------------------------------------------------------

def _readahead(path: Path, chunk: int = 1 << 23) -> None:
    """Read a whole file once so its pages are in the page cache before it is used.

    Runs on the reader thread while the previous tensor is converted; the
    converter then finds the memory-mapped pages resident (disk and CPU overlap).
    """
    buf = bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


class _Prefetcher:
    """Opens checkpoint files in a background thread, one file ahead of the consumer.

    Tensors are memory-mapped (quant.checkpoint's mmap mode: no copy into fresh
    memory) and the next file's pages are requested ahead of use, so the disk
    stays busy while the current tensor is converted. At most two tensors are
    open: the one being converted and the next one (``release`` is called when
    the consumer has finished with a tensor).
    """

    def __init__(self, ckpt_dir: Path, specs: list[WeightSpec]):
        self.ckpt_dir = ckpt_dir
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._slots = threading.Semaphore(2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ckpt_dir, specs),
                                        name="checkpoint-reader", daemon=True)
        self._thread.start()

    def _run(self, ckpt_dir: Path, specs: list[WeightSpec]) -> None:
        for spec in specs:
            while not self._slots.acquire(timeout=0.1):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            try:
                item = (spec, read_tensor(ckpt_dir, spec, mmap=True), None)
                _readahead(ckpt_dir / spec.filename)
            except BaseException as e:  # handed to the consumer, re-raised there
                item = (spec, None, e)
            self._queue.put(item)
            if item[2] is not None:
                return

    def get(self, expected: WeightSpec):
        spec, value, error = self._queue.get()
        if error is not None:
            raise error
        assert spec.index == expected.index, (spec.index, expected.index)
        return value

    def release(self) -> None:
        self._slots.release()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()


# --- checks before starting ---------------------------------------------------

def _check_tokenizer(path: Path, cfg: GrokConfig) -> None:
    import sentencepiece  # declared dependency; imported only when a tokenizer is given
    if not path.is_file():
        raise QuantizeError(f"{path}: tokenizer file not found")
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantizeError(f"{path}: expected a SentencePiece model, found something else "
                            f"({first})") from None
    if sp.get_piece_size() != cfg.vocab_size:
        log.warning("%s: tokenizer has %d pieces but the config's vocab_size is %d",
                    path, sp.get_piece_size(), cfg.vocab_size)


def _check_disk_space(out_dir: Path, units: list[Unit], extra_bytes: int) -> None:
    need = sum(size for u in units for size in u.files.values()) + extra_bytes
    partial = partial_dir(out_dir)
    if partial.is_dir():  # resuming: what is there already counts
        need -= sum(p.stat().st_blocks * 512 for p in partial.iterdir() if p.is_file())
    base = out_dir.parent
    while not base.exists():
        base = base.parent
    free = shutil.disk_usage(base).free
    if need > free:
        raise QuantizeError(f"{base}: not enough free disk space for {out_dir}: need "
                            f"{need / 1e9:.2f} GB, found {free / 1e9:.2f} GB free")


def check_inputs(ckpt_dir: Path, out_dir: Path, cfg: GrokConfig, settings: QuantSettings,
                 tokenizer: Path | None, resume: bool) -> list[Unit]:
    """Every check that can fail before any work is done; returns the units."""
    try:
        for spec in layer_specs(cfg, 0).values():
            if spec.per_expert:
                settings.expert_group_size(spec)
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    units = plan_units(cfg, settings)
    if tokenizer is not None:
        _check_tokenizer(tokenizer, cfg)
    if out_dir.exists():
        raise QuantizeError(f"{out_dir}: output directory already exists "
                            f"(remove it or choose another --out)")
    partial = partial_dir(out_dir)
    if partial.exists() and not resume:
        raise QuantizeError(f"{partial}: an interrupted run's output is there; rerun with "
                            f"--resume to continue it, or remove it")
    _check_disk_space(out_dir, units, (tokenizer.stat().st_size if tokenizer else 0) + (1 << 20))
    return units


# --- the pipeline ---------------------------------------------------------------

def fingerprint(path: Path, window: int = 1 << 16) -> int:
    """CRC-32 of FINGERPRINT_WINDOWS evenly spaced 64 KiB windows (first and last
    included) of a file: 1 MiB read per file, so a resume checks the whole
    checkpoint's identity in seconds (docs/PERFORMANCE.md). Two release files of
    the same size differ in every window (the weights look random)."""
    size, crc = path.stat().st_size, 0
    starts = sorted({min(max(size - window, 0), i * max(size - window, 0)
                         // (FINGERPRINT_WINDOWS - 1)) for i in range(FINGERPRINT_WINDOWS)})
    with open(path, "rb") as f:
        for start in starts:
            f.seek(start)
            crc = zlib.crc32(f.read(window), crc)
    return crc


def _run_identity(ckpt_dir: Path, cfg: GrokConfig, settings: QuantSettings,
                  tokenizer: Path | None, pool: ThreadPoolExecutor) -> dict:
    """What a partial directory was started with; resuming requires the same: the
    settings, and every checkpoint file's size and content fingerprint."""
    paths = [ckpt_dir / s.filename for s in checkpoint_specs(cfg)]
    return {"config": json.loads(cfg.to_json()), "quant": asdict(settings),
            "checkpoint_bytes": [p.stat().st_size for p in paths],
            "checkpoint_fingerprints": list(pool.map(fingerprint, paths)),
            "tokenizer": tokenizer is not None}


def _identity_mismatch(partial: Path, cfg: GrokConfig, found, identity: dict) -> str:
    if isinstance(found, dict) and {k: v for k, v in found.items() if "checkpoint" not in k} \
            == {k: v for k, v in identity.items() if "checkpoint" not in k}:
        for key in ("checkpoint_bytes", "checkpoint_fingerprints"):
            old, new = found.get(key) or [], identity[key]
            for spec, a, b in zip(checkpoint_specs(cfg), old, new):
                if a != b:
                    return (f"{partial}: checkpoint file {spec.filename} differs from the one "
                            f"the interrupted run read ({key[11:]} {a} then, {b} now); resume "
                            f"with the same checkpoint, or remove {partial}")
    return (f"{partial}: was started with other settings or another checkpoint; resume "
            f"with the same options, or remove it")


def _remove_leftovers(partial: Path, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for path in sorted(partial.glob(pattern)):
            path.unlink()


def _check_run_file(partial: Path, identity: dict) -> bool:
    """False if ``partial`` has no run file; raise QuantizeError if it differs."""
    run = partial / RUN_FILE
    if not run.is_file():
        return False
    try:
        found = json.loads(run.read_text())
    except (OSError, ValueError):
        found = None
    if found != identity:
        raise QuantizeError(_identity_mismatch(partial, _identity_cfg(identity), found,
                                               identity))
    return True


def _prepare(partial: Path, units: list[Unit], identity: dict,
             pool: ThreadPoolExecutor) -> list[dict]:
    """Create or check the partial directory; the records of the units to keep."""
    partial.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(partial, ("*.tmp",))
    if not _check_run_file(partial, identity):  # a fresh start (or killed very early)
        _remove_leftovers(partial, ("*" + RECORD_SUFFIX,))
        write_json_atomic(partial / RUN_FILE, identity)
        return []
    records = []
    for unit in units:
        record = load_valid_record(partial, unit, pool)
        if record is None:
            break
        records.append(record)
    for unit in units[len(records):]:
        (partial / unit.record).unlink(missing_ok=True)
    log.info("resuming %s: %d of %d units complete and verified", partial, len(records),
             len(units))
    return records


def _identity_cfg(identity: dict) -> GrokConfig:
    return GrokConfig.from_dict(identity["config"])


def _convert_and_write(spec: WeightSpec, value, settings: QuantSettings, writer: UnitWriter,
                       errors: dict, ckpt_dir: Path) -> None:
    check_finite(ckpt_dir / spec.filename, spec, value)
    for name, array in convert_tensor(spec, value, settings, errors):
        writer.write(name, array)
    writer.drain()  # the tensor's memory is free once this returns


def _run_unit(unit: Unit, reader: _Prefetcher, partial: Path, settings: QuantSettings,
              pool: ThreadPoolExecutor, progress: Progress, sizes: list[int]) -> dict:
    """Convert and write one unit's files, then record it as complete."""
    writer = UnitWriter(partial, unit, pool)
    errors: dict[str, float] = {}
    try:
        for spec in unit.specs:
            _convert_and_write(spec, reader.get(spec), settings, writer, errors, reader.ckpt_dir)
            reader.release()
            progress.advance(sizes[spec.index])
        rows = writer.finish()
    finally:
        writer.close()
    write_record(partial, unit, rows, errors)
    return {"unit": unit.name, "tensors": rows, "quant_error": errors}


def _run_units(ckpt_dir: Path, partial: Path, units: list[Unit], settings: QuantSettings,
               pool: ThreadPoolExecutor, progress: Progress, sizes: list[int]) -> list[dict]:
    if not units:
        return []
    reader = _Prefetcher(ckpt_dir, [s for u in units for s in u.specs])
    records = []
    try:
        for unit in units:
            start = time.perf_counter()
            records.append(_run_unit(unit, reader, partial, settings, pool, progress, sizes))
            nbytes = sum(sizes[s.index] for s in unit.specs)
            log.debug("%s done in %.2f s", unit.name, time.perf_counter() - start)
            progress.unit_done(unit.name, nbytes, time.perf_counter() - start)
    finally:
        reader.close()
    return records


def _write_manifest(partial: Path, cfg: GrokConfig, settings: QuantSettings,
                    records: list[dict], tokenizer: Path | None) -> dict:
    """Copy the tokenizer, then write the manifest (the last file of a model)."""
    if tokenizer is not None:
        shutil.copyfile(tokenizer, partial / (TOKENIZER + ".tmp"))
        os.replace(partial / (TOKENIZER + ".tmp"), partial / TOKENIZER)
    errors = {name: err for r in records for name, err in r["quant_error"].items()}
    extra = {"quant_error": errors, "quant_error_summary": error_summary(cfg, errors),
             "tokenizer": TOKENIZER if tokenizer is not None else None,
             "tokenizer_sha256": file_sha256(partial / TOKENIZER) if tokenizer else None}
    if settings.int4_levels is not None:
        extra["int4_method"] = {
            "rounding": "each weight to the nearest of the 16 levels times its group's scale",
            "scale": "bf16(signed extreme * r / level) for the extreme levels and clip ratios "
                     "r, then least-squares rescalings; the least squared error per (group, "
                     "column)", "levels": list(settings.int4_levels),
            "clip_ratios": list(LEVEL_CLIP_RATIOS), "ls_steps": LEVEL_LS_STEPS}
    elif settings.bits == 4:
        extra["int4_method"] = {
            "rounding": "symmetric, round half to even, clipped to [-8, 7]",
            "scale": "bf16(amax * r / 7) or bf16(signed extreme * r / -8), then least-squares "
                     "rescalings; the least squared error per (group, column)",
            "clip_ratios": list(clip_ratios_for(settings.group_size)), "refine": list(REFINE),
            "anchors": list(ANCHORS), "ls_steps": LS_STEPS}
    table = [row for r in records for row in r["tensors"]]
    manifest = make_manifest(cfg, settings, table, extra)
    write_json_atomic(partial / MANIFEST, manifest)
    return manifest


def _finished_manifest(partial: Path, cfg: GrokConfig, settings: QuantSettings) -> dict | None:
    """The manifest of a partial directory killed while being published, if it is sound."""
    path = partial / MANIFEST
    if not path.is_file():
        return None
    try:
        problems = verify_model(partial)
        manifest = json.loads(path.read_text())
    except (PackedFormatError, ValueError, OSError):
        problems, manifest = ["unreadable"], {}
    if (problems or manifest.get("config") != json.loads(cfg.to_json())
            or manifest.get("quant") != asdict(settings)):
        path.unlink()
        return None
    return manifest


def _publish(partial: Path, out_dir: Path) -> None:
    """Drop the bookkeeping files and rename: OUT appears only when complete."""
    _remove_leftovers(partial, ("*" + RECORD_SUFFIX, "*.tmp", RUN_FILE))
    os.rename(partial, out_dir)


def _completed(out_dir: Path, cfg: GrokConfig, settings: QuantSettings) -> dict:
    """The manifest of a finished OUT made with these settings (--resume is then a no-op)."""
    from quant.packed import PackedModel
    try:
        model = PackedModel.open(out_dir)
    except PackedFormatError as e:
        raise QuantizeError(str(e)) from None
    if model.cfg != cfg or model.settings != settings:
        raise QuantizeError(f"{out_dir}: already exists with other settings "
                            f"({asdict(model.settings)}); remove it or choose another --out")
    problems = verify_model(out_dir)
    if problems:
        raise QuantizeError(f"{out_dir}: already exists but is damaged: {problems[0]} "
                            f"({len(problems)} bad tensor(s)); remove it and quantize again")
    log.info("%s is already complete; nothing to resume", out_dir)
    return model.manifest


def quantize_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        cfg: GrokConfig | None, settings: QuantSettings,
                        tokenizer: str | os.PathLike | None = None, resume: bool = False,
                        progress: Progress | None = None) -> dict:
    """Quantize a release checkpoint into a packed model directory; returns the manifest.

    ``cfg`` None: inferred from the checkpoint's shapes; given, it must match
    them. Holds OUT's lock (quant/outlock.py) for the whole run. Raises
    QuantizeError or CheckpointError (input problems, before any work where
    they can be found up front).
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    progress = progress or Progress()
    cfg = resolve_config(ckpt_dir, cfg)
    if not (resume and (out_dir / MANIFEST).is_file()):
        check_inputs(ckpt_dir, out_dir, cfg, settings, tokenizer, resume)
    try:
        with OutputLock(out_dir):
            return _locked_run(ckpt_dir, out_dir, cfg, settings, tokenizer, resume, progress)
    except OutputLocked as e:
        raise QuantizeError(str(e)) from None


def _locked_run(ckpt_dir: Path, out_dir: Path, cfg: GrokConfig, settings: QuantSettings,
                tokenizer: Path | None, resume: bool, progress: Progress) -> dict:
    """The run proper, under the output's lock (checks repeated: another run may have
    published OUT between the first checks and taking the lock)."""
    if resume and (out_dir / MANIFEST).is_file():   # killed after the final rename
        return _completed(out_dir, cfg, settings)
    units = check_inputs(ckpt_dir, out_dir, cfg, settings, tokenizer, resume)
    partial = partial_dir(out_dir)
    with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="quantize-io") as pool:
        identity = _run_identity(ckpt_dir, cfg, settings, tokenizer, pool)
        sizes = identity["checkpoint_bytes"]
        manifest = None
        if resume and _check_run_file(partial, identity):
            manifest = _finished_manifest(partial, cfg, settings)
        if manifest is None:
            records = _prepare(partial, units, identity, pool)
            done = sum(sizes[s.index] for u in units[:len(records)] for s in u.specs)
            progress.start(sum(sizes), done)
            records += _run_units(ckpt_dir, partial, units[len(records):], settings, pool,
                                  progress, sizes)
            manifest = _write_manifest(partial, cfg, settings, records, tokenizer)
    _publish(partial, out_dir)
    return manifest
