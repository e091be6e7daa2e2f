"""``python -m lowmem.eval``: how far a model's predictions are from a reference's.

Teacher-forced over a text (or token ids): every position's next-token
distribution of ``--model`` is compared with that of ``--reference`` (another
packed model, e.g. int4 against int8, or the same model at another precision)
or with logits written by ``tools/release_oracle.py`` (``--release-oracle``,
the release's own code). Reported per position and overall:

- KL(reference || model), in nats (natural log), computed in float64;
- top-1 agreement (same argmax) and top-5 overlap (shared tokens / 5);
- relative logit error: max |model - reference| over max |reference|;
- perplexity of each model on the text (its own tokens after the first).

Each report also gives the expert bytes one decode token reads
(``expert_bytes_per_token``), so quality is seen next to its cost.
``--requant-experts q4_0`` evaluates a baseline instead of the packed model as
stored: the int8 model's experts requantized in memory with llama.cpp's Q4_0
and run densely by ``lowmem.reference`` (small presets; ``lowmem.requant``).

This is how a user decides between int8, int4 and group sizes, and how
tests assert quality.

    python -m lowmem.eval --model grok-1-int4 --reference grok-1-int8 --text prompt.txt --out q.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from lowmem import cli
from lowmem.cli import add_engine_arguments, engine_kwargs
from lowmem.model import PRECISIONS
from lowmem.requant import SCHEMES

log = logging.getLogger(__name__)


class EvalError(cli.CLIError):
    """Inputs that cannot be compared (shapes, too few tokens, unreadable files)."""


# --- metrics --------------------------------------------------------------------------

def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities over the last axis."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(model)) per row, nats: (T, V), (T, V) -> (T,)."""
    lp_ref, lp = log_softmax(ref_logits), log_softmax(logits)
    return np.maximum((np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1), 0.0)


def top_k_overlap(ref_logits: np.ndarray, logits: np.ndarray, k: int) -> np.ndarray:
    """Fraction of the reference's top-k tokens that are in the model's top-k, per row."""
    a = np.argsort(-np.asarray(ref_logits), axis=-1, kind="stable")[:, :k]   # (T, k)
    b = np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :k]       # (T, k)
    return np.array([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist())])


def perplexity(logits: np.ndarray, tokens: np.ndarray) -> float | None:
    """exp(mean NLL of tokens[1:] given logits[:-1]); None with fewer than 2 tokens."""
    if len(tokens) < 2:
        return None
    lp = log_softmax(logits[:-1])                                                  # (T-1, V)
    nll = -lp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]
    return float(np.exp(nll.mean()))


def compare(logits: np.ndarray, ref_logits: np.ndarray, tokens) -> dict:
    """Per-position and overall metrics of model logits against reference logits (T, V)."""
    logits, ref_logits = np.asarray(logits, np.float32), np.asarray(ref_logits, np.float32)
    tokens = np.asarray(tokens)
    if logits.shape != ref_logits.shape or logits.shape[0] != len(tokens):
        raise EvalError(f"logits of shape {logits.shape} and reference logits of shape "
                        f"{ref_logits.shape} do not both cover the {len(tokens)} tokens")
    kl = kl_divergence(ref_logits, logits)                                         # (T,)
    top1 = logits.argmax(-1) == ref_logits.argmax(-1)                              # (T,)
    top5 = top_k_overlap(ref_logits, logits, 5)                                    # (T,)
    err = np.abs(logits - ref_logits).max(-1)                                      # (T,)
    scale = np.abs(ref_logits).max(-1)                                             # (T,)
    positions = [{"position": i, "token": int(t), "kl": float(kl[i]), "top1": bool(top1[i]),
                  "top5_overlap": float(top5[i]), "rel_error": float(err[i] / scale[i])}
                 for i, t in enumerate(tokens)]
    overall = {"positions": len(tokens), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
               "top1_agreement": float(top1.mean()), "top1_matches": int(top1.sum()),
               "top5_overlap": float(top5.mean()),
               "max_rel_error": float(err.max() / scale.max()),
               "perplexity_model": perplexity(logits, tokens),
               "perplexity_reference": perplexity(ref_logits, tokens)}
    return {"overall": overall, "per_position": positions}


# --- running models -------------------------------------------------------------------

def teacher_forced_logits(engine, tokens: list[int], progress: bool = True) -> np.ndarray:
    """fp32 logits (T, V) after each token, fed in prefill chunks with a progress bar."""
    from tqdm import tqdm
    engine.reset()
    chunk = max(engine.options.prefill_buckets)
    rows = []
    with tqdm(total=len(tokens), unit="tok", disable=not progress,
              desc=Path(str(engine.model.model_dir)).name) as bar:
        for start in range(0, len(tokens), chunk):
            part = tokens[start:start + chunk]
            rows.append(engine.feed_all(part))
            bar.update(len(part))
    return np.concatenate(rows)


def read_tokens(args, runtime) -> list[int]:
    """The token ids of --prompt-ids, or of --text through the model's tokenizer."""
    if args.prompt_ids is not None:
        prompt = cli.parse_ids(args.prompt_ids)
    else:
        try:
            prompt = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EvalError(f"--text {args.text}: cannot read it as UTF-8 text ({e})") from None
    return runtime.encode(prompt, bos=args.bos)


