"""Every CLI: bad arguments are refused up front (exit 2, one line, nothing written),
options are documented with their defaults, and the tools speak one language.

Bad input is driven in-process through each tool's ``main(argv)`` (argparse's
own errors arrive as SystemExit(2)), and through ``python -m lowmem ...`` for
what only a real process shows (undecodable argv bytes, the dispatcher).
"""
import inspect
import subprocess
import sys

import pytest

from lowmem import __main__ as dispatcher
from lowmem import cli
from lowmem import eval as EV
from lowmem import serve as SV
from lowmem import generate as G
from lowmem import plan as PL
from lowmem import profile as P
from lowmem import quantize as Q
from lowmem import reference as R
from lowmem.api import Runtime
from quant.packed import QuantSettings
from quant.pipeline import quantize_checkpoint

from helpers import memlock_allows

TOOLS = {"generate": G, "profile": P, "plan": PL, "quantize": Q, "reference": R, "eval": EV, "serve": SV}


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg, tiny_ckpt, tmp_path_factory):
    """The tiny preset (sequence_len 128, vocabulary 512), int8, no tokenizer."""
    out = tmp_path_factory.mktemp("cli") / "int8"
    quantize_checkpoint(tiny_ckpt, out, tiny_cfg, QuantSettings(8))
    return out


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def assert_refused(capsys, tmp_path, main, argv, *words):
    """exit 2, exactly one line on stderr naming the problem, no stdout, no new files."""
    before = sorted(tmp_path.rglob("*"))
    assert _exit_code(main, argv) == 2, argv
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert "Traceback" not in err and out == "", (argv, out)
    for w in words:
        assert w in lines[0], (argv, lines[0])
    assert sorted(tmp_path.rglob("*")) == before, argv


HUGE = "9" * 400

GENERATE_BAD = [
    (["-n", "0"], "--max-new-tokens", ">= 1"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["-n", "x"], "whole number"),
    (["--context", "0"], "--context", ">= 1"),
    (["--context", "1e9"], "--context", "whole number"),
    (["--context", "1000000"], "--context 1000000", "sequence length 1024"),
    (["--seed", str(10**23)], "--seed", "4294967295"),
    (["--seed", "-1"], "--seed"),
    (["--expert-cache-gb", "inf"], "--expert-cache-gb"),
    (["--expert-cache-gb", "nan"], "--expert-cache-gb"),
    (["--expert-cache-gb", "-1"], "--expert-cache-gb"),
    (["--expert-cache-gb", HUGE], "--expert-cache-gb", "below 1 PiB"),
    (["--temperature", "nan"], "--temperature", "finite"),
    (["--temp", "-0.5"], "--temperature"),
    (["--top-p", "0"], "--top-p", "(0, 1]"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--stop", ""], "--stop", "non-empty"),
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "\udcff\udcfe"], "--prompt", "UTF-8"),
    (["--prompt-ids", "5,x"], "--prompt-ids", "integers"),
    (["--prompt-ids", ","], "--prompt-ids", "at least one"),
    (["-p", "a", "--prompt-ids", "5"], "not allowed with"),
    (["--backend", "gpu"], "--backend", "invalid choice"),
    (["--cache-policy", "fifo"], "--cache-policy"),
    (["--staging-workers", "0"], "--staging-workers", "in [1, 64]"),
    (["--staging-workers", "two"], "--staging-workers", "whole number"),
    (["-v", "-q"], "not allowed with"),
    (["--no-such-option"], "unrecognized"),
]


@pytest.mark.parametrize("argv_words", GENERATE_BAD, ids=lambda c: " ".join(c[0])[:40])
def test_generate_refuses_before_building_anything(capsys, tmp_path, argv_words):
    """Default model: every check runs before the synthetic model is written."""
    argv, *words = argv_words
    assert_refused(capsys, tmp_path, G.main, [*argv, "--workdir", str(tmp_path / "w")], *words)


