"""The memory planner: exact agreement with what the engine places and moves, and
Grok-1's figures from SPEC.md section 6."""
import subprocess
import sys

import pytest

from lowmem import plan as PL
from lowmem.cli import CLIError, parse_size
from lowmem.api import load
from quant.config import preset
from lowmem.profiler import run_profile
from quant.packed import PackedModel, QuantSettings
from quant.pipeline import quantize_checkpoint

GIB = 1 << 30


@pytest.fixture(scope="module")
def int4_dir(tiny_cfg, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "int4"
    quantize_checkpoint(tiny_ckpt, out, tiny_cfg, QuantSettings(4, 32, attention="bf16"))
    return out


@pytest.fixture(scope="module")
def profiled(int4_dir):
    """A device-backend engine on CPU with a 3.5-block budget, after a profiling run."""
    block = PackedModel.open(int4_dir).expert_block_nbytes
    budget_gb = 3.5 * block / GIB
    rt = load(int4_dir, backend="device", expert_cache_gb=budget_gb, context=100,
              prefetch=False, profile=True)
    report = run_profile(rt.engine, [7, 8, 9, 10, 11, 12], 5, warmup_tokens=1)
    return rt.engine, report, budget_gb


def test_plan_agrees_with_the_engine_exactly(profiled):
    engine, report, budget_gb = profiled
    plan = PL.make_plan(engine.cfg, engine.model.settings, device_memory=0, context=100,
                        expert_cache_bytes=int(budget_gb * GIB),
                        precision=engine.options.precision)
    assert plan.resident_total == engine.placed_resident_bytes
    assert plan.cache_slots == engine.experts.cache.capacity == 3
    itemsize = {"fp32": 4, "bf16": 2}[engine.options.precision]
    kv = (engine.cfg.num_layers * 2 * engine.cache_len * engine.cfg.num_kv_heads
          * engine.cfg.key_size * itemsize)
    assert plan.kv_cache == kv == engine.kv_cache_bytes == report["memory"]["kv_cache_bytes"]
    t = report["traffic"]
    assert t["misses"] > 0 and t["prefetches"] == 0
    assert plan.expert_block_nbytes == t["bytes_moved"] // t["misses"]
    for rec in report["tokens"]:
        assert rec["bytes_moved"] == rec["misses"] * plan.expert_block_nbytes


def test_derived_budget_gives_the_engines_slots(profiled):
    engine, _, _ = profiled
    cfg, settings = engine.cfg, engine.model.settings
    base = PL.make_plan(cfg, settings, device_memory=0, context=100, headroom=0)
    block = base.expert_block_nbytes
    memory = base.resident_total + base.kv_cache + 1000 + 5 * block + block // 2
    plan = PL.make_plan(cfg, settings, memory, context=100, headroom=1000)
    assert plan.cache_slots == 5 and plan.fits
    assert plan.device_used == base.resident_total + base.kv_cache + 5 * block
    tight = PL.make_plan(cfg, settings, memory - 4 * block, context=100, headroom=1000)
    assert tight.cache_slots == 1 and not tight.fits


def test_resident_kinds_are_the_layout_bytes(tiny_cfg):
    settings = QuantSettings(8)
    kinds = PL.resident_bytes_by_kind(tiny_cfg, settings)
    d, v, layers = tiny_cfg.emb_size, tiny_cfg.vocab_size, tiny_cfg.num_layers
    assert kinds["embedding"] == v * d * 2                               # bf16
    assert kinds["router"] == layers * d * tiny_cfg.num_experts * 4      # fp32
    assert kinds["norms"] == (4 * layers + 1) * d * 4
    q, kv = tiny_cfg.q_width, tiny_cfg.kv_width
    values = layers * (d * q + 2 * d * kv + q * d)                       # int8 q, k, v, o
    scales = layers * 2 * (q + 2 * kv + tiny_cfg.scale_row_blocks * d)   # bf16
    assert kinds["attention"] == values + scales


@pytest.mark.parametrize("bits, slots, floor", [(8, 112, 1.55), (4, 225, 0.78)])
def test_grok1_matches_spec_section_6(bits, slots, floor):
    plan = PL.make_plan(preset("grok-1"), QuantSettings(bits), parse_size("80GB"),
                        context=8192, link_gbps=50.0, precision="bf16")  # SPEC: the release's
    assert plan.resident_params == pytest.approx(6.45e9, rel=0.01)        # "about 6.4B"
    assert plan.resident["attention"] + plan.resident["embedding"] == pytest.approx(
        7.25e9, rel=0.01)                                                 # int8 attn + bf16 emb
    assert plan.kv_cache == 64 * 8192 * 8 * 128 * 2 * 2                   # 2.1 GB
    assert plan.cache_slots == slots                                      # "roughly 100 / 200"
    zero_hit = plan.decode[0]
    assert zero_hit.hit_rate == 0.0
    assert zero_hit.seconds_per_token == pytest.approx(floor, rel=0.01)
    assert zero_hit.bytes_per_token == 64 * 2 * plan.expert_block_nbytes
    assert plan.host_expert_bytes == 512 * plan.expert_block_nbytes


def test_decode_estimate_scales_with_misses():
    cfg = preset("grok-1")
    full = PL.decode_estimate(cfg, 1000, 0.0, 1.0)
    half = PL.decode_estimate(cfg, 1000, 0.5, 1.0)
    assert full.bytes_per_token == 64 * 2 * 1000 and half.bytes_per_token == 64 * 1000
    assert half.seconds_per_token == pytest.approx(full.seconds_per_token / 2)
    with_compute = PL.decode_estimate(cfg, 1000, 0.0, 1.0, device_read=2e9, device_gbps=2.0)
    assert with_compute.compute_s == pytest.approx(1.0)
    assert PL.distinct_experts(cfg, 1) == 2
    assert PL.distinct_experts(cfg, 4) == pytest.approx(8 * (1 - 0.75 ** 4))


def test_parse_size():
    """plan re-exports the one size parser of lowmem.cli."""
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("1.5 gb") == 1_500_000_000
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("7") == 7 * 10**9
    for bad in ("abc", "80XB", "", "-3GB"):
        with pytest.raises(CLIError, match="expected a size like 80GB"):
            parse_size(bad, "--device-memory")


def test_cli_bad_input_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "lowmem.plan", "--device-memory", "abc"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: argument --device-memory: expected a size like 80GB")
    assert proc.stdout == ""


@pytest.mark.parametrize("argv, message", [
    (["--bits", "5"], "argument --bits: invalid choice: 5"),
    (["--hit-rate", "1.5"], "--hit-rate: expected a finite number in [0, 1]"),
    (["--context", "x"], "--context: expected a whole number"),
    (["--link-gbps", "0"], "--link-gbps: expected a finite number > 0"),
])
def test_cli_rejects_bad_settings(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        PL.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_cli_prints_plan_for_a_model_dir(int4_dir, capsys):
    assert PL.main(["--model", str(int4_dir), "--device-memory", "3GiB", "--context", "100"]) == 0
    out = capsys.readouterr().out
    assert "int4 experts (group 32), bf16 attention" in out and "fits: yes" in out
    assert PL.main(["--json", "--bits", "8"]) == 0
    import json
    assert json.loads(capsys.readouterr().out)["cache_slots"] == 109   # fp32 KV: 4.3 GB


def test_grok1_fits_80_and_141_gb_with_the_measured_headroom():
    """The steps compiled at Grok-1 shapes (abstract, on CPU) leave room for the cache."""
    from lowmem.step_memory import measured_headroom, step_temporaries
    cfg = preset("grok-1")
    for bits in (8, 4):
        settings = QuantSettings(bits)
        temps = step_temporaries(cfg, settings, "fp32", 8192)
        headroom = measured_headroom(cfg, settings, "fp32", 8192)
        assert max(temps.values()) < headroom < 4 * 2**30
        for memory in (80e9, 141e9):
            plan = PL.make_plan(cfg, settings, int(memory), context=8192, headroom=headroom)
            assert plan.fits and plan.cache_slots >= cfg.num_selected_experts, (bits, memory)
            assert plan.device_used + headroom <= memory


def test_host_output_table_is_what_the_host_backend_builds(int4_dir, tiny_cfg):
    """The plan's RAM for the int8 output table equals the table the host backend
    builds for an int4 model by default; an int8 model gets none."""
    model = PackedModel.open(int4_dir)
    rt = load(int4_dir, backend="host")
    try:
        table = rt.engine.backend.output_q
        built = table.values.nbytes + table.scales.nbytes
    finally:
        rt.close()
    plan = PL.make_plan(tiny_cfg, model.settings, 8 * GIB)
    assert plan.host_output_table == built > 0
    assert PL.make_plan(tiny_cfg, QuantSettings(8), 8 * GIB).host_output_table == 0
    assert "int8 output table in RAM" in PL.format_plan(plan)
