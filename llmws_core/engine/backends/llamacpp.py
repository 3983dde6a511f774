"""The llama.cpp backend (llama-cpp-python's bindings, GGUF files).

The chat template comes from the file's metadata and renders in llama-cpp-python's
sandboxed Jinja environment (`ImmutableSandboxedEnvironment`), so a malicious
template cannot reach Python objects. Decoding does not go through `Llama`'s
Python loop: the low-level API is driven by `llamacpp_batch.BatchEngine`, which
batches concurrent requests into one `llama_decode` per step (continuous
batching over sequence ids), samples in native sampler chains, detokenizes
incrementally and keeps each session's KV prefix for its next turn.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ... import errors
from .. import gguf
from ..grammar import grammar_for
from .base import (
    Backend,
    CancelCheck,
    GenerationParams,
    GenerationResult,
    Message,
    ModelInfo,
    TokenCallback,
)
from .llamacpp_batch import BatchEngine, Request, StopMatcher, _common_prefix

__all__ = ["LlamaCppBackend", "StopMatcher", "default_threads"]

logger = logging.getLogger("llmws.engine.llamacpp")

# Used when a GGUF file carries no chat template (ChatML, the most common one).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_threads() -> int:
    """Physical cores are the sweet spot for llama.cpp's decode."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except Exception:  # psutil is a dependency, but never let this fail a load
        cores = None
    return max(1, cores or os.cpu_count() or 1)


#: Slots give up context before they give up parallelism, down to this per request.
MIN_SLOT_CONTEXT = 2048


