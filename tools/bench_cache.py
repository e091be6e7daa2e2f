"""Expert cache policies on a recorded routing trace: LRU against the offline optimum.

Generates with ``record_routing=True``, turns the trace into the engine's
request order (per layer step, the distinct experts of the step's tokens:
``lowmem.profile.trace_keys``) and replays it at several cache budgets (in
expert slots) under LRU (the engine's policy) and Belady's optimum (evict the
block whose next use is farthest), side by side with the uniform-routing
expectation slots / experts.

As a check on the simulator, the generation itself runs on the device backend
(CPU is fine) with prefetch off and one of the budgets: its cache's hit count
must equal the LRU simulation's at that budget.

Synthetic weights route close to uniformly at random, so these hit rates say
little about real Grok-1 routing, which is skewed and correlated between
neighbouring tokens and layers (higher hit rates, and a larger gap to the
optimum for a policy that exploits it). Rerun on real weights to plan a cache.

    python tools/bench_cache.py                          # the embedded demo model
    python tools/bench_cache.py --feed random --tokens 256   # random ids, one step each
    python tools/bench_cache.py --model DIR --tokens 256 --slots 16 32 64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowmem.expert_cache import belady_hits, lru_hits, policy_hits, trace_keys  # noqa: E402

GIB = 1 << 30


def default_slots(total: int, top_k: int) -> list[int]:
    """A spread of budgets from one step's need to three quarters of all experts."""
    fractions = (0.0, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4)
    return sorted({max(top_k, round(f * total)) for f in fractions})


def _engine(model_dir, check_slots: int):
    from lowmem.api import load
    from quant.packed import PackedModel
    block = PackedModel.open(model_dir).expert_block_nbytes
    return load(model_dir, backend="device", prefetch=False, record_routing=True,
                expert_cache_gb=(check_slots + 0.5) * block / GIB)


def record(model_dir, args, check_slots: int):
    """Run the engine; returns (engine, trace keys, distinct tokens fed).

    'generate': a sampled generation (seed 0) from the prompt. 'random': the
    prompt, then --tokens uniformly random token ids fed one decode step each
    (random weights often collapse onto one repeated token when generating,
    and routing repeats with it).
    """
    import numpy as np
    from lowmem.decoding import GenerationRequest, generate_tokens, prompt_logits
    from lowmem.sampling import SamplingParams
    rt = _engine(model_dir, check_slots)
    vocab = rt.engine.cfg.vocab_size
    if rt.tokenizer is not None:
        ids = rt.encode(args.prompt)
    else:
        ids = rt.encode([4 + b % (vocab - 4) for b in args.prompt.encode()])
    if args.feed == "random":
        fed = np.random.default_rng(0).integers(4, vocab, args.tokens).tolist()
        prompt_logits(rt.engine, ids + fed)
    else:
        req = GenerationRequest(args.tokens, SamplingParams(temperature=args.temperature),
                                seed=0, stop_at_eos=False)
        fed = list(generate_tokens(rt.engine, ids, req))
    return rt.engine, trace_keys(rt.engine.routing_trace), len(set(fed))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="packed model dir (default: the embedded demo model)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated (default 64)")
    ap.add_argument("--prompt", default="The answer to life the universe and everything is of course")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="sampling temperature with --feed generate (default 1)")
    ap.add_argument("--feed", choices=("generate", "random"), default="generate",
                    help="generate tokens, or feed random token ids one step each")
    ap.add_argument("--slots", type=int, nargs="+", help="budgets in expert slots")
    ap.add_argument("--workdir", default=".lowmem", help="where the demo model is kept")
    args = ap.parse_args(argv)
    if args.model is None:
        from lowmem.demo import ensure_demo_model
        args.model = ensure_demo_model(args.workdir)
    from quant.config import GrokConfig
    from quant.packed import PackedModel
    cfg: GrokConfig = PackedModel.open(args.model).cfg
    total = cfg.num_layers * cfg.num_experts
    slots = sorted(set(args.slots or default_slots(total, cfg.num_selected_experts)))
    if args.tokens < 1 or slots[0] < cfg.num_selected_experts:
        print(f"error: need --tokens >= 1 and every --slots >= {cfg.num_selected_experts} "
              f"(one step's experts)", file=sys.stderr)
        return 2
    check = slots[len(slots) // 2]
    engine, trace, distinct = record(args.model, args, check)
    engine_hits = engine.expert_stats.hits
    if distinct < args.tokens / 4:
        print(f"warning: only {distinct} distinct tokens: the routing repeats with them "
              f"(random weights collapse when generating); try --feed random")
    print(f"model {args.model}: {cfg.num_layers} layers x {cfg.num_experts} experts = {total}; "
          f"trace of {len(trace)} requests, prompt included; {args.tokens} tokens "
          + (f"generated at temperature {args.temperature:g}" if args.feed == "generate"
             else "of random ids fed") + f", {distinct} distinct")
    print(f"{'slots':>6}{'of all':>8}{'LRU':>8}{'layer':>8}{'Belady':>8}{'uniform':>9}"
          f"{'Belady/LRU':>12}")
    for s in slots:
        lru, opt = lru_hits(trace, s) / len(trace), belady_hits(trace, s) / len(trace)
        layer = policy_hits(trace, s, "layer", cfg.num_layers) / len(trace)
        ratio = f"{opt / lru:12.2f}" if lru else f"{'-':>12}"
        print(f"{s:6d}{s / total:8.1%}{lru:8.1%}{layer:8.1%}{opt:8.1%}{min(1.0, s / total):9.1%}"
              f"{ratio}")
    sim = lru_hits(trace, check)
    status = "agrees" if sim == engine_hits else "DISAGREES"
    print(f"check: the engine's LRU cache at {check} slots had {engine_hits} hits; the simulator "
          f"{sim} ({status})")
    print("note: synthetic routing is close to uniform random; real Grok-1 routing will differ")
    return 0 if sim == engine_hits else 1


if __name__ == "__main__":
    sys.exit(main())
