"""What every command-line tool shares: options, their parsing and checks, logging, errors.

Each option is defined here once (``-m/--model``, ``-p/--prompt``, sizes,
sampling, engine settings, ``-v/-q``), so that a flag means the same in every
tool and is checked the same way before any work starts. Bad input ends in
exactly one line on stderr and exit status 2 (``CLIError``, or argparse's own
errors through ``Parser``); unexpected errors keep their traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

from lowmem import backends
from lowmem.engine import DEFAULT_PRECISION
from lowmem.model import PRECISIONS

DEFAULT_PROMPT = "The answer to life the universe and everything is of course"
DEFAULT_PRESET = "grok-1"
GIB = 1 << 30
OUTPUT_TABLES = {"auto": None, **{t: t for t in backends.OUTPUT_TABLES}}  # -> output_table
ACTIVATIONS = {"auto": None, "fp32": False, "int8": True}     # --activations -> act_int8
MAX_SIZE = 1 << 50                      # 1 PiB: anything larger is a typo, not a device
SEED_MAX = 2**32 - 1                    # jax.random.key takes a uint32 seed without x64
STAGE_LOGGER = "lowmem.stage"           # one line per stage of a run, shown unless -q
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


class CLIError(ValueError):
    """Bad command-line input: one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors ('error: ...; see --help') and defaults in the help."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout, drops reST double backticks."""

    def format_help(self) -> str:
        return super().format_help().replace("``", "")


def stage(message: str, *args) -> None:
    """A progress line on stderr (what the run is doing now); silenced by -q."""
    logging.getLogger(STAGE_LOGGER).info(message, *args)


# --- value parsers (argparse types: a ValueError becomes a one-line usage error) ----

