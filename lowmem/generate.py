"""``python -m lowmem.generate``: stream text from a packed model directory.

With no ``--model``, runs the embedded default: a small synthetic checkpoint
is written, quantized and generated from, all locally (meaningless text: the
weights are random; the point is that every stage runs).
"""
from __future__ import annotations

import argparse
import logging
import sys

from lowmem.cli import add_engine_arguments, engine_kwargs, setup_cli
from lowmem.engine import EngineError
from lowmem.sampling import SamplingParams
from quant.packed import PackedFormatError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lowmem.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="packed model directory (from python -m lowmem.quantize); "
                   "omit to build and use the embedded synthetic default")
    p.add_argument("--prompt", default="The answer to life the universe and everything is of course",
                   help="text to continue (Grok-1 is a base model: no chat template)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus filter p in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[],
                   help="stop when this string is produced (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    p.add_argument("--bos", action="store_true", help="prepend BOS (the reference does not)")
    p.add_argument("--truncate", action="store_true",
                   help="left-truncate a prompt longer than the context instead of failing")
    add_engine_arguments(p)
    p.add_argument("--workdir", default=".lowmem",
                   help="where the embedded default's synthetic model is kept (default .lowmem)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and statistics")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli(args.verbose)
    from lowmem.api import load
    from lowmem.decoding import GenerationRequest
    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
        model_dir = args.model
        if model_dir is None:
            from lowmem.demo import ensure_demo_model
            model_dir = ensure_demo_model(args.workdir)
            print(f"[embedded default: synthetic model in {model_dir}; random weights, "
                  f"so the text is meaningless]", file=sys.stderr)
        runtime = load(model_dir, **engine_kwargs(args))
        req = GenerationRequest(max_new_tokens=args.max_new_tokens, sampling=sampling,
                                seed=args.seed, stop_at_eos=not args.ignore_eos,
                                truncate=args.truncate)
        try:
            sys.stdout.write(args.prompt)
            for piece in runtime.generate_text(args.prompt, req, stops=tuple(args.stop),
                                               bos=args.bos):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            log.info("expert stats: %s", runtime.engine.expert_stats.as_dict())
        finally:
            runtime.close()
    except (EngineError, PackedFormatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
