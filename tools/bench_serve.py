"""Aggregate decode throughput of a live ``python -m lowmem.serve`` at several concurrencies.

    python -m lowmem.serve --model DIR --max-batch 16 --port 8000 &
    python tools/bench_serve.py --url http://127.0.0.1:8000 --concurrency 1,2,4,8,16

For each concurrency c, c streaming requests (short distinct prompts, sampled
at temperature 1 with distinct seeds, so routing differs between sequences)
run at once: sent together after a barrier, from one shared client (a client
per request spent ~10-20 ms each on its SSL context, which spread 16 requests
over 0.2-0.3 s). It reports, per level:

- end-to-end tok/s: every output token over the level's wall time (prefill
  and the first token included);
- decode tok/s: the output tokens after the first of each request over the
  decode wall time, from the first request's first token to the last
  request's last token (the steady state once the prompts are read; later
  prompts' prefill chunks still share that window, as in serving);
- the mean time per output token of one stream (after its first token);
- the expert bytes the server moved per output token (from /metrics, prefill
  included);
- how far apart the requests were sent and their first tokens came (a first
  token spread of a step or more: the prompts were read in different steps).

Use enough output tokens per request (``--max-tokens``, default 32) that the
decode window dominates. ``--rounds N`` runs the whole sweep N times in turn
and reports each level's ratio to concurrency 1 as the median of the rounds'
ratios (each round's level over that round's one stream, measured minutes
apart at most): on a shared VM whose speed drifts by 20-30% over half an hour
a single sweep's c=1 window may fall in a fast or a slow stretch. Prints the
setting, the load average before and after, and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from statistics import median

import httpx


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(rf"^lowmem_{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def one_stream(client: httpx.Client, i: int, max_tokens: int, start: threading.Barrier
               ) -> tuple[int, float, float, float]:
    """(tokens received, perf_counter when sent, of the first token, of the last)."""
    body = {"prompt": f"Request {i}: the weather today is", "max_tokens": max_tokens,
            "temperature": 1.0, "seed": i, "stream": True, "logprobs": 1}
    tokens, first, last = 0, None, None
    start.wait()
    sent = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            lp = json.loads(line[6:])["choices"][0]["logprobs"]
            if lp and lp["tokens"]:
                now = time.perf_counter()
                first = first or now
                last = now
                tokens += len(lp["tokens"])
    return tokens, sent, first or 0.0, last or 0.0


def run_level(url: str, c: int, max_tokens: int) -> dict:
    """c streams sent at once (a barrier, one shared client) -> the level's figures."""
    bytes0, toks0 = metric(url, "expert_bytes_moved_total"), metric(url, "tokens_generated_total")
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    start = threading.Barrier(c)
    with httpx.Client(base_url=url, timeout=600, limits=limits) as client, \
            ThreadPoolExecutor(c) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda i: one_stream(client, i, max_tokens, start), range(c)))
    wall = time.perf_counter() - t0
    tokens = sum(t for t, *_ in results)
    per_token = [(b - a) / (t - 1) for t, _, a, b in results if t > 1]
    decode_tokens = sum(max(t - 1, 0) for t, *_ in results)
    decode_wall = max(b for *_, b in results) - min(a for _, _, a, _ in results)
    sent = [s for _, s, _, _ in results]
    moved = metric(url, "expert_bytes_moved_total") - bytes0
    counted = metric(url, "tokens_generated_total") - toks0
    return {"concurrency": c, "tokens": tokens, "tok_s": tokens / wall,
            "decode_tok_s": decode_tokens / decode_wall if decode_wall > 0 else 0.0,
            "tpot_ms": 1e3 * sum(per_token) / max(len(per_token), 1),
            "sent_spread_ms": 1e3 * (max(sent) - min(sent)),
            "first_spread_ms": 1e3 * (max(a for _, _, a, _ in results)
                                      - min(a for _, _, a, _ in results)),
            "expert_mb_per_token": moved / max(counted, 1) / 1e6}


def summarize(rounds: list[list[dict]]) -> list[dict]:
    """Per level over the rounds (each a list of run_level rows, levels in the same order,
    the first the baseline): the medians of its figures and of each round's ratios to
    that round's baseline, with the ratios' range."""
    out = []
    for i, row in enumerate(rounds[0]):
        same = [r[i] for r in rounds]
        ratio = {k: [r[i][k] / r[0][k] if r[0][k] else 0.0 for r in rounds]
                 for k in ("decode_tok_s", "tok_s", "expert_mb_per_token")}
        summary = {k: float(median([r[k] for r in same])) for k in row}
        summary.update({f"x_{k}": float(median(v)) for k, v in ratio.items()})
        summary["x_decode_range"] = (min(ratio["decode_tok_s"]), max(ratio["decode_tok_s"]))
        out.append(summary)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated levels")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default 32)")
    p.add_argument("--rounds", type=int, default=1,
                   help="sweeps run in turn; ratios are the median of the rounds' (default 1)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        print(f"error: --rounds must be >= 1, got {args.rounds}", file=sys.stderr)
        return 2
    if args.max_tokens < 2:
        print(f"error: --max-tokens must be >= 2 (decode needs tokens after the first), got "
              f"{args.max_tokens}", file=sys.stderr)
        return 2
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
        httpx.get(args.url + "/health", timeout=10).raise_for_status()
    except ValueError:
        print(f"error: --concurrency expects integers like 1,2,4, got {args.concurrency!r}",
              file=sys.stderr)
        return 2
    except httpx.HTTPError as e:
        print(f"error: --url {args.url}: no server answers /health ({e})", file=sys.stderr)
        return 2
    # Warm-up: c requests of c + 1 tokens each make the server step every number of rows
    # from 1 to c (prompts are read one per step while the earlier ones decode), so
    # every step shape the levels use is compiled before the clock runs.
    top = max(levels)
    run_level(args.url, top, top + 1)
    load0 = os.getloadavg()[0]
    rounds = [[run_level(args.url, c, args.max_tokens) for c in levels]
              for _ in range(args.rounds)]
    rows = summarize(rounds)
    print(f"{args.max_tokens} output tokens per request, temperature 1, distinct seeds; "
          f"{args.rounds} round(s), medians; load average {load0:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print("| concurrency | decode tok/s | x c=1 | x c=1 range | end-to-end tok/s | x c=1 | "
          "time/token per stream (ms) | expert MB / output token | x c=1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["x_decode_range"]
        print(f"| {r['concurrency']:.0f} | {r['decode_tok_s']:.2f} | {r['x_decode_tok_s']:.2f} | "
              f"{lo:.2f}-{hi:.2f} | {r['tok_s']:.2f} | {r['x_tok_s']:.2f} | {r['tpot_ms']:.1f} | "
              f"{r['expert_mb_per_token']:.3f} | {r['x_expert_mb_per_token']:.2f} |")
    print("requests sent within " + ", ".join(f"{r['sent_spread_ms']:.0f}" for r in rows)
          + " ms; first tokens within " + ", ".join(f"{r['first_spread_ms']:.0f}" for r in rows)
          + " ms (medians per level: a spread of a step or more means prompts were read in "
          "different steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
