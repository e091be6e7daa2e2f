"""Continuous batching: requests join and leave a ``BatchEngine`` between steps.

One worker thread owns the engine. Each iteration of its loop

1. drops cancelled sequences (a client that went away frees its slot within
   one step) and admits queued requests into free KV cache slots (an idle
   worker first lets a burst that is still arriving gather, ``gather_s``),
2. runs ONE step (``BatchEngine.step``) over every sequence that has its
   next token pending and the next prompt chunks of the sequences still
   reading their prompt, oldest first, up to ``prefill_tokens`` prompt tokens
   (a long prompt never stalls the running decodes for more than that); the
   step's MoE reads each expert once for the decodes and the prompts, so a
   burst of new requests is read in one step, not one step each,
3. samples each row (a decode row, or a prompt's last chunk) with its own
   settings and key.

Submitting never blocks: the waiting queue is bounded (``QueueFull``), and a
request that cannot fit the context is refused at once (``EngineError``).
Results go back through each sequence's ``on_event`` callback, called on the
worker thread: ``("token", id, logprob, top)`` per token (``top``: the
request's ``top_logprobs`` likeliest tokens as (id, logprob) pairs, most likely
first; () when it asks for none), then exactly one
``("done", finish_reason, None)`` ('stop', 'length' or 'cancelled') or
``("error", message, None)``.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lowmem.batch import (TOP_LOGPROBS_MAX, BatchEngine, sample_rows, sampling_columns,
                          seed_key_data, top_logprobs)
from lowmem.engine import EngineError
from lowmem.sampling import SamplingParams

log = logging.getLogger(__name__)
_IDS = itertools.count()


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queue`` requests already."""


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_tokens: int = 16
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop_at_eos: bool = True
    top_logprobs: int = 0             # alternatives reported per token, 0..TOP_LOGPROBS_MAX