def test_generate_prompt_file_errors(capsys, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    work = ["--workdir", str(tmp_path / "w")]
    assert_refused(capsys, tmp_path, G.main, ["--prompt-file", str(bad), *work],
                   "latin1.txt", "UTF-8", "0xe9 at offset 3")
    assert_refused(capsys, tmp_path, G.main, ["--prompt-file", str(tmp_path / "nope"), *work],
                   "nope", "cannot read")


def test_generate_checks_against_the_model(capsys, tmp_path, tiny_model):
    m = ["--model", str(tiny_model)]
    assert_refused(capsys, tmp_path, G.main, [*m, "--context", "129"], "sequence length 128")
    assert_refused(capsys, tmp_path, G.main, [*m, "-p", "hello"], "no tokenizer.model",
                   "--prompt-ids")
    assert_refused(capsys, tmp_path, G.main, [*m, "--prompt-ids", "5,999"],
                   "outside the vocabulary")
    assert_refused(capsys, tmp_path, G.main, ["--model", str(tmp_path / "missing")], "missing")


def test_generate_mlock(capsys, tmp_path, tiny_model, monkeypatch):
    """--mlock locks the model's files before generating; a refused lock is one line, exit 2."""
    from quant import hostmem, packed
    calls = []
    real = packed.PackedModel.lock
    monkeypatch.setattr(packed.PackedModel, "lock", lambda self: calls.append(self) or real(self))
    argv = ["-m", str(tiny_model), "--prompt-ids", "5,17", "-n", "2", "--backend", "host", "-q"]
    if not memlock_allows(sum(f.stat().st_size for f in tiny_model.glob("*.bin"))):
        pytest.skip("the memlock limit (ulimit -l) is below the tiny model's size")
    assert G.main([*argv, "--mlock"]) == 0 and len(calls) == 1
    assert G.main(argv) == 0 and len(calls) == 1                  # off by default
    capsys.readouterr()
    monkeypatch.setattr(hostmem, "_mlock_fn", lambda name="mlock": None)
    assert_refused(capsys, tmp_path, G.main, [*argv, "--mlock"], "cannot lock in memory")


def test_generate_no_mmap(capsys, tmp_path, tiny_model, monkeypatch):
    """--no-mmap reads the files into RAM and generates the same tokens; too little RAM
    is one line, exit 2."""
    import psutil
    from quant import packed
    calls = []
    real = packed.PackedModel.read_into_memory
    monkeypatch.setattr(packed.PackedModel, "read_into_memory",
                        lambda self: calls.append(real(self)) or calls[-1])
    argv = ["-m", str(tiny_model), "--prompt-ids", "5,17", "-n", "3", "--backend", "host",
            "--ignore-eos"]
    assert G.main(argv) == 0 and calls == []                      # mapped by default
    mapped = capsys.readouterr().out
    assert G.main([*argv, "--no-mmap"]) == 0
    assert calls == [sum(f.stat().st_size for f in tiny_model.glob("*.bin"))]
    assert capsys.readouterr().out == mapped
    vm = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm._replace(available=10 ** 6))
    assert_refused(capsys, tmp_path, G.main, [*argv, "--no-mmap"], "needs", "GB of RAM",
                   "--no-mmap", str(tiny_model))


def test_generate_talks_on_stderr_and_q_silences(capsys, tiny_model):
    """Token ids out on stdout; the backend line and the closing rates on stderr."""
    argv = ["-m", str(tiny_model), "--prompt-ids", "5,17,99", "-n", "4", "--ignore-eos",
            "--backend", "host", "--expert-cache-gb", "1"]
    assert G.main(argv) == 0
    out, err = capsys.readouterr()
    ids = [int(t) for t in out.strip().split(",")]
    assert len(ids) == 4 and all(0 <= t < 512 for t in ids)
    assert "backend host -> host: numba kernels" in err
    assert "--expert-cache-gb is ignored by the host backend" in err
    assert "prompt: 3 tokens in" in err and "decode: 3 tokens in" in err and "tok/s" in err
    assert G.main([*argv[:-2], "-q"]) == 0
    out_q, err_q = capsys.readouterr()
    assert out_q == out and err_q == ""


