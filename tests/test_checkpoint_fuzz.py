"""Hostile input for the checkpoint reader: crafted pickles and a seeded fuzz.

The reader's promise: whatever bytes a tensor file holds, load_tensor_file
returns an ndarray or a QuantizedWeight8bit of release dtypes, or raises one
CheckpointError naming the file -- never another exception, never a crash.
The fuzz loop runs in a child process (this file, run as a script), so a
segfault fails the test instead of killing pytest. All bad inputs are built
here at test time from a small pickle assembler.
"""
from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from quant.checkpoint import (BF16, CheckpointError, QuantizedWeight8bit,  # noqa: E402
                              load_tensor_file, write_tensor_file)

FUZZ_SEED = 20240601
FUZZ_CASES = 6000
MAX_MESSAGE = 600


# --- a tiny pickle assembler -------------------------------------------------------

def s(text: str) -> bytes:
    """SHORT_BINUNICODE."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def g(module: str, name: str) -> bytes:
    """STACK_GLOBAL."""
    return s(module) + s(name) + b"\x93"


def k(i: int) -> bytes:
    """BININT1."""
    return b"K" + bytes([i])


def dtype(code: bytes) -> bytes:
    """numpy.dtype(code, False, True); ``code`` is pickle ops pushing a str or class."""
    return g("numpy", "dtype") + code + b"\x89\x88\x87R"


def array(shape: bytes, dtype_ops: bytes, data: bytes, state_tail: bytes = b"") -> bytes:
    """_reconstruct(ndarray, (0,), b'b') then BUILD (1, shape, dtype, False, data)."""
    return (g("numpy._core.multiarray", "_reconstruct") + g("numpy", "ndarray") + k(0)
            + b"\x85C\x01b\x87R(" + k(1) + shape + dtype_ops + b"\x89" + data
            + state_tail + b"tb")


def dtype_state(order: str, names: bytes = b"N", fields: bytes = b"N",
                elsize: int = 255, align: int = 255, flags: int = 0) -> bytes:
    """(3, order, None, names, fields, elsize, align, flags) then BUILD; 255 means -1."""
    num = (lambda v: b"J\xff\xff\xff\xff" if v == 255 else k(v))
    return (b"(" + k(3) + s(order) + b"N" + names + fields + num(elsize) + num(align)
            + num(flags) + b"tb")


def short_bytes(data: bytes) -> bytes:
    return b"C" + bytes([len(data)]) + data


P4 = b"\x80\x04"
F4 = dtype(s("f4")) + dtype_state("<")
SHAPE_2 = k(2) + b"\x85"


def object_field_dtype(base: str = "V8", field: str = "O8") -> bytes:
    """The crash: a dtype whose field is an object, with the flags that mark it cleared.

    numpy then treats 8 bytes from the file as a PyObject pointer and increments
    its refcount when the array is copied.
    """
    fields = b"}" + s("a") + dtype(s(field)) + k(0) + b"\x86s"
    return dtype(s(base)) + dtype_state("|", s("a") + b"\x85", fields, 8, 1, 0)


def crafted() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a phrase the error must contain)."""
    pointer = short_bytes(struct.pack("<Q", 0x4141414141414141))
    good = P4 + array(SHAPE_2, F4, short_bytes(bytes(8))) + b"."
    return {
        "dtype_build_object_field": (P4 + array(k(1) + b"\x85", object_field_dtype(), pointer)
                                     + b".", "refusing dtype 'V8'"),
        "allowed_dtype_given_object_field": (
            P4 + array(k(1) + b"\x85", object_field_dtype("f4"), pointer) + b".",
            "refusing dtype 'O8'"),
        "dtype_state_with_fields": (
            P4 + array(k(1) + b"\x85", object_field_dtype("f4", "i1"), pointer) + b".",
            "refusing dtype state for float32: expected (3, '<', None, None, None, -1, -1, 0) "
            "(byte order '<' or '='), found (3, '|', None, a tuple of 1 items, a dict of 1 "
            "items, 8, 1, 0)"),
        "dtype_object": (P4 + array(k(1) + b"\x85", dtype(s("O8")), pointer) + b".",
                         "refusing dtype 'O8'"),
        "dtype_float64": (P4 + array(SHAPE_2, dtype(s("f8")) + dtype_state("<"),
                                     short_bytes(bytes(16))) + b".", "refusing dtype 'f8'"),
        "dtype_big_endian": (P4 + array(SHAPE_2, dtype(s("f4")) + dtype_state(">"),
                                        short_bytes(bytes(8))) + b".", "found (3, '>'"),
        "dtype_flags_set": (P4 + array(SHAPE_2, dtype(s("f4")) + dtype_state("<", flags=63),
                                       short_bytes(bytes(8))) + b".",
                            "refusing dtype state for float32"),
        "dtype_built_twice": (P4 + array(SHAPE_2, F4 + b"(" + k(3) + s("<") + b"NNN" + k(4)
                                         + k(4) + k(0) + b"tb", short_bytes(bytes(8))) + b".",
                              "found a second state"),
        "dtype_state_with_dict": (P4 + array(SHAPE_2, dtype(s("f4")) + dtype_state(
            "<", b"}", b"}"), short_bytes(bytes(8))) + b".", "a dict of 0 items"),
        "dtype_align_true": (P4 + g("numpy", "dtype") + s("f4") + b"\x88\x88\x87R.",
                             "expected dtype arguments (code, False, True)"),
        "huge_unicode": (P4 + b"\x8d" + struct.pack("<Q", 1 << 62) + b"abcdefghi",
                         f"claims a {1 << 62}-byte string"),
        "huge_bytes": (P4 + b"\x8e" + struct.pack("<Q", 1 << 62) + b"abcdefghi",
                       f"claims a {1 << 62}-byte payload, but only 9 bytes are left"),
        "huge_bytearray": (P4 + b"\x96" + struct.pack("<Q", (1 << 64) - 1) + b"x",
                           "-byte payload, but only 1 bytes are left"),
        "huge_frame": (P4 + b"\x95" + struct.pack("<Q", 1 << 62) + b"N.", "-byte frame"),
        "huge_binbytes4": (P4 + b"B" + struct.pack("<I", 1 << 31) + b"x.",
                           f"claims a {1 << 31}-byte payload"),
        "huge_long1": (P4 + b"\x8a\xff" + b"\x01" * 40 + b".", "at most 8 bytes, found 255"),
        "deep_tuples": (P4 + b"N" + b"\x85" * 1500 + b".", "nest more than"),
        "deep_marks": (P4 + b"(" * 1500 + b".", "nested MARKs"),
        "deep_dicts": (P4 + (b"}" + s("a")) * 400 + b"}" + b"s" * 400 + b".", "nest more than"),
        "many_objects": (P4 + b"N" * 1500 + b".", "objects on the stack"),
        "many_opcodes": (P4 + b"N" + b"\x94" * 12000 + b".", "more than 10000 opcodes"),
        "wrong_global": (P4 + g("os", "system") + s("true") + b"\x85R.",
                         "refusing to load global os.system"),
        "wrong_global_protocol0": (b"cbuiltins\ngetattr\n(S'x'\ntR.",
                                   "refusing to load global builtins.getattr"),
        "global_line_too_long": (b"c" + b"a" * 1000, "name line of at most"),
        "global_with_newline": (P4 + g("os\n", "sys\rtem") + b".",
                                "refusing to load global os\\n.sys\\rtem"),
        "global_not_strings": (P4 + k(1) + k(2) + b"\x93.", "expected a module and a name"),
        "reduce_ndarray": (P4 + g("numpy", "ndarray") + b")R.", "expected to call numpy's"),
        "newobj_dtype": (P4 + g("numpy", "dtype") + b")\x81.", "expected QuantizedWeight8bit"),
        "reconstruct_wrong_args": (P4 + g("numpy._core.multiarray", "_reconstruct")
                                   + g("numpy", "dtype") + k(0) + b"\x85C\x01b\x87R.",
                                   "expected _reconstruct(numpy.ndarray"),
        "shape_mismatch": (P4 + array(k(3) + b"\x85", F4, short_bytes(bytes(8))) + b".",
                           "array float32[3] needs 12 bytes of data, found 8"),
        "negative_dim": (P4 + array(b"J\xff\xff\xff\xff\x85", F4, short_bytes(b"")) + b".",
                         "non-negative ints"),
        "huge_shape": (P4 + array(b"\x8a\x08" + b"\xff" * 7 + b"\x7f" + b"\x85", F4,
                                  short_bytes(bytes(8))) + b".", "needs 36893488147419103228"),
        "shape_not_tuple": (P4 + array(k(2), F4, short_bytes(bytes(8))) + b".",
                            "expected a shape"),
        "list_payload": (P4 + array(SHAPE_2, F4, b"N") + b".", "expected the array's bytes"),
        "array_state_short": (P4 + g("numpy._core.multiarray", "_reconstruct")
                              + g("numpy", "ndarray") + k(0) + b"\x85C\x01b\x87R" + k(1)
                              + b"\x85b.", "expected array state (1, shape"),
        "array_without_state": (P4 + g("numpy._core.multiarray", "_reconstruct")
                                + g("numpy", "ndarray") + k(0) + b"\x85C\x01b\x87R.",
                                "expected an array or a QuantizedWeight8bit"),
        "qw8_wrong_keys": (P4 + g("__main__", "QuantizedWeight8bit") + b")\x81}" + s("weight")
                           + b"Nsb.", "expected QuantizedWeight8bit state"),
        "qw8_dict_key_dict": (P4 + g("__main__", "QuantizedWeight8bit") + b")\x81}}Nsb.",
                              "expected a string dict key"),
        "build_on_int": (P4 + k(1) + b"Nb.", "expected to set the state"),
        "memo_missing": (P4 + b"h\x05.", "memo slot 5, which was never stored"),
        "stack_underflow": (P4 + b"R.", "needs 2 objects on the stack"),
        "tuple_without_mark": (P4 + b"Nt.", "expected a MARK"),
        "unknown_opcode": (P4 + b"]N.", "opcode b']' is not one"),
        "protocol_9": (b"\x80\x09N.", "expected pickle protocol 0 to 5, found 9"),
        "no_stop": (good[:-1], "needs 1 more byte, but only 0 are left"),
        "trailing_bytes": (good + b"junk", "found 4 more bytes"),
        "two_objects_at_stop": (P4 + b"NN.", "expected one object at STOP, found 2"),
        "not_an_array": (P4 + k(5) + b".", "expected an array or a QuantizedWeight8bit"),
        "bad_utf8": (P4 + b"\x8c\x02\xff\xfe.", "string is not UTF-8"),
        "empty_file": (b"", "needs 1 more byte"),
    }