def parse_size(text: str, what: str = "size", bare: str = "gb") -> int:
    """'80GB' -> 80e9 bytes, '80GiB' -> 80 * 2^30, '512MB'; a bare number is in ``bare`` units."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = (m.group(2).lower() or bare) if m else None
    if m is None or unit not in _UNITS:
        raise CLIError(f"{what}: expected a size like 80GB, 80GiB or 512MB, found {text!r}")
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value > MAX_SIZE:
        raise CLIError(f"{what}: expected a size below 1 PiB, found {text!r}")
    return int(value)


def size_type(what: str, bare: str = "gb"):
    def parse(text):
        try:
            return parse_size(text, what, bare)
        except CLIError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    parse.__name__ = "size"
    return parse


def int_type(lo: int | None = None, hi: int | None = None):
    """An integer in [lo, hi] (either end open when None)."""
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            rng = (f">= {lo}" if hi is None else f"<= {hi}" if lo is None
                   else f"in [{lo}, {hi}]")
            raise argparse.ArgumentTypeError(f"expected a whole number {rng}, found {text!r}")
        return n
    parse.__name__ = "integer"
    return parse


def float_type(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False):
    """A finite number in [lo, hi] ((lo, hi] with lo_open)."""
    def parse(text):
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
        if not math.isfinite(x) or x < lo or (lo_open and x == lo) or x > hi:
            lo_s = f"> {lo:g}" if lo_open else f">= {lo:g}"
            rng = lo_s if hi == math.inf else f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise argparse.ArgumentTypeError(f"expected a finite number {rng}, found {text!r}")
        return x
    parse.__name__ = "number"
    return parse


def nonempty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a non-empty string")
    return text


nonempty.__name__ = "string"


def _parent_exists(text: str) -> Path:
    path = Path(text)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {str(parent)!r} does not exist")
    return path


def output_file(text: str) -> Path:
    """A file to write: its directory must exist now, not after the run."""
    path = _parent_exists(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, expected a file name")
    return path


output_file.__name__ = "output path"


def new_directory(text: str) -> Path:
    """A directory to create: its parent must exist now, not after the run."""
    return _parent_exists(text)


new_directory.__name__ = "output directory"


def load_config(preset_name: str | None, config: str | None):
    """A GrokConfig from --config (a JSON object, inline or in a file) or --preset."""
    from quant.config import GrokConfig, preset
    if config is None:
        return preset(preset_name or DEFAULT_PRESET)
    text = config
    if not text.lstrip().startswith("{"):
        try:
            text = Path(text).read_text()
        except OSError as e:
            raise CLIError(f"--config {config}: cannot read the file ({e.strerror})") from None
    try:     # GrokConfig checks every field's type and range
        return GrokConfig.from_dict(json.loads(text))
    except (ValueError, TypeError, AttributeError) as e:
        raise CLIError(f"--config: expected a JSON object of GrokConfig fields ({e})") from None


# --- option groups -------------------------------------------------------------------

def add_verbosity(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true",
                   help="also log details and statistics (default: stage lines only)")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="print only the result and errors (default: off)")


def add_model_argument(p, help_default: str) -> None:
    p.add_argument("-m", "--model", metavar="MODEL_DIR",
                   help=f"packed model directory from lowmem quantize (default: {help_default})")


def add_config_arguments(p, default: str = DEFAULT_PRESET) -> None:
    """--preset / --config: one rule in every tool (default preset grok-1)."""
    from quant.config import PRESETS
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"model configuration by name (default {default}; a model directory's "
                        f"own config wins)")
    g.add_argument("--config", metavar="JSON",
                   help="model configuration as a JSON object, inline or in a file, instead "
                        "of --preset (default: none)")


def add_prompt_arguments(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-p", "--prompt", help=f"text to continue (Grok-1 is a base model: no chat "
                                          f"template; default {DEFAULT_PROMPT!r})")
    g.add_argument("--prompt-file", metavar="PATH",
                   help="read the prompt from a UTF-8 file, or stdin with '-' (default: none)")
    g.add_argument("--prompt-ids", metavar="IDS",
                   help="comma-separated token ids instead of text, e.g. 5,17,99 "
                        "(default: none; needed for a model without tokenizer)")


def add_sampling_arguments(p, max_new_tokens: int | None = None, sampling: bool = True) -> None:
    """-n and (unless ``sampling`` is False: greedy-only tools) the sampling settings."""
    from lowmem.decoding import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    p.add_argument("-n", "--max-new-tokens", type=int_type(1), default=max_new_tokens, metavar="N",
                   help=f"tokens to generate, >= 1 (default {max_new_tokens})")
    if not sampling:
        return
    p.add_argument("--temperature", "--temp", type=float_type(0.0), default=DEFAULT_TEMPERATURE, metavar="T",
                   help=f"sampling temperature, >= 0; 0 = greedy (default {DEFAULT_TEMPERATURE:g})")
    p.add_argument("--top-p", type=float_type(0.0, 1.0, lo_open=True), default=1.0, metavar="P",
                   help="nucleus filter: keep the most likely tokens up to this probability "
                        "mass, in (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int_type(0), default=0, metavar="K",
                   help="keep the k most likely tokens, >= 0 (default 0 = off)")
    p.add_argument("--seed", type=int_type(0, SEED_MAX), default=0,
                   help=f"random seed for sampling, 0..{SEED_MAX} (default 0)")


def add_engine_arguments(p) -> None:
    """The engine options every running CLI shares (generate, profile)."""
    p.add_argument("--expert-cache-gb", type=size_type("--expert-cache-gb", bare="gib"),
                   default=None, metavar="SIZE",
                   help="device expert cache budget; a bare number is GiB, or 60GB / 60GiB "
                        "(default: what fits after resident weights, KV cache and 2 GiB headroom; "
                        "device backend only)")
    p.add_argument("--cache-policy", choices=("auto", "lru", "layer"), default="auto",
                   help="expert eviction: lru, layer (evict the layer whose turn comes last; far "
                        "better when the cache holds less than one token's experts), or auto = "
                        "layer below two tokens' experts, else lru (default auto)")
    p.add_argument("--context", type=int_type(1), default=None, metavar="TOKENS",
                   help="KV cache length in tokens, 1 .. the model's sequence length "
                        "(default: the model's sequence length)")
    p.add_argument("--backend", choices=("auto", "host", "device"), default="auto",
                   help="host = numba kernels on the mapped files; device = experts streamed "
                        "into an accelerator cache; auto = device when JAX sees a GPU, else host "
                        "(default auto)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="disable speculative expert prefetch (default: prefetch on)")
    p.add_argument("--staging-workers", type=int_type(1, 64), default=4, metavar="N",
                   help="device backend: threads filling host staging chunks while earlier "
                        "chunks are transferred, 1..64 (default 4)")
    p.add_argument("--output-table", choices=OUTPUT_TABLES, default="auto",
                   help="host backend: the logits read the bf16 output table or a copy built "
                        "at load: int8 (half its bytes per token) or int4 (groups of 32, about "
                        "0.28x); docs/FIDELITY.md; auto = int8 for models with int4 experts, "
                        "bf16 for int8 ones and on a device (default auto)")
    p.add_argument("--output-int8", dest="output_table", action="store_const", const="int8",
                   help="the same as --output-table int8 (default: off, --output-table decides)")
    p.add_argument("--activations", choices=ACTIVATIONS, default="auto",
                   help="host backend: the inputs of the quantized matmuls (experts, attention) "
                        "in fp32, or int8 per 32 values (and int16 per row in the int8 output "
                        "table's logits; AVX-512 VNNI; 1.5-2.3x faster where "
                        "several tokens share an expert: prefill, serving; a measured change of "
                        "the logits, docs/FIDELITY.md); auto, on a CPU with AVX-512 VNNI: int8 "
                        "for models with int4 experts; for int8 models, int8 in the matmuls "
                        "of 2 rows or more (prompt chunks, batched steps), fp32 for one row "
                        "(decode exact); else fp32 (default auto)")
    p.add_argument("--act-int8", dest="activations", action="store_const", const="int8",
                   help="the same as --activations int8 (default: off, --activations decides)")
    p.add_argument("--mlock", action="store_true",
                   help="lock the model's files in RAM at load, so the OS never pages out "
                        "experts a while unused (needs the RAM and a memlock limit, ulimit -l, "
                        "that allows it; default off)")
    p.add_argument("--no-mmap", action="store_true",
                   help="read the model's files into RAM (huge pages) at load instead of "
                        "mapping them: the host kernels stream experts through 2 MiB pages "
                        "(needs the model's size in free RAM; default off: mapped)")
    add_precision_argument(p)


def add_precision_argument(p) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="activations and KV cache: fp32 = the exact math of the weights; "
                        f"bf16 = as the release runs (default {DEFAULT_PRECISION}; "
                        f"docs/FIDELITY.md)")


def engine_kwargs(args) -> dict:
    """EngineOptions fields from arguments added by add_engine_arguments."""
    budget = None if args.expert_cache_gb is None else args.expert_cache_gb / GIB
    return dict(backend=args.backend, expert_cache_gb=budget, context=args.context,
                prefetch=not args.no_prefetch, cache_policy=args.cache_policy,
                staging_workers=args.staging_workers,
                precision=args.precision, output_table=OUTPUT_TABLES[args.output_table],
                act_int8=ACTIVATIONS[args.activations], mlock=args.mlock,
                mmap=not args.no_mmap)


# --- checks that need more than one option, or a file ---------------------------------

def parse_ids(text: str, option: str = "--prompt-ids") -> list[int]:
    """'5,17,99' -> [5, 17, 99]; at least one id."""
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CLIError(f"{option}: expected comma-separated integers, found {text!r}") from None
    if not ids:
        raise CLIError(f"{option}: expected at least one token id, found none")
    return ids


def read_prompt(args) -> str | list[int]:
    """Text or token ids from -p / --prompt-file / --prompt-ids (default: DEFAULT_PROMPT)."""
    if args.prompt_ids is not None:
        return parse_ids(args.prompt_ids)
    if args.prompt_file is not None:
        what = "stdin" if args.prompt_file == "-" else args.prompt_file
        try:
            data = (sys.stdin.buffer.read() if args.prompt_file == "-"
                    else Path(args.prompt_file).read_bytes())
        except OSError as e:
            raise CLIError(f"--prompt-file {what}: cannot read ({e.strerror})") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CLIError(f"--prompt-file {what}: expected UTF-8 text, found byte "
                           f"0x{data[e.start]:02x} at offset {e.start}") from None
    else:
        text = DEFAULT_PROMPT if args.prompt is None else args.prompt
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:   # undecodable argv bytes arrive as lone surrogates
            raise CLIError(f"--prompt: expected UTF-8 text, found an undecodable byte at "
                           f"character {e.start}") from None
    if not text:
        raise CLIError("the prompt is empty: give some text (-p, --prompt-file) or --prompt-ids")
    return text


def check_context(args, cfg) -> None:
    """--context against the model's sequence length, before anything is allocated."""
    if args.context is not None and args.context > cfg.sequence_len:
        raise CLIError(f"--context {args.context}: expected at most the model's sequence "
                       f"length {cfg.sequence_len}")


