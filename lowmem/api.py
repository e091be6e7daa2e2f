"""The Python API: ``lowmem.load(model_dir)`` -> a runtime that generates.

    rt = lowmem.load("grok-1-int4")
    for token_id in rt.generate("The answer is", max_new_tokens=20, temperature=0.7):
        ...
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from lowmem.decoding import GenerationRequest, generate_tokens
from lowmem.engine import Engine, EngineError, EngineOptions, enable_compilation_cache
from lowmem.sampling import SamplingParams
from lowmem.tokenizer import Tokenizer, TokenizerError, stream_text
from quant.packed import PackedModel


@dataclass
class Runtime:
    """An engine and the model's tokenizer (None when the model directory has none)."""
    engine: Engine
    tokenizer: Tokenizer | None

    def close(self) -> None:
        self.engine.close()

    def encode(self, prompt: str | list[int], bos: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EngineError(f"{self.engine.model.model_dir}: no tokenizer.model in the "
                                  f"model directory; pass token ids instead of text")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.engine.cfg.vocab_size]
        if bad:
            raise EngineError(f"token ids {bad[:5]} outside the vocabulary of "
                              f"{self.engine.cfg.vocab_size}")
        return ([self.engine.cfg.bos_token_id] if bos else []) + ids

    def generate(self, prompt: str | list[int], max_new_tokens: int = 100,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 stop_at_eos: bool = True, truncate: bool = False, bos: bool = False
                 ) -> Iterator[int]:
        """Yield generated token ids (prefill, then one decode step per token)."""
        req = GenerationRequest(max_new_tokens, SamplingParams(temperature, top_p, top_k),
                                seed, stop_at_eos, truncate)
        return generate_tokens(self.engine, self.encode(prompt, bos), req)

    def generate_text(self, prompt: str, req: GenerationRequest, stops: tuple[str, ...] = (),
                      bos: bool = False) -> Iterator[str]:
        """Yield text pieces as they are produced, stopping at any of ``stops``."""
        if self.tokenizer is None:
            raise EngineError(f"{self.engine.model.model_dir}: no tokenizer.model to decode text")
        ids = self.encode(prompt, bos)
        tokens = generate_tokens(self.engine, ids, req)
        return stream_text(self.tokenizer, tokens, stops, context=ids)


def load(model_dir: str | os.PathLike, compilation_cache: str | None = None,
         **options) -> Runtime:
    """Open a packed model directory; options are EngineOptions fields.

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
