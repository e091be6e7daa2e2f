"""The quantizer pipeline and CLI (quant/quantize.py, lowmem/quantize.py).

Stored weights are read back through quant.packed.PackedModel and compared with
the checkpoint read independently through quant.checkpoint.
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import quant.pipeline as qq
from lowmem.quantize import main
from lowmem.tokenizer import BUNDLED
from quant.checkpoint import dequantize, iter_checkpoint
from quant.int4 import quantize_int4
from quant.packed import MANIFEST, ROW_PAD, PackedModel, QuantSettings
from quant.qweight import dequantize as dequantize_q
from quant.pipeline import QuantizeError, quantize_checkpoint

TOKENIZER = BUNDLED
BF16 = np.dtype(ml_dtypes.bfloat16)
REPO = Path(__file__).resolve().parents[1]


def quantize(ckpt, out, cfg, settings, **kw):
    return quantize_checkpoint(ckpt, out, cfg, settings, **kw)


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def ckpt_values(tiny_cfg, tiny_ckpt):
    return {spec.name: value for spec, value in iter_checkpoint(tiny_ckpt, tiny_cfg)}


@pytest.fixture(scope="module")
def models(tiny_cfg, tiny_ckpt, tmp_path_factory):
    """Uninterrupted runs: the baselines every other test compares with."""
    root = tmp_path_factory.mktemp("models")
    runs = {"int8": (QuantSettings(8), TOKENIZER), "int4": (QuantSettings(4), None),
            "int8-tiles": (QuantSettings(8, row_pad=0, tiles=True, attention_tiles=True),
                           TOKENIZER),                                     # CLI default
            "int4-g32": (QuantSettings(4, 32), None),
            "bf16-attn": (QuantSettings(8, attention="bf16"), None)}
    out = {}
    for name, (settings, tok) in runs.items():
        quantize(tiny_ckpt, root / name, tiny_cfg, settings, tokenizer=tok)
        out[name] = root / name
    return out


def expert_name(layer, role, e):
    return f"transformer/decoder_layer_{layer}/{role}[{e}]"


# --- what is stored ---------------------------------------------------------------

def test_int8_experts_and_attention_pass_through_bit_exact(models, ckpt_values, tiny_cfg):
    model = PackedModel.open(models["int8"])
    for layer in range(tiny_cfg.num_layers):
        prefix = f"transformer/decoder_layer_{layer}/"
        src = {role: ckpt_values[prefix + path] for role, path in
               (("gate", "moe/linear/w"), ("up", "moe/linear_v/w"), ("down", "moe/linear_1/w"))}
        for e in range(tiny_cfg.num_experts):
            block = model.expert(layer, e)
            for role, w in (("gate", block.gate), ("up", block.up), ("down", block.down)):
                n = src[role].weight.shape[-1]               # stored rows: N + ROW_PAD bytes
                assert w.values.shape[1] == n + ROW_PAD and not w.values[:, n:].any()
                assert bits_equal(w.values[:, :n], src[role].weight[e])
                assert bits_equal(w.scales, src[role].scales[e])      # incl. down's 8 blocks
                assert isinstance(w.values.base, np.memmap) or np.shares_memory(w.values,
                                                                                block.raw)
        res = model.layer(layer)
        for role, path in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "linear")):
            value = ckpt_values[prefix + f"multi_head_attention/{path}/w"]
            assert bits_equal(res[role].values, value.weight)
            assert bits_equal(res[role].scales, value.scales)
        assert bits_equal(res["router"], ckpt_values[prefix + "router/w"])
        assert bits_equal(res["moe_post_norm"], ckpt_values[prefix + "rms_norm_3/scale"])
    embed = ckpt_values["language_model/in_out_embed/embeddings"]
    assert bits_equal(model.embed(), embed.astype(BF16))                # round to nearest even
    assert bits_equal(model.final_norm(), ckpt_values["language_model/rms_norm/scale"])


def test_bf16_attention_is_rounded_release_weights(models, ckpt_values):
    model = PackedModel.open(models["bf16-attn"])
    manifest = model.manifest
    name = "transformer/decoder_layer_1/multi_head_attention/linear/w"   # 8-row-block scales
    w = dequantize(ckpt_values[name])
    stored = model.layer(1)["o"]
    assert bits_equal(stored, w.astype(BF16))
    err = np.linalg.norm(w - stored.astype(np.float32)) / np.linalg.norm(w)
    assert manifest["quant_error"][name] == pytest.approx(err, rel=1e-6)
    assert 0 < err < 2 ** -8


@pytest.mark.parametrize("name, group", [("int4", None), ("int4-g32", 32)])
def test_int4_experts_and_recorded_errors(models, ckpt_values, tiny_cfg, name, group):
    model = PackedModel.open(models[name])
    errors = model.manifest["quant_error"]
    value = ckpt_values["transformer/decoder_layer_1/moe/linear_1/w"]   # down: 8 row blocks
    ref = dequantize(value).astype(np.float64)                           # (E, F, D)
    for e in range(tiny_cfg.num_experts):
        w = model.expert(1, e).down
        direct = quantize_int4(value.weight[e], value.scales[e], group)
        n = tiny_cfg.emb_size                                             # down's N
        assert w.values.shape[1] == n + ROW_PAD and not w.values[:, n:].any()
        assert bits_equal(w.values[:, :n], direct.weight.values)
        assert bits_equal(w.scales, direct.weight.scales)
        err = np.linalg.norm(ref[e] - dequantize_q(w)) / np.linalg.norm(ref[e])
        assert errors[expert_name(1, "down", e)] == pytest.approx(err, rel=1e-6)
        assert 0.05 < err < 0.12
    assert w.group_size == (group or tiny_cfg.ffn_size) and w.bits == 4


def test_manifest_extras(models, tiny_cfg):
    m8 = json.loads((models["int8"] / MANIFEST).read_text())
    m4 = json.loads((models["int4"] / MANIFEST).read_text())
    g32 = json.loads((models["int4-g32"] / MANIFEST).read_text())
    assert m8["tokenizer"] == "tokenizer.model" and m4["tokenizer"] is None
    assert (models["int8"] / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    n_weights = 2 + tiny_cfg.num_layers * (9 + 3 * tiny_cfg.num_experts)
    assert len(m8["quant_error"]) == len(m4["quant_error"]) == n_weights
    assert all(v == 0.0 for k, v in m8["quant_error"].items() if "embeddings" not in k)
    for m in (m8, m4, g32):
        for role in ("gate", "up", "down"):
            s = m["quant_error_summary"][role]
            errs = [v for k, v in m["quant_error"].items() if f"/{role}[" in k]
            assert s["count"] == len(errs) == tiny_cfg.num_layers * tiny_cfg.num_experts
            assert s["worst"] == max(errs) and s["mean"] == pytest.approx(np.mean(errs))
        assert m["quant_error_summary"]["router"] == {"worst": 0.0, "mean": 0.0,
                                                      "count": tiny_cfg.num_layers}
    for role in ("gate", "up", "down"):
        assert g32["quant_error_summary"][role]["mean"] < m4["quant_error_summary"][role]["mean"]
    assert "int4_method" in m4 and "int4_method" not in m8


def test_output_directory_is_clean_and_deterministic(models, tiny_cfg, tiny_ckpt, tmp_path):
    for path in models.values():
        names = {p.name for p in path.iterdir()}
        assert not {n for n in names if n.endswith((".json", ".tmp")) and n != MANIFEST}
        assert not Path(str(path) + ".partial").exists()
    again = tmp_path / "again"
    quantize(tiny_ckpt, again, tiny_cfg, QuantSettings(4))
    assert dir_bytes(again) == dir_bytes(models["int4"])


# --- interruption and resume ------------------------------------------------------

class Boom(RuntimeError):
    pass


def fail_at(monkeypatch, index):
    """Make the pipeline fail while converting checkpoint file ``index``."""
    real = qq.convert_tensor

    def convert(spec, *args):
        if spec.index == index:
            raise Boom(f"injected failure at file {index}")
        yield from real(spec, *args)
    monkeypatch.setattr(qq, "convert_tensor", convert)


@pytest.mark.parametrize("name, fail_index", [("int4", 1), ("int4", 9), ("int4-g32", 20),
                                              ("int8", 25)])
def test_resume_after_failure_is_byte_identical(models, tiny_cfg, tiny_ckpt, tmp_path,
                                                monkeypatch, name, fail_index):
    settings = json.loads((models[name] / MANIFEST).read_text())["quant"]
    settings = QuantSettings(**settings)
    tok = TOKENIZER if name == "int8" else None
    out = tmp_path / "m"
    with monkeypatch.context() as mp:
        fail_at(mp, fail_index)
        with pytest.raises(Boom):
            quantize(tiny_ckpt, out, tiny_cfg, settings, tokenizer=tok)
    assert not out.exists() and (tmp_path / "m.partial").is_dir()
    with pytest.raises(QuantizeError, match="--resume"):
        quantize(tiny_ckpt, out, tiny_cfg, settings, tokenizer=tok)
    quantize(tiny_ckpt, out, tiny_cfg, settings, tokenizer=tok, resume=True)
    assert dir_bytes(out) == dir_bytes(models[name])


def test_resume_redoes_damaged_or_unrecorded_layers(models, tiny_cfg, tiny_ckpt, tmp_path,
                                                    monkeypatch, caplog):
    out, partial = tmp_path / "m", tmp_path / "m.partial"
    with monkeypatch.context() as mp:
        fail_at(mp, 20)                                 # in layer 1 (files 14..25)
        with pytest.raises(Boom):
            quantize(tiny_ckpt, out, tiny_cfg, QuantSettings(4))
    assert sorted(p.name for p in partial.glob("*.done.json")) == ["global.done.json",
                                                                   "layer_00.done.json"]
    path = partial / "layer_00.experts.bin"
    data = bytearray(path.read_bytes())
    data[5000] ^= 0xFF
    path.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, logger="quant")
    quantize(tiny_ckpt, out, tiny_cfg, QuantSettings(4), resume=True)
    assert "layer_00: tensor transformer/decoder_layer_0/" in caplog.text
    assert "1 of 3 units complete" in caplog.text
    assert dir_bytes(out) == dir_bytes(models["int4"])


def test_resume_after_kill_during_publish(models, tiny_cfg, tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "m"
    real = qq._remove_leftovers
    calls = []

    def remove(partial, patterns):   # publishing: dies after the first record is deleted
        if (partial / MANIFEST).exists() and any(p.endswith(".done.json") for p in patterns):
            first = sorted(partial.glob("*.done.json"))[0]
            first.unlink()
            calls.append(first.name)
            raise Boom("killed while publishing")
        real(partial, patterns)
    monkeypatch.setattr(qq, "_remove_leftovers", remove)
    with pytest.raises(Boom):
        quantize(tiny_ckpt, out, tiny_cfg, QuantSettings(4))
    monkeypatch.setattr(qq, "_remove_leftovers", real)
    assert calls == ["global.done.json"] and (tmp_path / "m.partial" / MANIFEST).is_file()
    quantize(tiny_ckpt, out, tiny_cfg, QuantSettings(4), resume=True)
    assert dir_bytes(out) == dir_bytes(models["int4"])


def test_resume_of_a_finished_directory_is_a_no_op(models, tiny_cfg, tiny_ckpt, tmp_path):
    """Killed after the final rename: --resume finds OUT complete and succeeds."""
    import shutil
    out = tmp_path / "m"
    shutil.copytree(models["int4"], out)
    before = dir_bytes(out)
    manifest = quantize(tiny_ckpt, out, tiny_cfg, QuantSettings(4), resume=True)
    assert manifest["quant"] == {"bits": 4, "group_size": None, "attention": "int8",
                                 "int4_levels": None, "row_pad": ROW_PAD, "tiles": False,
                                 "attention_tiles": False}
    assert dir_bytes(out) == before
    with pytest.raises(QuantizeError, match="already exists with other settings"):
        quantize(tiny_ckpt, out, tiny_cfg, QuantSettings(4, 32), resume=True)
    with pytest.raises(QuantizeError, match="output directory already exists"):
        quantize(tiny_ckpt, out, tiny_cfg, QuantSettings(4))


def test_resume_with_other_settings_is_refused(tiny_cfg, tiny_ckpt, tmp_path, monkeypatch):
    with monkeypatch.context() as mp:
        fail_at(mp, 14)
        with pytest.raises(Boom):
            quantize(tiny_ckpt, tmp_path / "m", tiny_cfg, QuantSettings(4))
    with pytest.raises(QuantizeError, match="other settings"):
        quantize(tiny_ckpt, tmp_path / "m", tiny_cfg, QuantSettings(4, 32), resume=True)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import quant.pipeline as qq
    real = qq.write_record
    def slow(*args):            # widen the window between records so the kill lands mid-run
        real(*args)
        time.sleep(0.5)
    qq.write_record = slow
    from lowmem.quantize import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_then_resume_is_byte_identical(models, tiny_ckpt, tmp_path):
    out = tmp_path / "m"
    args = ["--checkpoint", str(tiny_ckpt), "--out", str(out), "--bits", "8", "--preset",
            "tiny", "--tokenizer", str(TOKENIZER)]
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], cwd=REPO,
                            stderr=subprocess.DEVNULL)
    record = tmp_path / "m.partial" / "layer_00.done.json"
    deadline = time.monotonic() + 120
    while not record.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert record.exists() and not out.exists()
    assert main([*args, "--resume"]) == 0
    assert dir_bytes(out) == dir_bytes(models["int8-tiles"])


# --- the command line -------------------------------------------------------------

def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def test_verify(models, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(["--verify", str(models["int4"])]) == 0
    bad = tmp_path / "bad"
    shutil.copytree(models["int4"], bad)
    model = PackedModel.open(bad)
    entry = next(e for e in model.entries if e.name == expert_name(0, "up", 2) + ".values")
    del model
    flip_byte(bad / entry.file, entry.offset + 17)
    caplog.clear()
    assert main(["--verify", str(bad)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and entry.name in errors[0] and "1 bad tensor" in errors[0]


def run_cli(*args, check_one_line=True):
    proc = subprocess.run([sys.executable, "-m", "lowmem.quantize", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    if check_one_line:
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr


def test_cli_missing_checkpoint_file(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    (ckpt / "tensor00017_000").unlink()
    code, err = run_cli("--checkpoint", str(ckpt), "--out", str(tmp_path / "m"), "--bits", "8",
                        "--preset", "tiny")
    assert code == 2 and "tensor00017_000: file not found" in err
    assert not (tmp_path / "m.partial").exists()


def test_cli_not_a_tokenizer(tiny_ckpt, tmp_path):
    tok = tmp_path / "tokenizer.model"
    tok.write_text("hello, not a model\n")
    code, err = run_cli("--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "m"),
                        "--bits", "4", "--preset", "tiny", "--tokenizer", str(tok))
    assert code == 2 and "expected a SentencePiece model" in err and str(tok) in err


def _main_error(caplog, argv) -> str:
    caplog.clear()
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    return errors[0]


def test_cli_bad_inputs(tiny_ckpt, tmp_path, caplog, monkeypatch):
    base = ["--checkpoint", str(tiny_ckpt), "--preset", "tiny"]
    out = tmp_path / "m"
    msg = _main_error(caplog, [*base, "--out", str(out), "--bits", "4", "--group-size", "96"])
    assert "group size 96 does not divide" in msg
    msg = _main_error(caplog, [*base, "--out", str(out), "--bits", "8", "--group-size", "32"])
    assert "--group-size applies to --bits 4" in msg
    msg = _main_error(caplog, [*base, "--out", str(out), "--bits", "8", "--int4-levels",
                               "uniform"])
    assert "--int4-levels applies to --bits 4" in msg
    msg = _main_error(caplog, [*base, "--out", str(out), "--bits", "4", "--group-size",
                               "channel", "--int4-levels", "student-t"])
    assert "--int4-levels student-t needs groups" in msg
    out.mkdir()
    msg = _main_error(caplog, [*base, "--out", str(out), "--bits", "8"])
    assert "already exists" in msg and str(out) in msg
    out.rmdir()
    (tmp_path / "m.partial").mkdir()
    msg = _main_error(caplog, [*base, "--out", str(out), "--bits", "8"])
    assert "--resume" in msg
    (tmp_path / "m.partial").rmdir()
    usage = type("Usage", (), {"free": 10_000, "total": 10**9, "used": 0})
    with monkeypatch.context() as mp:
        mp.setattr(qq.shutil, "disk_usage", lambda path: usage)
        msg = _main_error(caplog, [*base, "--out", str(out), "--bits", "8"])
    assert "not enough free disk space" in msg and "0.00 GB free" in msg
    msg = _main_error(caplog, ["--checkpoint", str(tiny_ckpt), "--config", "{\"emb_size\": 3",
                               "--out", str(out), "--bits", "8"])
    assert "expected a JSON object" in msg
    assert not out.exists() and not (tmp_path / "m.partial").exists()


def test_cli_group_size_default_and_per_channel(tiny_ckpt, tmp_path, capsys):
    """int4 without --group-size takes the default groups of 32; 'channel' asks for
    per-channel scales; anything else is one line and exit 2, nothing written."""
    base = ["--checkpoint", str(tiny_ckpt), "--preset", "tiny", "--bits", "4", "-q"]
    assert main([*base, "--out", str(tmp_path / "d")]) == 0
    assert main([*base, "--out", str(tmp_path / "c"), "--group-size", "channel"]) == 0
    d = json.loads((tmp_path / "d" / MANIFEST).read_text())
    c = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert d["quant"]["group_size"] == qq.DEFAULT_GROUP_SIZE == 32
    assert c["quant"]["group_size"] is None
    assert PackedModel.open(tmp_path / "c").expert(0, 0).down.group_size == 256    # K of down
    with pytest.raises(SystemExit) as exc:
        main([*base, "--out", str(tmp_path / "x"), "--group-size", "chanel"])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()
    assert "expected a whole number >= 1 or 'channel', found 'chanel'" in capsys.readouterr().err


def test_cli_checkpoint_of_wrong_shape(tiny_ckpt, tmp_path, caplog):
    """Files exist but hold another config's shapes: one line naming the file, exit 2."""
    cfg = json.dumps({"emb_size": 64, "vocab_size": 256, "num_layers": 2, "num_q_heads": 4,
                      "num_kv_heads": 2, "key_size": 16, "ffn_size": 256})
    msg = _main_error(caplog, ["--checkpoint", str(tiny_ckpt), "--config", cfg,
                               "--out", str(tmp_path / "m"), "--bits", "8"])
    assert "tensor00000_000" in msg and "expected array float32[256, 64]" in msg