class LlamaCppBackend(Backend):
    """A GGUF model served through llama.cpp's low-level API, batching concurrent requests."""

    name = "llamacpp"

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int | None = None,
        max_context_cap: int = 8192,
        n_threads: int | None = None,
        n_gpu_layers: int = -1,
        n_batch: int = 512,
        display_name: str | None = None,
        parallel: int = 8,
    ) -> None:
        """Args:
        n_ctx: context of ONE request (each slot gets this much KV); None: memory estimate.
        max_context_cap: upper bound on the estimated per-request context.
        parallel: slots, i.e. requests decoded together, each with a full context of
            KV; if all of them would take more than half the free memory, the context
            shrinks (to MIN_SLOT_CONTEXT at least), then the slots.
        """
        self.path = Path(path)
        self._n_ctx = n_ctx
        self._cap = max_context_cap
        self._n_threads = n_threads or default_threads()
        self._threads_configured = n_threads is not None
        self._n_gpu_layers = n_gpu_layers
        self._n_batch = n_batch
        self._parallel = max(1, parallel)
        self._ll: Any = None
        self._model: Any = None  # llama_model_p
        self._vocab: Any = None
        self._ctx: Any = None  # llama_context_p
        self._engine: BatchEngine | None = None
        self._formatter: Any = None
        self._bos_text = ""
        size_mb = self.path.stat().st_size / 2**20 if self.path.exists() else None
        self.info = ModelInfo(
            name=display_name or self.path.stem,
            path=str(self.path),
            format="gguf",
            backend=self.name,
            size_mb=round(size_mb, 1) if size_mb else None,
        )

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        try:
            import llama_cpp
            from llama_cpp._logger import set_verbose
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:  # pragma: no cover - a dependency
            raise errors.ModelLoadError("llama-cpp-python is not installed.") from exc
        if not self.path.is_file():
            raise errors.ModelNotFound(f"Model file not found: {self.info.name}")
        ll = self._ll = llama_cpp
        set_verbose(False)  # llama.cpp's own log goes to stderr only for errors
        ll.llama_backend_init()
        n_ctx, n_slots = self._plan_context()
        try:
            mparams = ll.llama_model_default_params()
            mparams.n_gpu_layers = 0x7FFFFFFF if self._n_gpu_layers == -1 else self._n_gpu_layers
            self._model = ll.llama_model_load_from_file(str(self.path).encode("utf-8"), mparams)
            if not self._model:
                raise ValueError("llama_model_load_from_file returned NULL")
            self._vocab = ll.llama_model_get_vocab(self._model)
            trained = int(ll.llama_model_n_ctx_train(self._model)) or None
            if trained:
                n_ctx = min(n_ctx, trained)
            cparams = ll.llama_context_default_params()
            # One KV stream per slot (see llamacpp_batch: speed and batch-invariant text).
            cparams.n_ctx = n_ctx * n_slots
            cparams.n_seq_max = n_slots
            cparams.kv_unified = False
            cparams.n_batch = self._n_batch
            cparams.n_ubatch = self._n_batch
            cparams.n_threads = self._n_threads
            cparams.n_threads_batch = self._n_threads
            cparams.no_perf = True
            self._ctx = ll.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise ValueError("llama_init_from_model returned NULL")
        except Exception as exc:
            logger.error("llama.cpp failed to load %s", self.path, exc_info=exc)
            self._free()
            raise errors.ModelLoadError(
                f"llama.cpp could not load {self.info.name}: not a valid GGUF model or not enough memory."
            ) from None
        meta = self._metadata()
        template = meta.get("tokenizer.chat_template") or CHATML_TEMPLATE
        bos = self._token_text(meta.get("tokenizer.ggml.bos_token_id"))
        eos = self._token_text(meta.get("tokenizer.ggml.eos_token_id"))
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self._bos_text = bos
        preamble = self._template_start()
        st = self.path.stat()
        self._engine = BatchEngine(
            ll,
            self._model,
            self._ctx,
            n_slots=n_slots,
            n_batch=self._n_batch,
            max_context=n_ctx,
            prefixes=self.prefixes,
            # A stored KV state loads only into the same file with the same slot context.
            model_id=f"llamacpp|{self.path.name}|{st.st_size}|{int(st.st_mtime)}|{n_ctx}",
            # Only an automatic thread count adapts; a configured one is kept as given.
            adaptive_threads=0 if self._threads_configured else self._n_threads,
            preamble=preamble,
        )
        self.max_concurrency = n_slots
        self.supports_grammar = True
        self.supports_logprobs = True
        self.supports_completion = True
        arch = meta.get("general.architecture", "")
        self.info.n_ctx_train = trained
        self.info.max_context = self._engine.max_context
        self.info.name = self.info.name or meta.get("general.name", self.path.stem)
        self.info.dtype = meta.get("general.file_type")
        self.info.quantization = gguf.quantization(meta.get("general.file_type"), self.path.name)
        self.info.parameters = int(ll.llama_model_n_params(self._model)) or None
        self.info.extra = {"architecture": arch, "n_threads": self._n_threads, "parallel": n_slots}
        logger.info(
            "loaded %s (context %d per request, %d slots, trained %s, %d threads)",
            self.path.name,
            self.info.max_context,
            n_slots,
            trained,
            self._n_threads,
        )

    def _plan_context(self) -> tuple[int, int]:
        """(context per request, slots): the memory estimate capped by config, such that
        all slots' KV takes at most half of what the estimate leaves free."""
        try:
            from ..memory import arch_from_gguf, estimate

            arch = arch_from_gguf(self.path)
            est = estimate(arch, self.path.stat().st_size, dtype_bytes=2)
            fit = est.available_bytes // est.kv_bytes_per_token if est.kv_bytes_per_token else 0
            ctx = self._n_ctx or max(256, min(est.max_context or 2048, self._cap))
            slots = self._parallel
            while fit and slots * ctx > fit // 2:
                if not self._n_ctx and ctx > MIN_SLOT_CONTEXT:
                    ctx = max(MIN_SLOT_CONTEXT, ctx // 2)
                elif slots > 1:
                    slots -= 1
                else:
                    break
        except Exception as exc:  # the estimate is best effort; a safe default serves
            logger.warning("context estimate failed for %s: %s", self.path.name, exc)
            ctx, slots = self._n_ctx or 4096, self._parallel
        return ctx, slots

    def _template_start(self) -> list[int]:
        """The tokens every conversation's prompt starts with: what the chat template
        renders before the first user message's text (a default system prompt, role
        markers), found as the common start of two prompts with different texts. It
        comes from the model file alone, never from a session."""
        try:
            a = self._prompt_tokens([{"role": "user", "content": "A"}])[0]
            b = self._prompt_tokens([{"role": "user", "content": "z"}])[0]
        except Exception as exc:  # a template that needs more than one user turn
            logger.debug("no shared template start: %s", exc)
            return []
        return a[: _common_prefix(a, b)]

    def _metadata(self) -> dict[str, str]:
        ll, out = self._ll, {}
        buf = ctypes.create_string_buffer(1 << 16)
        for i in range(ll.llama_model_meta_count(self._model)):
            parts = []
            for fn in (ll.llama_model_meta_key_by_index, ll.llama_model_meta_val_str_by_index):
                n = fn(self._model, i, buf, len(buf))
                if n >= len(buf):
                    buf = ctypes.create_string_buffer(n + 1)
                    n = fn(self._model, i, buf, len(buf))
                parts.append(buf.value.decode("utf-8", "replace"))
            out[parts[0]] = parts[1]
        return out

    def _token_text(self, token_id: Any) -> str:
        if token_id is None or self._vocab is None:
            return ""
        try:
            buf = ctypes.create_string_buffer(256)
            n = self._ll.llama_token_to_piece(self._vocab, int(token_id), buf, 256, 0, True)
            return buf.raw[: max(n, 0)].decode("utf-8", "replace")
        except Exception:
            return ""

    def unload(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self._free()

    def _free(self) -> None:
        if self._ctx:
            self._ll.llama_free(self._ctx)
        if self._model:
            self._ll.llama_model_free(self._model)
        self._ctx = self._model = self._vocab = None

    # ------------------------------------------------------------------ prompts

    def _require(self) -> BatchEngine:
        if self._engine is None:
            raise errors.ModelNotLoaded("The model is not loaded.")
        return self._engine

    def render(self, messages: Sequence[Message]) -> tuple[str, list[str]]:
        """The prompt text for `messages` and the template's stop strings."""
        self._require()
        return self._render(messages)

    def _render(self, messages: Sequence[Message]) -> tuple[str, list[str]]:
        try:
            result = self._formatter(messages=[dict(m) for m in messages])
        except Exception as exc:
            logger.warning("chat template failed: %s", exc)
            raise errors.BadRequest("The model's chat template rejected these messages.") from None
        stops = result.stop if isinstance(result.stop, list) else ([result.stop] if result.stop else [])
        return result.prompt, stops

    def _tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        """llama_tokenize (thread-safe: it only reads the vocabulary)."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        out = (ctypes.c_int32 * cap)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), out, cap, add_bos, special)
        if n < 0:
            cap = -n
            out = (ctypes.c_int32 * cap)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), out, cap, add_bos, special)
            if n < 0:
                raise errors.BadRequest("The text could not be tokenized.")
        return out[:n]

    def tokenize_prompt(self, messages: Sequence[Message]) -> tuple[list[int], list[str]]:
        self._require()
        return self._prompt_tokens(messages)

    def _prompt_tokens(self, messages: Sequence[Message]) -> tuple[list[int], list[str]]:
        prompt, stops = self._render(messages)
        add_bos = not (self._bos_text and prompt.startswith(self._bos_text))
        return self._tokenize(prompt, add_bos=add_bos, special=True), stops

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(self.tokenize_prompt(messages)[0])

    def tokenize_text(self, text: str) -> int:
        self._require()
        return len(self._tokenize(text, add_bos=False, special=False))

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        on_token: TokenCallback,
        cancelled: CancelCheck,
        *,
        persist: bool = False,
    ) -> GenerationResult:
        """Args (beyond Backend.generate's):
        persist: store the request's KV prefix on disk when it ends (`warm_prefix`).
        """
        engine = self._require()
        if params.response_format and not params.grammar:
            # JSON mode, forced tool calls: the grammar sampler keeps the reply to the format.
            params = dataclasses.replace(params, grammar=grammar_for(params.response_format))
        tokens, template_stops = self.tokenize_prompt(messages)
        stops = list(params.stop) + [s for s in template_stops if s]
        return self._submit(engine, tokens, stops, params, on_token, cancelled, persist=persist)

    def complete(
        self,
        prompt: str | list[int],
        params: GenerationParams,
        on_token: TokenCallback,
        cancelled: CancelCheck,
    ) -> GenerationResult:
        """Continue raw text or token ids (no chat template; `/v1/completions`)."""
        engine = self._require()
        if params.response_format and not params.grammar:
            params = dataclasses.replace(params, grammar=grammar_for(params.response_format))
        tokens = self.prompt_tokens(prompt)
        return self._submit(engine, tokens, list(params.stop), params, on_token, cancelled)

    def prompt_tokens(self, prompt: str | list[int]) -> list[int]:
        """The tokens a raw prompt is (BOS first where the model wants one); ids are checked."""
        self._require()
        if isinstance(prompt, str):
            add_bos = bool(self._ll.llama_vocab_get_add_bos(self._vocab)) and not (
                self._bos_text and prompt.startswith(self._bos_text)
            )
            tokens = self._tokenize(prompt, add_bos=add_bos, special=True)
        else:
            n_vocab = int(self._ll.llama_vocab_n_tokens(self._vocab))
            if any(not 0 <= t < n_vocab for t in prompt):
                raise errors.BadRequest(f"Token ids must lie in 0..{n_vocab - 1} for this model.")
            tokens = list(prompt)
        if not tokens:
            raise errors.BadRequest("The prompt is empty.")
        return tokens

    def count_prompt(self, prompt: str | list[int]) -> int:
        """Tokens of a raw prompt (see `prompt_tokens`)."""
        return len(self.prompt_tokens(prompt))

    def _submit(
        self,
        engine: BatchEngine,
        tokens: list[int],
        stops: list[str],
        params: GenerationParams,
        on_token: TokenCallback,
        cancelled: CancelCheck,
        *,
        persist: bool = False,
    ) -> GenerationResult:
        n_in = len(tokens)
        n_ctx = engine.max_context
        if n_in + 1 > n_ctx:
            raise errors.ContextTooLong(n_in, n_ctx)
        if cancelled():
            return GenerationResult("cancelled", n_in, 0)
        req = Request(
            tokens=tokens,
            params=params,
            stops=stops,
            on_token=on_token,
            cancelled=cancelled,
            budget=max(1, min(params.max_new_tokens, n_ctx - n_in)),
            persist=persist,
        )
        if params.cache_key is not None:
            req.restored = engine.load_prefix(params.cache_key, tokens)
        return engine.submit(req)

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        self._require()
        add_bos = add_special and bool(self._ll.llama_vocab_get_add_bos(self._vocab))
        return self._tokenize(text, add_bos=add_bos, special=True)

    def detokenize(self, tokens: list[int]) -> str:
        """The text of token ids (what `/detokenize` shows)."""
        engine = self._require()
        n_vocab = int(self._ll.llama_vocab_n_tokens(self._vocab))
        if any(not 0 <= t < n_vocab for t in tokens):
            raise errors.BadRequest(f"Token ids must lie in 0..{n_vocab - 1} for this model.")
        return b"".join(engine._piece_of(t) for t in tokens).decode("utf-8", errors="replace")

    def warm_prefix(self, messages: Sequence[Message], cache_key: str | None) -> tuple[int, bool]:
        """Evaluate `messages` into `cache_key`'s slot and store the KV on disk.

        Returns (prompt tokens now cached, whether they are also on disk)."""
        params = GenerationParams(max_new_tokens=1, temperature=0.0, cache_key=cache_key)
        result = self.generate(messages, params, lambda _text: None, lambda: False, persist=True)
        engine = self._require()
        if engine.prefixes is None or cache_key is None:
            return result.tokens_in, False
        engine.prefixes.flush()  # on disk before the caller hears "persistent"
        return result.tokens_in, True

    @property
    def cache_stats(self) -> dict[str, int]:
        """Prompt tokens prefilled vs reused from a session's cached prefix (`restored`:
        loaded from disk), prefixes stored on disk, decode steps."""
        return dict(self._engine.stats) if self._engine else {}
