"""Where a batched decode step's time goes: ``BatchEngine.decode`` of B rows, by section.

    python tools/profile_batch.py --model DIR --rows 16,8,1

Each slot is prefilled with a few random tokens; then, per row count, one
warm-up step (compiles that batch size) and ``--repeats`` timed steps with
``EngineOptions(profile=True)`` (each section synchronized), each followed
by ``batch.sample_rows`` at temperature 1 (timed as sampling). Prints ms per
step and per section, and the load average before and after (the machines
these run on are shared: compare rows of one run).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from lowmem.batch import BatchEngine, sample_rows, seed_key_data
from lowmem.engine import Engine, EngineOptions
from quant.packed import PackedFormatError, PackedModel


def profile_rows(batch: BatchEngine, rows: int, repeats: int, rng) -> dict:
    """Mean ms per section over ``repeats`` steps of ``rows`` rows (after a warm-up)."""
    eng = batch.engine
    slots, toks = list(range(rows)), list(rng.integers(3, 1000, rows))
    keys = np.stack([seed_key_data(i) for i in range(rows)])                  # (B, 2)
    temp, top_p = np.ones(rows, np.float32), np.ones(rows, np.float32)       # (B,)
    top_k = np.zeros(rows, np.int32)                                          # (B,)
    jax.block_until_ready(sample_rows(batch.decode(slots, toks), keys, temp, top_p, top_k))
    sections: dict[str, float] = {}
    sampling = wall = 0.0
    for _ in range(repeats):
        eng.timer.start()
        t0 = time.perf_counter()
        logits = jax.block_until_ready(batch.decode(slots, toks))             # (B, V)
        t1 = time.perf_counter()
        jax.block_until_ready(sample_rows(logits, keys, temp, top_p, top_k))
        t2 = time.perf_counter()
        sampling, wall = sampling + t2 - t1, wall + t2 - t0
        for k, v in eng.timer.totals.items():
            sections[k] = sections.get(k, 0.0) + v
    out = {k: 1e3 * v / repeats for k, v in sections.items()}
    return {"step": 1e3 * wall / repeats, **out, "sampling": 1e3 * sampling / repeats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="packed model directory")
    p.add_argument("--rows", default="16,8,1", help="comma-separated row counts (default 16,8,1)")
    p.add_argument("--context", type=int, default=128, help="KV cache context (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per row count (default 3)")
    args = p.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
        if not rows or min(rows) < 1 or args.repeats < 1:
            raise ValueError
    except ValueError:
        print(f"error: --rows expects positive integers like 16,8,1 and --repeats >= 1, got "
              f"{args.rows!r} and {args.repeats}", file=sys.stderr)
        return 2
    try:
        model = PackedModel.open(args.model, verify_experts=False)
    except PackedFormatError as e:
        print(f"error: --model: {e}", file=sys.stderr)
        return 2
    engine = Engine(model, EngineOptions(backend="host", context=args.context, profile=True,
                                         verify=False))
    batch = BatchEngine(engine, max(rows))
    rng = np.random.default_rng(0)
    for slot in range(batch.max_batch):
        batch.prefill(slot, rng.integers(3, 1000, 4))
    print(f"load average {os.getloadavg()[0]:.2f}")
    for r in rows:
        res = profile_rows(batch, r, args.repeats, rng)
        print(f"rows {r}: " + "  ".join(f"{k} {v:.1f}" for k, v in res.items()) + " (ms)")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
