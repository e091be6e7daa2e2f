"""``lowmem COMMAND [options]`` (or ``python -m lowmem``): one entry point for every tool.

Each command is the module ``lowmem.<command>`` with a ``main(argv)``; adding
a tool is one line in COMMANDS. ``python -m lowmem.<command>`` keeps working.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {   # name -> one-line summary (module lowmem.<name>)
    "generate": "stream text from a packed model (default: a synthetic demo model)",
    "quantize": "pack the Grok-1 release checkpoint (ckpt-0/) into a model directory",
    "profile": "where a token's time, bytes and memory go",
    "plan": "what a device can hold, and how fast it should decode",
    "reference": "the dense numpy reference forward pass on a small checkpoint",
    "serve": "an OpenAI-compatible HTTP server with continuous batching",
    "eval": "how far a model's predictions are from a reference's (KL, top-1, perplexity)",
}


def usage() -> str:
    from lowmem import __version__
    lines = [f"usage: lowmem COMMAND [options]   (lowmem {__version__})", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", "lowmem COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from lowmem import __version__
        print(f"lowmem {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; expected one of "
              f"{', '.join(COMMANDS)} (see lowmem --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(f"lowmem.{argv[0]}")
    return module.main(argv[1:], prog=f"lowmem {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
