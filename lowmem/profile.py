"""``python -m lowmem.profile``: where a token's time, bytes and memory go.

Runs one generation with the engine's section timer on (``profile=True``) and
reports, per token, the time spent in each section of a step (embedding,
attention, routing, waiting for expert transfers, expert compute, output
logits, sampling), prefill and decode separately; the expert traffic (experts
and bytes moved, cache and prefetch hit rates, effective transfer bandwidth
next to a plain copy measured at start); and memory (peak and current host
RSS split into mapped expert pages, mapped resident pages and the rest, and
accelerator memory where the platform reports it).

The timer synchronizes at section boundaries, which could slow what it
measures; ``--overhead-check`` decodes with the timer on and off, interleaved,
and reports both rates side by side.

Measured runs follow a short warm-up (compilation) and start from an empty
expert cache whose transfers are timed one by one (device backend).
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

from lowmem.api import add_engine_arguments, setup_cli
from lowmem.engine import Engine
from lowmem.experts import DeviceExperts, ExpertCache, Stager
from lowmem.generation import GenerationRequest, generate_tokens, make_sampler
from lowmem.plan import resident_bytes_by_kind
from lowmem.sampling import SamplingParams

log = logging.getLogger(__name__)
SECTIONS = ("embedding", "attention", "routing", "transfer_wait", "experts", "logits", "sampling")
COUNTERS = ("requests", "hits", "misses", "prefetches", "prefetch_hits", "bytes_moved")
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
    """Give a device-backend engine an empty expert cache of the same capacity whose
    transfers are timed; None on the host backend (nothing is transferred)."""
    if not isinstance(engine.experts, DeviceExperts):
        return None
    old = engine.experts.cache
    fetch = TimedFetch(Stager(engine.model, engine.device, engine.options.staging_buffers))
    engine.experts.cache = ExpertCache(fetch, old.block_nbytes, old.capacity)
    old.close()
    return fetch


def counters(engine: Engine) -> dict:
    stats = engine.expert_stats
    return {**{k: getattr(stats, k) for k in COUNTERS}, "wait_s": stats.wait_s}


def timed_tokens(engine: Engine, prompt_ids: list[int], n: int, sampler,
                 fetch: TimedFetch | None = None) -> list[dict]:
    """Greedy-generate n tokens; one record per step (the first is the prefill).

    A step runs from the previous token's arrival to this token's: the forward
    pass that produced its logits plus its sampling. Section times are the
    engine timer's totals over that interval (reset before each step).
    """
    req = GenerationRequest(max_new_tokens=n, sampling=SamplingParams(temperature=0.0),
                            stop_at_eos=False)
    records = []
    before, fetched = counters(engine), fetch.seconds if fetch else 0.0
    engine.timer.start()
    start = time.perf_counter()
    for i, _token in enumerate(generate_tokens(engine, prompt_ids, req, sampler)):
        wall = time.perf_counter() - start
        now, fetched_now = counters(engine), fetch.seconds if fetch else 0.0
        records.append({"phase": "prefill" if i == 0 else "decode",
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


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def overhead_check(engine: Engine, prompt_ids: list[int], n: int, sampler,
                   repeats: int = 3) -> dict:
    """Decode tokens/s with the section timer on and off, interleaved (ABBA...) in one run."""
    enabled = engine.timer.enabled
    rates: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for r in range(repeats):
            for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                engine.timer.enabled = mode == "on"
                walls = [x["wall_s"] for x in timed_tokens(engine, prompt_ids, n, sampler)[1:]]
                rates[mode].append(len(walls) / sum(walls))
    finally:
        engine.timer.enabled = enabled
    on, off = float(np.median(rates["on"])), float(np.median(rates["off"]))
    return {"decode_tokens": n - 1, "repeats": repeats, "tokens_per_s_profile_on": on,
            "tokens_per_s_profile_off": off, "overhead_pct": (off / on - 1.0) * 100.0,
            "runs": rates}


# --- memory ------------------------------------------------------------------------

def placed_resident_bytes(engine: Engine) -> int:
    """Bytes of the resident arrays the engine placed on its device (host-backend
    attention handles and the host embedding are not placed)."""
    leaves = jax.tree_util.tree_leaves([engine.layers, engine.final_norm, engine.embed_dev])
    return sum(int(x.nbytes) for x in leaves if isinstance(x, jax.Array))


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
    kv = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(engine.state.caches))
    return {"peak_rss": peak_rss(), "peak_rss_scope": peak_scope, "rss": rss, **maps, "other_rss": rss - mapped,
            "resident_weight_bytes": sum(resident_bytes_by_kind(engine.cfg,
                                                                engine.model.settings).values()),
            "placed_resident_bytes": placed_resident_bytes(engine), "kv_cache_bytes": kv,
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
    host = engine.backend == "host"   # experts read in place: every request reads a block
    moved = [r["requests"] if host else r["misses"] + r["prefetches"] for r in decode]
    fetch_s = sum(r["fetch_s"] for r in records)
    wait_s = sum(r["sections"]["transfer_wait"] for r in records)
    expert_s = sum(r["sections"]["experts"] for r in records)
    out = {**tot, "expert_block_nbytes": engine.model.expert_block_nbytes,
           "hit_rate": tot["hits"] / tot["requests"] if tot["requests"] else None,
           "prefetch_hit_rate": tot["prefetch_hits"] / tot["prefetches"] if tot["prefetches"]
           else None,
           "experts_moved_per_token": distribution(moved),
           "bytes_moved_per_token": distribution([r["bytes_moved"] for r in decode]),
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
                warmup_tokens: int = 2, overhead_repeats: int = 0) -> dict:
    """Warm up, profile one generation from an empty cache, optionally check overhead."""
    if not engine.timer.enabled:
        raise ValueError("run_profile needs an engine built with EngineOptions(profile=True)")
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be >= 2 (a prefill and a decode step), "
                         f"found {max_new_tokens}")
    sampler = make_sampler()
    copy = copy_bandwidth(engine.device)
    if warmup_tokens:
        timed_tokens(engine, prompt_ids, warmup_tokens + 1, sampler)         # compiles
    fetch = fresh_expert_cache(engine)
    scope = "measured run" if reset_peak_rss() else "process lifetime (includes the copy buffers)"
    records = timed_tokens(engine, prompt_ids, max_new_tokens, sampler, fetch)
    report = {"model": str(engine.model.model_dir), "backend": engine.backend,
              "platform": engine.device.platform, "device": str(engine.device),
              "config": json.loads(engine.cfg.to_json()),
              "settings": dict(engine.model.manifest["quant"]),
              "expert_cache_slots": getattr(getattr(engine.experts, "cache", None), "capacity",
                                            None),
              "prefetch": engine.options.prefetch, "context": engine.context,
              "prompt_tokens": len(prompt_ids), "new_tokens": len(records),
              "copy_bandwidth": copy, "prefill": phase_summary(records, "prefill"),
              "decode": phase_summary(records, "decode"), "tokens": records,
              "traffic": traffic_summary(records, engine, copy), "memory": memory_report(engine, scope),
              "overhead": None}
    if overhead_repeats:
        report["overhead"] = overhead_check(engine, prompt_ids, max_new_tokens, sampler,
                                            overhead_repeats)
    return report


# --- cache policies on a routing trace ------------------------------------------

def trace_keys(routing_trace) -> list[tuple[int, int]]:
    """(layer, expert) requests in the engine's order: per layer step, distinct experts
    of the real tokens in first-use order (``Engine.routing_trace`` entries)."""
    keys = []
    for layer, experts in routing_trace:
        keys += ExpertCache.needed(layer, experts)
    return keys


def lru_hits(trace, slots: int) -> int:
    """Hits of a least-recently-used cache of ``slots`` entries on a request trace."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, found {slots}")
    cache: dict = {}           # insertion order = recency order, oldest first
    hits = 0
    for key in trace:
        if key in cache:
            hits += 1
            del cache[key]
        elif len(cache) >= slots:
            del cache[next(iter(cache))]
        cache[key] = None
    return hits


