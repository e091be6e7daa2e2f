"""Reader (and writer) for the release checkpoint format, ``ckpt-0/``.

Each ``tensor{i:05d}_000`` file is one pickle: a numpy array, or a
``__main__.QuantizedWeight8bit`` holding an int8 ``weight`` and bf16
``scales``. Pickles can run arbitrary code, so the unpickler here resolves only
the handful of globals these files need and refuses everything else.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
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


# --- reading: a small pickle machine that only knows the release's objects --------
#
# pickle.Unpickler, even restricted to a few globals, hands file data to numpy:
# dtype.__setstate__ accepts any fields and flags, and a crafted object-field
# dtype made numpy increment "refcounts" at addresses from the file (segfault).
# So the few opcodes the release uses are interpreted here; globals resolve to
# inert tokens, dtypes come from a fixed table, arrays are made only once the
# whole file has checked out, every length is checked against the bytes left
# before anything is read, and opcodes, stack, marks and nesting are bounded.

MAX_OPS = 10_000          # a release pickle has about 100 opcodes
MAX_STACK = 1_000
MAX_MARKS = 64
MAX_DEPTH = 16            # a QuantizedWeight8bit file nests 6 deep
MAX_NDIM = 32
MAX_TEXT = 1 << 12        # module, class, dtype and key names are short
MAX_LINE = 256            # protocol-0 GLOBAL lines
SPAN_MIN = 1 << 16        # payloads at least this big are left in the file until the end


class _Bad(Exception):
    """A reason the file is malformed; load_tensor_file adds the path and offset."""


class _Global:
    """Token standing for one allowed global; calling it is impossible by design."""

    def __init__(self, name: str):
        self.name, self.what = name, f"the global {name}"


_RECONSTRUCT, _FROMBUFFER, _NDARRAY, _DTYPE, _QW8, _BFLOAT16 = (
    _Global(n) for n in ("numpy._core.multiarray._reconstruct", "numpy._core.numeric._frombuffer",
                         "numpy.ndarray", "numpy.dtype", "__main__.QuantizedWeight8bit",
                         "ml_dtypes.bfloat16"))


def _global_table() -> dict[tuple[str, str], _Global]:
    """(module, name) -> token, under every spelling numpy 1.x/2.x and jax pickled them."""
    table = {("__main__", "QuantizedWeight8bit"): _QW8,
             ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _DTYPE}
    for mod in ("numpy.core", "numpy._core"):
        table[(f"{mod}.multiarray", "_reconstruct")] = _RECONSTRUCT
        table[(f"{mod}.numeric", "_frombuffer")] = _FROMBUFFER
    for mod in ("ml_dtypes", "ml_dtypes._ml_dtypes_ext", "ml_dtypes._custom_floats",
                "jax.numpy", "jax._src.dtypes"):
        table[(mod, "bfloat16")] = _BFLOAT16
    return table


_GLOBALS = _global_table()
# The only element types of the release: int8 weights, bf16 scales, fp32 rest.
_DTYPES = {"i1": np.dtype("<i1"), "f4": np.dtype("<f4"), _BFLOAT16: BF16.newbyteorder("<")}
# The BUILD states numpy writes for them: plain, native or little-endian byte order.
_LITTLE = ("<", "=") if sys.byteorder == "little" else ("<",)
_DTYPE_STATES = {key: [(3, order) + dt.__reduce__()[2][2:]
                       for order in (("|",) if dt.itemsize == 1 else _LITTLE)]
                 for key, dt in _DTYPES.items()}


class _Tuple(tuple):
    """A tuple that knows how deeply it nests, so depth is bounded without recursion."""
    depth = 1


class _Dict(dict):
    depth = 1


class _Span:
    """A large payload left in the file: (offset, length); read or mapped at the end."""

    def __init__(self, offset: int, length: int):
        self.offset, self.length = offset, length

    def __len__(self) -> int:
        return self.length


class _DtypeStub:
    """numpy.dtype(...) from the file: already the real, whitelisted dtype."""
    depth, built = 1, False

    def __init__(self, key):
        self.key, self.dtype = key, _DTYPES[key]
        self.what = f"dtype {self.dtype.name}"


class _ArrayStub:
    """ndarray from the file, before any array exists; BUILD sets the fields."""
    depth, what, shape, dtype, fortran, data = 1, "an array", None, None, None, None


class _QW8Stub:
    """QuantizedWeight8bit from the file; BUILD sets its two arrays."""
    depth, what, weight, scales = 1, "a QuantizedWeight8bit", None, None


def _show(x, nested: bool = False) -> str:
    """Describe a value from the file for an error message: shallow and short."""
    if x is None or isinstance(x, (bool, int, str)):
        return repr(x) if len(repr(x)) <= 42 else repr(x)[:40] + "..."
    if isinstance(x, (bytes, bytearray, _Span)):
        return f"{len(x)} bytes"
    if isinstance(x, (_Global, _DtypeStub, _ArrayStub, _QW8Stub)):
        return x.what
    if isinstance(x, _Tuple) and x and not nested:
        items = [_show(item, True) for item in x[:10]]
        return "(" + ", ".join(items + ["..."] * (len(x) > 10)) + ("," * (len(x) == 1)) + ")"
    if isinstance(x, _Dict) and not nested:
        return "a dict with keys " + ", ".join(_show(k, True) for k in list(x)[:10])
    return f"a {type(x).__name__.strip('_').lower()} of {len(x)} items"


def _nest(x, items) -> object:
    x.depth = 1 + max((getattr(item, "depth", 0) for item in items), default=0)
    if x.depth > MAX_DEPTH:
        raise _Bad(f"objects nest more than {MAX_DEPTH} deep (a checkpoint nests 6)")
    return x


class _Machine:
    """Runs the opcodes of one file; ``pos`` is the file offset of the next byte."""

    def __init__(self, f, size: int):
        self.f, self.size, self.pos = f, size, 0
        self.stack, self.marks, self.memo = [], [], {}  # marks: stack lengths at each MARK
        self.op_pos, self.op_name = 0, "start"

    def run(self):
        for _ in range(MAX_OPS):
            self.op_pos, self.op_name = self.pos, "opcode"
            code = self.read(1)[0]
            if code not in _OPS:
                raise _Bad(f"opcode {bytes([code])!r} is not one checkpoint pickles use")
            self.op_name, handler = _OPS[code]
            result = handler(self)
            if self.op_name == "STOP":
                return result
        raise _Bad(f"more than {MAX_OPS} opcodes (a checkpoint pickle has about 100)")

    def read(self, n: int) -> bytes:
        left = self.size - self.pos
        if n > left:
            raise _Bad(f"needs {n} more byte{'s' * (n != 1)}, but only {left} are left in the file")
        data = self.f.read(n)
        if len(data) != n:
            raise _Bad(f"read {len(data)} of {n} bytes: the file changed while being read")
        self.pos += n
        return data

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.read(nbytes), "little")

    def claim(self, n: int, what: str) -> int:
        """``n``, a length read from the file, once it is known to fit in what is left."""
        if n > (left := self.size - self.pos):
            raise _Bad(f"claims a {n}-byte {what}, but only {left} bytes are left in the file")
        return n

    def payload(self, n: int):
        """Bytes for a small payload; a _Span, skipped for now, for a large one."""
        if self.claim(n, "payload") < SPAN_MIN:
            return self.read(n)
        span = _Span(self.pos, n)
        self.pos += n
        self.f.seek(self.pos)
        return span

    def text(self, n: int) -> str:
        if n > MAX_TEXT:
            raise _Bad(f"claims a {n}-byte string; names in checkpoint pickles are under "
                       f"{MAX_TEXT} bytes")
        try:
            return self.read(n).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise _Bad(f"string is not UTF-8 ({e.reason} at byte {e.start})") from None

    def line(self) -> str:
        data = self.f.readline(MAX_LINE)  # never past the end, so pos stays <= size
        self.pos += len(data)
        if not data.endswith(b"\n"):
            raise _Bad(f"expected a name line of at most {MAX_LINE} bytes, found "
                       f"{len(data)} bytes without a newline")
        try:
            return data[:-1].decode("ascii")
        except UnicodeDecodeError:
            raise _Bad("expected an ASCII name line, found other bytes") from None

    def push(self, x) -> None:
        if len(self.stack) >= MAX_STACK:
            raise _Bad(f"more than {MAX_STACK} objects on the stack (a checkpoint needs 20)")
        self.stack.append(x)

    def pop(self, n: int) -> list:
        floor = self.marks[-1] if self.marks else 0
        if len(self.stack) - floor < n:
            raise _Bad(f"needs {n} objects on the stack above the last mark, found "
                       f"{len(self.stack) - floor}")
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return items

    def pop_mark(self) -> list:
        if not self.marks:
            raise _Bad("expected a MARK before this opcode, found none")
        items = self.stack[self.marks[-1]:]
        del self.stack[self.marks.pop():]
        return items

    def top(self):
        """The object an opcode works on in place (MEMOIZE, BUILD, SETITEMS): kept on the stack."""
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Bad("needs an object on the stack above the last mark, found none")
        return self.stack[-1]

    def put(self, index: int) -> None:
        self.memo[index] = self.top()

    def get(self, index: int) -> None:
        if index not in self.memo:
            raise _Bad(f"refers to memo slot {index}, which was never stored")
        self.push(self.memo[index])


# --- opcodes (names as in pickletools) ---

def _proto(m):
    if (proto := m.uint(1)) > 5:
        raise _Bad(f"expected pickle protocol 0 to 5, found {proto}")


def _tuple(items: list) -> _Tuple:
    return _nest(_Tuple(items), items)


def _long1(m):
    if (n := m.uint(1)) > 8:
        raise _Bad(f"expected an integer of at most 8 bytes, found {n} bytes")
    m.push(int.from_bytes(m.read(n), "little", signed=True))


def _mark(m):
    if len(m.marks) >= MAX_MARKS:
        raise _Bad(f"more than {MAX_MARKS} nested MARKs (a checkpoint needs 3)")
    m.marks.append(len(m.stack))


def _set_items(m, items: list) -> None:
    target = m.top()
    if not isinstance(target, _Dict):
        raise _Bad(f"expected a dict to set items in, found {_show(target)}")
    if len(items) % 2:
        raise _Bad(f"expected key/value pairs, found {len(items)} objects")
    for key, value in zip(items[::2], items[1::2]):
        if not isinstance(key, str):
            raise _Bad(f"expected a string dict key, found {_show(key)}")
        target[key] = value
        target.depth = max(target.depth, 1 + getattr(value, "depth", 0))
    if target.depth > MAX_DEPTH:
        raise _Bad(f"objects nest more than {MAX_DEPTH} deep (a checkpoint nests 6)")


def _resolve(module, name) -> _Global:
    if not (isinstance(module, str) and isinstance(name, str)):
        raise _Bad(f"expected a module and a name, found {_show(module)} and {_show(name)}")
    if (module, name) not in _GLOBALS:
        shown = ".".join(t[:80].encode("unicode_escape").decode() for t in (module, name))
        raise _Bad(f"refusing to load global {shown} (checkpoints use only "
                   "numpy's array and dtype rebuilders, bfloat16 and QuantizedWeight8bit)")
    return _GLOBALS[(module, name)]


def _reduce(m):
    func, args = m.pop(2)
    makers = {_RECONSTRUCT: _reconstruct, _DTYPE: _make_dtype, _FROMBUFFER: _frombuffer}
    if not isinstance(func, _Global) or func not in makers:
        raise _Bad(f"expected to call numpy's _reconstruct, dtype or _frombuffer, "
                   f"found {_show(func)}")
    if not isinstance(args, _Tuple):
        raise _Bad(f"expected a tuple of arguments for {func.name}, found {_show(args)}")
    m.push(makers[func](args))


def _newobj(m):
    cls, args = m.pop(2)
    if cls is not _QW8 or args != ():
        raise _Bad(f"expected QuantizedWeight8bit with no arguments, found {_show(cls)} "
                   f"with {_show(args)}")
    m.push(_QW8Stub())


def _build(m):
    (state,) = m.pop(1)
    target = m.top()
    builders = {_DtypeStub: _build_dtype, _ArrayStub: _build_array, _QW8Stub: _build_qw8}
    if type(target) not in builders:
        raise _Bad(f"expected to set the state of a dtype, an array or a "
                   f"QuantizedWeight8bit, found {_show(target)}")
    builders[type(target)](target, state)
    _nest(target, (state,))


def _stop(m):
    if m.marks or len(m.stack) != 1:
        raise _Bad(f"expected one object at STOP, found {len(m.stack)} and "
                   f"{len(m.marks)} open MARKs")
    if m.pos != m.size:
        raise _Bad(f"expected the file to end at byte {m.pos}, found {m.size - m.pos} "
                   "more bytes")
    obj = m.stack[0]
    parts = [obj.weight, obj.scales] if isinstance(obj, _QW8Stub) else [obj]
    if not all(isinstance(p, _ArrayStub) and p.data is not None for p in parts):
        raise _Bad(f"expected an array or a QuantizedWeight8bit of two arrays, found "
                   f"{_show(obj)}")
    return obj


_OPS = {code[0]: (name, handler) for code, name, handler in (
    (b"\x80", "PROTO", _proto),
    (b"\x95", "FRAME", lambda m: m.claim(m.uint(8), "frame")),  # a read-ahead hint only
    (b"\x8c", "SHORT_BINUNICODE", lambda m: m.push(m.text(m.uint(1)))),
    (b"X", "BINUNICODE", lambda m: m.push(m.text(m.uint(4)))),
    (b"\x8d", "BINUNICODE8", lambda m: m.push(m.text(m.uint(8)))),
    (b"C", "SHORT_BINBYTES", lambda m: m.push(m.payload(m.uint(1)))),
    (b"B", "BINBYTES", lambda m: m.push(m.payload(m.uint(4)))),
    (b"\x8e", "BINBYTES8", lambda m: m.push(m.payload(m.uint(8)))),
    (b"\x96", "BYTEARRAY8", lambda m: m.push(m.payload(m.uint(8)))),
    (b"K", "BININT1", lambda m: m.push(m.uint(1))),
    (b"M", "BININT2", lambda m: m.push(m.uint(2))),
    (b"J", "BININT", lambda m: m.push(int.from_bytes(m.read(4), "little", signed=True))),
    (b"\x8a", "LONG1", _long1),
    (b"N", "NONE", lambda m: m.push(None)),
    (b"\x88", "NEWTRUE", lambda m: m.push(True)),
    (b"\x89", "NEWFALSE", lambda m: m.push(False)),
    (b"(", "MARK", _mark),
    (b")", "EMPTY_TUPLE", lambda m: m.push(_tuple([]))),
    (b"\x85", "TUPLE1", lambda m: m.push(_tuple(m.pop(1)))),
    (b"\x86", "TUPLE2", lambda m: m.push(_tuple(m.pop(2)))),
    (b"\x87", "TUPLE3", lambda m: m.push(_tuple(m.pop(3)))),
    (b"t", "TUPLE", lambda m: m.push(_tuple(m.pop_mark()))),
    (b"}", "EMPTY_DICT", lambda m: m.push(_Dict())),
    (b"s", "SETITEM", lambda m: _set_items(m, m.pop(2))),
    (b"u", "SETITEMS", lambda m: _set_items(m, m.pop_mark())),
    (b"\x94", "MEMOIZE", lambda m: m.put(len(m.memo))),
    (b"q", "BINPUT", lambda m: m.put(m.uint(1))),
    (b"r", "LONG_BINPUT", lambda m: m.put(m.uint(4))),
    (b"h", "BINGET", lambda m: m.get(m.uint(1))),
    (b"j", "LONG_BINGET", lambda m: m.get(m.uint(4))),
    (b"c", "GLOBAL", lambda m: m.push(_resolve(m.line(), m.line()))),
    (b"\x93", "STACK_GLOBAL", lambda m: m.push(_resolve(*m.pop(2)))),
    (b"R", "REDUCE", _reduce),
    (b"\x81", "NEWOBJ", _newobj),
    (b"b", "BUILD", _build),
    (b".", "STOP", _stop))}


# --- the objects REDUCE, NEWOBJ and BUILD may make ---

def _make_dtype(args: _Tuple) -> _DtypeStub:
    """numpy.dtype(code, align=False, copy=True): refused unless ``code`` is in _DTYPES."""
    if len(args) != 3 or args[1] is not False or args[2] is not True:
        raise _Bad(f"expected dtype arguments (code, False, True), found {_show(args)}")
    code = args[0]
    if not isinstance(code, (str, _Global)) or code not in _DTYPES:
        raise _Bad(f"refusing dtype {_show(code)}: expected 'i1' (int8), 'f4' (float32) "
                   "or ml_dtypes.bfloat16")
    return _DtypeStub(code)


def _build_dtype(stub: _DtypeStub, state) -> None:
    """dtype.__setstate__, never called: the state must be exactly what numpy writes."""
    # Compared with ==, never hashed: a state holding a dict must be refused, not crash.
    ok = isinstance(state, _Tuple) and any(state == s for s in _DTYPE_STATES[stub.key])
    if stub.built or not ok:
        orders = " or ".join(repr(state[1]) for state in _DTYPE_STATES[stub.key])
        expected = f"{stub.dtype.__reduce__()[2]} (byte order {orders})"
        found = "a second state" if stub.built else _show(state)
        raise _Bad(f"refusing dtype state for {stub.dtype.name}: expected {expected}, "
                   f"found {found}")
    stub.built = True


def _reconstruct(args: _Tuple) -> _ArrayStub:
    if args != (_NDARRAY, (0,), b"b"):  # the class and a dummy shape and typecode
        raise _Bad(f"expected _reconstruct(numpy.ndarray, (0,), b'b'), found {_show(args)}")
    return _ArrayStub()


def _frombuffer(args: _Tuple) -> _ArrayStub:
    """numpy's protocol-5 spelling: _frombuffer(payload, dtype, shape, order)."""
    if len(args) != 4 or args[3] not in ("C", "F"):
        raise _Bad(f"expected _frombuffer(payload, dtype, shape, 'C' or 'F'), "
                   f"found {_show(args)}")
    stub = _ArrayStub()
    _set_array(stub, args[2], args[1], args[3] == "F", args[0])
    return stub


