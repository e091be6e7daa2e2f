"""Reader (and writer) for the release checkpoint format, ``ckpt-0/``.

Each ``tensor{i:05d}_000`` file is one pickle: a numpy array, or a
``__main__.QuantizedWeight8bit`` holding an int8 ``weight`` and bf16
``scales``. Pickles can run arbitrary code, so the unpickler here resolves only
the handful of globals these files need and refuses everything else.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import struct
import sys
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from quant.config import GrokConfig
from quant.spec import WeightSpec, checkpoint_specs

log = logging.getLogger(__name__)

BF16 = np.dtype(ml_dtypes.bfloat16)


class CheckpointError(ValueError):
    """A checkpoint file is missing or is not what the config says it must be."""


class QuantizedWeight8bit:
    """Local stand-in for the release's ``__main__.QuantizedWeight8bit``."""

    def __init__(self, weight: np.ndarray, scales: np.ndarray):
        self.weight = weight
        self.scales = scales

    def __repr__(self) -> str:
        return (f"QuantizedWeight8bit(weight={self.weight.dtype}{list(self.weight.shape)}, "
                f"scales={self.scales.dtype}{list(self.scales.shape)})")


def _allowed_globals() -> dict[tuple[str, str], object]:
    from numpy._core import multiarray, numeric
    allowed = {("__main__", "QuantizedWeight8bit"): QuantizedWeight8bit,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x spell these differently
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    for mod in ("ml_dtypes", "ml_dtypes._ml_dtypes_ext", "ml_dtypes._custom_floats",
                "jax.numpy", "jax._src.dtypes"):
        allowed[(mod, "bfloat16")] = ml_dtypes.bfloat16
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


class _Span:
    """Placeholder for a large bytes payload left in the file: (offset, length)."""

    def __init__(self, offset: int, length: int):
        self.offset, self.length = offset, length

    def __len__(self) -> int:
        return self.length


class _LazyArray:
    """What ``_reconstruct`` builds when mapping: becomes an np.memmap after loading."""

    def __setstate__(self, state):
        _, self.shape, self.dtype, self.fortran, self.data = state


def _lazy_reconstruct(cls, shape, typecode):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
    return _LazyArray()


class _MappingUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, restricted, that leaves large payloads in the file.

    A BINBYTES/BINBYTES8 payload outside a protocol-4 frame (pickle writes every
    large one there) is skipped and recorded as a _Span, so the arrays can be
    memory-mapped from the file instead of copied twice into fresh memory.
    """
    _allowed = {**_RestrictedUnpickler._allowed,
                **{(m, "_reconstruct"): _lazy_reconstruct
                   for m in ("numpy.core.multiarray", "numpy._core.multiarray")}}
    dispatch = dict(pickle._Unpickler.dispatch)
    find_class = _RestrictedUnpickler.find_class

    def __init__(self, file):
        super().__init__(file)
        self._raw = file

    def _bytes(self, n: int) -> None:
        if n >= 1 << 16 and self._unframer.current_frame is None:
            self.append(_Span(self._raw.tell(), n))
            self._raw.seek(n, os.SEEK_CUR)
        else:
            self.append(self.read(n))

    def load_binbytes(self):
        self._bytes(int.from_bytes(self.read(4), "little"))
    dispatch[pickle.BINBYTES[0]] = load_binbytes

    def load_binbytes8(self):
        self._bytes(int.from_bytes(self.read(8), "little"))
    dispatch[pickle.BINBYTES8[0]] = load_binbytes8


def _materialize(path: Path, obj, size: int):
    """Turn _LazyArray placeholders into arrays: mapped for spans, copied for small bytes."""
    if isinstance(obj, QuantizedWeight8bit):
        return QuantizedWeight8bit(_materialize(path, obj.weight, size),
                                   _materialize(path, obj.scales, size))
    if not isinstance(obj, _LazyArray):
        return obj
    order = "F" if obj.fortran else "C"
    count = int(np.prod(obj.shape, dtype=np.int64))
    if isinstance(obj.data, _Span):
        if obj.data.length != count * obj.dtype.itemsize or obj.data.offset + obj.data.length > size:
            raise pickle.UnpicklingError("array payload does not match its shape")
        return np.memmap(path, obj.dtype, "r", obj.data.offset, obj.shape, order)
    return np.frombuffer(obj.data, obj.dtype, count).reshape(obj.shape, order=order).copy()


def load_tensor_file(path: str | os.PathLike, mmap: bool = False):
    """Unpickle one checkpoint file with a restricted unpickler.

    ``mmap=True`` returns read-only np.memmap views of the file for the large
    arrays (no copy; the quantizer reads 318 GB this way).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            if not mmap:
                return _RestrictedUnpickler(io.BufferedReader(f, 1 << 24)).load()
            obj = _MappingUnpickler(f).load()
            return _materialize(path, obj, os.fstat(f.fileno()).st_size)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            struct.error) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint pickle ({e})") from None


