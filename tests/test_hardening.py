"""What lowmem refuses: a corpus of bad inputs, built at test time (README "What
lowmem refuses, and how").

Each command-line case asserts exit 2, exactly one line on stderr, no
traceback and nothing published; library cases assert the error type and that
the message names the file and tensor.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import lowmem
from lowmem.tokenizer import BUNDLED
from quant.checkpoint import load_tensor_file, write_tensor_file
from quant.ckpt_config import infer_config
from quant.config import preset
from quant.packed import MANIFEST, IntegrityError, PackedModel, QuantSettings, tensor_layout
from quant.pipeline import quantize_checkpoint
from quant.spec import checkpoint_specs
from quant.synthetic import write_checkpoint

REPO = Path(__file__).resolve().parents[1]


def cli(module: str, *args, timeout=300) -> tuple[int, str]:
    """Run a CLI; unless it succeeds, assert one stderr line and no traceback.
    Returns (exit code, the line or the whole stderr)."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 0:
        return 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, lines[0]


def quantize_cli(*args) -> tuple[int, str]:
    return cli("lowmem.quantize", *args)


def refused(out: Path, code: int) -> None:
    assert code == 2 and not out.exists()


def flip(path: Path, offset: int, mask: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


@pytest.fixture(scope="module")
def model(tiny_cfg, tiny_ckpt, tmp_path_factory):
    """A good int8 model with the tokenizer (copied before each damage)."""
    out = tmp_path_factory.mktemp("hardening") / "model"
    quantize_checkpoint(tiny_ckpt, out, tiny_cfg, QuantSettings(8), tokenizer=BUNDLED)
    return out


def copy(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# --- the quantizer ------------------------------------------------------------------

HOLD_SCRIPT = textwrap.dedent("""
    import sys, time
    import quant.pipeline as qq
    real = qq.write_record
    def slow(*args):            # keep the run (and its lock) alive long enough to race it
        real(*args)
        time.sleep(1.0)
    qq.write_record = slow
    from lowmem.quantize import main
    sys.exit(main(sys.argv[1:]))
""")


def test_concurrent_resume_runs_one_wins(tiny_ckpt, tmp_path):
    """The second --resume run on one output exits 2 naming the holder; the first
    publishes a model that passes --verify."""
    out = tmp_path / "m"
    args = ["--checkpoint", str(tiny_ckpt), "--out", str(out), "--bits", "8", "--resume"]
    first = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, *args], cwd=REPO,
                             stderr=subprocess.DEVNULL)
    lock = tmp_path / "m.lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if lock.exists() and f'"pid": {first.pid}' in lock.read_text():
            break
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)           # hold it mid-run, lock held
    try:
        code, line = quantize_cli(*args)
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == 2 and f"pid {first.pid} on host" in line and str(out) in line
    assert first.wait(timeout=120) == 0
    assert quantize_cli("--verify", out)[0] == 0 and not lock.exists()


def test_swapped_checkpoint_files_are_refused_on_resume(tiny_cfg, tiny_ckpt, tmp_path,
                                                        monkeypatch):
    import quant.pipeline as qq
    ckpt = copy(tiny_ckpt, tmp_path, "ckpt")
    real, calls = qq.write_record, []

    def stop_after_global(*a):
        real(*a)
        calls.append(a[1].name)
        raise KeyboardInterrupt
    monkeypatch.setattr(qq, "write_record", stop_after_global)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(ckpt, tmp_path / "m", tiny_cfg, QuantSettings(8))
    monkeypatch.undo()
    a, b = ckpt / "tensor00003_000", ckpt / "tensor00015_000"   # same role, layers 0 and 1
    assert calls == ["global"] and a.stat().st_size == b.stat().st_size
    a.rename(tmp_path / "t"), b.rename(a), (tmp_path / "t").rename(b)
    code, line = quantize_cli("--checkpoint", ckpt, "--out", tmp_path / "m", "--bits", "8",
                              "--layout", "rows", "--resume")      # QuantSettings(8)
    refused(tmp_path / "m", code)
    assert "tensor00003_000 differs" in line and "fingerprints" in line


NON_FINITE = [  # (file index, part, value, where)
    (0, None, np.nan, (7, 3)),          # embeddings
    (1, None, np.inf, (5,)),            # final norm
    (13, None, -np.inf, (2, 6)),        # layer 0 router
    (9, None, np.nan, (11,)),           # layer 0 attention norm
    (2, "scales", np.nan, (4, 0, 9)),   # layer 0 gate scales (expert 4)
    (6, "scales", np.inf, (3, 1)),      # layer 0 attention output scales
]


@pytest.mark.parametrize("index, part, value, where", NON_FINITE)
def test_non_finite_values_are_refused(tiny_cfg, tiny_ckpt, tmp_path, index, part, value,
                                       where):
    ckpt = copy(tiny_ckpt, tmp_path, "ckpt")
    path = ckpt / f"tensor{index:05d}_000"
    obj = load_tensor_file(path)
    array = getattr(obj, part) if part else obj
    array[where] = value
    write_tensor_file(path, obj)
    code, line = quantize_cli("--checkpoint", ckpt, "--out", tmp_path / "m", "--bits", "4")
    refused(tmp_path / "m", code)
    name = checkpoint_specs(tiny_cfg)[index].name
    assert f"{name}{' scales' if part else ''}: non-finite value" in line
    assert f"at index {list(where)}" in line and str(path) in line