PROFILE_BAD = [
    (["--max-new-tokens", "1"], "--max-new-tokens", ">= 2"),
    (["--warmup-tokens", "-1"], "--warmup-tokens"),
    (["--overhead-check", "0"], "--overhead-check"),
    (["--expert-cache-gb", "inf"], "--expert-cache-gb"),
    (["--context", "0"], "--context"),
    (["--prompt-ids", "5,x"], "--prompt-ids"),
]


@pytest.mark.parametrize("argv_words", PROFILE_BAD, ids=lambda c: " ".join(c[0])[:40])
def test_profile_refuses(capsys, tmp_path, argv_words):
    argv, *words = argv_words
    assert_refused(capsys, tmp_path, P.main, [*argv, "--workdir", str(tmp_path / "w")], *words)


def test_profile_output_directories_are_checked_first(capsys, tmp_path, tiny_model):
    m = ["--model", str(tiny_model), "--prompt-ids", "5,17"]
    assert_refused(capsys, tmp_path, P.main, [*m, "--out", str(tmp_path / "no" / "r.json")],
                   "--out", "does not exist")
    assert_refused(capsys, tmp_path, P.main, [*m, "--png", str(tmp_path / "no" / "r.png")],
                   "--png", "does not exist")
    assert_refused(capsys, tmp_path, P.main, [*m, "--out", str(tmp_path)], "is a directory")


PLAN_BAD = [
    (["--expert-cache-gb", "inf"], "--expert-cache-gb"),
    (["--expert-cache-gb", "-2"], "--expert-cache-gb"),
    (["--device-memory", HUGE], "--device-memory", "below 1 PiB"),
    (["--device-memory", "80XB"], "--device-memory", "80GiB"),
    (["--headroom", "-1GB"], "--headroom"),
    (["--link-gbps", "nan"], "--link-gbps", "finite number > 0"),
    (["--link-gbps", "0"], "--link-gbps"),
    (["--device-gbps", "-5"], "--device-gbps"),
    (["--context", "0"], "--context"),
    (["--context", "8193"], "sequence length 8192"),
    (["--batch", "0"], "--batch"),
    (["--hit-rate", "1.5"], "--hit-rate"),
    (["--bits", "5"], "--bits"),
    (["--group-size", "0"], "--group-size"),
    (["--bits", "4", "--group-size", "96"], "96"),
    (["--config", '{"emb_size": "x"}'], "--config"),
    (["--config", "{not json"], "--config", "JSON object"),
    (["--config", "/nonexistent/cfg.json"], "cannot read"),
    (["--preset", "tiny", "--config", "{}"], "not allowed with"),
]


@pytest.mark.parametrize("argv_words", PLAN_BAD, ids=lambda c: " ".join(c[0])[:40])
def test_plan_refuses(capsys, tmp_path, argv_words):
    argv, *words = argv_words
    assert_refused(capsys, tmp_path, PL.main, argv, *words)


def test_plan_plot_directory_checked_first(capsys, tmp_path):
    assert_refused(capsys, tmp_path, PL.main, ["--plot", str(tmp_path / "no" / "p.png")],
                   "--plot", "does not exist")


def test_quantize_refuses(capsys, tmp_path, tiny_ckpt):
    base = ["--checkpoint", str(tiny_ckpt), "--preset", "tiny"]
    for argv, word in [
        ([*base, "--bits", "8", "--out", str(tmp_path / "no" / "m")], "does not exist"),
        ([*base, "--bits", "5", "--out", str(tmp_path / "m")], "--bits"),
        ([*base, "--bits", "4", "--group-size", "0", "--out", str(tmp_path / "m")], "--group-size"),
        ([*base, "--bits", "4"], "missing --out"),
        (["--preset", "nope"], "--preset"),
    ]:
        assert_refused(capsys, tmp_path, Q.main, argv, word)


