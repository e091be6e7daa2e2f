"""One layer's host-backend decode attention against the read floor of its weights (issue 10 item 4).

Times, interleaved call by call in one process (the machines are shared): a
plain parallel read (``membw.read_seconds``, the time of the read itself) of
layer 0's q/k/v/o weight bytes (the floor), the four numba
kernels called directly, and the engine's jitted attention step for one token
at position ``--position`` (default ``--context - 12``) of a cache filled up to
it. The floor reads what one token's attention must: the four weights and the
KV cache's filled positions (in the engine's precision; the host backend's
attend reads the blocks of ``model.KEY_BLOCK`` positions that hold them, an
older model.py may read the whole cache). ``--against FILE`` times
another version of ``lowmem/model.py`` beside it (e.g.
``git show HEAD~1:lowmem/model.py > /tmp/old_model.py``) on the same weights,
cache rows and token, and prints how far its output is from this one's.

    python tools/bench_attention.py --model DIR --context 512
    python tools/bench_attention.py --model DIR --context 8192 --against /tmp/old_model.py
    python tools/bench_attention.py --model DIR --context 8192 --position 20
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lowmem import engine as E
from lowmem import model as M
from lowmem.cpu_kernels import matmul
from lowmem.engine import Engine, EngineOptions
from membw import read_seconds
from quant.packed import PackedFormatError, PackedModel

ROLES = ("q", "k", "v", "o")


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("other_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["other_model"] = module
    spec.loader.exec_module(module)
    return module


def filled_cache(module, cfg, length: int, rows: np.ndarray, precision: str):
    """A layer cache in ``module``'s own layout holding ``rows`` (2, n, Hkv, K) from 0."""
    cache = module.init_kv_cache(cfg, length, precision=precision)[0]
    return module.kv_write(cache, jnp.asarray(rows[0]), jnp.asarray(rows[1]), jnp.int32(0))


def floor_bytes(engine: Engine, pos: int) -> int:
    """Layer 0's q/k/v/o weight bytes (values and scales) plus one layer's KV cache rows
    up to position pos."""
    weights = engine.backend.weights[0]
    cache = (pos + 1) * engine.cfg.num_kv_heads * engine.cfg.key_size * 2
    return (sum(weights[r].values.nbytes + weights[r].scales.nbytes for r in ROLES)
            + cache * np.dtype(M.cache_dtype(engine.precision)).itemsize)


def cases(engine: Engine, against, rows: np.ndarray, pos: int):
    """(name -> a function timing one call, the attention cases' outputs, the floor's
    seconds: each "read floor" call appends the read's own time, without the three
    readers' repeats that ``read_seconds`` takes)."""
    cfg, prec, backend = engine.cfg, engine.precision, engine.backend
    lp, weights = engine.layers[0], backend.weights[0]
    words = [np.asarray(a).reshape(-1).view(np.uint8)
             for r in ROLES for a in (weights[r].values, weights[r].scales)]
    cache = filled_cache(M, cfg, engine.cache_len, rows, prec)
    filled = (cache.k[:, :pos + 1], cache.v[:, :, :pos + 1])                 # keys, values to pos
    words += [np.asarray(a).reshape(-1).view(np.uint8) for a in filled]
    words = [w[: w.size // 8 * 8].view(np.uint64) for w in words]
    h = jnp.asarray(np.random.default_rng(1).standard_normal((1, cfg.emb_size)), jnp.float32)
    x, zeros = np.asarray(h), np.zeros((1, cfg.q_width), np.float32)          # (1, D), (1, Hq*K)
    valid = jnp.arange(engine.cache_len) < pos                                 # (S,) bool
    outs: dict = {}

    def step(name, module, jitted, **kw):
        state = [filled_cache(module, cfg, engine.cache_len, rows, prec)]

        def run():
            out, state[0] = jitted(cfg, backend.linear, prec, lp, h, state[0], valid,
                                   jnp.int32(pos), **kw)
            outs[name] = jax.block_until_ready(out)                           # (1, D) fp32
        return run

    floor_s: list[float] = []
    fns = {"read floor": lambda: floor_s.append(read_seconds(words)),
           "kernels": lambda: [matmul(x, weights[r]) for r in "qkv"] + [matmul(zeros, weights["o"])],
           "attention": step("attention", M, E._attention,
                             key_block=backend.key_block)}
    if against is not None:
        other = jax.jit(against.attention_block, static_argnums=(0, 1, 2), donate_argnames=("cache",))
        fns["--against"] = step("--against", against, other)
    return fns, outs, floor_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="packed model directory")
    p.add_argument("--context", type=int, default=512, help="KV cache context (default 512)")
    p.add_argument("--precision", choices=M.PRECISIONS, default=E.DEFAULT_PRECISION,
                   help=f"engine precision (default {E.DEFAULT_PRECISION})")
    p.add_argument("--position", type=int,
                   help="the token's position (default --context - 12; the cache holds the "
                        "ones before)")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per case (default 15)")
    p.add_argument("--against", help="another lowmem/model.py to time beside this one")
    args = p.parse_args(argv)
    if args.context < 16 or args.repeats < 1:
        print(f"error: --context expects >= 16 and --repeats >= 1, got {args.context} and "
              f"{args.repeats}", file=sys.stderr)
        return 2
    pos = args.context - 12 if args.position is None else args.position
    if not 0 < pos < args.context:
        print(f"error: --position expects 1 .. --context - 1 ({args.context - 1}), got {pos}",
              file=sys.stderr)
        return 2
    if args.against is not None and not os.path.isfile(args.against):
        print(f"error: --against: no such file {args.against!r}", file=sys.stderr)
        return 2
    try:
        model = PackedModel.open(args.model, verify_experts=False)
    except PackedFormatError as e:
        print(f"error: --model: {e}", file=sys.stderr)
        return 2
    engine = Engine(model, EngineOptions(backend="host", context=args.context, verify=False,
                                         precision=args.precision))
    cfg = engine.cfg
    rows = np.random.default_rng(0).standard_normal(
        (2, pos, cfg.num_kv_heads, cfg.key_size)).astype(np.float32)          # (2, n, Hkv, K)
    against = load_module(args.against) if args.against else None
    fns, outs, floor_s = cases(engine, against, rows, pos)
    for f in fns.values():
        f(), f()                                                              # compile, warm
    times = {name: [] for name in fns}
    print(f"precision {engine.precision}, context {args.context} ({engine.cache_len} cache rows), "
          f"position {pos}, floor bytes {floor_bytes(engine, pos) / 1e6:.1f} MB, "
          f"load average {os.getloadavg()[0]:.2f}")
    for _ in range(args.repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    times["read floor"] = floor_s[-args.repeats:]
    floor = np.median(times["read floor"])
    for name, t in times.items():
        t = np.asarray(t)
        print(f"{name:11s} median {1e3 * np.median(t):7.2f} ms  min {1e3 * t.min():7.2f} ms  "
              f"({np.median(t) / floor:.2f}x the read floor)")
    if against is not None:
        ref, other = np.asarray(outs["attention"]), np.asarray(outs["--against"])
        print(f"--against output: max |diff| / max |out| = "
              f"{np.abs(ref - other).max() / np.abs(ref).max():.2e}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