@pytest.fixture(scope="module")
def ckpt12(tmp_path_factory):
    return write_checkpoint(preset("tiny-12"), tmp_path_factory.mktemp("c12") / "ckpt", seed=1)


def test_config_is_inferred_and_checked(ckpt12, tmp_path):
    """A 12-layer checkpoint: refused with the 2-layer preset, inferred without one."""
    code, line = quantize_cli("--checkpoint", ckpt12, "--out", tmp_path / "m", "--bits", "8",
                              "--preset", "tiny")
    refused(tmp_path / "m", code)
    assert "the config has 2 layers" in line and "the checkpoint 12" in line
    assert infer_config(ckpt12) == preset("tiny-12")
    assert quantize_cli("--checkpoint", ckpt12, "--out", tmp_path / "m", "--bits", "8")[0] == 0
    assert PackedModel.open(tmp_path / "m").cfg.num_layers == 12


def test_extra_and_malformed_checkpoint_files_are_refused(tiny_ckpt, tmp_path):
    ckpt = copy(tiny_ckpt, tmp_path, "ckpt")
    shutil.copyfile(ckpt / "tensor00002_000", ckpt / "tensor00026_000")
    code, line = quantize_cli("--checkpoint", ckpt, "--out", tmp_path / "m", "--bits", "8")
    refused(tmp_path / "m", code)
    assert "found 27" in line
    (ckpt / "tensor00026_000").unlink()
    (ckpt / "tensor00020_000").write_bytes(os.urandom(300))     # random bytes: no KeyError
    code, line = quantize_cli("--checkpoint", ckpt, "--out", tmp_path / "m", "--bits", "8")
    refused(tmp_path / "m", code)
    assert "tensor00020_000" in line


def test_config_field_of_wrong_type(tiny_ckpt, tmp_path):
    code, line = quantize_cli("--checkpoint", tiny_ckpt, "--out", tmp_path / "m", "--bits", "8",
                              "--config", '{"emb_size": "x"}')
    refused(tmp_path / "m", code)
    assert "emb_size must be a positive integer, found 'x'" in line


# --- integrity of a model directory -----------------------------------------------------

def expert_entry(cfg, name):
    return next(e for e in tensor_layout(cfg, QuantSettings(8)) if e.name == name)


def test_corrupted_expert_block_refused_by_generation(tiny_cfg, tiny_ckpt, tmp_path):
    bad = tmp_path / "m"           # no tokenizer: tiny's vocabulary is smaller than it
    quantize_checkpoint(tiny_ckpt, bad, tiny_cfg, QuantSettings(8))
    for e in range(tiny_cfg.num_experts):                     # whichever experts route
        entry = expert_entry(tiny_cfg, f"transformer/decoder_layer_0/gate[{e}].values")
        flip(bad / entry.file, entry.offset + 100)
    rt = lowmem.load(bad, backend="host")
    try:
        with pytest.raises(IntegrityError, match=r"tensor transformer/decoder_layer_0/gate\[\d\]"):
            list(rt.generate([5, 6, 7], max_new_tokens=2, temperature=0.0))
    finally:
        rt.close()
    rt = lowmem.load(bad, backend="host", verify=False)        # the documented opt-out
    try:
        assert len(list(rt.generate([5, 6, 7], max_new_tokens=2, temperature=0.0))) == 2
    finally:
        rt.close()


@pytest.mark.parametrize("damage, expect", [
    (lambda d: (d / MANIFEST).write_text(json.dumps(
        {**json.loads((d / MANIFEST).read_text()),
         "config": {**json.loads((d / MANIFEST).read_text())["config"],
                    "output_multiplier_scale": 0.5773502691896258}})),
     "does not match its checksum"),
    (lambda d: flip(d / "tokenizer.model", 1000), "tokenizer.model: expected sha256"),
    (lambda d: (d / MANIFEST).write_text("[1, 2, 3]"), "found a JSON list"),
    (lambda d: (d / MANIFEST).write_text(json.dumps(
        {**json.loads((d / MANIFEST).read_text()), "tensors": None})), "checksum"),
])
def test_damaged_manifest_or_tokenizer_refused_everywhere(model, tmp_path, damage, expect):
    bad = copy(model, tmp_path)
    damage(bad)
    for module, args in (("lowmem.quantize", ["--verify", bad]),
                         ("lowmem.generate", ["--model", bad, "--prompt", "hi"]),
                         ("lowmem.plan", ["--model", bad, "--device-memory", "8GB"])):
        code, line = cli(module, *args)
        assert code == 2 and expect in line, (module, line)


def test_resume_on_a_damaged_finished_output_is_refused(model, tiny_cfg, tiny_ckpt, tmp_path):
    bad = copy(model, tmp_path)
    entry = expert_entry(tiny_cfg, "transformer/decoder_layer_1/down[2].scales")
    flip(bad / entry.file, entry.offset + 1)
    code, line = quantize_cli("--checkpoint", tiny_ckpt, "--out", bad, "--bits", "8",
                              "--layout", "rows", "--tokenizer", BUNDLED, "--resume")
    assert code == 2 and "already exists but is damaged" in line and entry.name in line
