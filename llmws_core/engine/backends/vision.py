"""Vision-language models for the transformers backend: images and text in, text out.

A model folder whose config has a `vision_config` (Qwen2-VL / Qwen2.5-VL, SmolVLM /
Idefics3, LLaVA and the other `AutoModelForImageTextToText` architectures) is served
through its `AutoProcessor`: the processor's chat template places each image's
placeholder in the prompt, and the processor turns the images into pixel values and
expands every placeholder into the image's tokens. So the prompt's token count,
`tokens_in` and the context check include the images' tokens.

Image decoding and preprocessing happen in the calling worker thread (the chat
service runs `count_tokens` and `generate` off the event loop). Generation goes
through the model's own `generate` (each architecture's image-aware position ids
and caches are its business), one request at a time under a lock: the streamer
hands each token to the same UTF-8-safe detokenizer and stop matcher as the batch
scheduler, and a stopping criterion ends it within one step when the request is
cancelled or a stop string matched.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ... import errors, images
from .base import CancelCheck, GenerationParams, GenerationResult, Message, TokenCallback
from .batching import Detokenizer
from .stops import StopMatcher

logger = logging.getLogger("llmws.engine.vision")


def is_vision_config(cfg: dict[str, Any]) -> bool:
    """Whether a Hugging Face `config.json` describes a vision-language model."""
    return isinstance(cfg.get("vision_config"), dict)


def conversation(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages as processor chat templates take them: content parts, one
    `{"type": "image"}` per image before the message's text."""
    out = []
    for m in messages:
        parts: list[dict[str, Any]] = [{"type": "image"} for _ in m.get("images") or ()]
        parts.append({"type": "text", "text": m.get("content") or ""})
        out.append({"role": m["role"], "content": parts})
    return out


class VisionRunner:
    """Prompts and generation of one loaded vision-language model (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        decode: Callable[[list[int]], str],
        eos_ids: set[int],
        error_map: Callable[[BaseException], errors.LLMWSError],
    ) -> None:
        import torch

        self._torch = torch
        self.model = model
        self.processor = processor
        self._decode = decode
        self._eos_ids = eos_ids
        self._error_map = error_map
        self._lock = threading.Lock()  # one generation (and one processor call) at a time
        tok = processor.tokenizer
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text (image placeholders not yet expanded)."""
        try:
            return str(
                self.processor.apply_chat_template(conversation(messages), add_generation_prompt=True, tokenize=False)
            )
        except Exception as exc:
            logger.warning("chat template failed: %s", exc)
            raise errors.BadRequest("The model's chat template rejected these messages.") from None

    def inputs(self, messages: Sequence[Message]) -> Any:
        """The processor's tensors for `messages`: token ids with every image's tokens, pixel values."""
        text = self.render(messages)
        pictures = [images.to_pil(img) for m in messages for img in m.get("images") or ()]
        try:
            return self.processor(text=[text], images=pictures or None, return_tensors="pt")
        except Exception as exc:
            logger.warning("image preprocessing failed: %s", exc, exc_info=exc)
            raise errors.BadRequest("The model's processor could not prepare these images.") from None

    def count_tokens(self, messages: Sequence[Message]) -> int:
        with self._lock:
            return int(self.inputs(messages)["input_ids"].shape[1])

    def generate(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        on_token: TokenCallback,
        cancelled: CancelCheck,
        *,
        max_context: int,
        stops: list[str],
    ) -> GenerationResult:
        torch = self._torch
        with self._lock:
            batch = self.inputs(messages)
            n_in = int(batch["input_ids"].shape[1])
            if n_in + 1 > max_context:
                raise errors.ContextTooLong(n_in, max_context)
            budget = max(1, min(params.max_new_tokens, max_context - n_in))
            state = _Stream(Detokenizer(self._decode), StopMatcher(stops), self._eos_ids, on_token, cancelled)
            if cancelled():
                return GenerationResult("cancelled", n_in, 0)
            batch = batch.to(self.model.device)
            if "pixel_values" in batch and self.model.dtype != torch.float32:
                batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
            sample = params.temperature > 0
            kwargs: dict[str, Any] = {
                "max_new_tokens": budget,
                "do_sample": sample,
                "streamer": state,
                "stopping_criteria": [state.should_stop],
                "eos_token_id": sorted(self._eos_ids) or None,
                "pad_token_id": self._pad_id,
                "repetition_penalty": params.repeat_penalty,
            }
            if sample:
                kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
            else:  # the model's generation_config may ask for sampling; greedy must be greedy
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if sample and params.seed is not None:
                torch.manual_seed(params.seed)  # generate() samples from the global generator
            try:
                with torch.inference_mode():
                    self.model.generate(**batch, **kwargs)
            except Exception as exc:
                if state.callback_error is not None:
                    raise state.callback_error from None
                logger.error("vision generation failed (%d prompt tokens)", n_in, exc_info=exc)
                raise self._error_map(exc) from None
            if state.callback_error is not None:
                raise state.callback_error
            state.finish()
            if state.cancelled_seen or cancelled():
                reason = "cancelled"
            elif state.stopped:
                reason = "stop"
            else:
                reason = "length" if state.n_out >= budget else "stop"
            return GenerationResult(reason, n_in, state.n_out)  # type: ignore[arg-type]


class _Stream:
    """A transformers streamer: tokens to text through the stop matcher, to `on_token`."""

    def __init__(
        self,
        detok: Detokenizer,
        matcher: StopMatcher,
        eos_ids: set[int],
        on_token: TokenCallback,
        cancelled: CancelCheck,
    ) -> None:
        self.detok, self.matcher, self.eos_ids = detok, matcher, eos_ids
        self.on_token, self.cancelled = on_token, cancelled
        self.n_out = 0
        #: The reply ended: an end-of-sequence token, a stop string, or a failed callback.
        self.stopped = False
        self.stop_hit = False
        self.cancelled_seen = False
        self.callback_error: BaseException | None = None
        self._prompt_seen = False
        self.should_stop = _Criterion(self)

    # -- the streamer interface: generate() puts the prompt first, then each new token
    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.stopped:
                return
            if token in self.eos_ids:
                self.stopped = True
                return
            self.n_out += 1
            text, hit = self.matcher.feed(self.detok.push(int(token)))
            self._emit(text)
            if hit:
                self.stopped = self.stop_hit = True

    def end(self) -> None:
        pass

    def finish(self) -> None:
        """Emit the text still held back (none after a stop string: it ends the reply there)."""
        if self.stop_hit:
            return
        text, hit = self.matcher.feed(self.detok.flush())
        if not hit:
            text += self.matcher.flush()
        self._emit(text)

    def _emit(self, text: str) -> None:
        if not text or self.callback_error is not None:
            return
        try:
            self.on_token(text)
        except Exception as exc:  # a raising consumer ends this request
            self.callback_error = exc
            self.stopped = True


class _Criterion:
    """`StoppingCriteria`: stop when the request is cancelled, a stop string matched or a callback failed."""

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        s = self._stream
        if not s.stopped and s.cancelled():
            s.cancelled_seen = True
        done = s.stopped or s.cancelled_seen
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