def _describe(obj) -> str:
    if isinstance(obj, QuantizedWeight8bit):
        return repr(obj)
    if isinstance(obj, np.ndarray):
        return f"array {obj.dtype}{list(obj.shape)}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def check_tensor(path: Path, spec: WeightSpec, obj) -> None:
    """Raise CheckpointError unless ``obj`` has the kind, dtype and shape of ``spec``."""
    if spec.quantized:
        expected = (f"QuantizedWeight8bit(weight=int8{list(spec.shape)}, "
                    f"scales=bfloat16{list(spec.scale_shape)})")
        ok = (isinstance(obj, QuantizedWeight8bit)
              and isinstance(obj.weight, np.ndarray) and isinstance(obj.scales, np.ndarray)
              and obj.weight.dtype == np.int8 and obj.weight.shape == spec.shape
              and obj.scales.dtype == BF16 and obj.scales.shape == spec.scale_shape)
    else:
        expected = f"array float32{list(spec.shape)}"
        ok = (isinstance(obj, np.ndarray) and obj.dtype == np.float32
              and obj.shape == spec.shape)
    if not ok:
        raise CheckpointError(f"{path}: {spec.name}: expected {expected}, found {_describe(obj)}")


def read_tensor(ckpt_dir: str | os.PathLike, spec: WeightSpec, mmap: bool = False):
    """Load and validate the file that holds ``spec`` (``mmap``: see load_tensor_file)."""
    path = Path(ckpt_dir) / spec.filename
    try:
        obj = load_tensor_file(path, mmap)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; expected {spec.name}") from None
    check_tensor(path, spec, obj)
    return obj


def check_checkpoint_dir(ckpt_dir: str | os.PathLike, cfg: GrokConfig) -> None:
    """Cheap up-front check that every file exists, so a long run fails early."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    for spec in checkpoint_specs(cfg):
        if not (ckpt_dir / spec.filename).is_file():
            raise CheckpointError(f"{ckpt_dir / spec.filename}: file not found "
                                  f"(expected {spec.name})")


def iter_checkpoint(ckpt_dir: str | os.PathLike, cfg: GrokConfig,
                    start: int = 0) -> Iterator[tuple[WeightSpec, object]]:
    """Yield (spec, value) one tensor at a time, in file order, from file ``start``."""
    for spec in checkpoint_specs(cfg)[start:]:
        yield spec, read_tensor(ckpt_dir, spec)


def dequantize(value) -> np.ndarray:
    """fp32 weights from a checkpoint value (SPEC.md section 5, row-block scales)."""
    if not isinstance(value, QuantizedWeight8bit):
        return np.asarray(value, np.float32)
    w, s = value.weight, value.scales.astype(np.float32)
    *lead, k, n = w.shape
    blocks = s.shape[-2]
    out = w.astype(np.float32).reshape(*lead, blocks, k // blocks, n)
    out *= s[..., :, None, :]
    return out.reshape(w.shape)


# --- writing (synthetic checkpoints in the release format) -----------------

@contextlib.contextmanager
def _release_class_name():
    """Pickle QuantizedWeight8bit under the release's name, ``__main__.QuantizedWeight8bit``.

    pickle checks that ``__main__.QuantizedWeight8bit`` resolves to the class it
    saves; the release's own code installed it there the same way.
    """
    main = sys.modules["__main__"]
    had = hasattr(main, "QuantizedWeight8bit")
    old = getattr(main, "QuantizedWeight8bit", None)
    saved = (QuantizedWeight8bit.__module__, QuantizedWeight8bit.__qualname__)
    QuantizedWeight8bit.__module__ = "__main__"
    main.QuantizedWeight8bit = QuantizedWeight8bit
    try:
        yield
    finally:
        QuantizedWeight8bit.__module__, QuantizedWeight8bit.__qualname__ = saved
        if had:
            main.QuantizedWeight8bit = old
        else:
            del main.QuantizedWeight8bit


def write_tensor_file(path: str | os.PathLike, value) -> None:
    """Pickle one tensor as the release did, via a temporary name and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with _release_class_name(), open(tmp, "wb") as f:
        pickle.dump(value, f, protocol=4)
    os.replace(tmp, path)
