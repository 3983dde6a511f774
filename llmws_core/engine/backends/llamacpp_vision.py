"""GGUF vision-language models through llama-cpp-python's multimodal support (libmtmd).

A GGUF model with its multimodal projector (`mmproj-*.gguf` beside it, paired by
the scanner) is served by `llama_cpp.Llama` with an `MTMDChatHandler`: the chat
template from the model file places one media marker per image, libmtmd turns each
image into its embedding tokens and evaluates them with the text. One request runs
at a time (the handler evaluates into the context's only sequence).

Token counts come from libmtmd's own tokenization (text chunks and image chunks
alike), so `tokens_in` and the context check include the images' tokens. Library
errors become the project's errors here; llama.cpp's own logging stays off.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ... import errors, images
from ...images import openai_messages
from .base import (
    Backend,
    CancelCheck,
    GenerationParams,
    GenerationResult,
    Message,
    ModelInfo,
    TokenCallback,
)

logger = logging.getLogger("llmws.engine.llamacpp_vision")


class LlamaCppVisionBackend(Backend):
    """A GGUF vision model and its projector (see the module docstring)."""

    name = "llamacpp"
    max_concurrency = 1

    def __init__(
        self,
        path: Path,
        mmproj: Path,
        *,
        n_ctx: int | None = None,
        max_context_cap: int = 8192,
        n_threads: int | None = None,
        n_gpu_layers: int = -1,
        n_batch: int = 512,
        display_name: str | None = None,
    ) -> None:
        """Args:
        path: the model's GGUF file; mmproj: its projector's GGUF file.
        n_ctx: the context; None: the memory estimate capped by `max_context_cap`
            and the trained context.
        n_gpu_layers: layers offloaded to the GPU (-1: all); 0 also keeps the projector on the CPU.
        """
        self.path = Path(path)
        self.mmproj = Path(mmproj)
        self._n_ctx = n_ctx
        self._cap = max_context_cap
        self._n_threads = n_threads
        self._n_gpu_layers = n_gpu_layers
        self._n_batch = n_batch
        self._llama: Any = None
        self._handler: Any = None
        self._lock = threading.Lock()
        size = sum(p.stat().st_size for p in (self.path, self.mmproj) if p.exists())
        self.info = ModelInfo(
            name=display_name or self.path.stem,
            path=str(self.path),
            format="gguf",
            backend=self.name,
            size_mb=round(size / 2**20, 1) if size else None,
            vision=True,
            extra={"mmproj": self.mmproj.name},
        )

    # ------------------------------------------------------------------ loading

    def _context(self) -> tuple[int, int | None]:
        """(context to allocate, trained context) from the file's metadata and free memory."""
        try:
            from ..memory import arch_from_gguf, estimate

            arch = arch_from_gguf(self.path)
            weights = self.path.stat().st_size + self.mmproj.stat().st_size
            est = estimate(arch, weights, dtype_bytes=2)
            ctx = self._n_ctx or max(256, min(est.max_context or 2048, self._cap))
            return ctx, arch.n_ctx_train
        except Exception as exc:  # best effort: a safe default serves
            logger.warning("context estimate failed for %s: %s", self.path.name, exc)
            return self._n_ctx or 4096, None

    def load(self) -> None:
        if not self.path.is_file() or not self.mmproj.is_file():
            raise errors.ModelNotFound(f"Model or projector file not found: {self.info.name}")
        try:
            import llama_cpp
            from llama_cpp.llama_chat_format import MTMDChatHandler
        except ImportError:
            raise errors.ModelLoadError(
                "The llama.cpp backend needs llama-cpp-python with multimodal support."
            ) from None
        n_ctx, trained = self._context()
        if trained:
            n_ctx = min(n_ctx, trained)
        llama = None
        try:
            handler = MTMDChatHandler(clip_model_path=str(self.mmproj), verbose=False, use_gpu=self._n_gpu_layers != 0)
            kwargs: dict[str, Any] = {
                "model_path": str(self.path),
                "chat_handler": handler,
                "n_ctx": n_ctx,
                "n_gpu_layers": self._n_gpu_layers,
                "n_batch": self._n_batch,
                "verbose": False,
            }
            if self._n_threads:
                kwargs["n_threads"] = self._n_threads
            llama = llama_cpp.Llama(**kwargs)
            handler._init_mtmd_context(llama)  # the projector now, so a bad one fails the load
        except Exception as exc:
            logger.error("llama.cpp could not load %s with %s", self.path, self.mmproj, exc_info=exc)
            if llama is not None:
                llama.close()
            raise errors.ModelLoadError(
                f"llama.cpp could not load {self.info.name} with its projector {self.mmproj.name}."
            ) from None
        self._llama, self._handler = llama, handler
        self.info.max_context = int(llama.n_ctx())
        self.info.n_ctx_train = trained
        self.info.device = "cpu" if self._n_gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload() else "gpu"
        logger.info("loaded %s with projector %s (context %d)", self.info.name, self.mmproj.name, self.info.max_context)

    def unload(self) -> None:
        llama, self._llama, self._handler = self._llama, None, None
        if llama is not None:
            try:
                llama.close()
            except Exception:  # best effort
                logger.debug("closing llama failed", exc_info=True)

    def _require(self) -> Any:
        if self._llama is None:
            raise errors.ModelNotLoaded("The model is not loaded.")
        return self._llama

    # ------------------------------------------------------------------ prompts

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text the model's chat template renders, with one media marker per image."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        llama, handler = self._require(), self._handler
        marker = handler._mtmd_cpp.mtmd_default_marker().decode("utf-8")
        template = llama.metadata.get("tokenizer.chat_template")
        if not isinstance(template, str) or not template:
            raise errors.BadRequest("This model file has no chat template.")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            return env.from_string(template).render(
                messages=handler._get_template_messages(openai_messages(messages), marker),
                add_generation_prompt=True,
                bos_token=llama.detokenize([llama.token_bos()]).decode("utf-8", "ignore"),
                eos_token=llama.detokenize([llama.token_eos()]).decode("utf-8", "ignore"),
            )
        except Exception as exc:
            logger.warning("chat template failed: %s", exc)
            raise errors.BadRequest("The model's chat template rejected these messages.") from None

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Prompt tokens as libmtmd tokenizes them: text and every image's tokens."""
        with self._lock:
            return self._count(messages)

    def _count(self, messages: Sequence[Message]) -> int:
        self._require()
        handler = self._handler
        mtmd = handler._mtmd_cpp
        text = self.render(messages).encode("utf-8")
        pics = [images.to_bytes(p) for m in messages for p in m.get("images") or ()]
        bitmaps = []
        chunks = None
        try:
            bitmaps = [handler._create_bitmap_from_bytes(raw) for raw in pics]
            chunks = mtmd.mtmd_input_chunks_init()
            piece = mtmd.mtmd_input_text()
            piece.text, piece.text_len = text, len(text)
            piece.add_special = piece.parse_special = True
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            if mtmd.mtmd_tokenize(handler.mtmd_ctx, chunks, ctypes.byref(piece), array, len(bitmaps)) != 0:
                raise errors.BadRequest("The model could not read these images.")
            return sum(
                int(mtmd.mtmd_input_chunk_get_n_tokens(mtmd.mtmd_input_chunks_get(chunks, i)))
                for i in range(mtmd.mtmd_input_chunks_size(chunks))
            )
        except errors.LLMWSError:
            raise
        except Exception as exc:
            logger.warning("multimodal tokenization failed: %s", exc)
            raise errors.BadRequest("The model could not read these images.") from None
        finally:
            if chunks is not None:
                mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

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
            llama = self._require()
            n_in = self._count(messages)
            limit = self.info.max_context
            if n_in + 1 > limit:
                raise errors.ContextTooLong(n_in, limit)
            if cancelled():
                return GenerationResult("cancelled", n_in, 0)
            budget = max(1, min(params.max_new_tokens, limit - n_in))
            reason = "length"
            pieces: list[str] = []
            try:
                stream = llama.create_chat_completion(
                    messages=openai_messages(messages),
                    stream=True,
                    max_tokens=budget,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k,
                    stop=list(params.stop) or None,
                    seed=params.seed,
                    repeat_penalty=params.repeat_penalty,
                )
                for chunk in stream:
                    choice = (chunk.get("choices") or [{}])[0]
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        pieces.append(text)
                        on_token(text)
                    if choice.get("finish_reason"):
                        reason = "length" if choice["finish_reason"] == "length" else "stop"
                    if cancelled():
                        reason = "cancelled"
                        stream.close()
                        break
            except errors.LLMWSError:
                raise
            except Exception as exc:
                logger.error("llama.cpp vision generation failed (%d prompt tokens)", n_in, exc_info=exc)
                raise errors.GenerationError("The model failed while generating; the server log has details.") from None
            # Streamed pieces are not tokens one to one (text held back at a stop string
            # comes together): the reply's own token count.
            n_out = self.tokenize_text("".join(pieces)) if pieces else 0
            return GenerationResult(reason, n_in, n_out)  # type: ignore[arg-type]
