"""Profiling measurements: where a token's time, bytes and memory go.

``run_profile(engine, ...)`` runs one generation with the engine's section
timer on (``EngineOptions(profile=True)``) and returns a report dict: per
token, the time in each section of a step (embedding, attention, routing,
waiting for expert transfers, expert compute, output logits, sampling),
prefill and decode separately; the expert traffic (experts and bytes moved,
cache and prefetch hit rates, effective transfer bandwidth next to a plain
copy measured at start); and memory (peak and current host RSS split into
mapped expert pages, mapped resident pages and the rest, and accelerator
memory where the platform reports it). ``lowmem.profile`` prints and plots it.

The timer synchronizes at section boundaries, which could slow what it
measures; ``overhead_check`` decodes with the timer on and off, interleaved,
and reports both rates side by side. Measured runs follow a short warm-up
(compilation) and start from an empty expert cache whose transfers are timed
one by one (device backend).
"""
from __future__ import annotations

import dataclasses
import json
import resource
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

from lowmem.decoding import GenerationRequest, generate_tokens
from lowmem.engine import Engine
from lowmem.plan import resident_bytes_by_kind
from lowmem.sampling import SamplingParams

SECTIONS = ("embedding", "attention", "routing", "transfer_wait", "experts", "logits", "sampling")
COUNTERS = ("requests", "hits", "misses", "prefetches", "prefetch_hits", "token_prefetches",
            "token_prefetch_hits", "bytes_moved", "host_syncs", "dispatches", "slot_writes")
ENGINE_COUNTERS = ("host_syncs", "dispatches", "slot_writes")      # the engine's own
COPY_BYTES = 256 << 20


# --- measuring -------------------------------------------------------------------

class TimedFetch:
    """Wraps an expert cache's fetch function and adds up the seconds of each transfer.

    Fetches run on worker threads, so the total can exceed wall time when two
    overlap; bytes / total is then the per-stream transfer rate.
    """

    def __init__(self, fetch):
        self.fetch, self.seconds, self.count = fetch, 0.0, 0
        self._lock = threading.Lock()

    def __call__(self, key):
        start = time.perf_counter()
        out = self.fetch(key)
        with self._lock:
            self.seconds += time.perf_counter() - start
            self.count += 1
        return out


def fresh_expert_cache(engine: Engine) -> TimedFetch | None:
    """Empty the engine's expert cache (every option kept) and time its transfers from
    now on; None on the host backend (nothing is transferred)."""
    if engine.backend_name == "host":
        return None
    timed: dict[str, TimedFetch] = {}

    def hook(fetch):
        timed["fetch"] = TimedFetch(fetch)
        return timed["fetch"]
    engine.reset_expert_cache(fetch_hook=hook)
    return timed["fetch"]


def counters(engine: Engine) -> dict:
    stats = engine.expert_stats
    return {**{k: getattr(stats, k) for k in COUNTERS if k not in ENGINE_COUNTERS},
            **{k: getattr(engine, k) for k in ENGINE_COUNTERS}, "wait_s": stats.wait_s}


GREEDY = SamplingParams(temperature=0.0)


def timed_tokens(engine: Engine, prompt_ids: list[int], n: int,
                 fetch: TimedFetch | None = None, sampling: SamplingParams = GREEDY,
                 seed: int = 0) -> list[dict]:
    """Generate n tokens with ``sampling``; one record per step (the first is the prefill).

    A step runs from the previous token's arrival to this token's: the forward
    pass that produced its logits plus its sampling. Section times are the
    engine timer's totals over that interval (reset before each step).
    """
    req = GenerationRequest(max_new_tokens=n, sampling=sampling, seed=seed, stop_at_eos=False)
    records = []
    before, fetched = counters(engine), fetch.seconds if fetch else 0.0
    engine.timer.start()
    start = time.perf_counter()
    for i, token in enumerate(generate_tokens(engine, prompt_ids, req)):
        wall = time.perf_counter() - start
        now, fetched_now = counters(engine), fetch.seconds if fetch else 0.0
        records.append({"phase": "prefill" if i == 0 else "decode", "token": int(token),
                        "tokens": len(prompt_ids) if i == 0 else 1, "wall_s": wall,
                        "sections": {s: engine.timer.totals.get(s, 0.0) for s in SECTIONS},
                        **{k: now[k] - before[k] for k in COUNTERS},
                        "fetch_s": fetched_now - fetched})
        before, fetched = now, fetched_now
        engine.timer.start()
        start = time.perf_counter()
    return records


