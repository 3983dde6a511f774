"""What this machine's accelerator can do, and the precision/attention/quantization it implies.

The policy is pure functions over a `Capabilities` record, so it is unit-tested
by handing in made-up machines; `probe()` is the only place that asks torch
(imported lazily, so importing this module costs nothing and works without torch).

Policy (DESIGN.md section 5):
- dtype: bf16 on CUDA compute capability >= 8.0 (Ampere and later have bf16
  tensor cores), fp16 on older CUDA GPUs, fp32 on the CPU (CPU half precision is
  slow and lossy for small models).
- attention: FlashAttention 2 where the `flash_attn` package is importable, the
  GPU is Ampere or later and the dtype is half precision; SDPA otherwise.
- quantization: bitsandbytes needs CUDA and the `bitsandbytes` package.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Literal

from .. import errors

logger = logging.getLogger("llmws.engine.device")

DtypeName = Literal["bfloat16", "float16", "float32"]
AttentionName = Literal["flash_attention_2", "sdpa", "eager"]

#: Bytes per element of each dtype we load weights or KV caches in.
DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}

#: FlashAttention 2 and bf16 tensor cores both start with Ampere (sm_80).
AMPERE = (8, 0)


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers, as far as model loading cares.

    `compute_capability` is the lowest among the visible GPUs (a device map may put
    layers on any of them), None without CUDA.
    """

    cuda: bool = False
    device_count: int = 0
    compute_capability: tuple[int, int] | None = None
    device_name: str | None = None
    flash_attn: bool = False  # the flash_attn package is importable and transformers accepts it
    bitsandbytes: bool = False  # the bitsandbytes package is importable

    @property
    def device(self) -> str:
        """ "cuda" or "cpu": where a model goes."""
        return "cuda" if self.cuda else "cpu"


def _flash_attn_usable() -> bool:
    """The flash_attn package is installed and transformers considers it usable."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from transformers.utils import is_flash_attn_2_available

        return bool(is_flash_attn_2_available())
    except Exception:  # a broken install (ABI mismatch, ...) is "not available"
        logger.debug("flash_attn check failed", exc_info=True)
        return False


def _bitsandbytes_usable() -> bool:
    """bitsandbytes is installed (importing it needs CUDA libraries, so only look for it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def probe() -> Capabilities:
    """Ask torch what this machine has (imports torch)."""
    import torch

    if not torch.cuda.is_available():
        return Capabilities(cuda=False, bitsandbytes=_bitsandbytes_usable())
    count = torch.cuda.device_count()
    caps = [tuple(torch.cuda.get_device_capability(i)) for i in range(count)]
    lowest = min(caps) if caps else None
    return Capabilities(
        cuda=True,
        device_count=count,
        compute_capability=(int(lowest[0]), int(lowest[1])) if lowest else None,
        device_name=torch.cuda.get_device_name(0) if count else None,
        flash_attn=_flash_attn_usable(),
        bitsandbytes=_bitsandbytes_usable(),
    )


def choose_dtype(requested: str, caps: Capabilities) -> DtypeName:
    """The weights dtype for `requested` ("auto" or a dtype name) on this machine."""
    if requested != "auto":
        if requested not in DTYPE_BYTES:
            raise errors.Unsupported(f"Unknown dtype {requested!r}; use auto, bfloat16, float16 or float32.")
        if requested == "bfloat16" and caps.cuda and (caps.compute_capability or (0, 0)) < AMPERE:
            logger.warning("bfloat16 requested on a GPU older than Ampere; it will be slow or emulated")
        return requested  # type: ignore[return-value]
    if not caps.cuda:
        return "float32"
    if caps.compute_capability is not None and caps.compute_capability >= AMPERE:
        return "bfloat16"
    return "float16"


def flash_attention_supported(caps: Capabilities, dtype: str) -> bool:
    """FlashAttention 2 can run: package present, Ampere or later, half precision."""
    return (
        caps.cuda
        and caps.flash_attn
        and caps.compute_capability is not None
        and caps.compute_capability >= AMPERE
        and dtype in ("bfloat16", "float16")
    )


def choose_attention(requested: str, caps: Capabilities, dtype: str) -> AttentionName:
    """The attention implementation: FA2 when it can run, else SDPA; an explicit choice is checked.

    Raises:
        Unsupported: FlashAttention 2 was asked for on a machine that cannot run it.
    """
    if requested == "auto":
        return "flash_attention_2" if flash_attention_supported(caps, dtype) else "sdpa"
    if requested == "flash_attention_2":
        if not flash_attention_supported(caps, dtype):
            raise errors.Unsupported(
                "FlashAttention 2 needs the flash-attn package, an NVIDIA GPU of compute capability "
                '8.0 or newer and a bfloat16/float16 dtype; use attention "sdpa" or "auto".'
            )
        return "flash_attention_2"
    if requested in ("sdpa", "eager"):
        return requested  # type: ignore[return-value]
    raise errors.Unsupported(f"Unknown attention {requested!r}; use auto, flash_attention_2, sdpa or eager.")


def check_quantization(quantization: str | None, caps: Capabilities) -> None:
    """Refuse bitsandbytes quantization where it cannot run.

    Raises:
        Unsupported: no CUDA GPU, bitsandbytes missing, or an unknown mode.
    """
    if quantization is None:
        return
    if quantization not in ("4bit", "8bit"):
        raise errors.Unsupported(f'Unknown quantization {quantization!r}; use "4bit", "8bit" or null.')
    if not caps.cuda:
        raise errors.Unsupported(
            f"{quantization} quantization (bitsandbytes) needs an NVIDIA GPU with CUDA; "
            "this machine has none. Set quantization to null to load the model unquantized."
        )
    if not caps.bitsandbytes:
        raise errors.Unsupported(
            f"{quantization} quantization needs the bitsandbytes package "
            "(pip install 'llmws[gpu]'); it is not installed."
        )


def torch_dtype(name: str) -> Any:
    """The torch dtype object for a dtype name (imports torch)."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def max_memory(
    caps: Capabilities, *, headroom: float = 0.1, min_headroom_bytes: int = 1 << 30
) -> dict[Any, int] | None:
    """`max_memory` for accelerate's `device_map="auto"`: free VRAM per GPU minus room for the KV cache.

    None on the CPU (no device map there). The headroom (10%, at least 1 GiB) is
    left on each GPU for activations and the KV cache the batch grows.
    """
    if not caps.cuda:
        return None
    import psutil

    from .memory import free_memory_bytes

    budget: dict[Any, int] = {}
    for i in range(caps.device_count):
        free = free_memory_bytes(f"cuda:{i}")
        budget[i] = max(0, int(free - max(free * headroom, min_headroom_bytes)))
    # Layers that do not fit any GPU spill to RAM (slow, but loads instead of failing).
    budget["cpu"] = int(psutil.virtual_memory().available * 0.8)  # type: ignore[index]
    return budget
