"""The transformers backend: Hugging Face model folders (safetensors), or a GGUF through transformers.

Loading picks precision, attention and placement from `engine.device` (bf16 on
Ampere+, fp16 on older CUDA, fp32 on the CPU; FlashAttention 2 where it can run,
SDPA otherwise; accelerate's `device_map="auto"` on CUDA), optionally quantizes
with bitsandbytes, and starts a `BatchScheduler` that owns the model: concurrent
`generate()` calls share forward passes (`max_concurrency = max_batch`).

Chat templates render through `tokenizer.apply_chat_template`, which uses
transformers' sandboxed Jinja environment. A folder whose config has a
`vision_config` is a vision-language model: it loads through `AutoProcessor` and
`AutoModelForImageTextToText` with the same device policy and is served by
`vision.VisionRunner` (images in the prompt, one request at a time). torch and transformers are imported
only in `load()`, so importing this module is cheap and works without them.
Library errors (OOM, bad files) are logged here and become `ModelLoadError` /
`GenerationError` with user-safe messages.
"""

from __future__ import annotations

import gc
import inspect
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from ... import errors
from .. import device as devmod
from .base import (
    Backend,
    CancelCheck,
    GenerationParams,
    GenerationResult,
    Message,
    ModelInfo,
    TokenCallback,
)

logger = logging.getLogger("llmws.engine.transformers")

#: Used when a tokenizer has no chat template: plain role-prefixed turns; the stop
#: string below keeps a base model from writing the user's next turn.
SIMPLE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
SIMPLE_TEMPLATE_STOPS = ["\nUser:", "\nSystem:"]

Quantization = Literal["4bit", "8bit"] | None