def policy_hits(trace, slots: int, policy: str, num_layers: int) -> int:
    """Hits of the engine's own eviction rule (lowmem.experts.eviction_order) on a trace.

    Like the engine, keys of the current layer step (consecutive requests of
    one layer) are pinned: never evicted while the step runs.
    """
    from lowmem.experts import eviction_order
    if slots < 1:
        raise ValueError(f"slots must be >= 1, found {slots}")
    cache: dict = {}           # insertion order = recency order, oldest first
    step: set = set()
    hits = 0
    for key in trace:
        if step and next(iter(step))[0] != key[0]:
            step = set()
        if key in cache:
            hits += 1
            del cache[key]
        elif len(cache) >= slots:
            order = eviction_order(list(cache), policy, key[0], num_layers)
            del cache[next(k for k in order if k not in step)]
        cache[key] = None
        step.add(key)
    return hits


def belady_hits(trace, slots: int) -> int:
    """Hits of the offline optimum (Belady): on a miss with a full cache, evict the
    entry whose next use is farthest in the future (or never comes)."""
    import heapq
    if slots < 1:
        raise ValueError(f"slots must be >= 1, found {slots}")
    trace = list(trace)
    never = len(trace)
    next_use, seen = [never] * len(trace), {}
    for i in range(len(trace) - 1, -1, -1):
        next_use[i] = seen.get(trace[i], never)
        seen[trace[i]] = i
    cache: dict = {}           # key -> its next use
    heap: list = []            # (-next use, tie-break, key); stale entries skipped
    hits = 0
    for i, key in enumerate(trace):
        if key in cache:
            hits += 1
        elif len(cache) >= slots:
            while True:
                neg, _, victim = heapq.heappop(heap)
                if cache.get(victim) == -neg:
                    del cache[victim]
                    break
        cache[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], i, key))
    return hits