def copy_bandwidth(device, nbytes: int = COPY_BYTES, repeats: int = 3) -> dict:
    """The plain copy the expert traffic is compared with: host memcpy on a CPU,
    host -> device ``device_put`` (pageable, and pinned where available) otherwise."""
    src = np.ones(nbytes, np.uint8)                                          # touched pages
    if device.platform == "cpu":
        dst = np.empty_like(src)
        np.copyto(dst, src)
        best = min(_seconds(lambda: np.copyto(dst, src)) for _ in range(repeats))
        return {"kind": "host memcpy (np.copyto)", "bytes": nbytes, "gbps": nbytes / best / 1e9}
    # an explicit memory kind: a bare Device target refuses a pinned_host source
    target = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    put = lambda s: jax.device_put(s, target).block_until_ready()          # noqa: E731
    put(src)
    out = {"kind": "host->device device_put (pageable)", "bytes": nbytes,
           "gbps": nbytes / min(_seconds(lambda: put(src)) for _ in range(repeats)) / 1e9}
    if "pinned_host" in {m.kind for m in device.addressable_memories()}:
        sharding = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
        pinned = jax.device_put(src, sharding).block_until_ready()
        put(pinned)
        out["pinned_gbps"] = nbytes / min(_seconds(lambda: put(pinned))
                                          for _ in range(repeats)) / 1e9
    return out


EXECUTE_EVENT = "::ExecuteHelper"   # PJRT's per-execution trace event (CPU: ...OnSingleDevice)
_MARK = "lowmem.xla_executions"


def xla_executions(fn) -> int | None:
    """XLA executions started by ``fn`` on the calling thread, counted by JAX's profiler.

    An independent check of ``Engine.dispatches`` (which the engine counts
    itself): every jitted call and eager op is one execution. None where this
    jaxlib has no profile reader, the trace lost the calling thread, or no event
    of the name this client uses was seen (another PJRT client may name it
    otherwise: a GPU's is unverified).
    """
    import glob
    import tempfile
    try:
        from jax._src.lib import _profile_data
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        opts = jax.profiler.ProfileOptions()
        opts.python_tracer_level = 0                # Python tracing: slow, and not needed
        jax.profiler.start_trace(tmp, profiler_options=opts)
        try:
            with jax.profiler.TraceAnnotation(_MARK):
                fn()
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        data = _profile_data.ProfileData.from_file(files[0]) if files else None
    lines = [list(line.events) for plane in (data.planes if data else ()) for line in plane.lines]
    mine = [events for events in lines if any(e.name == _MARK for e in events)]
    count = sum(EXECUTE_EVENT in e.name for events in mine for e in events)
    return count or None


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def overhead_check(engine: Engine, prompt_ids: list[int], n: int, repeats: int = 3,
                   sampling: SamplingParams = GREEDY) -> dict:
    """Decode tokens/s with the section timer on and off, interleaved (ABBA...) in one run."""
    enabled = engine.timer.enabled
    rates: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for r in range(repeats):
            for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                engine.timer.enabled = mode == "on"
                walls = [x["wall_s"] for x in timed_tokens(engine, prompt_ids, n,
                                                           sampling=sampling)[1:]]
                rates[mode].append(len(walls) / sum(walls))
    finally:
        engine.timer.enabled = enabled
    on, off = float(np.median(rates["on"])), float(np.median(rates["off"]))
    return {"decode_tokens": n - 1, "repeats": repeats, "tokens_per_s_profile_on": on,
            "tokens_per_s_profile_off": off, "overhead_pct": (off / on - 1.0) * 100.0,
            "runs": rates}


