"""Release-format checkpoint: synthetic writer, restricted reader, bad input.

The generator is checked against an independent plain-numpy rebuild of its
documented recipe (splitmix64 counter RNG, fused quantization with bf16
scales rounded by ml_dtypes), so a kernel bug cannot hide behind a round trip
that only compares the code with itself.
"""
import math
import pickle
import pickletools
import shutil

import ml_dtypes
import numba
import numpy as np
import pytest

from quant.checkpoint import (CheckpointError, QuantizedWeight8bit, check_checkpoint_dir,
                              dequantize, iter_checkpoint, read_tensor, write_tensor_file)
from quant.spec import checkpoint_specs, layer_specs
from quant.synthetic import (HeavyTails, generate_tensor, hash_uniform, stream_key,
                             tensor_recipe, write_checkpoint)

BF16 = np.dtype(ml_dtypes.bfloat16)


# --- independent reference of the generator ------------------------------------

def ref_gauss(key: int, count: int) -> np.ndarray:
    """z(key, i) for i < count: splitmix64 output, sum of its four 16-bit fields, standardized."""
    with np.errstate(over="ignore"):
        z = np.uint64(key) + np.arange(count, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    m = np.uint64(0xFFFF)
    s = (z & m) + ((z >> np.uint64(16)) & m) + ((z >> np.uint64(32)) & m) + (z >> np.uint64(48))
    return (s.astype(np.float32) - np.float32(131070.0)) * np.float32(math.sqrt(3) / 65536)


def ref_tensor(cfg, spec, seed=0):
    """Plain-numpy rebuild: fp32 array, or (int8 weight, bf16 scales)."""
    r = tensor_recipe(cfg, spec, seed)
    if not spec.quantized:
        rows, cols = (1, spec.shape[0]) if len(spec.shape) == 1 else spec.shape
        z = ref_gauss(r.key, rows * cols).reshape(rows, cols)
        out = np.float32(r.mean) + (r.row_scale[:, None] * r.col_std[None, :]) * z
        return out.reshape(spec.shape)
    k, n = spec.shape[-2:]
    e = spec.shape[0] if spec.per_expert else 1
    own = ref_gauss(r.key, e * k * n).reshape(e, k, n)
    shared = ref_gauss(r.shared_key, k * n).reshape(k, n)
    vals = r.col_std * (np.float32(r.own_weight) * own + np.float32(r.shared_weight) * shared)
    blocks = spec.scale_shape[-2]
    groups = vals.reshape(e, blocks, k // blocks, n)
    lo = np.minimum(groups.min(axis=2), 0)
    hi = np.maximum(groups.max(axis=2), 0)
    scales = np.maximum(-lo / np.float32(128), hi / np.float32(127)).astype(BF16)
    s32 = scales.astype(np.float32)
    q = np.clip(np.rint(groups * (np.float32(1) / s32)[:, :, None, :]), -128, 127)
    return q.astype(np.int8).reshape(spec.shape), scales.reshape(spec.scale_shape)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_every_tensor_matches_independent_reference(tiny_cfg, tiny_ckpt):
    for spec, value in iter_checkpoint(tiny_ckpt, tiny_cfg):
        ref = ref_tensor(tiny_cfg, spec)
        if spec.quantized:
            assert same_bits(value.weight, ref[0]), spec.name
            assert same_bits(value.scales, ref[1]), spec.name
        else:
            assert same_bits(value, ref), spec.name


def test_reader_returns_what_was_generated(tiny_cfg, tiny_ckpt):
    for spec in checkpoint_specs(tiny_cfg):
        made, read = generate_tensor(tiny_cfg, spec, seed=0), read_tensor(tiny_ckpt, spec)
        if spec.quantized:
            assert same_bits(made.weight, read.weight) and same_bits(made.scales, read.scales)
        else:
            assert same_bits(made, read)


def test_generation_independent_of_thread_count(tiny_cfg):
    specs = [s for s in layer_specs(tiny_cfg, 1).values() if s.role in ("down", "gate", "o")]
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = [generate_tensor(tiny_cfg, s, seed=7) for s in specs]
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = [generate_tensor(tiny_cfg, s, seed=7) for s in specs]
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, many):
        assert same_bits(a.weight, b.weight) and same_bits(a.scales, b.scales)


def test_files_deterministic_and_layers_independent_of_num_layers(tiny_cfg, tiny_ckpt, tmp_path):
    # Files 0..13 (embeddings, final norm, layer 0) must be byte-identical when
    # only one layer is written; a different seed must change them.
    one = write_checkpoint(tiny_cfg, tmp_path / "one", seed=0, num_layers=1)
    assert sorted(p.name for p in one.iterdir()) == [f"tensor{i:05d}_000" for i in range(14)]
    for i in range(14):
        name = f"tensor{i:05d}_000"
        assert (one / name).read_bytes() == (tiny_ckpt / name).read_bytes(), name
    other = write_checkpoint(tiny_cfg, tmp_path / "other", seed=1, num_layers=1)
    assert (other / "tensor00002_000").read_bytes() != (one / "tensor00002_000").read_bytes()


def test_seeds_and_layers_give_different_values(tiny_cfg):
    gate0, gate1 = (generate_tensor(tiny_cfg, layer_specs(tiny_cfg, i)["gate"]) for i in (0, 1))
    assert not np.array_equal(gate0.weight, gate1.weight)


# --- pickle format -------------------------------------------------------------

def pickled_globals(data: bytes) -> set[str]:
    """'module.name' of every global a pickle refers to (STACK_GLOBAL or GLOBAL)."""
    found, strings, memo, last = set(), [], [], None
    for op, arg, _ in pickletools.genops(data):
        if op.name == "MEMOIZE":
            memo.append(last)  # memoizes the top of the stack
            continue
        last = None
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            last = arg
        elif op.name in ("BINGET", "LONG_BINGET"):
            last = memo[arg]
        elif op.name == "STACK_GLOBAL":
            found.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        if isinstance(last, str):
            strings.append(last)
    return found


def test_pickles_name_release_class(tiny_cfg, tiny_ckpt):
    allowed = {"__main__.QuantizedWeight8bit", "numpy.ndarray", "numpy.dtype",
               "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
               "ml_dtypes.bfloat16"}
    for spec in checkpoint_specs(tiny_cfg):
        data = (tiny_ckpt / spec.filename).read_bytes()
        assert data[:2] == b"\x80\x04"  # protocol 4
        names = pickled_globals(data)
        assert names <= allowed, (spec.name, names)
        assert ("__main__.QuantizedWeight8bit" in names) == spec.quantized, spec.name
        assert ("ml_dtypes.bfloat16" in names) == spec.quantized, spec.name


class _NumpyOneWeight:
    """Pickled under a stand-in name, then renamed to the release's class in the bytes."""

    def __init__(self, weight, scales):
        self.weight = weight
        self.scales = scales


def test_numpy1_style_pickle_loads(tiny_cfg, tmp_path):
    spec = layer_specs(tiny_cfg, 0)["o"]
    made = generate_tensor(tiny_cfg, spec)
    # Protocol 3 spells globals as text lines (no frame lengths), so names can be swapped.
    data = pickle.dumps(_NumpyOneWeight(made.weight, made.scales), protocol=3)
    here = f"c{_NumpyOneWeight.__module__}\n{_NumpyOneWeight.__qualname__}\n".encode()
    assert data.count(here) == 1 and b"cnumpy._core.multiarray\n" in data
    data = data.replace(here, b"c__main__\nQuantizedWeight8bit\n")
    data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"numpy._core" not in data
    (tmp_path / spec.filename).write_bytes(data)
    value = read_tensor(tmp_path, spec)
    assert isinstance(value, QuantizedWeight8bit)
    assert same_bits(value.weight, made.weight) and same_bits(value.scales, made.scales)


# --- quantization --------------------------------------------------------------

def test_full_int8_range_used(tiny_cfg, tiny_ckpt):
    for spec, value in iter_checkpoint(tiny_ckpt, tiny_cfg):
        if not spec.quantized:
            continue
        q = value.weight
        assert q.min() == -128 and q.max() == 127, spec.name
        e = q.shape[0] if spec.per_expert else 1
        k, n = q.shape[-2:]
        groups = q.reshape(e, spec.row_blocks, k // spec.row_blocks, n)
        # Every (row block, column) group reaches one end of the range.
        assert np.all((groups.min(axis=2) == -128) | (groups.max(axis=2) == 127)), spec.name


@pytest.mark.parametrize("role", ["down", "o", "gate", "k"])
def test_dequantize_matches_hand_loop(tiny_cfg, tiny_ckpt, role):
    spec = layer_specs(tiny_cfg, 1)[role]
    value = read_tensor(tiny_ckpt, spec)
    got = dequantize(value)
    w = value.weight.reshape((-1,) + spec.shape[-2:])
    s = value.scales.reshape((-1,) + spec.scale_shape[-2:])
    k, n = w.shape[1:]
    rows_per_block = k // spec.row_blocks
    expected = np.empty(w.shape, np.float32)
    for e in range(w.shape[0]):
        for row in range(k):
            for col in range(n):
                scale = float(s[e, row // rows_per_block, col])
                expected[e, row, col] = float(w[e, row, col]) * scale
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected.reshape(spec.shape))


# --- magnitudes (SPEC.md section 7) -------------------------------------------

def _rms_norm(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5)


def test_magnitudes_of_synthetic_model(tiny_cfg, tiny_ckpt):
    specs = checkpoint_specs(tiny_cfg)
    emb, final_gain = read_tensor(tiny_ckpt, specs[0]), read_tensor(tiny_ckpt, specs[1])
    layer = {role: read_tensor(tiny_ckpt, s) for role, s in layer_specs(tiny_cfg, 0).items()}
    h = emb * tiny_cfg.embedding_multiplier_scale  # (V, D): every token's residual input
    assert np.sqrt(np.mean(h ** 2)) == pytest.approx(2.0, rel=0.25)
    x = _rms_norm(h) * layer["moe_norm"]
    assert np.std(x @ layer["router"]) == pytest.approx(3.0, rel=0.3)
    gate = dequantize(layer["gate"])
    assert np.sqrt(np.mean((x @ gate[3]) ** 2)) == pytest.approx(1.5, rel=0.25)
    logits = (_rms_norm(h) * final_gain) @ emb.T * tiny_cfg.output_multiplier_scale
    assert np.std(logits) == pytest.approx(2.5, rel=0.3)
    assert np.mean(layer["attn_post_norm"]) == pytest.approx(0.4, rel=0.1)
    assert np.mean(layer["attn_norm"]) == pytest.approx(1.0, rel=0.1)
    # Experts share ~90% of their weight variance.
    assert np.corrcoef(gate[0].ravel(), gate[5].ravel())[0, 1] == pytest.approx(0.9, abs=0.05)


def test_attention_heads_spread(tiny_cfg, tiny_ckpt):
    cfg = tiny_cfg
    emb = read_tensor(tiny_ckpt, checkpoint_specs(cfg)[0])
    layer = {role: read_tensor(tiny_ckpt, s) for role, s in layer_specs(cfg, 1).items()}
    x = _rms_norm(emb) * layer["attn_norm"]
    q = (x @ dequantize(layer["q"])).reshape(len(x), cfg.num_q_heads, cfg.key_size)
    k = (x @ dequantize(layer["k"])).reshape(len(x), cfg.num_kv_heads, cfg.key_size)
    stds = sorted(float(np.std(q[:, h] @ k[:, h // cfg.q_group].T) * cfg.attn_output_multiplier)
                  for h in range(cfg.num_q_heads))
    assert np.median(stds) == pytest.approx(2.0, rel=0.5)
    assert stds[-1] > 7.0  # the sharpest head reaches the 30 * tanh cap


# --- bad input -----------------------------------------------------------------

@pytest.fixture
def spec_of(tiny_cfg):
    return lambda role, layer=0: layer_specs(tiny_cfg, layer)[role]


def test_missing_file(tmp_path, spec_of):
    spec = spec_of("q")
    with pytest.raises(CheckpointError, match=rf"{spec.filename}: file not found.*{spec.name}"):
        read_tensor(tmp_path, spec)


@pytest.mark.parametrize("mmap", [False, True])
def test_truncated_pickle(tiny_ckpt, tmp_path, spec_of, mmap):
    spec = spec_of("down")
    data = (tiny_ckpt / spec.filename).read_bytes()
    for cut in (len(data) // 2, 40, 0):
        (tmp_path / spec.filename).write_bytes(data[:cut])
        with pytest.raises(CheckpointError,
                           match=rf"{spec.filename}: not a readable checkpoint pickle.*{spec.name}"):
            read_tensor(tmp_path, spec, mmap=mmap)


def test_wrong_shape(tmp_path, spec_of):
    spec = spec_of("attn_norm")
    write_tensor_file(tmp_path / spec.filename, np.ones(63, np.float32))
    with pytest.raises(CheckpointError, match=rf"{spec.filename}: {spec.name}: expected array "
                                              r"float32\[64\], found array float32\[63\]"):
        read_tensor(tmp_path, spec)


def test_wrong_dtype(tiny_cfg, tmp_path, spec_of):
    # Release dtypes in the wrong place: the reader loads them, check_tensor refuses.
    norm = spec_of("moe_norm")
    write_tensor_file(tmp_path / norm.filename, np.ones(64, np.int8))
    with pytest.raises(CheckpointError, match=r"expected array float32\[64\], found array "
                                              r"int8\[64\]"):
        read_tensor(tmp_path, norm)
    spec = spec_of("k")
    made = generate_tensor(tiny_cfg, spec)
    write_tensor_file(tmp_path / spec.filename,
                      QuantizedWeight8bit(made.weight.astype(np.float32), made.scales))
    with pytest.raises(CheckpointError, match=rf"{spec.filename}: .*expected QuantizedWeight8bit"
                                              r"\(weight=int8\[64, 32\].*found .*weight=float32"):
        read_tensor(tmp_path, spec)
    write_tensor_file(tmp_path / spec.filename,
                      QuantizedWeight8bit(made.weight, made.scales.astype(np.float32)))
    with pytest.raises(CheckpointError, match=r"scales=bfloat16\[1, 32\].*found .*"
                                              r"scales=float32\[1, 32\]"):
        read_tensor(tmp_path, spec)


@pytest.mark.parametrize("mmap", [False, True])
def test_other_dtypes_refused_while_reading(tiny_cfg, tmp_path, spec_of, mmap):
    # Any other dtype is refused when the file builds it, before an array exists.
    norm = spec_of("moe_norm")
    write_tensor_file(tmp_path / norm.filename, np.ones(64, np.float64))
    with pytest.raises(CheckpointError, match=rf"{norm.filename}: .*refusing dtype 'f8': "
                                              r"expected 'i1' \(int8\), 'f4' \(float32\)"):
        read_tensor(tmp_path, norm, mmap=mmap)
    spec = spec_of("k")
    made = generate_tensor(tiny_cfg, spec)
    write_tensor_file(tmp_path / spec.filename,
                      QuantizedWeight8bit(made.weight.astype(np.int16), made.scales))
    with pytest.raises(CheckpointError, match=rf"{spec.filename}: .*refusing dtype 'i2'"):
        read_tensor(tmp_path, spec, mmap=mmap)
    write_tensor_file(tmp_path / norm.filename, np.ones(64, ">f4"))
    with pytest.raises(CheckpointError, match=r"refusing dtype state for float32: expected "
                                              r"\(3, '<', .*found \(3, '>', None"):
        read_tensor(tmp_path, norm, mmap=mmap)


def test_fp32_where_quantized_expected(tmp_path, spec_of):
    spec = spec_of("gate")
    write_tensor_file(tmp_path / spec.filename, np.zeros(spec.shape, np.float32))
    with pytest.raises(CheckpointError, match=rf"{spec.filename}: {spec.name}: expected "
                                              r"QuantizedWeight8bit\(weight=int8\[8, 64, 256\], "
                                              r"scales=bfloat16\[8, 1, 256\]\), found array "
                                              r"float32\[8, 64, 256\]"):
        read_tensor(tmp_path, spec)


class _Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


@pytest.mark.parametrize("mmap", [False, True])
def test_foreign_globals_refused_not_executed(tmp_path, spec_of, mmap):
    spec = spec_of("router")
    marker = tmp_path / "pwned"
    crafted = [
        pickle.dumps(_Exploit(f"touch {marker}"), protocol=4),  # names posix.system
        b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.",  # protocol 0, os.system
        b"\x80\x04cbuiltins\neval\n(Vopen(" + repr(str(marker)).encode() + b",'w')\ntR.",
    ]
    for data in crafted:
        (tmp_path / spec.filename).write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{spec.filename}: .*refusing to load global "
                                                  r"(posix|os|builtins)\.(system|eval)"):
            read_tensor(tmp_path, spec, mmap=mmap)
        assert not marker.exists()


def test_mmap_reading_maps_large_arrays_and_equals_a_plain_load(tiny_cfg, tiny_ckpt):
    for spec in checkpoint_specs(tiny_cfg):
        plain, mapped = read_tensor(tiny_ckpt, spec), read_tensor(tiny_ckpt, spec, mmap=True)
        pairs = ([(plain.weight, mapped.weight), (plain.scales, mapped.scales)]
                 if spec.quantized else [(plain, mapped)])
        for a, b in pairs:
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes()
            assert isinstance(b, np.memmap) == (a.nbytes >= 1 << 16)  # big payloads mapped
            assert not (isinstance(b, np.memmap) and b.flags.writeable)


def test_check_checkpoint_dir(tiny_cfg, tiny_ckpt, tmp_path):
    check_checkpoint_dir(tiny_ckpt, tiny_cfg)  # complete: no error
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, copy)
    spec = checkpoint_specs(tiny_cfg)[17]
    (copy / spec.filename).unlink()
    with pytest.raises(CheckpointError, match=rf"tensor00017_000: file not found "
                                              rf"\(expected {spec.name}\)"):
        check_checkpoint_dir(copy, tiny_cfg)
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        check_checkpoint_dir(tmp_path / "nowhere", tiny_cfg)


def test_writer_leaves_no_temporary_files(tiny_ckpt):
    assert not [p.name for p in tiny_ckpt.iterdir() if not p.name.endswith("_000")]


# --- command line ------------------------------------------------------------------

def _load_cli():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "tools" / "make_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_checkpoint_cli(tiny_ckpt, tmp_path, capsys):
    cli = _load_cli()
    out = tmp_path / "cli"
    assert cli.main(["--preset", "tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "preset tiny, seed 0" in printed and "wrote 26 files" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_ckpt.iterdir())
    assert (out / "tensor00025_000").read_bytes() == (tiny_ckpt / "tensor00025_000").read_bytes()
    # An existing non-empty directory is refused with one line and exit code 2.
    assert cli.main(["--preset", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} exists and is not an empty directory" in err
    (tmp_path / "bad.json").write_text('{"emb_size": 64, "emb_dim": 3}')
    assert cli.main(["--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")]) == 2
    assert "unknown GrokConfig fields" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- heavy-tailed option --------------------------------------------------------------

def test_heavy_tails_option_rebuilt_independently(tiny_cfg):
    """Student-t values (unit variance), 1% outlier rows and columns 6x, quantized like
    the default writer; fp32 leaves and the default model are untouched."""
    tails = HeavyTails(dof=4.0, outlier_rows=0.01, outlier_cols=0.02, outlier_scale=6.0)
    specs = layer_specs(tiny_cfg, 0)
    for role in ("gate", "down", "q"):
        spec = specs[role]
        got = generate_tensor(tiny_cfg, spec, 0, tails)
        r = tensor_recipe(tiny_cfg, spec, 0)
        e = spec.shape[0] if spec.per_expert else 1
        k, n = spec.shape[-2:]
        t = lambda key, shape: np.random.Generator(np.random.PCG64(key)).standard_t(  # noqa: E731
            4.0, size=shape) * math.sqrt(2 / 4)
        vals = r.own_weight * t(r.key, (e, k, n)).astype(np.float32)
        if r.shared_weight:
            vals = vals + r.shared_weight * t(r.shared_key, (1, k, n)).astype(np.float32)
        mult = []
        for stream, count, frac in ((4, k, 0.01), (5, n, 0.02)):
            m = np.ones(count, np.float32)
            chosen = np.argsort(hash_uniform(stream_key(0, 0, role, stream), count))
            m[chosen[:round(frac * count)]] = 6.0
            mult.append(m)
        vals = vals * mult[0][:, None] * (r.col_std * mult[1])[None, :]
        w = dequantize(got).reshape(e, k, n)
        step = got.scales.astype(np.float32).max()
        assert np.abs(w - vals).max() <= 0.5 * step + 1e-6      # the int8 rounding only
        assert got.weight.min() == -128 or got.weight.max() == 127
        z = (w / w.std(axis=1, keepdims=True)).ravel()
        assert np.mean(z ** 4) > 4.5                              # Gaussian: 3
        assert same_bits(generate_tensor(tiny_cfg, spec, 0, tails).weight, got.weight)
    default = generate_tensor(tiny_cfg, specs["gate"], 0)
    assert same_bits(default.weight, ref_tensor(tiny_cfg, specs["gate"])[0])
    norm = specs["attn_norm"]
    assert same_bits(generate_tensor(tiny_cfg, norm, 0, tails), generate_tensor(tiny_cfg, norm))
    with pytest.raises(ValueError, match="dof must be > 2"):
        HeavyTails(dof=2.0)
