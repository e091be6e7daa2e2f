"""Time ``lowmem.sampling.sample`` per token on one 131072-entry row (issue 10 item 2).

Each case is one decode step's sampling as the engine runs it: a key split and
the draw in one jitted call, then the host reads the token. ``--against FILE``
times another version of ``sampling.py`` in the same process, interleaved call
by call (e.g. ``git show HEAD~1:lowmem/sampling.py > /tmp/old.py``), and checks
that both draw the same token in every case.

    python tools/bench_sampling.py
    python tools/bench_sampling.py --against /tmp/old.py --repeats 25
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import jax
import numpy as np

from lowmem import sampling

VOCAB = 131072


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("other_sampling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["other_sampling"] = module          # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def step_fn(module):
    @jax.jit
    def step(logits, key, temperature, top_p, top_k):
        key, sub = jax.random.split(key)
        return module.sample(logits[None], sub, temperature, top_p, top_k)[0], key
    return step


def cases():
    rng = np.random.default_rng(0)
    peaked = (rng.normal(0, 1, VOCAB) - 8 * (np.arange(VOCAB) > 50)).astype(np.float32)
    flat = rng.normal(0, 1, VOCAB).astype(np.float32)
    return [("greedy (temperature 0)", peaked, 0.0, 1.0, 0),
            ("top-p 0.95, top-k 40", peaked, 1.0, 0.95, 40),
            ("top-p 0.95, nucleus inside the selection cap", peaked, 1.0, 0.95, 0),
            ("top-p 0.95, nucleus of ~12000 tokens", flat, 1.0, 0.95, 0),
            ("temperature 1, no filter", flat, 1.0, 1.0, 0)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--against", metavar="FILE", help="another sampling.py to time alongside")
    p.add_argument("--repeats", type=int, default=25, help="timed calls per case (default 25)")
    args = p.parse_args(argv)
    fns = {"this": step_fn(sampling)}
    if args.against:
        fns = {"other": step_fn(load_module(args.against)), **fns}
    print(f"# load average {os.getloadavg()[0]:.2f}; median ms per token, {args.repeats} calls")
    print("| case | " + " | ".join(fns) + " |\n|---|" + "---|" * len(fns))
    for name, row, t, top_p, top_k in cases():
        call = (jax.numpy.asarray(row), jax.random.key(1), np.float32(t), np.float32(top_p),
                np.int32(top_k))
        tokens = {n: int(f(*call)[0]) for n, f in fns.items()}       # compiles
        if len(set(tokens.values())) != 1:
            raise SystemExit(f"{name}: the versions drew different tokens {tokens}")
        times: dict[str, list[float]] = {n: [] for n in fns}
        for _ in range(args.repeats):
            for n, f in fns.items():
                t0 = time.perf_counter()
                int(f(*call)[0])
                times[n].append(time.perf_counter() - t0)
        print(f"| {name} | " + " | ".join(f"{1e3 * np.median(v):.2f}" for v in times.values()) + " |")
    print(f"# load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
