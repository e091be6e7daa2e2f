"""The Python API: ``lowmem.load(model_dir)`` -> a runtime that generates.

    rt = lowmem.load("grok-1-int4")
    for token_id in rt.generate("The answer is", max_new_tokens=20, temperature=0.7):
        ...
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator

from lowmem.engine import Engine, EngineError, EngineOptions, enable_compilation_cache
from lowmem.generation import (GenerationRequest, Tokenizer, generate_tokens, make_sampler,
                               stream_text)
from lowmem.sampling import SamplingParams
from quant.packed import PackedModel


@dataclass
class Runtime:
    engine: Engine
    tokenizer: Tokenizer | None

    def __post_init__(self):
        self._sampler = make_sampler()

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
        return generate_tokens(self.engine, self.encode(prompt, bos), req, self._sampler)

    def generate_text(self, prompt: str, req: GenerationRequest, stops: tuple[str, ...] = (),
                      bos: bool = False) -> Iterator[str]:
        """Yield text pieces as they are produced, stopping at any of ``stops``."""
        if self.tokenizer is None:
            raise EngineError(f"{self.engine.model.model_dir}: no tokenizer.model to decode text")
        ids = self.encode(prompt, bos)
        tokens = generate_tokens(self.engine, ids, req, self._sampler)
        return stream_text(self.tokenizer, tokens, stops, context=ids)


def load(model_dir: str | os.PathLike, compilation_cache: str | None = None,
         **options) -> Runtime:
    """Open a packed model directory; options are EngineOptions fields."""
    enable_compilation_cache(compilation_cache)
    model = PackedModel.open(model_dir)
    engine = Engine(model, EngineOptions(**options))
    tok = Tokenizer(model.tokenizer_path) if model.tokenizer_path else None
    if tok is not None and tok.vocab_size > model.cfg.vocab_size:
        raise EngineError(f"{model.tokenizer_path}: tokenizer has {tok.vocab_size} pieces, "
                          f"the model's vocabulary only {model.cfg.vocab_size}")
    return Runtime(engine, tok)


def setup_cli(verbose: bool) -> None:
    """Logging for a CLI, and JAX's GPU allocator at 95% of the device, not 75%.

    The expert cache is sized from the allocator's limit, so JAX's default
    would leave a fifth of an H100 unused. Environment variables are read when
    JAX starts its backend, so CLI mains call this first; library users set
    XLA_PYTHON_CLIENT_MEM_FRACTION themselves.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def add_engine_arguments(p) -> None:
    """The engine options every CLI shares (generate, profile)."""
    p.add_argument("--expert-cache-gb", type=float, default=None,
                   help="device expert cache budget in GiB (default: what fits after resident "
                        "weights, KV cache and headroom)")
    p.add_argument("--cache-policy", choices=("lru", "layer"), default="lru",
                   help="expert eviction: lru, or layer (evict the layer whose turn comes last; "
                        "far better when the cache holds less than one token's experts)")
    p.add_argument("--context", type=int, default=None,
                   help="KV cache length in tokens (default: the model's sequence length)")
    p.add_argument("--backend", choices=("auto", "host", "device"), default="auto",
                   help="host = numba kernels on the mapped files (CPU default); "
                        "device = experts streamed into an accelerator cache (GPU default)")
    p.add_argument("--no-prefetch", action="store_true", help="disable speculative expert prefetch")


def engine_kwargs(args) -> dict:
    """EngineOptions fields from arguments added by add_engine_arguments."""
    return dict(backend=args.backend, expert_cache_gb=args.expert_cache_gb, context=args.context,
                prefetch=not args.no_prefetch, cache_policy=args.cache_policy)