# --- the fuzz loop (runs in a child process) ---------------------------------------

def seed_files(out: Path) -> list[bytes]:
    """Real tensor files as write_tensor_file writes them, small and (one) mapped-size."""
    rng = np.random.default_rng(0)
    values = [np.arange(6, dtype=np.float32).reshape(2, 3),
              np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float32)),
              QuantizedWeight8bit(rng.integers(-128, 128, (2, 8, 4), dtype=np.int8),
                                  rng.standard_normal((2, 1, 4)).astype(BF16)),
              np.zeros((0, 3), np.int8),
              rng.standard_normal((64, 260)).astype(np.float32)]  # 66560 bytes: a span
    seeds = []
    for i, value in enumerate(values):
        write_tensor_file(out / f"seed{i}", value)
        seeds.append((out / f"seed{i}").read_bytes())
    return seeds


def mutate(rng: random.Random, seeds: list[bytes], crafted_files: list[bytes]) -> bytes:
    """One fuzz case: random bytes, a truncation, bit flips, byte pokes or a splice."""
    kind = rng.randrange(6)
    if kind == 0:
        head = P4 if rng.random() < 0.5 else b""
        return head + rng.randbytes(rng.randrange(300))
    base = rng.choice(seeds if rng.random() < 0.8 else crafted_files)
    header = max(1, min(len(base), 400))  # payload bytes are not interesting to flip
    if kind == 1:
        return base[:rng.randrange(len(base) + 1)]
    data = bytearray(base)
    if kind == 2:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(header)] ^= 1 << rng.randrange(8)
    elif kind == 3:
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(header)] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif kind == 4:
        other = rng.choice(seeds)
        at, start = rng.randrange(header), rng.randrange(min(len(other), 400))
        data[at:at] = other[start:start + rng.randint(1, 40)]
    else:
        at = rng.randrange(header)
        del data[at:at + rng.randint(1, 16)]
    return bytes(data)