@dataclass(eq=False)
class Sequence:
    """A request's life in the scheduler; ``cancel()`` may be called from any thread."""
    request: Request
    on_event: Callable
    id: int = field(default_factory=lambda: next(_IDS))
    slot: int | None = None
    fed: int = 0                      # prompt tokens prefilled
    generated: list = field(default_factory=list)
    pending: int | None = None        # sampled, not yet fed
    key_data: np.ndarray | None = None
    cancelled: bool = False
    finished: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Bounded queue, ``max_batch`` running sequences, one worker thread."""

    def __init__(self, batch: BatchEngine, max_queue: int = 64,
                 prefill_tokens: int | None = None, gather_s: float = 0.0):
        """prefill_tokens: prompt tokens a step may take (default: one chunk).
        gather_s: how long an idle worker lets a burst of requests gather before its
        first step (``_gather``); 0 starts at once."""
        self.batch, self.max_queue = batch, max_queue
        self.prefill_tokens = batch.chunk if prefill_tokens is None else prefill_tokens
        if self.prefill_tokens < 1:
            raise EngineError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        if not gather_s >= 0:
            raise EngineError(f"gather_s must be >= 0 seconds, got {gather_s}")
        self.gather_s = gather_s
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free = list(range(batch.max_batch))
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.tokens_out = 0
        self.steps = 0
        self.busy_s = 0.0             # time spent in steps that did work
        self.started = time.monotonic()
        self.ready = threading.Event()   # set once the worker takes requests (after warm-up)
        self.warmup_s: float | None = None

    # --- client side (any thread) ----------------------------------------------
    def check(self, req: Request) -> None:
        """Raise EngineError when a request cannot run (empty or too long a prompt)."""
        vocab = self.batch.cfg.vocab_size
        if not req.prompt_ids:
            raise EngineError("the prompt is empty (no tokens)")
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            raise EngineError(f"token ids must be in [0, {vocab})")
        if len(req.prompt_ids) > self.batch.context - 1:
            raise EngineError(f"prompt of {len(req.prompt_ids)} tokens does not fit the context "
                              f"of {self.batch.context} tokens (at most "
                              f"{self.batch.context - 1} prompt tokens)")
        if req.max_tokens < 1:
            raise EngineError(f"max_tokens must be >= 1, got {req.max_tokens}")
        if not 0 <= req.top_logprobs <= TOP_LOGPROBS_MAX:
            raise EngineError(f"top_logprobs must be in [0, {TOP_LOGPROBS_MAX}], "
                              f"got {req.top_logprobs}")

    def submit(self, req: Request, on_event: Callable) -> Sequence:
        self.check(req)
        seq = Sequence(req, on_event)
        with self._wake:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests already waiting "
                                f"(--max-queue {self.max_queue})")
            self.waiting.append(seq)
            self._wake.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        with self._wake:
            self._wake.notify()

    # --- worker ----------------------------------------------------------------------
    def start(self, warm_up: bool = False, on_ready: Callable | None = None) -> None:
        """Start the worker; with ``warm_up`` it first compiles every step shape
        (``BatchEngine.warm_up``) so that no request pays a compile. ``ready`` is set
        when it is done; ``on_ready(seconds or None)`` is then called on the worker."""
        self._thread = threading.Thread(target=self._run, args=(warm_up, on_ready),
                                        name="lowmem-scheduler", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel every waiting and running sequence (each gets its 'done' event) and stop."""
        with self._wake:
            self._stop = True
            for seq in list(self.waiting) + self.running:
                seq.cancel()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _warm_up(self) -> None:
        try:
            self.warmup_s = self.batch.warm_up(cancelled=lambda: self._stop)
        except Exception:   # noqa: BLE001 - serving still works, compiling as it goes
            log.exception("warm-up failed; shapes compile when first needed")
            for s in range(self.batch.max_batch):
                self.batch.reset(s)

    def _run(self, warm_up: bool = False, on_ready: Callable | None = None) -> None:
        if warm_up and not self._stop:
            self._warm_up()
        self.ready.set()
        if on_ready is not None:
            on_ready(self.warmup_s)
        while True:
            with self._wake:
                while not self._stop and not self.waiting and not self.running:
                    self._wake.wait()
                if not self.running:
                    self._gather()
            worked = self.step()
            if self._stop and not self.running and not self.waiting:
                return
            if not worked:
                time.sleep(0.001)

    def _gather(self) -> None:
        """Idle, with a request waiting: wait up to ``gather_s`` for more, or until the
        waiting requests fill the free slots (called holding ``_wake``).

        Clients of a burst arrive a few ms apart. Without the wait the first one's
        prompt starts a step alone and the others, arriving during it, wait for the
        next one: a whole prefill step (0.4-1.5 s at Grok-1 width on a CPU) later,
        and out of step with it to the end (a 16-request burst measured: sent
        within 8 ms, submitted within 18, first tokens 1.48 s apart). A running
        server never waits here: its steps go on back to back."""
        end = time.monotonic() + self.gather_s
        while not self._stop and len(self.waiting) < len(self.free):
            left = end - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)

    def step(self) -> bool:
        """One iteration: clean up and admit, then one step of decodes and prompt chunks."""
        t0 = time.perf_counter()
        self._drop_cancelled()
        self._admit()
        worked = self._step()
        if worked:
            self.steps += 1
            self.busy_s += time.perf_counter() - t0
        return worked

    def _drop_cancelled(self) -> None:
        with self._wake:
            gone = [s for s in self.waiting if s.cancelled]
            for s in gone:
                self.waiting.remove(s)
        for s in gone + [s for s in self.running if s.cancelled]:
            self._finish(s, "cancelled")

    def _admit(self) -> None:
        with self._wake:
            while self.free and self.waiting:
                seq = self.waiting.popleft()
                seq.slot = self.free.pop(0)
                seq.key_data = seed_key_data(seq.request.seed)
                self.batch.reset(seq.slot)
                self.running.append(seq)

    def _chunks(self) -> list[tuple[Sequence, tuple, bool]]:
        """(sequence, its next prompt chunk, whether it ends the prompt) for the sequences
        still reading their prompt, oldest first, within ``prefill_tokens`` tokens."""
        out, budget = [], self.prefill_tokens
        for seq in self.running:
            ids = seq.request.prompt_ids
            if seq.fed == len(ids) or budget == 0:
                continue
            part = ids[seq.fed:seq.fed + min(self.batch.chunk, budget)]
            out.append((seq, part, seq.fed + len(part) == len(ids)))
            budget -= len(part)
        return out

    def _step(self) -> bool:
        ready = [s for s in self.running if s.pending is not None]
        chunks = self._chunks()
        if not ready and not chunks:
            return False
        try:
            logits = self.batch.step([s.slot for s in ready], [s.pending for s in ready],
                                     [(s.slot, part, last) for s, part, last in chunks],
                                     spare=list(self.free))
        except Exception as e:   # noqa: BLE001 - the step's sequences cannot go on
            log.exception("step failed")
            for s in ready + [c[0] for c in chunks]:
                self._finish(s, None, error=f"step failed: {e}")
            return True
        for seq, part, _ in chunks:
            seq.fed += len(part)
        rows = ready + [seq for seq, _, last in chunks if last]
        if rows:
            self._sample(rows, logits)
        return True

    def _sample(self, seqs: list[Sequence], logits) -> None:
        """Draw each row's token, emit it, and end the sequences that are done."""
        temp, top_p, top_k = sampling_columns([s.request.sampling for s in seqs])
        keys = np.stack([s.key_data for s in seqs])                                # (B, 2)
        tokens, logprobs, keys = sample_rows(logits, keys, temp, top_p, top_k)
        tokens, logprobs, keys = np.asarray(tokens), np.asarray(logprobs), np.asarray(keys)
        top = self._top(seqs, logits)
        eos = self.batch.cfg.eos_token_id
        for i, seq in enumerate(seqs):
            token = int(tokens[i])
            seq.key_data, seq.pending = keys[i], token
            seq.generated.append(token)
            self.tokens_out += 1
            seq.on_event(("token", token, float(logprobs[i]), top[i]))
            req = seq.request
            if req.stop_at_eos and token == eos:
                self._finish(seq, "stop")
            elif (len(seq.generated) >= req.max_tokens
                  or self.batch.position(seq.slot) >= self.batch.context):
                self._finish(seq, "length")

    @staticmethod
    def _top(seqs: list[Sequence], logits) -> list[tuple]:
        """Each row's requested alternatives ((id, logprob), ...); computed only when asked."""
        if not any(s.request.top_logprobs for s in seqs):
            return [()] * len(seqs)
        ids, values = (np.asarray(a) for a in top_logprobs(logits))                # (B, N)
        return [tuple((int(t), float(v)) for t, v in
                      zip(ids[i, :s.request.top_logprobs], values[i, :s.request.top_logprobs]))
                for i, s in enumerate(seqs)]

    def _finish(self, seq: Sequence, reason: str | None, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished, seq.pending = True, None
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            with self._wake:
                self.free.append(seq.slot)
                self.free.sort()
        try:
            seq.on_event(("error", error, None) if error else ("done", reason, None))
        except Exception:   # noqa: BLE001 - a broken callback must not stop the worker
            log.exception("event callback failed")

    # --- metrics -------------------------------------------------------------------
    def metrics(self) -> dict:
        stats = self.batch.engine.expert_stats.as_dict()
        return {
            "queue_depth": len(self.waiting),
            "running_sequences": len(self.running),
            "kv_slots_in_use": self.batch.max_batch - len(self.free),
            "kv_slots_capacity": self.batch.max_batch,
            "tokens_generated_total": self.tokens_out,
            "tokens_per_second": self.tokens_out / self.busy_s if self.busy_s else 0.0,
            "steps_total": self.steps,
            "expert_requests_total": stats["requests"],
            "expert_hit_rate": stats["hit_rate"],
            "expert_bytes_moved_total": stats["bytes_moved"],
        }