def _build_array(stub: _ArrayStub, state) -> None:
    """ndarray.__setstate__((1, shape, dtype, is_fortran, payload)), checked, not called."""
    if stub.data is not None:
        raise _Bad("expected one state per array, found a second")
    if not (isinstance(state, _Tuple) and len(state) == 5 and state[0] == 1):
        raise _Bad(f"expected array state (1, shape, dtype, is_fortran, payload), "
                   f"found {_show(state)}")
    _set_array(stub, *state[1:])


def _set_array(stub: _ArrayStub, shape, dtype, fortran, data) -> None:
    if not (isinstance(shape, _Tuple) and len(shape) <= MAX_NDIM
            and all(type(d) is int and d >= 0 for d in shape)):
        raise _Bad(f"expected a shape of at most {MAX_NDIM} non-negative ints, "
                   f"found {_show(shape)}")
    if not isinstance(dtype, _DtypeStub):
        raise _Bad(f"expected a dtype, found {_show(dtype)}")
    if not isinstance(fortran, bool):
        raise _Bad(f"expected a bool for the memory order, found {_show(fortran)}")
    if not isinstance(data, (bytes, bytearray, _Span)):
        raise _Bad(f"expected the array's bytes, found {_show(data)}")
    need = math.prod(shape) * dtype.dtype.itemsize
    if len(data) != need:
        raise _Bad(f"array {dtype.dtype.name}{list(shape)} needs {need} bytes of data, "
                   f"found {len(data)}")
    stub.shape, stub.dtype, stub.fortran, stub.data = tuple(shape), dtype.dtype, fortran, data


