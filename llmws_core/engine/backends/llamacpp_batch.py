"""Continuous batching over one llama.cpp context, as `llama-server`'s slots do.

One scheduler thread owns the `llama_context`. Each concurrent `generate()` call
becomes a request that the scheduler places in a *slot* (a llama.cpp sequence id
with its own KV stream); every step it builds ONE `llama_batch` holding the next
token of every decoding slot plus a chunk of any prompt being prefilled, calls
`llama_decode` once, and samples each slot's token in its own native sampler
chain. Requests join and leave between steps; cancelling one only frees its slot.

Each slot has its own KV stream (`kv_unified = false`): a token attends only over
its own sequence's cells, so decoding is as fast as a single stream's, and a
request's greedy text does not depend on what else is in the batch (with one
unified pool, llama.cpp's attention runs over all sequences' cells, masked, and
rounding differs with the batch). The price: every slot reserves a full context.

A slot keeps its KV after a request ends and remembers whose it was (the
request's `cache_key`, the session id): the session's next turn goes back to the
same slot and only prefills the part of the prompt that differs (prefix cache).
A slot is only ever reused with its KV for the same key; given to anyone else it
is wiped first. Slots are recycled least-recently-used.

With a `PrefixStore`, a slot's KV is also sealed to disk before it is wiped for
another key (eviction), when the engine closes (model switch, shutdown) and when a
request asks for it (`/restore_cache`); a key whose KV is in no slot gets its
stored prefix loaded into the slot it is given (`llama_state_seq_set_data`), so
its next turn skips the prefill after an eviction or a restart.

The chat template's fixed start (its default system prompt and the opening of the
first user turn, the same for every conversation and holding nothing of any
session) is evaluated once when the engine starts; a new conversation gets that
KV copied into its slot (`llama_state_seq_set_data`, a few hundred microseconds)
instead of prefilling it, as `llama-server` reuses a slot's common prompt start.
Only that template text is ever shared: a session's own KV never is.

Per-token Python work is kept to a handful of ctypes calls: the batch arrays are
written in place, sampling (or, for plain greedy decoding, an argmax over the
logits row with numpy, which skips building llama.cpp's candidate array of the
whole vocabulary), end-of-generation checks and detokenization are native, and
text goes to the caller's callback straight from this thread.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ... import errors
from ..prefixes import PrefixStore
from .base import (
    CancelCheck,
    GenerationParams,
    GenerationResult,
    TokenCallback,
    TokenLogprob,
    token_burst,
)
from .stops import StopMatcher
from .threads import ThreadGovernor

logger = logging.getLogger("llmws.engine.llamacpp")

#: Penalties look this many tokens back (llama.cpp's default `repeat_last_n`).
PENALTY_LAST_N = 64

#: Prefixes shorter than this are neither stored nor loaded: prefilling them is cheaper.
MIN_STORED_PREFIX = 32

#: A template start shorter than this is prefilled with each prompt, not shared.
MIN_SHARED_PREAMBLE = 8


@dataclass
class Request:
    """One `generate()` call as the scheduler sees it."""

    tokens: list[int]
    params: GenerationParams
    stops: list[str]
    on_token: TokenCallback
    cancelled: CancelCheck
    budget: int
    done: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult | None = None
    error: BaseException | None = None
    #: (tokens, KV state) of this key's stored prefix, loaded by the caller's thread.
    restored: tuple[list[int], bytes] | None = None
    #: Store the slot's KV on disk when the request ends (`/restore_cache`).
    persist: bool = False


@dataclass
class Slot:
    """A llama.cpp sequence id, what its KV holds and who may reuse it."""

    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV is in this sequence
    owner: str | None = None  # cache_key of the KV in `cached`
    last_used: float = 0.0
    stored: int = -1  # len(cached) when it was last stored on disk (-1: not stored)
    # --- the request being served (None when idle)
    req: Request | None = None
    sampler: Any = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    next_token: int = -1  # sampled, not yet decoded
    n_out: int = 0
    decoder: Any = None
    greedy: bool = False  # plain argmax: no native sampler chain
    matcher: StopMatcher | None = None
    out_row: int = -1  # this step's logits row in the batch, -1: none
    logprobs: list[TokenLogprob] | None = None  # collected when the request asks for them


class BatchEngine:
    """The scheduler thread and slots over one llama.cpp context."""

    def __init__(
        self,
        llama_cpp: Any,
        model: Any,
        ctx: Any,
        *,
        n_slots: int,
        n_batch: int,
        max_context: int,
        prefixes: PrefixStore | None = None,
        model_id: str = "",
        adaptive_threads: int = 0,
        preamble: list[int] | None = None,
    ) -> None:
        """Args:
        preamble: the tokens every conversation starts with (the chat template's fixed
            start, no session's data): evaluated once, copied into new conversations.
        adaptive_threads: the context's thread count, to be lowered while the machine
            is contended (see threads.py); 0: keep the context's count as it is.
        prefixes: where evicted and restored KV prefixes are sealed; None: RAM only.
        model_id: names this model and context layout in the prefix store (a stored
            state only loads into the same model with the same context per slot).
        """
        self.ll = llama_cpp
        self.model = model  # llama_model_p (kept alive by the backend)
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.ctx = ctx
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.n_batch = n_batch
        #: Tokens one request may hold (prompt + reply): one slot's KV stream.
        self.max_context = min(max_context, int(llama_cpp.llama_n_ctx_seq(ctx)))
        self.slots = [Slot(i) for i in range(n_slots)]
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._tok = self._batch.token
        self._pos = self._batch.pos
        self._nseq = self._batch.n_seq_id
        self._seq = self._batch.seq_id
        self._logits = self._batch.logits
        self._piece = ctypes.create_string_buffer(256)
        self._logits_row = ctypes.c_float * self.n_vocab
        #: (tokens, KV state) of the template's fixed start, made by the scheduler thread.
        self._preamble_tokens = list(preamble or [])
        self._preamble: tuple[list[int], bytes] | None = None
        self._queue: deque[Request] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.prefixes = prefixes
        self.model_id = model_id
        #: Plain greedy requests take the argmax themselves (False: the native chain, for tests).
        self.fast_greedy = True
        self.governor = ThreadGovernor(adaptive_threads) if adaptive_threads > 1 else None
        self.threads = adaptive_threads
        #: Counters for tests, benchmarks and /metrics: prompt tokens prefilled vs reused
        #: from a cached prefix (of which `restored` came from disk), prefixes stored.
        #: `shared`: prompt tokens of the template's fixed start copied instead of prefilled.
        self.stats = {"prefilled": 0, "reused": 0, "restored": 0, "stored": 0, "steps": 0, "shared": 0}
        self._thread = threading.Thread(target=self._run, name="llamacpp-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side

    def submit(self, req: Request) -> GenerationResult:
        """Queue `req` and block until it finishes (any worker thread)."""
        with self._cv:
            if self._stopping:
                raise errors.ModelNotLoaded("The model is not loaded.")
            self._queue.append(req)
            self._cv.notify()
        req.done.wait()
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def holds(self, key: str) -> bool:
        """Whether a slot has `key`'s KV in RAM (read without the lock: a hint)."""
        return any(s.owner == key for s in self.slots)

    def load_prefix(self, key: str, tokens: list[int]) -> tuple[list[int], bytes] | None:
        """`key`'s stored prefix if no slot holds its KV and it covers enough of
        `tokens` to be worth loading (runs in the caller's thread: disk and AES)."""
        if self.prefixes is None or self.holds(key):
            return None
        stored = self.prefixes.load(self.model_id, key)
        if stored is None or _common_prefix(stored[0], tokens) < MIN_STORED_PREFIX:
            return None
        return stored

    def close(self) -> None:
        """Stop the scheduler, fail waiting requests, store every slot's prefix, free."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()
        for slot in self.slots:
            if slot.req is not None:
                self._finish(slot, "cancelled")
        while self._queue:
            req = self._queue.popleft()
            req.error = errors.ModelNotLoaded("The model was unloaded.")
            req.done.set()
        for slot in self.slots:
            self._store(slot)  # the next model load (or daemon start) picks them up
        if self.prefixes is not None:
            self.prefixes.flush()
        self.ll.llama_batch_free(self._batch)

    # ------------------------------------------------------------------ scheduler

    def _run(self) -> None:
        self._make_preamble()
        while True:
            with self._cv:
                while not self._stopping and not self._queue and not self._busy():
                    self._cv.wait()
                if self._stopping:
                    return
                while self._queue:
                    slot = self._pick_slot(self._queue[0].params.cache_key)
                    if slot is None:
                        break
                    req = self._queue.popleft()
                    try:
                        self._start(slot, req)
                    except Exception as exc:  # a bad request (grammar) fails alone
                        if not isinstance(exc, errors.LLMWSError):
                            logger.error("could not start a request", exc_info=exc)
                            exc = errors.GenerationError("The model failed while generating.")
                        req.error = exc
                        slot.req = req
                        self._release(slot, wipe=True)
            try:
                self._step()
            except Exception as exc:  # never let the thread die with callers waiting
                logger.error("llama.cpp batch step failed", exc_info=exc)
                for slot in self.slots:
                    if slot.req is not None:
                        slot.req.error = errors.GenerationError("The model failed while generating.")
                        self._release(slot, wipe=True)

    def _make_preamble(self) -> None:
        """Evaluate the template's fixed start alone in slot 0 and keep its KV state."""
        tokens = self._preamble_tokens[: self.n_batch]
        if len(tokens) < MIN_SHARED_PREAMBLE:
            return
        ll, slot = self.ll, self.slots[0]
        try:
            for i, t in enumerate(tokens):
                self._tok[i] = t
                self._pos[i] = i
                self._nseq[i] = 1
                self._seq[i][0] = slot.seq_id
                self._logits[i] = 0
            self._logits[len(tokens) - 1] = 1
            self._batch.n_tokens = len(tokens)
            if ll.llama_decode(self.ctx, self._batch) != 0:
                raise RuntimeError("llama_decode failed")
            state = self._seq_state(slot.seq_id)
            if state:
                self._preamble = (tokens, state)
        except Exception as exc:  # an optimisation: serve without it
            logger.warning("the template's start could not be evaluated ahead: %s", exc)
        finally:
            self._wipe(slot)

    def _busy(self) -> bool:
        return any(s.req is not None for s in self.slots)

    def _pick_slot(self, key: str | None) -> Slot | None:
        """The idle slot holding `key`'s KV, else an empty one, else the least recently
        used; among those, one next to the busy slots.

        llama.cpp attends over the range of KV streams from the lowest to the highest
        sequence id in a batch, so busy slots 0 and 7 cost as much as all eight: keeping
        them together keeps every decode step as small as it can be."""
        idle = [s for s in self.slots if s.req is None]
        if not idle:
            return None
        if key is not None:
            for s in idle:
                if s.owner == key:
                    return s
        busy = [s.seq_id for s in self.slots if s.req is not None]

        def span(s: Slot) -> int:
            ids = [*busy, s.seq_id]
            return max(ids) - min(ids)

        return min(idle, key=lambda s: (s.owner is not None, span(s), s.last_used))

    def _wipe(self, slot: Slot) -> None:
        self.ll.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.cached = []
        slot.owner = None
        slot.stored = -1

    def _store(self, slot: Slot) -> None:
        """Seal the slot's KV to disk for its owner (unless it is already there)."""
        if (
            self.prefixes is None
            or slot.owner is None
            or len(slot.cached) < MIN_STORED_PREFIX
            or slot.stored == len(slot.cached)
        ):
            return
        try:
            state = self._seq_state(slot.seq_id)
        except Exception as exc:  # storing is an optimisation: never fail a request for it
            logger.warning("could not read slot %d's KV state: %s", slot.seq_id, exc)
            return
        if not state:
            return
        self.prefixes.save(self.model_id, slot.owner, list(slot.cached), state)
        slot.stored = len(slot.cached)
        self.stats["stored"] += 1

    def _seq_state(self, seq_id: int) -> bytes:
        """The KV state of one sequence (`llama_state_seq_get_data`); b"": none."""
        ll = self.ll
        size = ll.llama_state_seq_get_size(self.ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = ll.llama_state_seq_get_data(self.ctx, buf, size, seq_id)
        return bytes(memoryview(buf)[:n]) if n else b""

    def _restore(self, slot: Slot, stored: tuple[list[int], bytes], *, count: bool = True) -> None:
        """Load a stored prefix (or the shared template start) into the wiped slot."""
        tokens, state = stored
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if not self.ll.llama_state_seq_set_data(self.ctx, buf, len(state), slot.seq_id):
            logger.warning("a stored prefix did not fit slot %d; prefilling", slot.seq_id)
            self.ll.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            return
        slot.cached = list(tokens)
        if count:
            slot.stored = len(tokens)
            self.stats["restored"] += _common_prefix(tokens, slot.req.tokens if slot.req else tokens)

    def _start(self, slot: Slot, req: Request) -> None:
        ll = self.ll
        key = req.params.cache_key
        if slot.owner != key or key is None:
            # Never serve one key's KV to another: store it for its owner, wipe it.
            self._store(slot)
            self._wipe(slot)
            slot.req = req
            if key is not None and req.restored is not None:
                self._restore(slot, req.restored)
        shared = 0
        if not slot.cached and self._preamble is not None:
            tokens = self._preamble[0]
            if len(req.tokens) > len(tokens) and req.tokens[: len(tokens)] == tokens:
                self._restore(slot, self._preamble, count=False)
                shared = len(slot.cached)
        req.restored = None  # the state's bytes are not needed any more
        n_keep = _common_prefix(slot.cached, req.tokens)
        if n_keep >= len(req.tokens):
            n_keep = len(req.tokens) - 1  # re-evaluate the last prompt token for its logits
        if n_keep < len(slot.cached):
            if not ll.llama_memory_seq_rm(self.mem, slot.seq_id, n_keep, -1):
                ll.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
                n_keep = 0
            slot.stored = -1
        del slot.cached[n_keep:]
        shared = min(shared, n_keep)
        self.stats["shared"] += shared
        self.stats["reused"] += n_keep - shared
        self.stats["prefilled"] += len(req.tokens) - n_keep
        slot.owner = key
        slot.req = req
        slot.pending = req.tokens[n_keep:]
        slot.next_token = -1
        slot.n_out = 0
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.matcher = StopMatcher(req.stops)
        p = req.params
        slot.logprobs = [] if p.logprobs is not None else None
        slot.greedy = (
            self.fast_greedy
            and p.temperature <= 0
            and not p.grammar
            and (not p.repeat_penalty or p.repeat_penalty == 1.0)
        )
        slot.sampler = None if slot.greedy else self._sampler(p, req.tokens)
        logger.debug("slot %d: %d prompt tokens, %d reused", slot.seq_id, len(req.tokens), n_keep)

    def _sampler(self, params: GenerationParams, prompt: list[int]) -> Any:
        """A native sampler chain for `params` (greedy when temperature <= 0)."""
        ll = self.ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if params.grammar:
            # First in the chain: every later sampler only sees tokens the grammar allows.
            grammar = ll.llama_sampler_init_grammar(self.vocab, params.grammar.encode(), b"root")
            if not grammar:
                ll.llama_sampler_free(chain)
                raise errors.BadRequest("The response format could not be turned into a grammar.")
            ll.llama_sampler_chain_add(chain, grammar)
        if params.repeat_penalty and params.repeat_penalty != 1.0:
            ll.llama_sampler_chain_add(
                chain, ll.llama_sampler_init_penalties(self.n_vocab, PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0)
            )
        if params.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(params.top_k))
            if 0 < params.top_p < 1:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(params.temperature))
            seed = ll.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        if params.repeat_penalty and params.repeat_penalty != 1.0:
            for tok in prompt[-PENALTY_LAST_N:]:
                ll.llama_sampler_accept(chain, tok)
        return chain

    def _step(self) -> None:
        """One `llama_decode` over every active slot, then sample and emit."""
        ll = self.ll
        tok, pos, nseq, seq, logits = self._tok, self._pos, self._nseq, self._seq, self._logits
        n = 0
        active: list[Slot] = []
        for slot in self.slots:
            req = slot.req
            if req is None:
                continue
            if req.cancelled():
                self._finish(slot, "cancelled")
                continue
            slot.out_row = -1
            if slot.next_token >= 0 and n < self.n_batch:
                tok[n] = slot.next_token
                pos[n] = len(slot.cached)
                nseq[n] = 1
                seq[n][0] = slot.seq_id
                logits[n] = 1
                slot.cached.append(slot.next_token)
                slot.next_token = -1
                slot.out_row = n
                n += 1
                active.append(slot)
        # Prompt chunks fill what is left of the batch (decoding slots go first: fairness).
        prefilling = False
        for slot in self.slots:
            if slot.req is None or not slot.pending or n >= self.n_batch:
                continue
            prefilling = True
            take = slot.pending[: self.n_batch - n]
            base = len(slot.cached)
            for i, t in enumerate(take):
                tok[n] = t
                pos[n] = base + i
                nseq[n] = 1
                seq[n][0] = slot.seq_id
                logits[n] = 0
                n += 1
            slot.cached.extend(take)
            del slot.pending[: len(take)]
            if not slot.pending:
                logits[n - 1] = 1
                slot.out_row = n - 1
            active.append(slot)
        if n == 0:
            return
        self._batch.n_tokens = n
        started = time.perf_counter()
        rc = ll.llama_decode(self.ctx, self._batch)
        self.stats["steps"] += 1
        if self.governor is not None and not prefilling and rc == 0:
            threads = self.governor.observe(n, time.perf_counter() - started)
            if threads != self.threads:
                ll.llama_set_n_threads(self.ctx, threads, threads)
                logger.info(
                    "decoding with %d threads (step times say the cores are %s)",
                    threads,
                    "contended" if threads < self.threads else "free",
                )
                self.threads = threads
        if rc != 0:
            logger.error("llama_decode returned %d for a batch of %d tokens", rc, n)
            for slot in active:
                slot.req.error = errors.GenerationError("The model failed while generating.")  # type: ignore[union-attr]
                self._release(slot, wipe=True)
            return
        with token_burst():  # the consumer wakes its event loop once, after the last slot
            self._sample_all(active)

    def _sample_all(self, active: list[Slot]) -> None:
        """Sample every slot that has a logits row this step, emit its text, end it
        when it stops."""
        ll = self.ll
        sample, is_eog, to_piece, buf = (
            ll.llama_sampler_sample,
            ll.llama_vocab_is_eog,
            ll.llama_token_to_piece,
            self._piece,
        )
        for slot in active:
            if slot.out_row < 0 or slot.req is None:
                continue
            req = slot.req
            if slot.greedy:
                row = ll.llama_get_logits_ith(self.ctx, slot.out_row)
                t = int(
                    np.frombuffer(self._logits_row.from_address(ctypes.addressof(row.contents)), np.float32).argmax()
                )
            else:
                t = sample(slot.sampler, self.ctx, slot.out_row)
            if is_eog(self.vocab, t):
                self._finish(slot, "stop")
                continue
            slot.n_out += 1
            k = to_piece(self.vocab, t, buf, 256, 0, False)
            piece = buf.raw[:k] if k >= 0 else _long_piece(ll, self.vocab, t, -k)
            if slot.logprobs is not None:
                entry = self._logprob(slot.out_row, t, piece, req.params.logprobs or 0)
                slot.logprobs.append(entry)
                if req.params.on_logprob is not None:
                    try:
                        req.params.on_logprob(entry)
                    except Exception:
                        logger.exception("logprob callback failed")
            text, hit = slot.matcher.feed(slot.decoder.decode(piece))  # type: ignore[union-attr]
            if text:
                try:
                    req.on_token(text)
                except Exception as exc:  # a broken consumer ends only its own request
                    logger.error("token callback failed", exc_info=exc)
                    req.error = errors.GenerationError("The reply could not be delivered.")
                    self._release(slot, wipe=False)
                    continue
            if hit:
                self._finish(slot, "stop", flush=False)
            elif slot.n_out >= req.budget:
                self._finish(slot, "length")
            else:
                slot.next_token = t

    def _logprob(self, row: int, token: int, piece: bytes, top: int) -> TokenLogprob:
        """The chosen token's log-probability (log-softmax of the raw logits, before any
        sampling transform) and the `top` likeliest tokens of this step."""
        ptr = self.ll.llama_get_logits_ith(self.ctx, row)
        logits = np.frombuffer(self._logits_row.from_address(ctypes.addressof(ptr.contents)), np.float32)
        peak = float(logits.max())
        lse = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
        alternatives: list[tuple[str, float, list[int]]] = []
        if top > 0:
            ids = np.argpartition(-logits, top)[:top]
            for i in ids[np.argsort(-logits[ids], kind="stable")]:
                raw = self._piece_of(int(i))
                alternatives.append((raw.decode("utf-8", errors="replace"), float(logits[i]) - lse, list(raw)))
        return TokenLogprob(
            piece.decode("utf-8", errors="replace"), float(logits[token]) - lse, list(piece), alternatives
        )

    def _piece_of(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        k = self.ll.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        return buf.raw[:k] if k >= 0 else _long_piece(self.ll, self.vocab, token, -k)

    def _finish(self, slot: Slot, reason: str, *, flush: bool = True) -> None:
        req = slot.req
        assert req is not None
        if flush and reason != "cancelled":
            tail, _ = slot.matcher.feed(slot.decoder.decode(b"", final=True))  # type: ignore[union-attr]
            tail += slot.matcher.flush()  # type: ignore[union-attr]
            if tail:
                try:
                    req.on_token(tail)
                except Exception:
                    logger.exception("token callback failed")
        matched = slot.matcher.matched if slot.matcher is not None else None
        req.result = GenerationResult(reason, len(req.tokens), slot.n_out, slot.logprobs, stop_sequence=matched)  # type: ignore[arg-type]
        if req.persist:
            self._store(slot)
        self._release(slot, wipe=False)

    def _release(self, slot: Slot, *, wipe: bool) -> None:
        """Free the slot; its KV stays for the owner's next turn unless `wipe`."""
        req = slot.req
        if slot.sampler is not None:
            self.ll.llama_sampler_free(slot.sampler)
            slot.sampler = None
        # A prompt cut short by cancellation left no KV beyond `cached`: both agree.
        slot.pending = []
        slot.next_token = -1
        slot.req = None
        slot.last_used = time.monotonic()
        if wipe or slot.owner is None:
            self._wipe(slot)
        if req is not None:
            req.done.set()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _long_piece(ll: Any, vocab: Any, token: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    k = ll.llama_token_to_piece(vocab, token, buf, size, 0, False)
    return buf.raw[: max(k, 0)]