def test_reference_refuses(capsys, tmp_path, tiny_ckpt):
    ck = ["--checkpoint", str(tiny_ckpt), "--preset", "tiny"]
    assert_refused(capsys, tmp_path, R.main, [*ck, "--prompt-ids", "5,x"], "--prompt-ids")
    assert_refused(capsys, tmp_path, R.main, [*ck, "--prompt-ids", "5,512"], "[0, 512)")
    assert_refused(capsys, tmp_path, R.main, [*ck, "--mode", "fp8"], "--mode")
    assert_refused(capsys, tmp_path, R.main, ["--preset", "tiny"], "--checkpoint")
    assert_refused(capsys, tmp_path, R.main, ["--checkpoint", str(tiny_ckpt)],
                   "tensor00000_000")                     # default preset grok-1: wrong shapes


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lowmem", *args], cwd=cwd, capture_output=True,
                          timeout=300)


def test_subprocess_bad_bytes_and_numbers(tmp_path):
    """Undecodable argv bytes and out-of-range numbers through python -m lowmem."""
    for args, word in [((b"generate", b"--prompt", b"caf\xe9"), b"UTF-8"),
                       ((b"generate", b"--seed", str(10**23).encode()), b"--seed"),
                       ((b"plan", b"--device-memory", HUGE.encode()), b"--device-memory"),
                       ((b"bogus",), b"unknown command")]:
        proc = _run(*args, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and word in lines[0], proc.stderr
        assert proc.stdout == b"" and list(tmp_path.iterdir()) == []


def test_dispatcher_lists_every_command_and_forwards():
    proc = _run("--help", cwd=None)
    for name in TOOLS:
        assert name.encode() in proc.stdout
    assert set(dispatcher.COMMANDS) == set(TOOLS)
    proc = _run("plan", "--json", "--bits", "8", "--precision", "bf16", cwd=None)
    # 113: the quantizer's default layout (tiles, no row padding; 112 with padded rows)
    assert proc.returncode == 0 and b'"cache_slots": 113' in proc.stdout


def _parsers():
    return {name: mod.build_parser() for name, mod in TOOLS.items()}


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_every_option_documents_its_default(name):
    parser = _parsers()[name]
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = (action.help or "").lower()
        assert "default" in text or "required" in text, (name, action.option_strings)
    assert "`" not in parser.format_help()


def test_shared_options_mean_the_same_everywhere():
    """One definition: the same flags, defaults and help wherever a tool has them."""
    seen = {}
    for name, parser in _parsers().items():
        for action in parser._actions:
            for flag in action.option_strings:
                seen.setdefault(flag, []).append((name, action.default, action.help,
                                                  tuple(action.option_strings)))
    for flag in ("-m", "-p", "--prompt-file", "--temperature", "--context", "--backend",
                 "--expert-cache-gb", "--workdir", "-v", "-q", "--preset", "--config",
                 "--staging-workers"):
        variants = {(d, h, o) for _, d, h, o in seen[flag]}
        if flag == "--preset":
            variants = {v for v in variants if "--preset" in v[2]}
        assert len(variants) == 1 or flag in ("--expert-cache-gb", "--preset", "--config", "-m"), \
            (flag, seen[flag])
    for name in ("generate", "profile"):
        assert {"-m", "-p", "--prompt-file", "--prompt-ids", "-n"} <= {
            f for a in _parsers()[name]._actions for f in a.option_strings}


def test_output_table_option_maps_to_the_engine_field(capsys):
    """auto -> None (int8 for int4 models, chosen by the backend), bf16, int8 (and
    its shorthand --output-int8), int4 -> their names; anything else: exit 2."""
    for name in ("generate", "profile", "serve", "eval"):
        parser = _parsers()[name]
        base = ["-m", "x", "--prompt-ids", "1"] if name == "eval" else []
        for argv, want in (([], None), (["--output-table", "auto"], None),
                           (["--output-table", "bf16"], "bf16"), (["--output-table", "int8"], "int8"),
                           (["--output-table", "int4"], "int4"), (["--output-int8"], "int8")):
            assert cli.engine_kwargs(parser.parse_args(base + argv))["output_table"] == want, \
                (name, argv)
        for argv, want in (([], None), (["--activations", "fp32"], False),
                           (["--activations", "int8"], True), (["--act-int8"], True)):
            assert cli.engine_kwargs(parser.parse_args(base + argv))["act_int8"] is want, \
                (name, argv)
    with pytest.raises(SystemExit) as e:
        G.build_parser().parse_args(["--output-table", "int2"])
    assert e.value.code == 2 and "--output-table" in capsys.readouterr().err


def test_sampling_defaults_equal_in_cli_and_api():
    api = inspect.signature(Runtime.generate).parameters
    text = inspect.signature(Runtime.generate_text).parameters
    assert list(api) == list(text)
    args = G.build_parser().parse_args([])
    for key in ("max_new_tokens", "temperature", "top_p", "top_k", "seed"):
        assert api[key].default == getattr(args, key), key
        assert text[key].default == api[key].default
    assert args.temperature == 0.0 and args.max_new_tokens == 32


def test_size_parser():
    assert cli.parse_size("80GB") == 80 * 10**9
    assert cli.parse_size("80GiB") == 80 * 2**30
    assert cli.parse_size("512MB") == 512 * 10**6
    assert cli.parse_size("60", bare="gib") == 60 * 2**30
    assert cli.parse_size("2.5e-3GiB") == int(2.5e-3 * 2**30)
    for bad in ("inf", "nan", "-1GB", "1e999", HUGE, "80XB", ""):
        with pytest.raises(cli.CLIError):
            cli.parse_size(bad, "--x")


def test_plan_that_does_not_fit_gives_no_speed(capsys):
    assert PL.main(["--device-memory", "8GB", "--bits", "8"]) == 0
    out = capsys.readouterr().out
    assert "fits: NO" in out and "does not fit" in out
    assert "tokens/s" not in out and "s/token" not in out
    assert PL.main(["--device-memory", "8GB", "--bits", "8", "--json"]) == 0
    import json
    assert json.loads(capsys.readouterr().out)["decode"] == []


def test_plan_plot_is_a_png_of_both_bit_widths(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan.png"
    assert PL.main(["--plot", str(out), "-q"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.png"]
    plan = PL.plan_from_args(PL.build_parser().parse_args([]))
    int8, int4 = PL.memory_sweep(plan, 8), PL.memory_sweep(plan, 4)
    at80 = PL.PLOT_MEMORY_GB.index(80)
    assert int4[at80] < int8[at80]                       # half the bytes per miss
    assert int8[0] != int8[0] and int4[0] != int4[0]      # 8 GB: does not fit (nan)


def test_profile_png_beside_the_report(tmp_path, tiny_model, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.json"
    assert P.main(["-m", str(tiny_model), "--prompt-ids", "5,17,99", "-n", "3",
                   "--warmup-tokens", "1", "--out", str(out)]) == 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "figure written to" in capsys.readouterr().err
    report = __import__("json").loads(out.read_text())
    title = P._title(report)
    assert "int8 experts" in title and "decode" in title and "tok/s" in title


def test_prompt_sources(monkeypatch, tmp_path):
    """-p, --prompt-file PATH, --prompt-file - (stdin), --prompt-ids, and the default."""
    import io
    parse = G.build_parser().parse_args
    assert cli.read_prompt(parse([])) == cli.DEFAULT_PROMPT
    assert cli.read_prompt(parse(["-p", "naïve"])) == "naïve"
    f = tmp_path / "p.txt"
    f.write_bytes("日本語\n".encode())
    assert cli.read_prompt(parse(["--prompt-file", str(f)])) == "日本語\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin")))
    assert cli.read_prompt(parse(["--prompt-file", "-"])) == "from stdin"
    assert cli.read_prompt(parse(["--prompt-ids", "5, 17,99"])) == [5, 17, 99]