# --- memory ------------------------------------------------------------------------

def mapped_rss(model_dir: Path) -> dict:
    """Resident pages of the model's mapped files: expert files and the rest."""
    import psutil
    root = str(Path(model_dir).resolve())
    out = {"expert_mapped_rss": 0, "resident_mapped_rss": 0}
    try:
        maps = psutil.Process().memory_maps(grouped=True)
    except (psutil.AccessDenied, NotImplementedError, OSError) as e:
        return {"expert_mapped_rss": None, "resident_mapped_rss": None,
                "reason": f"memory maps unavailable ({e})"}
    for m in maps:
        if m.path.startswith(root):
            key = "expert_mapped_rss" if m.path.endswith(".experts.bin") else "resident_mapped_rss"
            out[key] += int(m.rss)
    return out


def peak_rss() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KB on Linux)."""
    hwm = _peak_from_status()
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (Linux: "5" > /proc/self/clear_refs), so the
    peak reflects the measured run, not start-up or the copy benchmark's buffers."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_from_status() -> int | None:
    """VmHWM from /proc/self/status (the count reset_peak_rss restarts), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_memory(device) -> dict:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats:
        return {"bytes_in_use": None, "peak_bytes_in_use": None, "bytes_limit": None,
                "reason": f"{device.platform} device reports no memory_stats(); its arrays "
                          f"live in host memory (counted in the RSS)"}
    return {k: stats.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def memory_report(engine: Engine, peak_scope: str = "process lifetime") -> dict:
    """Host RSS (peak, current and its parts) and accelerator memory."""
    import psutil
    rss = int(psutil.Process().memory_info().rss)
    maps = mapped_rss(engine.model.model_dir)
    mapped = (maps["expert_mapped_rss"] or 0) + (maps["resident_mapped_rss"] or 0)
    return {"peak_rss": peak_rss(), "peak_rss_scope": peak_scope, "rss": rss, **maps, "other_rss": rss - mapped,
            "resident_weight_bytes": sum(resident_bytes_by_kind(engine.cfg,
                                                                engine.model.settings).values()),
            "placed_resident_bytes": engine.placed_resident_bytes,
            "kv_cache_bytes": engine.kv_cache_bytes,
            "device": device_memory(engine.device)}


# --- summaries ---------------------------------------------------------------------

def distribution(values) -> dict:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "median": None, "p90": None, "p99": None}
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)),
            "min": float(v.min()), "max": float(v.max())}


def phase_summary(records: list[dict], phase: str) -> dict | None:
    """Timing of one phase: per-step wall and section distributions, tokens/s."""
    recs = [r for r in records if r["phase"] == phase]
    if not recs:
        return None
    wall = [r["wall_s"] for r in recs]
    sections = {s: distribution([r["sections"][s] for r in recs]) for s in SECTIONS}
    accounted = sum(sum(r["sections"].values()) for r in recs)
    return {"steps": len(recs), "tokens": sum(r["tokens"] for r in recs),
            "tokens_per_s": sum(r["tokens"] for r in recs) / sum(wall),
            "wall_s": distribution(wall), "sections": sections,
            "accounted_fraction": accounted / sum(wall)}