def test_cli_summary(tiny_ckpt, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(["--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "m"), "--bits", "4",
                 "--preset", "tiny"]) == 0
    text = caplog.text
    assert "layer_01:" in text and "100% done" in text and "KB out" in text
    assert "down            worst 0.0" in text


def test_help_mentions_every_option():
    proc = subprocess.run([sys.executable, "-m", "lowmem.quantize", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for opt in ("--checkpoint", "--out", "--bits", "--group-size", "--attention", "--tokenizer",
                "--preset", "--config", "--resume", "--verify"):
        assert opt in proc.stdout


# --- bounded memory -----------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from quant.config import GrokConfig
    from quant.packed import QuantSettings
    from quant.pipeline import quantize_checkpoint
    cfg = GrokConfig.from_json(sys.argv[3])
    quantize_checkpoint(sys.argv[1], sys.argv[2], cfg, QuantSettings(4))
    print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def test_peak_memory_does_not_grow_with_layers(tmp_path):
    """A 6-layer model peaks like a 2-layer one: memory is per tensor, not per model.

    Width 1024 / ffn 4096: one expert file is 32 MB of int8 (96 MB per layer), so
    anything kept per layer would add ~400 MB over 4 more layers.
    """
    from quant.config import preset
    from quant.synthetic import write_checkpoint
    peaks = {}
    for layers in (2, 6):
        cfg = preset("tiny", emb_size=1024, ffn_size=4096, num_q_heads=8, num_kv_heads=2,
                     key_size=128, vocab_size=1024, num_layers=layers)
        ckpt = write_checkpoint(cfg, tmp_path / f"ckpt{layers}")
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(ckpt),
                               str(tmp_path / f"out{layers}"), cfg.to_json()], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        peaks[layers] = json.loads(proc.stdout)["peak_kb"] / 1024
        shutil.rmtree(ckpt)
    assert peaks[6] < peaks[2] + 32, peaks


def test_cli_int4_levels_default_and_uniform(tiny_ckpt, tmp_path):
    """--bits 4 writes the Student-t level table by default; --int4-levels uniform none."""
    from quant.int4_levels import STUDENT_T_LEVELS
    base = ["--checkpoint", str(tiny_ckpt), "--preset", "tiny", "--bits", "4", "-q"]
    assert main([*base, "--out", str(tmp_path / "lv")]) == 0
    assert main([*base, "--out", str(tmp_path / "u"), "--int4-levels", "uniform"]) == 0
    lv = json.loads((tmp_path / "lv" / "manifest.json").read_text())
    u = json.loads((tmp_path / "u" / "manifest.json").read_text())
    assert lv["quant"] == {"bits": 4, "group_size": 32, "attention": "int8",
                           "int4_levels": list(STUDENT_T_LEVELS), "row_pad": 0, "tiles": True,
                           "attention_tiles": True}
    assert u["quant"]["int4_levels"] is None and "levels" not in u["int4_method"]
    assert lv["int4_method"]["levels"] == list(STUDENT_T_LEVELS)
    assert lv["quant_error_summary"]["gate"]["mean"] < u["quant_error_summary"]["gate"]["mean"]


def test_cli_row_pad_zero_writes_dense_rows(models, tiny_ckpt, tmp_path, caplog):
    """--layout rows --row-pad 0 stores the rows dense (format 3's layout) with the same
    weights as padded rows; a value that is not a multiple of 64 is one line, exit 2."""
    base = ["--checkpoint", str(tiny_ckpt), "--preset", "tiny", "--bits", "8", "-q",
            "--layout", "rows"]
    assert main([*base, "--out", str(tmp_path / "dense"), "--row-pad", "0"]) == 0
    dense, padded = PackedModel.open(tmp_path / "dense"), PackedModel.open(models["int8"])
    assert dense.settings.row_pad == 0 and padded.settings.row_pad == ROW_PAD
    a, b = dense.expert(1, 3), padded.expert(1, 3)
    for role in ("gate", "up", "down"):
        wa, wb = getattr(a, role), getattr(b, role)
        assert wa.values.shape == wa.shape and wb.values.shape[1] == wb.shape[1] + ROW_PAD
        assert bits_equal(wa.values, wb.values[:, :wb.shape[1]])
    assert a.nbytes < b.nbytes
    msg = _main_error(caplog, [*base, "--out", str(tmp_path / "x"), "--row-pad", "100"])
    assert msg.endswith("--row-pad: expected a multiple of 64 in [0, 4096), found 100")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_cli_default_layout_is_tiles(tiny_ckpt, tmp_path, caplog):
    """The default --layout tiles stores each expert's values in 32 x 64 tiles: the row
    layout's bytes in tile order (checked with docs/FORMAT.md section 7's offset
    formula), so the same weights; --row-pad needs --layout rows (one line, exit 2)."""
    base = ["--checkpoint", str(tiny_ckpt), "--preset", "tiny", "--bits", "4", "-q"]
    assert main([*base, "--out", str(tmp_path / "t")]) == 0
    assert main([*base, "--out", str(tmp_path / "r"), "--layout", "rows", "--row-pad", "0"]) == 0
    tiled, rows = PackedModel.open(tmp_path / "t"), PackedModel.open(tmp_path / "r")
    assert tiled.settings.tiles and not rows.settings.tiles and tiled.settings.row_pad == 0
    for layer, expert in ((0, 5), (1, 2)):
        a, b = tiled.expert(layer, expert), rows.expert(layer, expert)
        for role in ("gate", "up", "down"):
            wa, wb = getattr(a, role), getattr(b, role)
            r, n = wb.values.shape                              # (K/2, N) packed int4
            kk, nn = np.meshgrid(np.arange(2 * r), np.arange(n), indexing="ij")  # weights
            flat = (((kk // 32) * (n // 64) + nn // 64) * 1024 + (kk % 32 // 4) * 128
                    + (nn % 64 // 32) * 64 + (nn % 16) * 4 + kk % 4)
            assert wa.tiled and wa.values.shape == (r, n)
            got = (np.asarray(wa.values).reshape(-1)[flat] >> (4 * (nn % 32 // 16))) & 15
            assert bits_equal(got, (np.asarray(wb.values)[kk // 2, nn] >> (4 * (kk % 2))) & 15)
            assert not bits_equal(wa.values, wb.values)          # the bytes moved
            assert bits_equal(dequantize_q(wa), dequantize_q(wb))
    msg = _main_error(caplog, [*base, "--out", str(tmp_path / "x"), "--row-pad", "64"])
    assert msg.endswith("--row-pad 64 applies to --layout rows (tiles have no rows to pad)")
    assert not (tmp_path / "x").exists()
