"""lowmem profile (python -m lowmem.profile): where a token's time, bytes and memory go.

Runs one generation with the engine's section timer on and prints, per token,
the time in each section of a step (embedding, attention, routing, waiting for
expert transfers, expert compute, output logits, sampling), prefill and decode
separately; the expert traffic (experts and bytes moved, hit rates, effective
transfer bandwidth next to a plain copy); and memory (host RSS split into
mapped expert pages, mapped resident pages and the rest; accelerator memory
where the platform reports it). --out keeps the report as JSON; a PNG of the per-token
breakdown (time by section, expert hit rate, bytes moved) is written beside it
(or to --png) when matplotlib is installed (pip install ".[plot]").

--overhead-check decodes with the timer on and off, interleaved, and
reports both rates side by side (the timer synchronizes at section bounds).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

from lowmem import cli
from lowmem.profiler import SECTIONS, run_profile
from lowmem.sampling import SamplingParams

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


def _sampling_line(s: dict) -> str:
    if s["temperature"] <= 0:
        return "sampling: greedy (argmax)"
    return (f"sampling: temperature {s['temperature']:g}, top-p {s['top_p']:g}, "
            f"top-k {s['top_k'] or 'off'}, seed {s['seed']}")


def format_report(report: dict) -> str:
    """The terminal table: timing, traffic, memory, overhead."""
    t, m, c = report["traffic"], report["memory"], report["copy_bandwidth"]
    lines = [f"model {report['model']} | backend {report['backend']} on {report['platform']} | "
             f"prompt {report['prompt_tokens']} tokens, {report['new_tokens']} new",
             _sampling_line(report["sampling"]), ""]
    lines += format_timing(report)
    moved, per_tok = t["experts_moved_per_token"], t["bytes_moved_per_token"]
    rate = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"       # noqa: E731
    lines += ["", f"expert traffic: {t['requests']} requests, hit rate {rate(t['hit_rate'])}, "
              f"prefetch hit rate {rate(t['prefetch_hit_rate'])} ({t['prefetches']} prefetches)",
              f"  per decode token: {moved['mean'] or 0:.2f} experts, {_size(per_tok['mean'])} "
              f"(block {_size(t['expert_block_nbytes'])}); total {_size(t['bytes_moved'])}; "
              f"{t['host_syncs_per_token']['mean'] or 0:.1f} host syncs, "
              f"{t['dispatches_per_token']['mean'] or 0:.1f} dispatches (+ "
              f"{t['slot_writes_per_token']['mean'] or 0:.1f} slot writes)",
              f"  next-token prefetch (layer 0, started at the last layer): "
              f"{t['token_prefetches']} fetches, {t['token_prefetch_hits']} hits",
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


def _title(report: dict) -> str:
    q = report["settings"]
    dec = report["decode"]
    rate = f"{dec['tokens_per_s']:.2f}" if dec else "n/a"
    return (f"{Path(report['model']).name}: int{q.get('bits')} experts, backend "
            f"{report['backend']} on {report['platform']}; prefill "
            f"{report['prefill']['tokens_per_s']:.2f} tok/s, decode {rate} tok/s")


def save_png(report: dict, path: Path) -> bool:
    """Per decode token: time by section (ms), expert hit rate and MB moved; needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no PNG written (pip install '.[plot]')")
        return False
    recs = [r for r in report["tokens"] if r["phase"] == "decode"]
    steps = np.arange(1, len(recs) + 1)                                     # (N,)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True,
                                  gridspec_kw={"height_ratios": (3, 2)})
    bottom = np.zeros(len(recs))                                            # (N,) ms
    for s in SECTIONS:
        ms = np.array([r["sections"][s] * 1e3 for r in recs])              # (N,) ms
        ax.bar(steps, ms, bottom=bottom, label=s)
        bottom += ms
    ax.plot(steps, [r["wall_s"] * 1e3 for r in recs], "k.", label="step wall time")
    ax.set_ylabel("decode time per token (ms)")
    ax.legend(fontsize=7, ncol=4)
    hit = [100 * r["hits"] / r["requests"] if r["requests"] else np.nan for r in recs]
    ax2.plot(steps, hit, "o-", color="tab:green", label="expert cache hit rate")
    ax2.set_ylabel("hit rate (%)")
    ax2.set_ylim(-5, 105)
    ax2.set_xlabel("decode token")
    mb = ax2.twinx()
    mb.bar(steps, [r["bytes_moved"] / 1e6 for r in recs], alpha=0.3, color="tab:blue",
           label="bytes moved")
    mb.set_ylabel("expert bytes moved per token (MB)")
    ax2.legend(loc="upper left", fontsize=7)
    mb.legend(loc="upper right", fontsize=7)
    fig.suptitle(_title(report), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# --- command line ------------------------------------------------------------------

def build_parser(prog: str = "python -m lowmem.profile") -> cli.Parser:
    p = cli.Parser(prog=prog, description=__doc__)
    cli.add_model_argument(p, "the embedded synthetic model")
    cli.add_prompt_arguments(p)
    cli.add_sampling_arguments(p, max_new_tokens=16)
    p.add_argument("--warmup-tokens", type=cli.int_type(0), default=2,
                   help="tokens of an unmeasured warm-up run that compiles, >= 0 (default 2)")
    cli.add_engine_arguments(p)
    p.add_argument("--overhead-check", type=cli.int_type(1), nargs="?", const=3, default=0,
                   metavar="REPEATS",
                   help="also decode with the timer on and off, interleaved, REPEATS times "
                        "each (default: off; 3 when given without a number)")
    p.add_argument("--out", type=cli.output_file, metavar="JSON",
                   help="write the report as JSON here (default: none)")
    p.add_argument("--png", type=cli.output_file, metavar="PNG",
                   help="per-token figure (needs matplotlib: pip install '.[plot]'; default: "
                        "beside --out, as JSON_STEM.png, when matplotlib is installed)")
    p.add_argument("--no-png", action="store_true", help="write no figure (default: write one)")
    cli.add_workdir_argument(p)
    cli.add_verbosity(p)
    return p


def prompt_ids_from_args(args, runtime) -> list[int]:
    """Token ids: --prompt-ids, the tokenizer's encoding, or (no tokenizer) UTF-8 bytes."""
    prompt = cli.read_prompt(args)
    if isinstance(prompt, list):
        return runtime.encode(prompt)
    if runtime.tokenizer is None:
        vocab = runtime.engine.cfg.vocab_size
        log.warning("no tokenizer.model in the model directory: using the prompt's UTF-8 bytes "
                    "as token ids")
        return runtime.encode([4 + b % (vocab - 4) for b in prompt.encode()])
    return runtime.encode(prompt)


def _png_path(args) -> Path | None:
    if args.no_png:
        return None
    if args.png:
        return args.png
    import importlib.util
    if args.out is None or importlib.util.find_spec("matplotlib") is None:
        return None
    return args.out.with_suffix(".png")


def run(args) -> int:
    if args.max_new_tokens < 2:
        raise cli.CLIError(f"--max-new-tokens: expected >= 2 (a prefill and a decode step), "
                           f"found {args.max_new_tokens}")
    prompt = cli.read_prompt(args)           # a bad prompt fails before the model is built
    runtime = cli.open_runtime(args, None if isinstance(prompt, str) else prompt, profile=True)
    try:
        report = run_profile(runtime.engine, prompt_ids_from_args(args, runtime),
                             args.max_new_tokens, args.warmup_tokens, args.overhead_check,
                             SamplingParams(args.temperature, args.top_p, args.top_k), args.seed)
    finally:
        runtime.close()
    print(format_report(report))
    if args.out:
        tmp = args.out.with_name(args.out.name + ".partial")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(args.out)
        cli.stage("report written to %s", args.out)
    png = _png_path(args)
    if png and save_png(report, png):
        cli.stage("figure written to %s", png)
    return 0


def main(argv=None, prog: str = "python -m lowmem.profile") -> int:
    args = build_parser(prog).parse_args(argv)
    cli.setup_cli(args)
    return cli.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