def traffic_summary(records: list[dict], engine: Engine, copy: dict) -> dict:
    """Expert traffic over the measured run, per decode token, and its bandwidth."""
    tot = {k: sum(r[k] for r in records) for k in COUNTERS}
    decode = [r for r in records if r["phase"] == "decode"]
    host = engine.backend_name == "host"   # experts read in place: every request reads a block
    moved = [r["requests"] if host else r["misses"] + r["prefetches"] for r in decode]
    fetch_s = sum(r["fetch_s"] for r in records)
    wait_s = sum(r["sections"]["transfer_wait"] for r in records)
    expert_s = sum(r["sections"]["experts"] for r in records)
    out = {**tot, "expert_block_nbytes": engine.model.expert_block_nbytes,
           "hit_rate": tot["hits"] / tot["requests"] if tot["requests"] and not host else None,
           "prefetch_hit_rate": tot["prefetch_hits"] / tot["prefetches"] if tot["prefetches"]
           else None,
           "experts_moved_per_token": distribution(moved),
           "bytes_moved_per_token": distribution([r["bytes_moved"] for r in decode]),
           "host_syncs_per_token": distribution([r["host_syncs"] for r in decode]),
           "dispatches_per_token": distribution([r["dispatches"] for r in decode]),
           "slot_writes_per_token": distribution([r["slot_writes"] for r in decode]),
           "token_prefetch_hit_rate": tot["token_prefetch_hits"] / tot["token_prefetches"]
           if tot["token_prefetches"] else None,
           "transfer_s": fetch_s, "transfer_wait_s": wait_s,
           "copy_gbps": copy["gbps"], "effective_transfer_gbps": None}
    if host:
        out["transfer_note"] = ("host backend: experts are read in place from the mapped files; "
                                "nothing is transferred (bytes_moved = bytes read)")
        out["expert_read_gbps"] = tot["bytes_moved"] / expert_s / 1e9 if expert_s else None
    elif fetch_s > 0:
        out["effective_transfer_gbps"] = tot["bytes_moved"] / fetch_s / 1e9
        out["transfer_vs_copy"] = out["effective_transfer_gbps"] / copy["gbps"]
    return out


def run_profile(engine: Engine, prompt_ids: list[int], max_new_tokens: int,
                warmup_tokens: int = 2, overhead_repeats: int = 0,
                sampling: SamplingParams = GREEDY, seed: int = 0) -> dict:
    """Warm up, profile one generation from an empty cache, optionally check overhead.

    ``sampling`` and ``seed`` are the generation's (greedy by default): the
    sampling section's time depends on them (a top-p nucleus costs more than an
    argmax), so the profile measures the settings a user runs with."""
    if not engine.timer.enabled:
        raise ValueError("run_profile needs an engine built with EngineOptions(profile=True)")
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be >= 2 (a prefill and a decode step), "
                         f"found {max_new_tokens}")
    copy = copy_bandwidth(engine.device)
    if warmup_tokens:
        timed_tokens(engine, prompt_ids, warmup_tokens + 1, sampling=sampling)  # compiles
    fetch = fresh_expert_cache(engine)
    scope = "measured run" if reset_peak_rss() else "process lifetime (includes the copy buffers)"
    records = timed_tokens(engine, prompt_ids, max_new_tokens, fetch, sampling, seed)
    report = {"model": str(engine.model.model_dir), "backend": engine.backend_name,
              "platform": engine.device.platform, "device": str(engine.device),
              "config": json.loads(engine.cfg.to_json()),
              "settings": dict(engine.model.manifest["quant"]),
              "expert_cache_slots": getattr(getattr(engine.experts, "cache", None), "capacity",
                                            None),
              "cache_policy": getattr(getattr(engine.experts, "cache", None), "policy", None),
              "prefetch": engine.options.prefetch, "context": engine.context,
              "prompt_tokens": len(prompt_ids), "new_tokens": len(records),
              "sampling": {**dataclasses.asdict(sampling), "seed": seed},
              "copy_bandwidth": copy, "prefill": phase_summary(records, "prefill"),
              "decode": phase_summary(records, "decode"), "tokens": records,
              "traffic": traffic_summary(records, engine, copy), "memory": memory_report(engine, scope),
              "overhead": None}
    if overhead_repeats:
        report["overhead"] = overhead_check(engine, prompt_ids, max_new_tokens,
                                            overhead_repeats, sampling)
    return report
