"""Continuous batching for the transformers backend: many requests share each forward pass.

One scheduler thread owns the model. A `generate()` call (from any worker
thread) enqueues a `Sequence` and blocks until it finishes; its `on_token`
callback fires from the scheduler thread. Every loop turn the scheduler

1. admits waiting requests up to `max_batch`: each is prefilled on its own
   (no padding inside a prompt, so its numbers are exactly single-stream ones),
   samples its first token, and its KV cache is merged into the batch cache;
2. drops requests whose `cancelled()` turned true (so a cancel lands within one step);
3. runs one decode step for the whole batch and samples each row with its own
   parameters; finished rows leave at once.

The batch KV cache is a transformers `DynamicCache` whose rows are left-padded
to a common length, with a 2-D attention mask marking the padding and explicit
per-row position ids (RoPE was applied to the keys before caching, so padding
never shifts a row's positions). Joining pads the shorter side on the left and
concatenates along the batch axis; leaving selects the remaining rows and trims
columns that became padding for every row. Cache surgery happens only on joins
and leaves; a decode step costs what a plain `generate` step costs.

Why not transformers' own `ContinuousBatchingManager`: it takes one generation
config for the whole manager (we need temperature, top-p, seed, stop strings
per request) and its paged-attention path targets CUDA.

torch is imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ... import errors
from .base import (
    CancelCheck,
    GenerationParams,
    GenerationResult,
    TokenCallback,
    TokenLogprob,
    token_burst,
)
from .stops import StopMatcher  # noqa: F401  (re-exported for callers)

logger = logging.getLogger("llmws.engine.batching")


# ---------------------------------------------------------------------------- text


class Detokenizer:
    """UTF-8-safe incremental detokenization of a growing token list.

    Byte-level tokenizers split multibyte characters across tokens, and
    SentencePiece ones drop a leading space when a token is decoded alone. So we
    decode a short window that starts one emitted chunk back and emit only the
    new suffix, holding it while it ends in U+FFFD (an incomplete character);
    the same scheme as text-generation-inference.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # start of the window
        self._read = 0  # end of what has been emitted

    def push(self, token_id: int) -> str:
        """Add a token; return the newly stable text ("" while a character is incomplete)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """The text still held back at the end of a reply (may end in U+FFFD for invalid bytes)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


# ---------------------------------------------------------------------------- requests


@dataclass(eq=False)
class Sequence:
    """One request in the scheduler: its prompt, parameters, streaming state and outcome."""

    prompt_ids: list[int]
    params: GenerationParams
    on_token: TokenCallback
    cancelled: CancelCheck
    budget: int  # max new tokens, already capped by the context
    stops: list[str] = field(default_factory=list)
    # -- filled by the scheduler
    n_out: int = 0
    last_token: int = -1
    seen: set[int] = field(default_factory=set)  # for the repetition penalty
    detok: Detokenizer | None = None
    matcher: StopMatcher | None = None
    generator: Any = None
    result: GenerationResult | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    #: Log-probabilities of the tokens so far (when `params.logprobs` is set), and the
    #: entry of the token just sampled, taken by `_accept`.
    logprobs: list[TokenLogprob] | None = None
    sampled_logprob: TokenLogprob | None = None


ErrorMap = Callable[[BaseException], errors.LLMWSError]

_STOP = object()


def _kv_layers(cache: Any) -> list[Any]:
    """The cache's per-layer objects holding `.keys`/`.values` (transformers >= 4.56)."""
    return list(cache.layers)


