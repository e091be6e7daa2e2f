"""The Python API: ``lowmem.load(model_dir)`` -> a runtime that generates.

    rt = lowmem.load("grok-1-int4")
    for piece in rt.generate_text("The answer is", max_new_tokens=20, temperature=0.7):
        print(piece, end="", flush=True)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import jax

from lowmem.decoding import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, GenerationRequest,
                             generate_tokens)
from lowmem.engine import Engine, EngineError, EngineOptions
from lowmem.sampling import SamplingParams
from lowmem.tokenizer import Tokenizer, TokenizerError, stream_text
from quant.packed import PackedModel


@dataclass
class Runtime:
    """A loaded model: its engine and its tokenizer (None when the model directory has none).

    ``generate`` yields token ids, ``generate_text`` text, with the same keyword
    arguments and the CLI's defaults (greedy, 32 tokens). One sequence at a
    time; ``close()`` stops the transfer threads and frees the device memory.
    """
    engine: Engine
    tokenizer: Tokenizer | None

    def close(self) -> None:
        self.engine.close()

    def encode(self, prompt: str | list[int], bos: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EngineError(f"{self.engine.model.model_dir}: no tokenizer.model in the "
                                  f"model directory; pass token ids instead of text")
            try:
                ids = self.tokenizer.encode(prompt)
            except TokenizerError as e:
                raise EngineError(str(e)) from None
        else:
            ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.engine.cfg.vocab_size]
        if bad:
            raise EngineError(f"token ids {bad[:5]} outside the vocabulary of "
                              f"{self.engine.cfg.vocab_size}")
        return ([self.engine.cfg.bos_token_id] if bos else []) + ids

    def _request(self, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos,
                 truncate) -> GenerationRequest:
        try:
            return GenerationRequest(int(max_new_tokens), SamplingParams(temperature, top_p, top_k),
                                     seed, stop_at_eos, truncate)
        except ValueError as e:
            raise EngineError(str(e)) from None

    def generate(self, prompt: str | list[int], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = DEFAULT_TEMPERATURE, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0, stop: tuple[str, ...] | list[str] = (), stop_at_eos: bool = True,
                 truncate: bool = False, bos: bool = False) -> Iterator[int]:
        """Yield generated token ids as they are produced (prefill, then one step per token).

        ``prompt``: text (needs the model's tokenizer) or token ids.
        ``max_new_tokens``: at most this many tokens (default 32).
        ``temperature``: 0 = greedy (the default, as in the CLI); else softmax temperature.
        ``top_p`` in (0, 1] (1 = off), ``top_k`` >= 0 (0 = off), ``seed``: sampling filters
        and seed. ``stop``: strings that end generation (the token completing one is
        not yielded; needs the tokenizer). ``stop_at_eos``: end at the EOS token.
        ``truncate``: keep the prompt's last tokens when it exceeds the context
        instead of raising. ``bos``: prepend BOS (the reference does not).
        Bad settings raise ``EngineError`` (a ValueError).
        """
        req = self._request(max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos,
                            truncate)
        ids = self.encode(prompt, bos)
        tokens = generate_tokens(self.engine, ids, req)
        if not stop:
            return tokens
        tok = self._need_tokenizer("stop strings")
        return _until_stop(tok, tokens, tuple(stop), ids)

    def generate_text(self, prompt: str | list[int], *,
                      max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                      temperature: float = DEFAULT_TEMPERATURE, top_p: float = 1.0,
                      top_k: int = 0, seed: int = 0, stop: tuple[str, ...] | list[str] = (),
                      stop_at_eos: bool = True, truncate: bool = False, bos: bool = False
                      ) -> Iterator[str]:
        """Yield text pieces as they are produced; same arguments as ``generate``.

        Spacing is the tokenizer's: pieces are decoded after the prompt's last
        tokens, so SentencePiece's leading spaces are kept; the text ends before
        the first ``stop`` string.
        """
        tok = self._need_tokenizer("text")
        req = self._request(max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos,
                            truncate)
        ids = self.encode(prompt, bos)
        return stream_text(tok, generate_tokens(self.engine, ids, req), tuple(stop), context=ids)

    def _need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise EngineError(f"{self.engine.model.model_dir}: no tokenizer.model in the model "
                              f"directory, needed for {what}")
        return self.tokenizer


def _until_stop(tok: Tokenizer, tokens: Iterator[int], stops: tuple[str, ...],
                context: list[int]) -> Iterator[int]:
    """Token ids until the decoded text contains a stop string (that token excluded)."""
    ids: list[int] = []
    skip = len(tok.decode(context[-8:]))
    for token in tokens:
        text = tok.decode(context[-8:] + ids + [token])[skip:]
        if any(s in text for s in stops):
            tokens.close()
            return
        ids.append(token)
        yield token


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache (kept between runs)."""
    path = Path(path or os.environ.get("LOWMEM_JAX_CACHE",
                                       Path.home() / ".cache" / "lowmem" / "jax"))
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


def load(model_dir: str | os.PathLike, compilation_cache: str | None = None,
         **options) -> Runtime:
    """Open a packed model directory and return a ``Runtime`` (engine + tokenizer).

    ``options`` are ``lowmem.engine.EngineOptions`` fields (backend, expert_cache_gb
    in GiB, context in tokens, ...). ``compilation_cache``: JAX's persistent
    compilation cache directory (default $LOWMEM_JAX_CACHE or ~/.cache/lowmem/jax).
    The manifest's and tokenizer's checksums are always checked; ``verify``
    (default True) also checks each tensor the first time it is read.
    """
    enable_compilation_cache(compilation_cache)
    opts = EngineOptions(**options)
    model = PackedModel.open(model_dir, verify_experts=opts.verify)
    try:
        tok = Tokenizer(model.tokenizer_path) if model.tokenizer_path else None
    except TokenizerError as e:
        raise EngineError(str(e)) from None
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        raise EngineError(f"{model.tokenizer_path}: tokenizer has {tok.vocab_size} pieces, "
                          f"the model's vocabulary only {model.cfg.vocab_size}")
    return Runtime(Engine(model, opts), tok)
