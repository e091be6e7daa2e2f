"""Prefill, decode and text streaming on top of the engine.

Grok-1 is a base model: no chat template. Like the reference runner, no BOS
is prepended unless asked for, and sampling follows SPEC.md section 3.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lowmem.engine import Engine, EngineError, State
from lowmem.sampling import SamplingParams, sample

log = logging.getLogger(__name__)


class Tokenizer:
    """The release's SentencePiece model (BPE, byte fallback, 131072 pieces)."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise EngineError(f"{path}: expected a sentencepiece model, found unreadable data "
                              f"({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


@dataclass(frozen=True)
class GenerationRequest:
    max_new_tokens: int = 100
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop_at_eos: bool = True
    truncate: bool = False   # drop the oldest prompt tokens when the prompt is too long


def fit_prompt(engine: Engine, ids: list[int], truncate: bool) -> list[int]:
    """The prompt, left-truncated (if allowed) to leave room for one new token."""
    room = engine.context - 1
    if not ids:
        raise EngineError("the prompt is empty (no tokens)")
    if len(ids) > room:
        if not truncate:
            raise EngineError(f"prompt of {len(ids)} tokens does not fit the context of "
                              f"{engine.context} (use --truncate to keep its last {room} tokens)")
        log.warning("prompt truncated from %d to its last %d tokens", len(ids), room)
        ids = ids[-room:]
    return ids


def make_sampler():
    """One jitted sampler; settings are traced, so changing them never recompiles."""
    return jax.jit(lambda logits, key, t, p, k: sample(logits[None], key, t, p, k)[0])


def generate_tokens(engine: Engine, prompt_ids: list[int], req: GenerationRequest,
                    sampler=None) -> Iterator[int]:
    """Prefill the prompt, then decode one token at a time, yielding each id."""
    sampler = sampler or make_sampler()
    ids = fit_prompt(engine, list(prompt_ids), req.truncate)
    state = State(engine.state.caches, jnp.zeros_like(engine.state.valid), 0)
    logits, state = engine.forward(state, ids)
    key = jax.random.key(req.seed)
    args = req.sampling.as_args()
    eos = engine.cfg.eos_token_id
    try:
        for i in range(req.max_new_tokens):
            key, sub = jax.random.split(key)
            token = int(sampler(logits, sub, *args))
            engine.timer.mark("sampling")
            yield token
            last = i + 1 == req.max_new_tokens or state.pos >= engine.context
            if last or (req.stop_at_eos and token == eos):
                break
            logits, state = engine.forward(state, [token])
    finally:   # also when the consumer stops early: the old caches were donated
        engine.state = state


def _held_back(text: str, stops: Iterable[str]) -> int:
    """How many trailing characters might be the start of a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold


def stream_text(tokenizer: Tokenizer, tokens: Iterable[int], stops: tuple[str, ...] = (),
                context: list[int] = ()) -> Iterator[str]:
    """Text pieces as tokens arrive; ends at (and excludes) the first stop string.

    Decoding the whole sequence each time keeps multi-byte characters split
    across byte-fallback tokens intact; an incomplete one is held back. The
    sequence is decoded after a few ``context`` (prompt) tokens, because
    SentencePiece drops the leading space of a sequence's first piece.
    """
    context = list(context)[-8:]
    skip = len(tokenizer.decode(context))
    decode = lambda ids: tokenizer.decode(context + ids)[skip:]  # noqa: E731
    ids: list[int] = []
    emitted = 0
    for token in tokens:
        ids.append(token)
        text = decode(ids)
        cut = min((i for i in (text.find(s, max(0, emitted - len(s))) for s in stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            if cut > emitted:
                yield text[emitted:cut]
            return
        safe = len(text) - _held_back(text, stops)
        while safe > emitted and text[safe - 1] == "\ufffd":   # an incomplete character
            safe -= 1
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = decode(ids)
    if len(text) > emitted:
        yield text[emitted:]


def greedy_ids(engine: Engine, prompt_ids: list[int], n: int) -> list[int]:
    """Convenience for tests and tools: n greedy tokens after a prompt."""
    req = GenerationRequest(max_new_tokens=n, sampling=SamplingParams(temperature=0.0),
                            stop_at_eos=False)
    return list(generate_tokens(engine, prompt_ids, req))


def prompt_logits(engine: Engine, ids: list[int]) -> np.ndarray:
    """fp32 logits after each prefix of ``ids`` (one token at a time), (T, V)."""
    state = State(engine.state.caches, jnp.zeros_like(engine.state.valid), 0)
    rows = []
    for token in ids:
        logits, state = engine.forward(state, [token])
        rows.append(np.asarray(logits))
    engine.state = state
    return np.stack(rows)
