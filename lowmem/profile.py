"""``python -m lowmem.profile``: where a token's time, bytes and memory go.

Runs one generation with the engine's section timer on and prints, per token,
the time in each section of a step (embedding, attention, routing, waiting for
expert transfers, expert compute, output logits, sampling), prefill and decode
separately; the expert traffic (experts and bytes moved, hit rates, effective
transfer bandwidth next to a plain copy); and memory (host RSS split into
mapped expert pages, mapped resident pages and the rest; accelerator memory
where the platform reports it). ``--out`` keeps the report as JSON, with a PNG
of the per-step breakdown beside it when matplotlib is installed.

``--overhead-check`` decodes with the timer on and off, interleaved, and
reports both rates side by side (the timer synchronizes at section bounds).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from lowmem.cli import add_engine_arguments, setup_cli
from lowmem.profiler import SECTIONS, run_profile

log = logging.getLogger(__name__)


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
              f"(block {_size(t['expert_block_nbytes'])}); total {_size(t['bytes_moved'])}; "
              f"{t['host_syncs_per_token']['mean'] or 0:.1f} host syncs",
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
    from lowmem.api import load
    from lowmem.cli import engine_kwargs
    from lowmem.engine import EngineError
    from quant.packed import PackedFormatError
    try:
        model_dir = args.model
        if model_dir is None:
            from lowmem.demo import ensure_demo_model
            model_dir = ensure_demo_model(args.workdir)
        runtime = load(model_dir, **engine_kwargs(args), profile=True)
        try:
            report = run_profile(runtime.engine, prompt_ids_from_args(args, runtime),
                                 args.max_new_tokens, args.warmup_tokens, args.overhead_check)
        finally:
            runtime.close()
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