def load_oracle(path: str, n_tokens: int, vocab: int) -> np.ndarray:
    """Logits (T, V) written by tools/release_oracle.py ((1, T, V) accepted)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise EvalError(f"--release-oracle {path}: cannot read a .npy array ({e})") from None
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != (n_tokens, vocab):
        raise EvalError(f"--release-oracle {path}: expected logits of shape ({n_tokens}, {vocab}) "
                        f"for these tokens, found {arr.shape}")
    return arr.astype(np.float32)


def build_parser(prog: str = "python -m lowmem.eval") -> argparse.ArgumentParser:
    p = cli.Parser(prog=prog, description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("-m", "--model", required=True, metavar="MODEL_DIR",
                   help="packed model directory to evaluate (required)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--reference", metavar="MODEL_DIR",
                     help="packed model directory to compare against (default: none, only "
                          "the model's perplexity)")
    ref.add_argument("--release-oracle", metavar="LOGITS.npy",
                     help="logits (T, V) from tools/release_oracle.py for the same tokens "
                          "(default: none)")
    p.add_argument("--reference-precision", choices=PRECISIONS, default="fp32",
                   help="precision of the --reference model (default fp32: the exact math)")
    p.add_argument("--reference-output-table", choices=tuple(cli.OUTPUT_TABLES), default="auto",
                   help="output table of the --reference model, as --output-table (default "
                        "auto: bf16 for an int8 model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="UTF-8 text file, tokenized with the model's tokenizer "
                     "(this or --prompt-ids is required)")
    src.add_argument("--prompt-ids", metavar="IDS",
                     help="comma-separated token ids (this or --text is required)")
    p.add_argument("--bos", action="store_true", help="prepend BOS (default: off)")
    p.add_argument("--requant-experts", choices=SCHEMES,
                   help="requantize the (int8) model's experts in memory with this baseline "
                        "scheme (q8_0, q4_0_gguf: every matrix but the router, as a Q8_0 / Q4_0 "
                        "GGUF; q4_0: the experts only) and run "
                        "it densely with lowmem.reference (small presets; default: the model "
                        "as stored)")
    p.add_argument("--out", type=cli.output_file,
                   help="write the JSON report here (default: stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    add_engine_arguments(p)
    cli.add_verbosity(p)
    return p


def run(args) -> dict:
    """Load the model(s), compute every position's logits, compare."""
    from lowmem.api import load
    kwargs = engine_kwargs(args)
    rt = load(args.model, **kwargs)
    try:
        tokens = read_tokens(args, rt)
        if not tokens:
            raise EvalError("no tokens to evaluate")
        if args.requant_experts:
            logits = requant_logits(rt.engine.model, args.requant_experts, tokens, args.precision)
        else:
            logits = teacher_forced_logits(rt.engine, tokens, not args.no_progress)
        from lowmem.requant import expert_bytes_per_token
        nbytes = expert_bytes_per_token(rt.engine.model, args.requant_experts)
        acts = "fp32" if args.requant_experts else rt.engine.backend.activations
        table = getattr(rt.engine.backend, "output_table", "bf16")   # auto resolved
    finally:
        rt.close()
    report = {"model": str(args.model), "precision": args.precision,
              "output_table": table, "activations": acts,
              "tokens": tokens,
              "requant_experts": args.requant_experts, "expert_bytes_per_token": nbytes}
    if args.release_oracle:
        ref = load_oracle(args.release_oracle, len(tokens), logits.shape[1])
        report["reference"] = {"release_oracle": str(args.release_oracle)}
    elif args.reference:
        ref_rt = load(args.reference, **dict(     # --activations is the model's: the reference
            kwargs, precision=args.reference_precision, act_int8=False,
            output_table=cli.OUTPUT_TABLES[args.reference_output_table]))
        try:
            ref = teacher_forced_logits(ref_rt.engine, tokens, not args.no_progress)
        finally:
            ref_rt.close()
        report["reference"] = {"model": str(args.reference), "precision": args.reference_precision,
                               "output_table": args.reference_output_table}
    else:
        report["overall"] = {"positions": len(tokens),
                             "perplexity_model": perplexity(logits, np.asarray(tokens))}
        return report
    report.update(compare(logits, ref, tokens))
    return report


def requant_logits(model, scheme: str, tokens: list[int], precision: str) -> np.ndarray:
    """(T, V) logits of ``model`` with its experts requantized by ``scheme``, run densely."""
    from lowmem import reference as R
    from lowmem.requant import dense_params
    try:
        params = dense_params(model, scheme)
    except ValueError as e:
        raise EvalError(f"--requant-experts: {e}") from None
    return R.forward(model.cfg, params, np.asarray(tokens), precision)[0]


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.partial"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def main(argv=None, prog: str = "python -m lowmem.eval") -> int:
    args = build_parser(prog).parse_args(argv)
    cli.setup_cli(args)
    return cli.run_main(_run_and_report, args)


def _run_and_report(args) -> int:
    report = run(args)
    text = json.dumps(report, indent=1)
    if args.out:
        write_atomic(args.out, text)
        o = report["overall"]
        print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in o.items()), file=sys.stderr)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
