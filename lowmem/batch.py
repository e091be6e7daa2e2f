"""Continuous batching steps: decode rows and prompt chunks share every expert load.

A ``BatchEngine`` is built on an ``Engine`` (its backend, placed layers,
final norm and MoE) and holds ``max_batch`` KV cache slots, preallocated
once. A step (``step``) takes the running sequences' slots with one token
each (decode rows) and any prompt chunks of sequences still reading their
prompt; per layer it

1. projects q/k/v for all B decode rows at once (one read of the attention
   weights; on the host backend one numba callback for the three),
2. writes each decode row's key/value into its own slot at its own position
   and attends over that slot alone (one jitted call per row of the
   single-sequence ``kv_write`` and ``model.attend``: exactly the arithmetic
   of a solo decode step; each slot's cache stays its own buffer, donated,
   so nothing is copied), then applies the output projection to all B rows;
   each prompt chunk runs the single-sequence attention block on its slot
   (``Engine.attention_layer``: a solo prefill's arithmetic),
3. routes every group and makes ONE MoE call for all of them
   (``Engine.moe_layers``): the union of the experts the decodes and the
   prompts need is fetched once and each expert is applied to exactly the
   rows routed to it (at the last layer a chunk's last row if it wants
   logits, else none of its rows: ``Engine.last_row``). Before, a prompt
   chunk ran in a step of its own and read its experts again.

The logits rows (the decode rows, then the last row of each chunk that ends
a prompt) are gathered into one buffer and read the output table once. A
step's decode rows are padded to a few fixed batch sizes (powers of two and
``max_batch``) with spare (free) slots, whose rows the MoE ignores; prompt
chunks are padded to the prefill buckets: each shape compiles once and no
step recompiles, whatever the mix.

``sample_rows`` draws one token per row with that row's own settings and its
own PRNG key, split exactly as ``decoding.generate_tokens`` splits a solo
run's key: a batched request gives the tokens of the same request run alone.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lowmem import model as M
from lowmem.engine import Engine, EngineError, SequenceState
from lowmem.sampling import SamplingParams, argmax, categorical, filter_logits

log = logging.getLogger(__name__)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _qkv_rows(cfg, linear, precision, lp, h, pos, rows):
    """Queries, keys and values of B rows (one read of the weights), split per row.

    h (B, D), pos (B,) int32, rows: the real (not padding) leading rows ->
    three tuples of B arrays, (1, H, K) each: each row goes on to its own
    sequence's attention call without a slicing op."""
    q, k, v = M.attention_qkv(cfg, linear, precision, lp, h, pos, rows)      # (B, H, K)
    split = lambda a: tuple(a[i:i + 1] for i in range(h.shape[0]))         # noqa: E731
    return split(q), split(k), split(v)


@partial(jax.jit, static_argnums=(0, 1, 2), donate_argnames=("cache",))
def _attend_row(cfg, precision, key_block, q, k, v, cache, valid, pos):
    """One sequence's decode attention: write its key/value at pos, attend over its cache.

    q (1, Hq, K), k, v (1, Hkv, K), pos (1,) int32 -> ((1, Hq*K), the updated cache).
    Exactly the single-sequence step's ``kv_write`` and ``attend``. Called once per
    row: unrolled inside one jitted step, B of these ran 3-5x slower on XLA:CPU
    than B calls (measured at Grok-1 width, B=16: 25.7 ms against 7.5 per layer)."""
    cache = M.kv_write(cache, k, v, pos[0])
    return M.attend(cfg, q, cache, valid, pos, precision, key_block), cache


@partial(jax.jit, static_argnums=(0, 1, 2))
def _attention_out(cfg, linear, precision, lp, h, outs, rows):
    """``h + rms_norm_1(attn @ o)`` for the B rows' attention outputs (a tuple), rows
    real leading rows -> (B, D)."""
    return M.attention_output(cfg, linear, precision, lp, h, jnp.concatenate(outs), rows)


@partial(jax.jit, donate_argnums=(0,))
def _mark_rows(valids, tokens, pos):
    """Each sequence's new key position is valid when it holds a real token (id > 0)."""
    return tuple(jax.lax.dynamic_update_slice_in_dim(v, tokens[i:i + 1] > 0, pos[i], 0)
                 for i, v in enumerate(valids))


_embed = jax.jit(M.embed, static_argnums=(0, 1))


