"""The profiling command and the cache-policy simulators.

A profiling run on the tiny model must produce every reported field, account
for each step's wall time with its sections, and count expert bytes exactly:
with as many cache slots as a step needs (top-2) and prefetch off, no request
can hit (keys are (layer, expert), and each layer's two experts evict the
previous layer's), so every decode token moves layers * 2 blocks.
"""
import json

import pytest

from lowmem import expert_cache as C
from lowmem import profile as P
from quant.packed import PackedModel, QuantSettings
from quant.pipeline import quantize_checkpoint

GIB = 1 << 30


@pytest.fixture(scope="module")
def int8_dir(tiny_cfg, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "int8"
    quantize_checkpoint(tiny_ckpt, out, tiny_cfg, QuantSettings(8))
    return out


def _profile(model_dir, tmp_path, *extra):
    out = tmp_path / "report.json"
    rc = P.main(["--model", str(model_dir), "--prompt-ids", "5,17,99,3,250", "--max-new-tokens",
                 "5", "--warmup-tokens", "1", "--out", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def device_report(int8_dir, tmp_path_factory):
    block = PackedModel.open(int8_dir).expert_block_nbytes
    gb = 2.5 * block / GIB                                   # 2 slots: exactly one step's need
    return _profile(int8_dir, tmp_path_factory.mktemp("rep"), "--backend", "device",
                    "--expert-cache-gb", repr(gb), "--no-prefetch", "--overhead-check", "1")


def test_report_has_every_field(device_report):
    r = device_report
    for key in ("copy_bandwidth", "prefill", "decode", "tokens", "traffic", "memory", "overhead"):
        assert r[key] is not None, key
    for phase in ("prefill", "decode"):
        assert set(r[phase]["sections"]) == set(P.SECTIONS)
        for dist in (r[phase]["wall_s"], *r[phase]["sections"].values()):
            assert set(dist) >= {"mean", "median", "p90", "p99"}
        assert r[phase]["tokens_per_s"] > 0
    assert r["prefill"]["tokens"] == 5 and r["decode"]["steps"] == 4
    t = r["traffic"]
    for key in ("hit_rate", "prefetch_hit_rate", "experts_moved_per_token",
                "bytes_moved_per_token", "effective_transfer_gbps", "copy_gbps", "transfer_s"):
        assert key in t, key
    assert t["effective_transfer_gbps"] > 0 and r["copy_bandwidth"]["gbps"] > 0
    layers = r["config"]["num_layers"]                        # device step: 3 + 4 per layer
    assert t["dispatches_per_token"]["min"] == t["dispatches_per_token"]["max"] == 3 + 4 * layers
    assert t["slot_writes_per_token"]["mean"] == t["experts_moved_per_token"]["mean"]
    m = r["memory"]
    for key in ("peak_rss", "rss", "expert_mapped_rss", "resident_mapped_rss", "other_rss",
                "resident_weight_bytes", "kv_cache_bytes"):
        assert isinstance(m[key], int), key
    assert m["rss"] == m["expert_mapped_rss"] + m["resident_mapped_rss"] + m["other_rss"]
    assert m["expert_mapped_rss"] > 0                        # the experts' pages were touched
    assert m["device"]["bytes_in_use"] is None and "memory_stats" in m["device"]["reason"]
    o = r["overhead"]
    assert o["tokens_per_s_profile_on"] > 0 and o["tokens_per_s_profile_off"] > 0


def test_sections_account_for_each_step(device_report):
    for rec in device_report["tokens"]:
        accounted = sum(rec["sections"].values())
        assert abs(accounted - rec["wall_s"]) <= 0.1 * rec["wall_s"] + 2e-3, rec
        assert all(v >= 0 for v in rec["sections"].values()), rec


def test_bytes_moved_match_counters(device_report, tiny_cfg):
    t = device_report["traffic"]
    block = t["expert_block_nbytes"]
    assert t["hits"] == 0 and t["prefetches"] == 0 and t["prefetch_hit_rate"] is None
    assert t["bytes_moved"] == t["misses"] * block
    for rec in device_report["tokens"]:
        assert rec["bytes_moved"] == rec["misses"] * block
    per_token = tiny_cfg.num_layers * tiny_cfg.num_selected_experts
    moved = t["experts_moved_per_token"]
    assert moved["min"] == moved["max"] == per_token
    assert t["bytes_moved_per_token"]["mean"] == per_token * block


def test_host_backend_report(int8_dir, tmp_path, tiny_cfg):
    r = _profile(int8_dir, tmp_path, "--backend", "host")
    t = r["traffic"]
    assert t["effective_transfer_gbps"] is None and "nothing is transferred" in t["transfer_note"]
    per_token = tiny_cfg.num_layers * tiny_cfg.num_selected_experts
    assert t["experts_moved_per_token"]["mean"] == per_token
    assert t["bytes_moved_per_token"]["mean"] == per_token * t["expert_block_nbytes"]
    assert all(rec["sections"]["transfer_wait"] == 0.0 for rec in r["tokens"])
    assert r["overhead"] is None


def test_profile_measures_the_cache_policy_it_was_given(int8_dir, tmp_path):
    """The profiler empties the cache through the engine, keeping every option."""
    block = PackedModel.open(int8_dir).expert_block_nbytes
    for policy in ("layer", "lru"):
        r = _profile(int8_dir, tmp_path, "--backend", "device", "--cache-policy", policy,
                     "--expert-cache-gb", repr(3.5 * block / GIB))
        assert r["cache_policy"] == policy and r["expert_cache_slots"] == 3


def test_profile_samples_with_the_settings_given(int8_dir, tmp_path):
    """--temperature/--top-p/--top-k/--seed reach the profiled generation: its tokens
    are those of a plain generation with the same request (greedy by default)."""
    from lowmem.api import load
    from lowmem.decoding import GenerationRequest, generate_tokens
    from lowmem.sampling import SamplingParams
    runs = {"greedy": ((), SamplingParams(temperature=0.0), 0),
            # the tiny model is very peaked: only a high temperature makes draws differ
            "top-p": (("--temperature", "1e4", "--top-p", "0.9", "--top-k", "50", "--seed", "7"),
                      SamplingParams(1e4, 0.9, 50), 7)}
    lm = load(int8_dir, backend="host")
    try:
        tokens = {}
        for name, (extra, sampling, seed) in runs.items():
            r = _profile(int8_dir, tmp_path, "--backend", "host", *extra)
            assert r["sampling"] == {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                     "top_k": sampling.top_k, "seed": seed}
            req = GenerationRequest(max_new_tokens=5, sampling=sampling, seed=seed,
                                    stop_at_eos=False)
            tokens[name] = [rec["token"] for rec in r["tokens"]]
            assert tokens[name] == list(generate_tokens(lm.engine, [5, 17, 99, 3, 250], req))
        assert tokens["greedy"] != tokens["top-p"]  # the settings changed what was drawn
    finally:
        lm.close()


def test_bad_inputs_exit_2(int8_dir, capsys):
    assert P.main(["--model", str(int8_dir), "--prompt-ids", "5,x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--prompt-ids" in err
    assert P.main(["--model", str(int8_dir), "--prompt-ids", "5", "--max-new-tokens", "1"]) == 2
    assert "--max-new-tokens: expected >= 2" in capsys.readouterr().err


def test_lru_simulation_replays_the_engines_cache(int8_dir):
    """The engine's cache (prefetch off) is LRU over trace_keys: same hit count."""
    from lowmem.api import load
    from lowmem.decoding import prompt_logits
    block = PackedModel.open(int8_dir).expert_block_nbytes
    rt = load(int8_dir, backend="device", prefetch=False, record_routing=True,
              expert_cache_gb=5.5 * block / GIB, prefill_buckets=(4,), cache_policy="lru")
    prompt_logits(rt.engine, [5, 17, 99, 3, 250, 42, 7, 300, 11, 12, 13, 400, 77])
    trace = C.trace_keys(rt.engine.routing_trace)
    stats = rt.engine.expert_stats
    assert len(trace) == stats.requests == 13 * 2 * 2
    assert C.lru_hits(trace, 5) == stats.hits