def _is_oom(exc: BaseException) -> bool:
    """Out of memory, on the GPU (torch's own class) or the CPU allocator."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, (MemoryError, RuntimeError)) and (
        "out of memory" in text.lower() or "can't allocate memory" in text
    )


def generation_error(exc: BaseException) -> errors.LLMWSError:
    """Map a library exception raised while generating to a user-safe project error."""
    if isinstance(exc, errors.LLMWSError):
        return exc
    if _is_oom(exc):
        _empty_cuda_cache()
        return errors.GenerationError(
            "The model ran out of memory while generating; try a shorter prompt or fewer concurrent requests."
        )
    return errors.GenerationError("The model failed while generating; the server log has details.")


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort
        logger.debug("empty_cache failed", exc_info=True)


class TransformersBackend(Backend):
    """A Hugging Face causal LM served with continuous batching."""

    name = "transformers"

    def __init__(
        self,
        path: Path,
        *,
        # -- what to load
        gguf_file: str | None = None,
        trust_remote_code: bool = False,
        # -- how to load it
        quantization: Quantization = None,
        attention: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto",
        dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto",
        compile: bool = False,
        # -- serving
        max_batch: int = 8,
        max_context: int | None = None,
    ) -> None:
        """Args:
        path: a model folder (config.json + safetensors + tokenizer), or a .gguf file.
        gguf_file: a GGUF file name inside `path` to load through transformers'
            GGUF support (dequantized on load); None: `path` itself when it is a .gguf.
        trust_remote_code: run the folder's own Python code; only from the config file.
        quantization: bitsandbytes "4bit" (NF4) or "8bit"; None: unquantized. CUDA only.
        attention: "auto" (FA2 where it runs, else SDPA) or a fixed implementation.
        dtype: "auto" (bf16 on CUDA >= 8.0, fp16 on older CUDA, fp32 on the CPU) or fixed.
        compile: torch.compile the decode step, warmed up at load.
        max_batch: most requests decoded together (`max_concurrency`).
        max_context: per-request context; None: the memory estimate capped by the
            model's trained context.
        """
        self.path = Path(path)
        if gguf_file is None and self.path.suffix.lower() == ".gguf":
            self._dir, self._gguf = self.path.parent, self.path.name
        else:
            self._dir, self._gguf = self.path, gguf_file
        self._trust_remote_code = trust_remote_code
        self._quantization = quantization
        self._attention = attention
        self._dtype = dtype
        self._compile = compile
        self.max_batch = max(1, int(max_batch))
        self.max_concurrency = self.max_batch
        self._max_context = max_context
        self._model: Any = None
        self._tokenizer: Any = None
        self._scheduler: Any = None
        self._vision: Any = None  # a VisionRunner when the model takes images
        self._template_stops: list[str] = []
        self._tok_lock = threading.Lock()  # fast tokenizers are not safe to encode concurrently
        self.info = ModelInfo(
            name=self._display_name(),
            path=str(self.path),
            format="gguf" if self._gguf else "safetensors",
            backend=self.name,
            size_mb=self._size_mb(),
            quantization=quantization,
        )

    def _display_name(self) -> str:
        return Path(self._gguf).stem if self._gguf else self.path.name

    def _size_mb(self) -> float | None:
        try:
            if self._gguf:
                files = [self._dir / self._gguf]
            else:
                files = list(self._dir.glob("*.safetensors")) or list(self._dir.glob("*.bin"))
            total = sum(f.stat().st_size for f in files if f.is_file())
        except OSError:
            return None
        return round(total / 2**20, 1) if total else None

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        """Load tokenizer and weights, pick precision/attention, start the batch scheduler."""
        if self._gguf:
            if not (self._dir / self._gguf).is_file():
                raise errors.ModelNotFound(f"Model file not found: {self.info.name}")
        elif not (self._dir / "config.json").is_file():
            raise errors.ModelNotFound(f"No model folder (config.json) at {self.info.name}")
        try:
            import torch
            import transformers
        except ImportError:
            raise errors.ModelLoadError(
                "The transformers backend needs torch and transformers (pip install 'llmws[transformers]')."
            ) from None

        caps = devmod.probe()
        # Refuse what this machine cannot do before reading gigabytes.
        devmod.check_quantization(self._quantization, caps)
        dtype = devmod.choose_dtype(self._dtype, caps)
        if self._quantization and dtype == "float32":
            dtype = "bfloat16" if (caps.compute_capability or (0, 0)) >= devmod.AMPERE else "float16"
        attention = devmod.choose_attention(self._attention, caps, dtype)

        vision = self._is_vision()
        try:
            if vision:
                processor = transformers.AutoProcessor.from_pretrained(
                    str(self._dir), trust_remote_code=self._trust_remote_code
                )
                tokenizer = processor.tokenizer
                auto = transformers.AutoModelForImageTextToText
                # One request at a time (see vision.py): the KV budget is one sequence's.
                self.max_batch = self.max_concurrency = 1
            else:
                tokenizer = self._load_tokenizer(transformers)
                auto = transformers.AutoModelForCausalLM
            model = self._load_model(transformers, torch, caps, dtype, attention, auto)
            self._tokenizer = tokenizer
            self._model = model
            if not vision and not getattr(tokenizer, "chat_template", None):
                logger.info("%s has no chat template; using a plain role-prefixed one", self.info.name)
                self._template_stops = list(SIMPLE_TEMPLATE_STOPS)
            self._fill_info(model, caps, dtype)
            if vision:
                from .vision import VisionRunner

                self._vision = VisionRunner(
                    model,
                    processor,
                    decode=self._decode_ids,
                    eos_ids=self._eos_ids(model, tokenizer),
                    error_map=generation_error,
                )
                self.info.vision = True
            else:
                self._start_scheduler(torch, model, tokenizer)
        except errors.LLMWSError:
            self.unload()
            raise
        except Exception as exc:
            self.unload()
            logger.error("transformers failed to load %s", self.path, exc_info=exc)
            if _is_oom(exc):
                _empty_cuda_cache()
                raise errors.ModelLoadError(
                    f"Not enough memory to load {self.info.name}; try quantization or a smaller model."
                ) from None
            if vision and "torchvision" in str(exc).lower():
                # transformers' Qwen2-VL / Qwen2.5-VL processors (video included) import torchvision.
                raise errors.ModelLoadError(
                    f"{self.info.name} needs torchvision for its image processor; install the "
                    "torchvision build that matches the installed torch."
                ) from None
            raise errors.ModelLoadError(
                f"transformers could not load {self.info.name}: not a valid model or not enough memory."
            ) from None
        logger.info(
            "loaded %s on %s (%s, %s attention, quantization %s, max_context %d, batch %d)",
            self.info.name,
            self.info.device,
            dtype,
            self.info.attention,
            self._quantization,
            self.info.max_context,
            self.max_batch,
        )

    def _is_vision(self) -> bool:
        """Whether the folder holds a vision-language model (its config has a `vision_config`)."""
        if self._gguf:
            return False
        import json

        from .vision import is_vision_config

        try:
            cfg = json.loads((self._dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(cfg, dict) and is_vision_config(cfg)

    def _load_tokenizer(self, transformers: Any) -> Any:
        kwargs: dict[str, Any] = {"trust_remote_code": self._trust_remote_code}
        if self._gguf:
            kwargs["gguf_file"] = self._gguf
        return transformers.AutoTokenizer.from_pretrained(str(self._dir), **kwargs)

    def _load_model(
        self, transformers: Any, torch: Any, caps: devmod.Capabilities, dtype: str, attention: str, auto: Any
    ) -> Any:
        kwargs: dict[str, Any] = {
            "attn_implementation": attention,
            "trust_remote_code": self._trust_remote_code,
        }
        # transformers 4.56 renamed `torch_dtype` to `dtype`.
        dtype_kw = "dtype" if _version_at_least(transformers.__version__, 4, 56) else "torch_dtype"
        kwargs[dtype_kw] = devmod.torch_dtype(dtype)
        if self._gguf:
            kwargs["gguf_file"] = self._gguf
        if caps.cuda:
            kwargs["device_map"] = "auto"
            budget = devmod.max_memory(caps)
            if budget:
                kwargs["max_memory"] = budget
        if self._quantization:
            compute = devmod.torch_dtype(dtype)
            if self._quantization == "4bit":
                kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_compute_dtype=compute,
                    bnb_4bit_use_double_quant=True,
                )
            else:
                kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
        model = auto.from_pretrained(str(self._dir), **kwargs)
        if not caps.cuda:
            model = model.to("cpu")
        model.eval()
        return model

    def _fill_info(self, model: Any, caps: devmod.Capabilities, dtype: str) -> None:
        from ..memory import arch_from_hf_config

        cfg = model.config.to_dict()
        try:
            arch = arch_from_hf_config(cfg)
        except ValueError:
            arch = None
        n_ctx_train = arch.n_ctx_train if arch else None
        self.info.n_ctx_train = n_ctx_train
        self.info.dtype = dtype
        self.info.attention = getattr(model.config, "_attn_implementation", None)
        self.info.parameters = int(model.num_parameters())
        self.info.quantization = self._quantization
        device_map = getattr(model, "hf_device_map", None)
        if caps.cuda:
            devices = sorted({str(v) for v in (device_map or {}).values()})
            self.info.device = "cuda" if not devices or devices == ["0"] else "cuda+" + ",".join(devices)
        else:
            self.info.device = "cpu"
        self.info.max_context = self._context_limit(arch, caps, dtype, n_ctx_train)
        self.info.extra = {
            "architecture": cfg.get("model_type"),
            "max_batch": self.max_batch,
            "compile": self._compile,
        }
        if caps.device_name:
            self.info.extra["gpu"] = caps.device_name
            self.info.extra["compute_capability"] = ".".join(map(str, caps.compute_capability or ()))

    def _context_limit(self, arch: Any, caps: devmod.Capabilities, dtype: str, n_ctx_train: int | None) -> int:
        """Per-request context: what `max_batch` full-length KV caches leave room for, capped by training."""
        if self._max_context:
            return min(self._max_context, n_ctx_train) if n_ctx_train else self._max_context
        fallback = n_ctx_train or 2048
        if arch is None:
            return fallback
        try:
            from ..memory import estimate

            est = estimate(
                arch,
                0,
                dtype_bytes=devmod.DTYPE_BYTES.get(dtype, 2),
                device="cuda:0" if caps.cuda else "cpu",
                weights_loaded=True,
            )
        except Exception as exc:  # the estimate is best effort
            logger.warning("context estimate failed for %s: %s", self.info.name, exc)
            return fallback
        per_seq = est.available_bytes // max(1, est.kv_bytes_per_token) // self.max_batch
        limit = min(per_seq, n_ctx_train) if n_ctx_train else per_seq
        if limit < 256:
            logger.warning("only %d tokens of context fit per request for %s", limit, self.info.name)
            limit = min(256, fallback)
        return int(limit)

    def _start_scheduler(self, torch: Any, model: Any, tokenizer: Any) -> None:
        from transformers import DynamicCache

        from .batching import BatchScheduler

        max_batch = self.max_batch
        # Left-padded batching rewrites full-attention caches only; sliding-window or
        # linear-attention layers would need their own surgery, so those models run one
        # sequence at a time.
        try:
            layers = DynamicCache(config=model.config).layers
            batchable = all(type(layer).__name__ == "DynamicLayer" for layer in layers)
        except Exception:
            batchable = False
        if not batchable and max_batch > 1:
            logger.warning("%s: cache layout not batchable; serving one sequence at a time", self.info.name)
            max_batch = 1
            self.max_concurrency = 1
        params = inspect.signature(model.forward).parameters
        logits_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        cache_kw = "cache" if "cache" in params else "past_key_values"

        decode_forward = None
        if self._compile:
            decode_forward = torch.compile(model, dynamic=True)
        self._scheduler = BatchScheduler(
            model,
            decode=self._decode_ids,
            eos_ids=self._eos_ids(model, tokenizer),
            max_batch=max_batch,
            error_map=generation_error,
            decode_forward=decode_forward,
            logits_to_keep=logits_kw,
            cache_keyword=cache_kw,
        )
        self._scheduler.start()
        self.supports_logprobs = True
        self.supports_completion = True
        if self._compile:
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile the decode step now (batch 1, then 2) so the first request does not pay for it."""
        import time

        started = time.monotonic()
        params = GenerationParams(max_new_tokens=4, temperature=0.0)
        msgs = [{"role": "user", "content": "Hello"}]
        failures: list[errors.LLMWSError] = []

        def one() -> None:
            try:
                self.generate(msgs, params, lambda _t: None, lambda: False)
            except errors.LLMWSError as exc:
                failures.append(exc)

        one()
        if not failures:
            threads = [threading.Thread(target=one) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if failures:
            # torch.compile needs a working compiler toolchain; serve uncompiled rather than fail.
            logger.warning("torch.compile warm-up failed (%s); serving without compile", failures[0].message)
            self._scheduler._decode_forward = self._model
            self._compile = False
            self.info.extra["compile"] = False
        logger.info("decode step warm-up took %.1f s", time.monotonic() - started)

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value if v is not None)
        return ids

    def unload(self) -> None:
        """Stop the scheduler (failing anything in flight) and free weights and caches."""
        if self._scheduler is not None:
            self._scheduler.stop()
            self._scheduler = None
        self._model = None
        self._tokenizer = None
        self._vision = None
        gc.collect()
        _empty_cuda_cache()

    # ------------------------------------------------------------------ prompts

    def _require(self) -> Any:
        if self._model is None or (self._scheduler is None and self._vision is None):
            raise errors.ModelNotLoaded("The model is not loaded.")
        return self._scheduler

    def _decode_ids(self, ids: list[int]) -> str:
        # Under the lock too: the Rust tokenizer refuses a decode while an encode re-configures it.
        with self._tok_lock:
            return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text the chat template renders `messages` into."""
        self._require()
        if self._vision is not None:
            return str(self._vision.render(messages))
        template = None if getattr(self._tokenizer, "chat_template", None) else SIMPLE_TEMPLATE
        try:
            with self._tok_lock:
                return self._tokenizer.apply_chat_template(
                    [dict(m) for m in messages],
                    chat_template=template,
                    add_generation_prompt=True,
                    tokenize=False,
                )
        except Exception as exc:
            logger.warning("chat template failed: %s", exc)
            raise errors.BadRequest("The model's chat template rejected these messages.") from None

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the rendered prompt (the template adds BOS itself where it wants one)."""
        text = self.render(messages)
        with self._tok_lock:
            return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, messages: Sequence[Message]) -> int:
        if self._vision is not None:
            return int(self._vision.count_tokens(messages))  # with the images' tokens
        return len(self.prompt_ids(messages))

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, tokens: list[int]) -> str:
        vocab = len(self._tokenizer)
        if any(not 0 <= t < vocab for t in tokens):
            raise errors.BadRequest(f"Token ids must lie in 0..{vocab - 1} for this model.")
        return str(self._tokenizer.decode(tokens, skip_special_tokens=False))

    def tokenize_text(self, text: str) -> int:
        self._require()
        with self._tok_lock:
            return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        on_token: TokenCallback,
        cancelled: CancelCheck,
    ) -> GenerationResult:
        if self._vision is not None:
            self._require()
            return self._vision.generate(  # type: ignore[no-any-return]
                messages,
                params,
                on_token,
                cancelled,
                max_context=self.info.max_context,
                stops=list(params.stop) + self._template_stops,
            )
        return self._run(
            self.prompt_ids(messages), list(params.stop) + self._template_stops, params, on_token, cancelled
        )

    def complete(
        self,
        prompt: str | list[int],
        params: GenerationParams,
        on_token: TokenCallback,
        cancelled: CancelCheck,
    ) -> GenerationResult:
        """Continue raw text or token ids (no chat template; `/v1/completions`)."""
        return self._run(self.raw_prompt_ids(prompt), list(params.stop), params, on_token, cancelled)

    def raw_prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """The ids of a raw prompt (the tokenizer's special tokens added); ids are checked."""
        self._require()
        ids = self.tokenize(prompt, add_special=True) if isinstance(prompt, str) else list(prompt)
        vocab = len(self._tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise errors.BadRequest(f"Token ids must lie in 0..{vocab - 1} for this model.")
        if not ids:
            raise errors.BadRequest("The prompt is empty.")
        return ids

    def count_prompt(self, prompt: str | list[int]) -> int:
        return len(self.raw_prompt_ids(prompt))

    def _run(
        self,
        ids: list[int],
        stops: list[str],
        params: GenerationParams,
        on_token: TokenCallback,
        cancelled: CancelCheck,
    ) -> GenerationResult:
        from .batching import Sequence as Request

        scheduler = self._require()
        n_in = len(ids)
        limit = self.info.max_context
        if n_in + 1 > limit:
            raise errors.ContextTooLong(n_in, limit)
        budget = max(1, min(params.max_new_tokens, limit - n_in))
        request = Request(
            prompt_ids=ids,
            params=params,
            on_token=on_token,
            cancelled=cancelled,
            budget=budget,
            stops=stops,
        )
        return scheduler.run(request)

    @property
    def stats(self) -> dict[str, int]:
        """Scheduler counters (steps, largest batch seen, prefills) for tests and benchmarks."""
        return dict(self._scheduler.stats) if self._scheduler is not None else {}


def _version_at_least(version: str, major: int, minor: int) -> bool:
    try:
        parts = [int(p) for p in version.split(".")[:2]]
    except ValueError:
        return True
    return tuple(parts) >= (major, minor)