def _build_qw8(stub: _QW8Stub, state) -> None:
    if stub.weight is not None:
        raise _Bad("expected one state per QuantizedWeight8bit, found a second")
    if not (isinstance(state, _Dict) and set(state) == {"weight", "scales"}
            and all(isinstance(v, _ArrayStub) for v in state.values())):
        raise _Bad(f"expected QuantizedWeight8bit state {{'weight': array, 'scales': array}}, "
                   f"found {_show(state)}")
    stub.weight, stub.scales = state["weight"], state["scales"]


# --- making the arrays, once the whole file has checked out ---

def _array(f, path: Path, stub: _ArrayStub, mmap: bool) -> np.ndarray:
    """Small payloads are copied; large ones mapped (``mmap``) or read straight into place."""
    order = "F" if stub.fortran else "C"
    if not isinstance(stub.data, _Span):
        flat = np.frombuffer(stub.data, stub.dtype)
        return flat.reshape(stub.shape, order=order).copy(order="K")
    if mmap:
        return np.memmap(path, stub.dtype, "r", stub.data.offset, stub.shape, order)
    flat = np.empty(len(stub.data) // stub.dtype.itemsize, stub.dtype)
    f.seek(stub.data.offset)
    if f.readinto(flat.view(np.uint8)) != stub.data.length:
        raise _Bad("the file changed while being read")
    return flat.reshape(stub.shape, order=order)


def load_tensor_file(path: str | os.PathLike, mmap: bool = False):
    """Read one checkpoint file: an ndarray or a QuantizedWeight8bit, nothing else.

    ``mmap=True`` returns read-only np.memmap views of the file for the large
    arrays (no copy; the quantizer reads 318 GB this way). Any malformed file
    raises CheckpointError naming the file, the byte offset and opcode, and what
    was expected there.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    m = None
    try:
        with open(path, "rb", buffering=SPAN_MIN) as f:
            m = _Machine(f, os.fstat(f.fileno()).st_size)
            obj = m.run()
            if isinstance(obj, _QW8Stub):
                return QuantizedWeight8bit(_array(f, path, obj.weight, mmap),
                                           _array(f, path, obj.scales, mmap))
            return _array(f, path, obj, mmap)
    except _Bad as e:
        where = f"byte {m.op_pos} ({m.op_name}): " if m else ""
        raise CheckpointError(f"{path}: not a readable checkpoint pickle: {where}{e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file: {e.strerror or e}") from None


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