def setup_cli(args_or_verbose, quiet: bool = False) -> None:
    """Logging for a CLI, and JAX's GPU allocator at 95% of the device, not 75%.

    Stage lines (``stage``) show unless -q; library logs show at -v. The
    expert cache is sized from the allocator's limit, so JAX's default would
    leave a fifth of an H100 unused; environment variables are read when JAX
    starts its backend, so CLI mains call this first (``lowmem.load`` sets it
    too when JAX has not started yet).
    """
    verbose = getattr(args_or_verbose, "verbose", args_or_verbose)
    quiet = getattr(args_or_verbose, "quiet", quiet)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR if quiet
                        else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    st = logging.getLogger(STAGE_LOGGER)
    st.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    st.addHandler(handler)
    st.propagate = False
    st.setLevel(logging.ERROR if quiet else logging.INFO)


def run_main(body, args) -> int:
    """Run a CLI body; expected errors -> one line on stderr and exit 2."""
    from lowmem.engine import EngineError
    from lowmem.tokenizer import TokenizerError
    from quant.checkpoint import CheckpointError
    from quant.packed import PackedFormatError
    try:
        return body(args)
    except (CLIError, EngineError, PackedFormatError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# --- running a model: the embedded default, the backend line, the closing rate line ---

def add_workdir_argument(p) -> None:
    p.add_argument("--workdir", default=os.environ.get("LOWMEM_WORKDIR", ".lowmem"),
                   help="where the embedded default's synthetic model is kept "
                        "(default $LOWMEM_WORKDIR or .lowmem)")


def _numba_cache() -> str:
    return os.environ.get("NUMBA_CACHE_DIR") or str(Path(__file__).parent / "__pycache__")


def check_prompt(prompt: str | list[int], cfg, model_dir, has_tokenizer: bool) -> None:
    """Text needs the model's tokenizer; ids must be in its vocabulary."""
    if isinstance(prompt, str) and not has_tokenizer:
        raise CLIError(f"{model_dir}: no tokenizer.model in the model directory; give the "
                       f"prompt as --prompt-ids")
    bad = [t for t in prompt if isinstance(t, int) and not 0 <= t < cfg.vocab_size]
    if bad:
        raise CLIError(f"--prompt-ids: token ids {bad[:5]} outside the vocabulary of "
                       f"{cfg.vocab_size}")


def open_runtime(args, prompt=None, **options):
    """Check the options (and prompt) against the model, build the demo if needed, load,
    and say what was chosen."""
    from quant.packed import PackedModel
    if args.model is None:
        from lowmem.demo import DEMO_PRESET, ensure_demo_model
        from quant.config import preset
        check_context(args, preset(DEMO_PRESET))
        if prompt is not None:
            check_prompt(prompt, preset(DEMO_PRESET), "the embedded default", True)
        model_dir = ensure_demo_model(args.workdir, progress=progress_bar())
        stage("embedded default: synthetic model in %s (random weights, so the text is "
              "meaningless)", model_dir)
    else:
        model_dir = args.model
        model = PackedModel.open(model_dir)
        check_context(args, model.cfg)
        if prompt is not None:
            check_prompt(prompt, model.cfg, model_dir, model.tokenizer_path is not None)
    from lowmem.api import load
    from lowmem.api import enable_compilation_cache
    jax_cache = enable_compilation_cache()
    runtime = load(model_dir, compilation_cache=str(jax_cache), **engine_kwargs(args), **options)
    engine = runtime.engine
    how = ("numba kernels on the memory-mapped files" if engine.backend_name == "host" else
           "experts streamed into a device cache")
    why = ""
    if args.backend == "auto":
        why = ("; JAX sees no GPU (pip install '.[cuda]' for one)"
               if engine.device.platform == "cpu" else "")
    stage("backend %s -> %s: %s, on %s%s", args.backend, engine.backend_name, how,
          engine.device, why)
    if engine.backend_name == "host" and args.expert_cache_gb is not None:
        logging.getLogger(STAGE_LOGGER).warning(
            "warning: --expert-cache-gb is ignored by the host backend (experts are read in place)")
    stage("the first steps compile (once: kept in %s and, for numba, %s)", jax_cache,
          _numba_cache())
    return runtime


def progress_bar():
    """The quantizer's tqdm bar when stderr is a terminal and stage lines are on."""
    if not (sys.stderr.isatty() and logging.getLogger(STAGE_LOGGER).isEnabledFor(logging.INFO)):
        return None
    from lowmem.quantize import BarProgress
    return BarProgress()


class TokenClock:
    """Prompt and decode rates for the closing line (llama-cli style, on stderr).

    The prompt phase runs to the first output (prefill and first sample); decode
    steps are the tokens fed after the prompt, timed from the first output on.
    """

    def __init__(self, prompt_tokens: int):
        self.clock = time.perf_counter
        self.prompt_tokens, self.start, self.first = prompt_tokens, self.clock(), None

    def tick(self) -> None:
        if self.first is None:
            self.first = self.clock()

    def report(self, engine) -> None:
        end = self.clock()
        first = self.first or end
        steps = max(engine.position - self.prompt_tokens, 0)
        pre, dec = first - self.start, end - first
        line = (f"prompt: {self.prompt_tokens} tokens in {pre:.2f} s "
                f"({self.prompt_tokens / max(pre, 1e-9):.2f} tok/s) | decode: {steps} tokens "
                f"in {dec:.2f} s")
        if steps:
            line += f" ({steps / max(dec, 1e-9):.2f} tok/s, {1e3 * dec / steps:.0f} ms/token)"
        stage("%s", line)
