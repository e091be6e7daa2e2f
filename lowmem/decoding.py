"""The generation loop on top of the engine: prefill, then sample and decode token by token.

Grok-1 is a base model: no chat template. Like the reference runner, no BOS
is prepended unless asked for, and sampling follows SPEC.md section 3.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import jax
import numpy as np

from lowmem.engine import Engine, EngineError
from lowmem.host_sampling import sampled_row
from lowmem.sampling import SamplingParams, categorical, sample

log = logging.getLogger(__name__)
# The defaults of the CLI and of Runtime.generate alike: greedy (reproducible, and what
# a base model's quality is judged by), and a few lines of text.
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_TEMPERATURE = 0.0


@dataclass(frozen=True)
class GenerationRequest:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingParams = SamplingParams(temperature=DEFAULT_TEMPERATURE)
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


@jax.jit
def sample_next(logits, key, temperature, top_p, top_k):
    """One token id from fp32 logits (V,) with a subkey of key, and the key to pass next
    time: the split and the draw in one call (each call after a decode step's
    weights have streamed through the caches costs 0.1-0.3 ms however small it
    is). Settings are traced, so changing them never recompiles."""
    key, sub = jax.random.split(key)
    return sample(logits[None], sub, temperature, top_p, top_k)[0], key


@jax.jit
def draw_next(row, key):
    """``sample_next``'s draw from a row already filtered (``host_sampling.sampled_row``):
    the same split, the same token."""
    key, sub = jax.random.split(key)
    return categorical(sub, row[None])[0], key


def generate_tokens(engine: Engine, prompt_ids: list[int], req: GenerationRequest
                    ) -> Iterator[int]:
    """Prefill the prompt, then decode one token at a time, yielding each id."""
    ids = fit_prompt(engine, list(prompt_ids), req.truncate)
    engine.reset()
    logits = engine.feed(ids)
    key = jax.random.key(req.seed)
    args = req.sampling.as_args()
    eos = engine.cfg.eos_token_id
    # greedy on a CPU: numpy's argmax (first index of the max or of a NaN, as
    # sampling.argmax) on the logits where they lie, 0.08 ms against 0.55 for a
    # jitted call after a step's weights have streamed through the caches
    argmax_here = req.sampling.temperature <= 0 and engine.device.platform == "cpu"
    # other settings on a CPU: the filters in numba (host_sampling; a top-p 0.95
    # token 3.5 -> 2.85 ms mid-step on a 2.1 GHz Xeon), the same jitted draw
    filter_here = engine.device.platform == "cpu"
    for i in range(req.max_new_tokens):
        if argmax_here:
            token = int(np.argmax(engine.to_host(logits)))                 # sync point
        elif filter_here:
            token, key = draw_next(sampled_row(engine.to_host(logits), *args), key)
            token = int(token)                                             # sync point
        else:
            token, key = sample_next(logits, key, *args)
            token = int(engine.to_host(token))                             # sync point
        engine.timer.mark("sampling")
        yield token
        last = i + 1 == req.max_new_tokens or engine.position >= engine.context
        if last or (req.stop_at_eos and token == eos):
            break
        logits = engine.feed([token])


def prompt_logits(engine: Engine, ids: list[int]) -> np.ndarray:
    """fp32 logits after each prefix of ``ids``, (T, V): what a quality check compares.

    Fed one token at a time (decode steps), so every row comes from the path
    generation uses after the prompt.
    """
    engine.reset()
    return np.stack([np.asarray(engine.feed([token])) for token in ids])