@partial(jax.jit, static_argnums=(1,))
def _row_buffer(h, size):
    """The step's logits rows (size, D): the first rows of h (T, D), zeros after (a
    chunk-only step starts from its first chunk's h: every row it reads is put after)."""
    rows = min(h.shape[0], size)
    return jnp.zeros((size, h.shape[1]), h.dtype).at[:rows].set(h[:rows])


@partial(jax.jit, donate_argnums=(0,))
def _put_row(rows, h, src, dst):
    """rows (R, D) with row dst replaced by row src of h (T, D): a prompt chunk's last
    real row joins the step's logits rows (both indices dynamic: no compile per index)."""
    return jax.lax.dynamic_update_slice_in_dim(
        rows, jax.lax.dynamic_slice_in_dim(h, src, 1, 0), dst, 0)


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _rows_logits(cfg, logits_fn, precision, count, rows, final_norm, table):
    """Final norm and tied output logits of the first ``count`` rows -> fp32 (count, V):
    one read of the table for every row of the step (compiled once per count)."""
    h = rows[:count]                                                            # (count, D)
    return logits_fn(cfg, M.final_hidden(cfg, h, final_norm, precision), table, precision)


def _each_row(fn, *columns):
    """fn on each row of the columns in turn (``lax.map``), not vmapped: a batched
    threefry of B keys ran 2.4x slower than B single ones (16 x 131072 Gumbel
    draws: 20 ms against 8), and under vmap the filters' ``lax.cond`` would
    become a select that runs the fallback bisection for every row."""
    return jax.lax.map(lambda row: fn(*row), columns)


@jax.jit
def sample_rows(logits, key_data, temperature, top_p, top_k):
    """One token per row, each with its own key and settings, drawn as a solo run draws it.

    logits (B, V) fp32; key_data (B, 2) uint32 (``jax.random.key_data`` of
    each row's key); settings (B,) -> (tokens (B,) int32, the chosen tokens'
    log-probabilities under the model (B,) fp32, next key_data (B, 2)).
    Each row's key is split and its draw made on a (1, V) row exactly as
    ``sampling.sample`` does for one sequence; like it, the sorting filter
    runs only when some row needs it (filtering an unfiltered row changes
    nothing, so the draws are the same either way).
    """
    keys = jax.vmap(jax.random.split)(jax.vmap(jax.random.wrap_key_data)(key_data))  # (B, 2)
    subs = keys[:, 1]
    greedy = temperature <= 0                                                        # (B,)
    unfiltered = (top_k <= 0) & (top_p >= 1)                                         # (B,)

    def full(_):
        draw = lambda l, k, t, p, kk: categorical(  # noqa: E731
            k, filter_logits(l[None], t, p, kk))[0]
        return _each_row(draw, logits, subs, temperature, top_p, top_k)

    def plain(_):
        draw = lambda l, k, t: categorical(  # noqa: E731
            k, (l / jnp.where(t <= 0, 1.0, t))[None])[0]
        return _each_row(draw, logits, subs, temperature)

    best = argmax(logits)                                                            # (B,)
    branch = jnp.where(jnp.all(greedy), 0, jnp.where(jnp.all(unfiltered | greedy), 1, 2))
    drawn = jax.lax.switch(branch, [lambda _: best, plain, full], None)              # (B,)
    tokens = jnp.where(greedy, best, drawn).astype(jnp.int32)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], 1)
    return tokens, logprobs[:, 0], jax.vmap(jax.random.key_data)(keys[:, 0])


TOP_LOGPROBS_MAX = 20   # alternatives a request may ask for (OpenAI's top_logprobs limit)


@jax.jit
def top_logprobs(logits):
    """The ``TOP_LOGPROBS_MAX`` likeliest tokens of each row and their log-probabilities
    under the model (the log-softmax of the unscaled logits, as the chosen token's):
    logits (B, V) fp32 -> (ids (B, N) int32, logprobs (B, N) fp32), descending.
    Computed once for the step's rows, only when a row asks for it (``lax.top_k``:
    no sort of the vocabulary)."""
    values, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), TOP_LOGPROBS_MAX)
    return ids.astype(jnp.int32), values


