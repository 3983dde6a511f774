"""The llama.cpp backend (llama-cpp-python, GGUF files).

The chat template comes from the file's metadata and renders in llama-cpp-python's
sandboxed Jinja environment (`ImmutableSandboxedEnvironment`), so a malicious
template cannot reach Python objects. Decoding uses the token-level `generate`
loop rather than `create_completion`: we need cancellation every token, our own
UTF-8-safe incremental detokenization and stop strings, and we get llama.cpp's
longest-common-prefix KV reuse between consecutive turns for free.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ... import errors
from .base import (
    Backend,
    CancelCheck,
    GenerationParams,
    GenerationResult,
    Message,
    ModelInfo,
    TokenCallback,
)

logger = logging.getLogger("llmws.engine.llamacpp")

# Used when a GGUF file carries no chat template (ChatML, the most common one).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class StopMatcher:
    """Holds back text that may be the start of a stop string; reports a full match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string matched)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        first = -1
        for stop in self.stops:
            idx = self.pending.find(stop)
            if idx != -1 and (first == -1 or idx < first):
                first = idx
        if first != -1:
            out = self.pending[:first]
            self.pending = ""
            return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def default_threads() -> int:
    """Physical cores are the sweet spot for llama.cpp's decode."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except Exception:  # psutil is a dependency, but never let this fail a load
        cores = None
    return max(1, cores or os.cpu_count() or 1)


class LlamaCppBackend(Backend):
    """A GGUF model served through llama-cpp-python."""

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
    ) -> None:
        self.path = Path(path)
        self._n_ctx = n_ctx
        self._cap = max_context_cap
        self._n_threads = n_threads or default_threads()
        self._n_gpu_layers = n_gpu_layers
        self._n_batch = n_batch
        self._llm: Any = None
        self._formatter: Any = None
        self._lock = threading.Lock()  # one llama_context: one generation at a time
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
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:  # pragma: no cover - a dependency
            raise errors.ModelLoadError("llama-cpp-python is not installed.") from exc
        if not self.path.is_file():
            raise errors.ModelNotFound(f"Model file not found: {self.info.name}")
        self._llama_cpp = llama_cpp
        n_ctx = self._n_ctx or self._estimate_ctx()
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=n_ctx,
                n_threads=self._n_threads,
                n_threads_batch=self._n_threads,
                n_gpu_layers=self._n_gpu_layers,
                n_batch=min(self._n_batch, n_ctx),
                verbose=False,
            )
        except Exception as exc:
            logger.error("llama.cpp failed to load %s", self.path, exc_info=exc)
            raise errors.ModelLoadError(
                f"llama.cpp could not load {self.info.name}: not a valid GGUF model or not enough memory."
            ) from None
        meta = dict(self._llm.metadata or {})
        template = meta.get("tokenizer.chat_template") or CHATML_TEMPLATE
        bos = self._token_text(meta.get("tokenizer.ggml.bos_token_id"))
        eos = self._token_text(meta.get("tokenizer.ggml.eos_token_id"))
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self._bos_text = bos
        arch = meta.get("general.architecture", "")
        trained = meta.get(f"{arch}.context_length")
        self.info.n_ctx_train = int(trained) if trained else None
        self.info.max_context = self._llm.n_ctx()
        self.info.name = self.info.name or meta.get("general.name", self.path.stem)
        self.info.dtype = meta.get("general.file_type")
        self.info.quantization = _quant_from_name(self.path.name)
        self.info.extra = {"architecture": arch, "n_threads": self._n_threads}
        logger.info(
            "loaded %s (n_ctx %d, trained %s, %d threads)",
            self.path.name, self.info.max_context, self.info.n_ctx_train, self._n_threads,
        )

    def _estimate_ctx(self) -> int:
        """Context to allocate: the memory estimate, capped by the trained context and config."""
        try:
            from ..memory import arch_from_gguf, estimate

            arch = arch_from_gguf(self.path)
            est = estimate(arch, self.path.stat().st_size, dtype_bytes=2)
            ctx = est.max_context or 2048
        except Exception as exc:  # the estimate is best effort; a safe default serves
            logger.warning("context estimate failed for %s: %s", self.path.name, exc)
            ctx = 4096
        return max(256, min(ctx, self._cap))

    def _token_text(self, token_id: Any) -> str:
        if token_id is None or self._llm is None:
            return ""
        try:
            return self._llm.detokenize([int(token_id)], special=True).decode("utf-8", "replace")
        except Exception:
            return ""

    def unload(self) -> None:
        with self._lock:
            if self._llm is not None:
                try:
                    self._llm.close()
                except Exception:  # closing is best effort
                    logger.debug("llama close failed", exc_info=True)
            self._llm = None

    # ------------------------------------------------------------------ prompts

    def _require(self) -> Any:
        if self._llm is None:
            raise errors.ModelNotLoaded("The model is not loaded.")
        return self._llm

    def render(self, messages: Sequence[Message]) -> tuple[str, list[str]]:
        """The prompt text for `messages` and the template's stop strings."""
        self._require()
        try:
            result = self._formatter(messages=[dict(m) for m in messages])
        except Exception as exc:
            logger.warning("chat template failed: %s", exc)
            raise errors.BadRequest("The model's chat template rejected these messages.") from None
        stops = result.stop if isinstance(result.stop, list) else ([result.stop] if result.stop else [])
        return result.prompt, stops

    def tokenize_prompt(self, messages: Sequence[Message]) -> tuple[list[int], list[str]]:
        llm = self._require()
        prompt, stops = self.render(messages)
        add_bos = not (self._bos_text and prompt.startswith(self._bos_text))
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
        return tokens, stops

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(self.tokenize_prompt(messages)[0])

    def tokenize_text(self, text: str) -> int:
        return len(self._require().tokenize(text.encode("utf-8"), add_bos=False, special=False))

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        on_token: TokenCallback,
        cancelled: CancelCheck,
    ) -> GenerationResult:
        with self._lock:
            llm = self._require()
            tokens, template_stops = self.tokenize_prompt(messages)
            n_in = len(tokens)
            n_ctx = llm.n_ctx()
            if n_in + 1 > n_ctx:
                raise errors.ContextTooLong(n_in, n_ctx)
            budget = min(params.max_new_tokens, n_ctx - n_in)
            stops = StopMatcher(list(params.stop) + [s for s in template_stops if s])
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            if params.seed is not None:
                llm.set_seed(params.seed)
            n_out = 0
            finish = "length"
            is_eog = self._llama_cpp.llama_vocab_is_eog
            vocab = llm._model.vocab
            try:
                if cancelled():
                    return GenerationResult("cancelled", n_in, 0)
                for token in llm.generate(
                    tokens,
                    top_k=params.top_k if params.top_k > 0 else 0,
                    top_p=params.top_p,
                    min_p=0.0,
                    temp=params.temperature,
                    repeat_penalty=params.repeat_penalty,
                    reset=True,
                ):
                    if is_eog(vocab, token):
                        finish = "stop"
                        break
                    n_out += 1
                    piece = llm.detokenize([token], special=False)
                    text, hit = stops.feed(decoder.decode(piece))
                    if text:
                        on_token(text)
                    if hit:
                        finish = "stop"
                        break
                    if cancelled():
                        finish = "cancelled"
                        break
                    if n_out >= budget:
                        finish = "length"
                        break
            except errors.LLMWSError:
                raise
            except Exception as exc:
                logger.error("llama.cpp generation failed", exc_info=exc)
                raise errors.GenerationError("The model failed while generating.") from None
            if finish != "stop":
                tail, _ = stops.feed(decoder.decode(b"", final=True))
                tail += stops.flush()
            else:
                tail = ""
            if tail and finish != "cancelled":
                on_token(tail)
            return GenerationResult(finish, n_in, n_out)  # type: ignore[arg-type]


def _quant_from_name(name: str) -> str | None:
    upper = name.upper()
    for tag in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0",
                "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32", "IQ4_XS"):
        if tag in upper:
            return tag
    return None