def check_loaded(value) -> None:
    """A file that loads must hold release dtypes only."""
    parts = [value.weight, value.scales] if isinstance(value, QuantizedWeight8bit) else [value]
    for part in parts:
        assert isinstance(part, np.ndarray), type(part)
        assert part.dtype in (np.dtype(np.int8), np.dtype(np.float32), BF16), part.dtype
        part.copy()  # touches every element: a bad dtype would crash here


def fuzz(work: Path, seed: int, cases: int) -> int:
    """Run ``cases`` fuzz cases; return how many loaded. Raises on any foreign exception."""
    seeds = seed_files(work)
    crafted_files = [data for data, _ in crafted().values() if data]
    rng = random.Random(seed)
    target = work / "tensor00003_000"
    loaded = 0
    for case in range(cases):
        data = mutate(rng, seeds, crafted_files)
        target.write_bytes(data)
        try:
            value = load_tensor_file(target, mmap=bool(case % 2))
        except CheckpointError as e:
            message = str(e)
            assert message.startswith(f"{target}: ") and message.isprintable(), message
            assert len(message) < MAX_MESSAGE and not message.endswith((" ()", ": ")), message
            continue
        except BaseException:
            print(f"case {case}: {data[:200]!r}", flush=True)
            raise
        check_loaded(value)
        loaded += 1
    return loaded