def seed_key_data(seed: int) -> np.ndarray:
    """The raw key a solo run starts from (``jax.random.key(seed)``), (2,) uint32."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


def sampling_columns(params: list[SamplingParams]) -> tuple[np.ndarray, ...]:
    """(temperature, top_p, top_k) columns of the rows' settings, (B,) each, fixed dtypes:
    the scheduler and the warm-up build them alike, so they share compiled versions."""
    return tuple(np.array(col) for col in zip(*(p.as_args() for p in params)))


@dataclass
class _DecodeRows:
    """A step's decode rows while it runs: B slots, one token each at its position."""
    slots: list[int]
    pos: np.ndarray             # (B,) int32
    valids: tuple               # B x (S,) bool
    h: jax.Array                # (B, D) activations
    caches: list[list]          # B x layers


@dataclass
class _ChunkRows:
    """A step's prompt chunk while it runs: one slot, n real tokens from pos."""
    slot: int
    pos: int
    n: int
    h: jax.Array                # (T, D) activations, T the chunk's bucket; (1, D) at the end
    valid: jax.Array            # (S,) bool
    caches: list                # layers
    wants: bool                 # logits of its last row (else the last layer's MoE skips it)


class BatchEngine:
    """``max_batch`` KV cache slots on one engine; prefill per slot, decode per batch."""

    def __init__(self, engine: Engine, max_batch: int):
        if max_batch < 1:
            raise EngineError(f"max_batch must be >= 1, got {max_batch}")
        self.engine, self.max_batch = engine, max_batch
        self.cfg = engine.cfg
        self.states = [self._fresh() for _ in range(max_batch)]

    def _fresh(self) -> SequenceState:
        return self.engine.new_state()

    @property
    def context(self) -> int:
        return self.engine.context

    @property
    def chunk(self) -> int:
        """The longest prefill chunk (as ``Engine.feed`` splits a prompt)."""
        return max(self.engine.options.prefill_buckets)

    @property
    def kv_slot_bytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes for c in self.states[0].caches)

    def position(self, slot: int) -> int:
        return self.states[slot].pos

    def reset(self, slot: int) -> None:
        """Start a new sequence in a slot (its cache reused, every key marked invalid)."""
        st = self.states[slot]
        self.states[slot] = SequenceState(st.caches, jnp.zeros_like(st.valid), 0)

    def prefill(self, slot: int, tokens) -> jax.Array:
        """Feed one prompt chunk (<= ``chunk`` tokens) to a slot -> fp32 logits (V,)."""
        return self.step([], [], [(slot, tokens, True)])[0]

    def warm_up(self, cancelled=lambda: False) -> float:
        """Compile every shape serving can run, on the free slots, then reset them -> seconds.

        Without it the first request mix at each concurrency pays compiles of
        seconds inside its steps. Covered: a prompt chunk of every padded shape
        (``_chunk_lengths``) with the (1, V) sampling of its logits, and for every
        row count n in 1..max_batch the decode step padded to its batch size and
        unpadded (a step pads only
        with free slots: when the other slots hold prompts still prefilling it runs
        at n rows), with the sampling and ``top_logprobs`` of n rows. The tokens are
        spread over the vocabulary so that several rows route to more experts than
        one expert call takes (the device MoE's first call and its accumulating
        calls are two versions). Call it before any sequence runs: it overwrites
        every slot. ``cancelled()`` is asked before each step (a shutdown during a
        warm-up of minutes stops it at once).
        """
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        tokens = lambda n: rng.integers(1, self.cfg.vocab_size, n).astype(np.int32)  # noqa: E731
        for n in self._chunk_lengths():
            if cancelled():
                break
            self.reset(0)
            self._warm_rows(self.prefill(0, tokens(n))[None])                 # (1, V)
        for n, spare in self._decode_shapes():
            if cancelled():
                break
            for s in range(n):
                self.reset(s)
            self._warm_rows(self.decode(list(range(n)), list(tokens(n)), spare=spare))  # (n, V)
        for s in range(self.max_batch):
            self.reset(s)
        return time.perf_counter() - t0

    def _chunk_lengths(self) -> list[int]:
        """Prompt chunk lengths that reach every padded shape a prompt can take: 1 (its
        own shape), then per bucket the shortest and the longest chunk padded to it
        (a shorter one masks its padding rows), within the context."""
        lengths, prev = [1], 1
        for b in sorted(self.engine.options.prefill_buckets):
            lo, hi = prev + 1, min(b, self.context - 1)
            lengths += sorted({lo, hi}) if lo <= hi else []
            prev = max(prev, b)
        return lengths

    def _decode_shapes(self) -> list[tuple[int, list[int]]]:
        """(rows, spare slots) of every decode step shape: each row count padded to its
        batch size with free slots, and unpadded (no free slot) where that differs."""
        shapes = []
        for n in range(1, self.max_batch + 1):
            shapes.append((n, list(range(n, self.max_batch))))
            if next(b for b in self.batch_sizes if b >= n) != n:
                shapes.append((n, []))
        return shapes

    @staticmethod
    def _warm_rows(logits) -> None:
        """Sample and rank n rows of logits (n, V) as the scheduler does (every branch of
        ``sample_rows`` compiles at once)."""
        n = logits.shape[0]
        keys = np.stack([seed_key_data(0)] * n)                                 # (n, 2)
        cols = sampling_columns([SamplingParams(0.8, 0.9, 5)] * n)
        jax.block_until_ready((sample_rows(logits, keys, *cols), top_logprobs(logits)))

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The step sizes compiled: powers of two below ``max_batch``, and ``max_batch``."""
        return tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b < self.max_batch) + (
            self.max_batch,)

    def _padding(self, slots: list[int], spare) -> list[int]:
        """Spare slots (reset) that pad this step to the next batch size; [] if too few."""
        size = next(b for b in self.batch_sizes if b >= len(slots))
        pad = [s for s in spare if s not in slots][:size - len(slots)]
        if len(pad) < size - len(slots):
            return []
        for s in pad:
            self.reset(s)
        return pad

    def decode(self, slots: list[int], tokens: list[int], spare=()) -> jax.Array:
        """Advance each slot's sequence by its token -> fp32 logits (B, V) (``step``
        without prompt chunks)."""
        return self.step(slots, tokens, spare=spare)

    def step(self, slots: list[int], tokens: list[int], chunks=(), spare=()) -> jax.Array | None:
        """One continuous-batching step -> fp32 logits (rows, V), or None if no row wants any.

        ``slots`` advance by one token each (``tokens``); ``chunks``, a list of
        (slot, prompt chunk of <= ``chunk`` tokens, wants logits), advance their
        prompts. Per layer each sequence attends on its own cache and ONE MoE call
        serves every row: an expert is read once for the decodes and the prompts.
        The logits rows are the decode rows, then the last row of each chunk that
        wants logits, in that order (one read of the output table). ``spare``:
        free slots that may pad the decode rows to a compiled batch size (their
        contents are discarded). If the step fails midway the slots' donated
        caches are gone: they are replaced by fresh ones (their sequences cannot
        go on).
        """
        every = list(slots) + [c[0] for c in chunks]
        if len(set(every)) != len(every) or not 0 < len(every) <= self.max_batch \
                or len(slots) != len(tokens):
            raise EngineError(f"a step needs 1 to {self.max_batch} distinct slots and one token "
                              f"per decode slot, got slots {every} and tokens {list(tokens)}")
        n = len(slots)
        if n and max(self.states[s].pos for s in slots) >= self.context:
            raise EngineError(f"a sequence would exceed the context of {self.context}")
        padded = [self.engine.chunk_tokens(self.states[c[0]], c[1]) for c in chunks]
        pad = self._padding(list(slots), [s for s in spare if s not in every]) if n else []
        try:
            dec = self._decode_rows(list(slots) + pad, list(tokens) + [0] * len(pad)) if n else None
            runs = [self._chunk_rows(c[0], *p, c[2]) for c, p in zip(chunks, padded)]
            for layer in range(len(self.engine.layers)):
                self._layer(layer, dec, n, runs)
            logits = self._logits(dec, n, [r for r, c in zip(runs, chunks) if c[2]])
        except BaseException:
            for s in every + pad:
                self.states[s] = self._fresh()
            raise
        if dec is not None:
            for s, c, v, p in zip(dec.slots, dec.caches, dec.valids, dec.pos):
                self.states[s] = SequenceState(c, v, int(p) + 1)
        for r in runs:
            self.states[r.slot] = SequenceState(r.caches, r.valid, r.pos + r.n)
        return logits

    def _decode_rows(self, slots: list[int], tokens: list[int]) -> _DecodeRows:
        """The decode rows' start: their keys marked valid, their embeddings (B, D)."""
        eng, cfg = self.engine, self.cfg
        states = [self.states[s] for s in slots]
        pos = np.array([st.pos for st in states], np.int32)                      # (B,)
        toks = np.asarray(tokens, np.int32).reshape(len(slots))                  # (B,)
        valids = _mark_rows(tuple(st.valid for st in states), toks, pos)
        eng.timer.mark("python")
        h = _embed(cfg, eng.precision, eng.backend.embed_rows(toks))             # (B, D)
        eng.timer.mark("embedding", h, valids)
        return _DecodeRows(slots, pos, valids, h, [list(st.caches) for st in states])

    def _chunk_rows(self, slot: int, padded: np.ndarray, n: int, wants: bool) -> _ChunkRows:
        """A prompt chunk's start on its slot (padded, n real tokens): embedded (T, D),
        its keys marked valid."""
        st = self.states[slot]
        h, valid = self.engine.chunk_input(st, padded, n)
        return _ChunkRows(slot, st.pos, n, h, valid, list(st.caches), wants)

    def _attention(self, layer: int, h, caches: list[list], valids, pos: np.ndarray, n: int):
        """One layer's attention for B rows, n real then padding: shared projections, one
        attend call per row on its own cache (``caches[row][layer]``, replaced by the
        updated one) -> (B, D)."""
        cfg, linear, prec = self.cfg, self.engine.backend.linear, self.engine.precision
        lp, rows = self.engine.layers[layer], np.int32(n)
        qs, ks, vs = _qkv_rows(cfg, linear, prec, lp, h, pos, rows)             # B x (1, H, K)
        outs = []
        for i, c in enumerate(caches):
            out, c[layer] = _attend_row(cfg, prec, self.engine.backend.key_block, qs[i], ks[i],
                                        vs[i], c[layer], valids[i], pos[i:i + 1])
            outs.append(out)                                                     # (1, Hq*K)
        return _attention_out(cfg, linear, prec, lp, h, tuple(outs), rows)       # (B, D)

    def _layer(self, layer: int, dec: _DecodeRows | None, n: int, runs: list[_ChunkRows]):
        """One layer for every group of rows: its attention, then one shared MoE call
        (at the last layer on a chunk's last row if it wants logits, else on none of
        its rows, as ``Engine._forward_chunk``)."""
        eng, groups, moe_runs = self.engine, [], []
        last = layer == len(eng.layers) - 1
        if dec is not None:
            dec.h = self._attention(layer, dec.h, dec.caches, dec.valids, dec.pos, n)
            eng.timer.mark("attention", dec.h)
            groups.append((dec.h, n))
        for r in runs:
            r.h, r.caches[layer] = eng.attention_layer(layer, r.h, r.caches[layer], r.valid,
                                                       r.pos, r.n)
            if last and not r.wants:
                continue
            if last:
                r.h = eng.last_row(r.h, r.n)                                     # (1, D)
            groups.append((r.h, 1 if last else r.n))
            moe_runs.append(r)
        outs = eng.moe_layers(layer, groups, self._next_rows(layer, n, runs)) if groups else []
        if dec is not None:
            dec.h = outs.pop(0)
        for r, h in zip(moe_runs, outs):
            r.h = h

    def _next_rows(self, layer: int, n: int, runs: list[_ChunkRows]) -> list[int] | None:
        """Before the last layer, the real rows its MoE will run (the n decode rows, the
        last row of each chunk that wants logits) among this layer's (the decode rows,
        then each chunk's n real rows): only their guessed experts are prefetched."""
        if layer + 2 != len(self.engine.layers):
            return None
        rows, start = list(range(n)), n
        for r in runs:
            if r.wants:
                rows.append(start + r.n - 1)
            start += r.n
        return rows

    def _logits(self, dec: _DecodeRows | None, n: int, runs: list[_ChunkRows]
                ) -> jax.Array | None:
        """Logits of the n real decode rows and the last real row of each chunk in runs
        (padding rows never read the output table) -> fp32 (n + len(runs), V)."""
        count = n + len(runs)
        if count == 0:
            return None
        eng, backend = self.engine, self.engine.backend
        rows = _row_buffer(dec.h if dec is not None else runs[0].h, self.max_batch)  # (R, D)
        for i, r in enumerate(runs):
            rows = _put_row(rows, r.h, np.int32(0), np.int32(n + i))       # r.h: (1, D)
        logits = _rows_logits(self.cfg, backend.logits_fn, eng.precision, count, rows,
                              eng.final_norm, backend.logits_table)              # (count, V)
        eng.timer.mark("logits", logits)
        return logits