# --- output ------------------------------------------------------------------------

def _ms(x) -> str:
    return "       -" if x is None else f"{x * 1e3:8.2f}"


def _size(n) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.1f} MB"


def format_timing(report: dict) -> list[str]:
    pre, dec = report["prefill"], report["decode"]
    lines = [f"{'section (ms/step)':<18}{'prefill':>9} | {'mean':>8}{'median':>9}{'p90':>9}"
             f"{'p99':>9}{'share':>8}"]
    total = sum(dec["sections"][s]["mean"] for s in SECTIONS) if dec else 0.0
    for s in SECTIONS:
        d = dec["sections"][s] if dec else {}
        share = f"{100 * d['mean'] / total:7.1f}%" if dec and total else "      -"
        lines.append(f"{s:<18}{_ms(pre['sections'][s]['mean'])} | {_ms(d.get('mean'))} "
                     f"{_ms(d.get('median'))} {_ms(d.get('p90'))} {_ms(d.get('p99'))}{share}")
    w = dec["wall_s"] if dec else {}
    lines.append(f"{'step wall':<18}{_ms(pre['wall_s']['mean'])} | {_ms(w.get('mean'))} "
                 f"{_ms(w.get('median'))} {_ms(w.get('p90'))} {_ms(w.get('p99'))}")
    lines.append(f"tokens/s: prefill {pre['tokens_per_s']:.2f} ({pre['tokens']} tokens), decode "
                 f"{dec['tokens_per_s'] if dec else float('nan'):.2f} "
                 f"({dec['steps'] if dec else 0} steps); sections account for "
                 f"{100 * (dec or pre)['accounted_fraction']:.1f}% of decode wall time")
    return lines