# --- tests -----------------------------------------------------------------------------

def test_fuzz_only_checkpoint_errors_escape(tmp_path):
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), str(FUZZ_SEED),
                           str(FUZZ_CASES)], capture_output=True, text=True, env=env,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"fuzz child exited {proc.returncode}:\n{output[-4000:]}"
    assert f"fuzz: {FUZZ_CASES} cases" in proc.stdout, output
    print(proc.stdout.strip(), f"({time.perf_counter() - start:.1f} s with start-up)")


def run_crafted(tmp_path: Path, data: bytes, mmap: bool) -> str:
    path = tmp_path / "tensor00007_000"
    path.write_bytes(data)
    try:
        load_tensor_file(path, mmap=mmap)
    except CheckpointError as e:
        message = str(e)
        assert message.startswith(f"{path}: not a readable checkpoint pickle: "), message
        assert message.isprintable() and len(message) < MAX_MESSAGE, message
        return message
    raise AssertionError("crafted file was loaded")


def test_crafted_files_each_refused_with_a_reason(tmp_path):
    for name, (data, phrase) in crafted().items():
        for mmap in (False, True):
            message = run_crafted(tmp_path, data, mmap)
            assert phrase in message, (name, mmap, message)


def test_dtype_attack_refused_before_an_array_exists(tmp_path):
    # On the pickle.Unpickler-based reader this file segfaulted (exit 139).
    data, _ = crafted()["dtype_build_object_field"]
    assert len(data) < 200
    for mmap in (False, True):
        message = run_crafted(tmp_path, data, mmap)
        assert "byte 94 (REDUCE): refusing dtype 'V8': expected 'i1' (int8)" in message


def test_huge_lengths_checked_against_file_size(tmp_path):
    data, _ = crafted()["huge_unicode"]
    assert len(data) == 20
    message = run_crafted(tmp_path, data, False)
    assert message.endswith(f"byte 2 (BINUNICODE8): claims a {1 << 62}-byte string; names in "
                            "checkpoint pickles are under 4096 bytes")
    message = run_crafted(tmp_path, crafted()["huge_bytes"][0], True)
    assert message.endswith(f"byte 2 (BINBYTES8): claims a {1 << 62}-byte payload, but only "
                            "9 bytes are left in the file")


def test_deep_nesting_and_many_objects_bounded(tmp_path):
    cases = crafted()
    assert "byte 19 (TUPLE1): objects nest more than 16 deep" in run_crafted(
        tmp_path, cases["deep_tuples"][0], False)
    assert "byte 66 (MARK): more than 64 nested MARKs" in run_crafted(
        tmp_path, cases["deep_marks"][0], False)
    assert "(NONE): more than 1000 objects on the stack" in run_crafted(
        tmp_path, cases["many_objects"][0], True)
    assert "more than 10000 opcodes" in run_crafted(tmp_path, cases["many_opcodes"][0], False)


def test_every_truncation_of_real_files_refused(tmp_path):
    seeds = seed_files(tmp_path)
    for data in seeds[:3]:
        for cut in range(len(data)):
            for mmap in (False, True):
                assert "not a readable checkpoint pickle" in run_crafted(tmp_path, data[:cut],
                                                                         mmap)


def test_seed_files_load(tmp_path):
    seeds = seed_files(tmp_path)
    for i in range(len(seeds)):
        for mmap in (False, True):
            value = load_tensor_file(tmp_path / f"seed{i}", mmap=mmap)
            check_loaded(value)


def test_protocol5_and_fortran_arrays_load(tmp_path):
    import pickle
    a = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    for protocol in (3, 4, 5):
        for value in (a, np.ones(20000, np.float32)):  # small, then mapped-size
            (tmp_path / "t").write_bytes(pickle.dumps(value, protocol=protocol))
            for mmap in (False, True):
                got = load_tensor_file(tmp_path / "t", mmap=mmap)
                assert got.dtype == value.dtype and np.array_equal(got, value)
                assert got.flags.f_contiguous == value.flags.f_contiguous


if __name__ == "__main__":
    work, seed, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    began = time.perf_counter()
    ok = fuzz(work, seed, count)
    print(f"fuzz: {count} cases, {ok} loaded, {count - ok} refused, "
          f"{time.perf_counter() - began:.2f} s")