class BatchScheduler:
    """Owns the model on one thread and decodes all running requests together."""

    def __init__(
        self,
        model: Any,
        *,
        decode: Callable[[list[int]], str],
        eos_ids: set[int],
        max_batch: int,
        error_map: ErrorMap,
        decode_forward: Callable[..., Any] | None = None,
        logits_to_keep: str | None = "logits_to_keep",
        cache_keyword: str = "past_key_values",
    ) -> None:
        """Args:
        model: a transformers causal LM (already on its device, in eval mode).
        decode: token ids -> text, special tokens skipped.
        eos_ids: tokens that end a reply.
        max_batch: most sequences decoded together.
        error_map: turns a library exception into a user-safe project error.
        decode_forward: the callable used for decode steps (e.g. a torch.compile'd
            forward); None: the model itself.
        logits_to_keep: name of the forward keyword that limits the prefill's logits
            to the last position (None: the model has none).
        cache_keyword: name of the forward keyword (and output field) of the KV cache:
            `past_key_values` until transformers 5.2x renamed it `cache`.
        """
        import torch

        self._torch = torch
        self.model = model
        self._decode = decode
        self.eos_ids = set(eos_ids)
        self.max_batch = max(1, max_batch)
        self._error_map = error_map
        self._decode_forward = decode_forward if decode_forward is not None else model
        self._logits_kw = logits_to_keep
        self._cache_kw = cache_keyword
        self._input_device = model.get_input_embeddings().weight.device
        # With a multi-GPU device map the logits come out on the last device; samplers live there.
        head = model.get_output_embeddings()
        self._output_device = head.weight.device if head is not None else self._input_device
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._lock = threading.Lock()
        # -- batch state (scheduler thread only)
        self._active: list[Sequence] = []
        self._cache: Any = None
        self._mask: Any = None  # (B, L) long, 1 = real token
        self._pos: Any = None  # (B,) long, position of each row's next token
        #: Counters for tests and the benchmark.
        self.stats = {"steps": 0, "max_batch_seen": 0, "prefills": 0}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._run, name="llmws-transformers-batch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread; requests still waiting or running fail with GenerationError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("batch scheduler did not stop within %.0f s", timeout)

    def run(self, seq: Sequence) -> GenerationResult:
        """Submit `seq`, block until it finishes, and return its result (or raise its error)."""
        with self._lock:
            if self._closed:
                raise errors.ModelNotLoaded("The model is not loaded.")
            self._queue.put(seq)
        seq.done.wait()
        if seq.error is not None:
            raise seq.error
        assert seq.result is not None
        return seq.result

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        torch = self._torch
        with torch.inference_mode():
            while not self._closed:
                try:
                    if not self._admit():
                        break
                    self._drop_cancelled()
                    if self._active:
                        self._step()
                except Exception as exc:  # never let the thread die with requests blocked on it
                    logger.error("batch scheduler failed", exc_info=exc)
                    self._fail_active(self._error_map(exc))
        self._fail_active(errors.GenerationError("The model was unloaded while generating."))
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Sequence):
                self._fail(item, errors.GenerationError("The model was unloaded while generating."))

    def _admit(self) -> bool:
        """Prefill waiting requests into free batch slots. False: the scheduler must stop."""
        new: list[Any] = []
        if not self._active:
            new.append(self._queue.get())  # idle: block for work
        while len(self._active) + len(new) < self.max_batch:
            try:
                new.append(self._queue.get_nowait())
            except queue.Empty:
                break
        stopping = False
        for item in new:
            if item is _STOP:
                stopping = True
            elif stopping:
                self._fail(item, errors.GenerationError("The model was unloaded while generating."))
            else:
                self._prefill(item)
        return not stopping

    def _prefill(self, seq: Sequence) -> None:
        """Run one prompt alone, sample its first token, and merge its cache into the batch."""
        torch = self._torch
        from transformers import DynamicCache

        seq.detok = Detokenizer(self._decode)
        seq.matcher = StopMatcher(seq.stops)
        seq.seen = set(seq.prompt_ids)
        if seq.params.temperature > 0:
            seed = seq.params.seed if seq.params.seed is not None else random.getrandbits(63)
            seq.generator = torch.Generator(device=self._output_device).manual_seed(seed)
        if self._is_cancelled(seq):
            return
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self._input_device)
        cache = DynamicCache(config=self.model.config)
        kwargs: dict[str, Any] = {}
        if self._logits_kw:
            kwargs[self._logits_kw] = 1
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                use_cache=True,
                **{self._cache_kw: cache},
                **kwargs,
            )
            token = self._sample(out.logits[:, -1, :], [seq])[0]
        except Exception as exc:
            logger.error("prefill failed (%d prompt tokens)", len(seq.prompt_ids), exc_info=exc)
            self._fail(seq, self._error_map(exc))
            return
        self.stats["prefills"] += 1
        if self._accept(seq, token):
            return  # finished on its first token
        self._join(seq, getattr(out, self._cache_kw), len(seq.prompt_ids))

    def _join(self, seq: Sequence, cache: Any, length: int) -> None:
        """Merge a prefilled (batch-1) cache into the batch cache, left-padding the shorter side."""
        torch = self._torch
        pad = torch.nn.functional.pad
        mask = torch.ones((1, length), dtype=torch.long, device=self._input_device)
        pos = torch.tensor([length], dtype=torch.long, device=self._input_device)
        if not self._active:
            self._cache, self._mask, self._pos = cache, mask, pos
            self._active = [seq]
            return
        old_len = self._mask.shape[1]
        new_len = max(old_len, length)
        for mine, theirs in zip(_kv_layers(self._cache), _kv_layers(cache), strict=True):
            for attr in ("keys", "values"):
                a, b = getattr(mine, attr), getattr(theirs, attr)
                if a is None or b is None or a.numel() == 0:
                    continue  # a layer without a cache of its own (KV sharing)
                a = pad(a, (0, 0, new_len - old_len, 0)) if new_len > old_len else a
                b = pad(b, (0, 0, new_len - length, 0)) if new_len > length else b
                setattr(mine, attr, torch.cat([a, b.to(a.device)], dim=0))
        self._mask = torch.cat([pad(self._mask, (new_len - old_len, 0)), pad(mask, (new_len - length, 0))], dim=0)
        self._pos = torch.cat([self._pos, pos])
        self._active.append(seq)

    def _leave(self, gone: list[Sequence]) -> None:
        """Remove finished rows from the batch and trim columns that are padding for every row."""
        if not gone:
            return
        torch = self._torch
        keep = [i for i, s in enumerate(self._active) if s not in gone]
        self._active = [self._active[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._pos = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self._input_device)
        self._mask = self._mask.index_select(0, index)
        self._pos = self._pos.index_select(0, index)
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start:
            self._mask = self._mask[:, start:]
        for layer in _kv_layers(self._cache):
            for attr in ("keys", "values"):
                t = getattr(layer, attr)
                if t is None or t.numel() == 0:
                    continue
                t = t.index_select(0, index.to(t.device))
                setattr(layer, attr, t[:, :, start:, :] if start else t)

    def _drop_cancelled(self) -> None:
        gone = [s for s in self._active if self._is_cancelled(s)]
        self._leave(gone)

    def _is_cancelled(self, seq: Sequence) -> bool:
        """Poll `cancelled()`; a raising check ends the request with that error."""
        try:
            if not seq.cancelled():
                return False
        except Exception as exc:
            self._fail(seq, exc)
            return True
        self._finish(seq, "cancelled", flush=False)
        return True

    def _step(self) -> None:
        """One decode step for every active row."""
        torch = self._torch
        batch = len(self._active)
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], batch)
        ids = torch.tensor([[s.last_token] for s in self._active], dtype=torch.long, device=self._input_device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((batch, 1))], dim=1)
        try:
            out = self._decode_forward(
                input_ids=ids,
                attention_mask=self._mask,
                position_ids=self._pos.view(batch, 1),
                use_cache=True,
                **{self._cache_kw: self._cache},
            )
            tokens = self._sample(out.logits[:, -1, :], self._active)
        except Exception as exc:
            logger.error("decode step failed (batch %d)", batch, exc_info=exc)
            self._fail_active(self._error_map(exc))
            return
        self._pos = self._pos + 1
        with token_burst():  # one consumer wake-up for the whole step
            gone = [s for s, t in zip(self._active, tokens, strict=True) if self._accept(s, t)]
        self._leave(gone)

    # ------------------------------------------------------------------ sampling

    def _sample(self, logits: Any, seqs: list[Sequence]) -> list[int]:
        """Next token per row: greedy rows from one argmax, others with their own sampler."""
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.temperature <= 0 and p.repeat_penalty == 1.0:
                out.append(int(greedy[i]))
            else:
                out.append(self._sample_row(logits[i].float(), seq))
            if p.logprobs is not None:
                seq.sampled_logprob = self._logprob(logits[i], out[-1], p.logprobs)
        return out

    def _logprob(self, row: Any, token: int, top: int) -> TokenLogprob:
        """The token's log-probability (log-softmax of the raw logits) and the `top` likeliest."""
        torch = self._torch
        logp = torch.log_softmax(row.float(), dim=-1)

        def piece(t: int) -> tuple[str, list[int]]:
            text = self._decode([t])
            return text, list(text.encode("utf-8"))

        alternatives = []
        if top > 0:
            values, ids = torch.topk(logp, top)
            for v, t in zip(values.tolist(), ids.tolist(), strict=True):
                text, raw = piece(int(t))
                alternatives.append((text, float(v), raw))
        text, raw = piece(token)
        return TokenLogprob(text, float(logp[token]), raw, alternatives)

    def _sample_row(self, row: Any, seq: Sequence) -> int:
        torch = self._torch
        p = seq.params
        if p.repeat_penalty != 1.0 and seq.seen:
            ids = torch.tensor(sorted(seq.seen), dtype=torch.long, device=row.device)
            scores = row.gather(0, ids)
            scores = torch.where(scores < 0, scores * p.repeat_penalty, scores / p.repeat_penalty)
            row = row.scatter(0, ids, scores)
        if p.temperature <= 0:
            return int(row.argmax())
        row = row / p.temperature
        if 0 < p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if 0 < p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Drop tokens once the mass before them already exceeds top_p (keeps at least one).
            drop = (torch.cumsum(probs, dim=-1) - probs) > p.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
        probs = torch.softmax(row, dim=-1)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    # ------------------------------------------------------------------ outcomes

    def _accept(self, seq: Sequence, token: int) -> bool:
        """Take a sampled token: stream its text, detect the end. True when `seq` finished."""
        assert seq.detok is not None and seq.matcher is not None
        if token in self.eos_ids:
            self._finish(seq, "stop")
            return True
        seq.n_out += 1
        seq.last_token = token
        seq.seen.add(token)
        if seq.sampled_logprob is not None:
            entry, seq.sampled_logprob = seq.sampled_logprob, None
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(entry)
            if seq.params.on_logprob is not None:
                try:
                    seq.params.on_logprob(entry)
                except Exception:
                    logger.exception("logprob callback failed")
        text, hit = seq.matcher.feed(seq.detok.push(token))
        if text and not self._emit(seq, text):
            return True
        if hit:
            self._finish(seq, "stop", flush=False)
            return True
        if seq.n_out >= seq.budget:
            self._finish(seq, "length")
            return True
        return False

    def _emit(self, seq: Sequence, text: str) -> bool:
        """Call the request's callback; a raising callback ends that request (only)."""
        try:
            seq.on_token(text)
            return True
        except Exception as exc:
            self._fail(seq, exc)
            return False

    def _finish(self, seq: Sequence, reason: str, *, flush: bool = True) -> None:
        if flush and seq.detok is not None and seq.matcher is not None:
            text, hit = seq.matcher.feed(seq.detok.flush())
            if not hit:
                text += seq.matcher.flush()
            if text and not self._emit(seq, text):
                return
        matched = seq.matcher.matched if seq.matcher is not None else None
        logprobs = (seq.logprobs or []) if seq.params.logprobs is not None else None
        seq.result = GenerationResult(reason, len(seq.prompt_ids), seq.n_out, logprobs, stop_sequence=matched)  # type: ignore[arg-type]
        seq.done.set()

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        if not seq.done.is_set():
            seq.error = exc
            seq.done.set()

    def _fail_active(self, exc: BaseException) -> None:
        for seq in self._active:
            self._fail(seq, exc)
        self._active = []
        self._cache = self._mask = self._pos = None