def format_report(report: dict) -> str:
    """The terminal table: timing, traffic, memory, overhead."""
    t, m, c = report["traffic"], report["memory"], report["copy_bandwidth"]
    lines = [f"model {report['model']} | backend {report['backend']} on {report['platform']} | "
             f"prompt {report['prompt_tokens']} tokens, {report['new_tokens']} new", ""]
    lines += format_timing(report)
    moved, per_tok = t["experts_moved_per_token"], t["bytes_moved_per_token"]
    rate = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"       # noqa: E731
    lines += ["", f"expert traffic: {t['requests']} requests, hit rate {rate(t['hit_rate'])}, "
              f"prefetch hit rate {rate(t['prefetch_hit_rate'])} ({t['prefetches']} prefetches)",
              f"  per decode token: {moved['mean'] or 0:.2f} experts, {_size(per_tok['mean'])} "
              f"(block {_size(t['expert_block_nbytes'])}); total {_size(t['bytes_moved'])}",
              f"  plain copy ({c['kind']}): {c['gbps']:.2f} GB/s"
              + (f", pinned {c['pinned_gbps']:.2f} GB/s" if "pinned_gbps" in c else "")]
    if t["effective_transfer_gbps"] is not None:
        lines.append(f"  effective transfer: {t['effective_transfer_gbps']:.2f} GB/s "
                     f"({100 * t['transfer_vs_copy']:.0f}% of the copy); exposed wait "
                     f"{t['transfer_wait_s'] * 1e3:.1f} ms")
    elif "transfer_note" in t:
        gbps = t.get("expert_read_gbps")
        lines.append(f"  {t['transfer_note']}; expert read rate "
                     f"{'n/a' if gbps is None else f'{gbps:.2f} GB/s'}")
    d = m["device"]
    lines += ["", f"memory: peak RSS {_size(m['peak_rss'])} ({m['peak_rss_scope']}), RSS {_size(m['rss'])} = mapped "
              f"experts {_size(m['expert_mapped_rss'])} + mapped resident files "
              f"{_size(m['resident_mapped_rss'])} + other {_size(m['other_rss'])}",
              f"  resident weights {_size(m['resident_weight_bytes'])} (placed on the device "
              f"{_size(m['placed_resident_bytes'])}), KV cache {_size(m['kv_cache_bytes'])}",
              "  accelerator: " + (d["reason"] if d.get("reason") else
                                    f"in use {_size(d['bytes_in_use'])}, peak "
                                    f"{_size(d['peak_bytes_in_use'])} of {_size(d['bytes_limit'])}")]
    o = report["overhead"]
    if o:
        lines.append(f"profiling overhead: decode {o['tokens_per_s_profile_on']:.2f} tokens/s "
                     f"timed vs {o['tokens_per_s_profile_off']:.2f} untimed "
                     f"({o['overhead_pct']:+.1f}%, median of {o['repeats']})")
    return "\n".join(lines)


def save_png(report: dict, path: Path) -> bool:
    """Stacked per-step section times; only when matplotlib is importable."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no PNG written (optional)")
        return False
    recs = report["tokens"]
    fig, ax = plt.subplots(figsize=(10, 4))
    bottom = np.zeros(len(recs))
    for s in SECTIONS:
        ms = np.array([r["sections"][s] * 1e3 for r in recs])
        ax.bar(range(len(recs)), ms, bottom=bottom, label=s)
        bottom += ms
    ax.set_xlabel("step (0 = prefill)")
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# --- command line ------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lowmem.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="packed model directory (default: the embedded synthetic one)")
    p.add_argument("--prompt", default="The answer to life the universe and everything is of course")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated (default 16)")
    p.add_argument("--warmup-tokens", type=int, default=2,
                   help="tokens of an unmeasured warm-up run that compiles (default 2)")
    add_engine_arguments(p)
    p.add_argument("--overhead-check", type=int, nargs="?", const=3, default=0, metavar="REPEATS",
                   help="also decode with the timer on and off, interleaved (default 3 each)")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--png", help="per-step breakdown PNG (needs matplotlib; default beside --out)")
    p.add_argument("--workdir", default=".lowmem", help="where the embedded default is kept")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def prompt_ids_from_args(args, runtime) -> list[int]:
    """Token ids: --prompt-ids, the tokenizer's encoding, or (no tokenizer) UTF-8 bytes."""
    if args.prompt_ids:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids: expected comma-separated integers, found "
                             f"{args.prompt_ids!r}") from None
        return runtime.encode(ids)
    if runtime.tokenizer is None:
        vocab = runtime.engine.cfg.vocab_size
        log.warning("no tokenizer.model in the model directory: using the prompt's UTF-8 bytes "
                    "as token ids")
        return runtime.encode([4 + b % (vocab - 4) for b in args.prompt.encode()])
    return runtime.encode(args.prompt)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli(args.verbose)
    from lowmem.api import engine_kwargs, load
    from lowmem.engine import EngineError
    from quant.packed import PackedFormatError
    try:
        model_dir = args.model
        if model_dir is None:
            from lowmem.demo import ensure_demo_model
            model_dir = ensure_demo_model(args.workdir)
        runtime = load(model_dir, **engine_kwargs(args), profile=True)
        report = run_profile(runtime.engine, prompt_ids_from_args(args, runtime),
                             args.max_new_tokens, args.warmup_tokens, args.overhead_check)
    except (EngineError, PackedFormatError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    png = args.png or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if png:
        save_png(report, Path(png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
