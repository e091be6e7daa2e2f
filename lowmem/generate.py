"""lowmem generate (python -m lowmem.generate): stream text from a packed model directory.

With no --model, runs the embedded default: a small synthetic checkpoint is
written, quantized and generated from, all locally (meaningless text: the
weights are random; the point is that every stage runs). The text goes to
stdout; stage lines and a closing tokens/s line go to stderr (-q silences them).
"""
from __future__ import annotations

import logging
import sys

from lowmem import cli
from lowmem.cli import CLIError

log = logging.getLogger(__name__)


def build_parser(prog: str = "python -m lowmem.generate") -> cli.Parser:
    p = cli.Parser(prog=prog, description=__doc__)
    cli.add_model_argument(p, "build and use the embedded synthetic model")
    cli.add_prompt_arguments(p)
    cli.add_sampling_arguments(p)
    p.add_argument("--stop", action="append", default=[], type=cli.nonempty, metavar="TEXT",
                   help="stop when this string is produced, repeatable (default: none)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the EOS token (default: stop)")
    p.add_argument("--bos", action="store_true",
                   help="prepend BOS (default: no, as the reference runner)")
    p.add_argument("--truncate", action="store_true",
                   help="left-truncate a prompt longer than the context instead of failing "
                        "(default: fail)")
    cli.add_engine_arguments(p)
    cli.add_workdir_argument(p)
    cli.add_verbosity(p)
    return p


def run(args) -> int:
    prompt = cli.read_prompt(args)
    runtime = cli.open_runtime(args, prompt)
    try:
        if isinstance(prompt, list) or runtime.tokenizer is None:
            _generate_ids(runtime, args, prompt)
        else:
            _generate_text(runtime, args, prompt)
        log.info("expert stats: %s", runtime.engine.expert_stats.as_dict())
    finally:
        runtime.close()
    return 0


def _settings(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
                stop_at_eos=not args.ignore_eos, truncate=args.truncate, bos=args.bos)


def _generate_text(runtime, args, prompt: str) -> None:
    ids = runtime.encode(prompt, args.bos)     # errors about the prompt come before any output
    pieces = runtime.generate_text(prompt, **_settings(args))
    clock = cli.TokenClock(len(ids))
    first = True
    for piece in pieces:
        if first:
            sys.stdout.write(prompt)
            first = False
        sys.stdout.write(piece)
        sys.stdout.flush()
        clock.tick()
    sys.stdout.write(prompt if first else "")
    sys.stdout.write("\n")
    clock.report(runtime.engine)


def _generate_ids(runtime, args, prompt) -> None:
    if isinstance(prompt, str):
        raise CLIError(f"{runtime.engine.model.model_dir}: no tokenizer.model in the model "
                       f"directory; give the prompt as --prompt-ids")
    settings = _settings(args)
    if settings.pop("stop"):
        raise CLIError("--stop needs a tokenizer.model in the model directory")
    ids = runtime.encode(prompt, args.bos)
    clock = cli.TokenClock(len(ids))
    out = []
    for token in runtime.generate(prompt, **settings):
        out.append(str(token))
        clock.tick()
    print(",".join(out))
    clock.report(runtime.engine)


def main(argv=None, prog: str = "python -m lowmem.generate") -> int:
    args = build_parser(prog).parse_args(argv)
    cli.setup_cli(args)
    return cli.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
