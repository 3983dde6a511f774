"""How much context fits: KV-cache arithmetic from a model's architecture and free memory.

The KV cache holds, for every token of context, a key and a value vector per
layer and per KV head, so its size per token is
`2 × layers × kv_heads × head_dim × dtype bytes` (grouped-query attention is why
`kv_heads`, not `heads`). What is left of free VRAM (or RAM on the CPU) after the
weights and a margin, divided by that, is the context this process can hold --
capped by the context the model was trained with. The architecture comes from
`config.json` or from GGUF metadata (gguf.py), read without loading any weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .gguf import GGUFMeta, read_gguf, split_parts

if TYPE_CHECKING:
    from llmws_core.engine.scan import ModelEntry

logger = logging.getLogger("llmws.engine.memory")

MiB = 1024 * 1024


@dataclass
class ArchInfo:
    """The numbers of an architecture that decide its KV-cache size.

    `v_head_dim` is set only where values are not as wide as keys (None: same as `head_dim`).
    """

    n_layers: int
    n_kv_heads: int
    head_dim: int
    n_ctx_train: int | None = None
    n_params: int | None = None
    v_head_dim: int | None = None


def _first(cfg: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            return value
    return None


def arch_from_hf_config(cfg: dict[str, Any]) -> ArchInfo:
    """The architecture from a Hugging Face `config.json` (multimodal configs: their `text_config`).

    Raises:
        ValueError: the config lacks the layer or head counts.
    """
    if _first(cfg, "num_hidden_layers", "n_layer", "num_layers") is None and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    n_layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    n_heads = _first(cfg, "num_attention_heads", "n_head")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    if n_layers is None or n_heads is None:
        raise ValueError("config.json lacks num_hidden_layers or num_attention_heads")
    n_kv = _first(cfg, "num_key_value_heads", "n_kv_heads") or n_heads
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden is None:
            raise ValueError("config.json lacks head_dim and hidden_size")
        head_dim = int(hidden) // int(n_heads)
    n_ctx = _first(cfg, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    return ArchInfo(
        n_layers=int(n_layers),
        n_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        n_ctx_train=int(n_ctx) if n_ctx is not None else None,
        n_params=None,
    )


def _as_int(value: Any) -> int | None:
    """A GGUF number, or the largest of a per-layer list of them."""
    if isinstance(value, list):
        numbers = [int(v) for v in value if isinstance(v, int | float)]
        return max(numbers) if numbers else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    return None


def arch_from_gguf_meta(meta: GGUFMeta) -> ArchInfo:
    """The architecture from GGUF metadata keys `<arch>.block_count`, `<arch>.attention.*`, ...

    Raises:
        ValueError: required keys are missing.
    """
    arch = meta.fields.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError("GGUF file lacks general.architecture")

    def get(key: str) -> int | None:
        return _as_int(meta.fields.get(f"{arch}.{key}"))

    n_layers, n_heads = get("block_count"), get("attention.head_count")
    if n_layers is None or not n_heads:
        raise ValueError(f"GGUF file lacks {arch}.block_count or {arch}.attention.head_count")
    n_kv = get("attention.head_count_kv") or n_heads
    head_dim = get("attention.key_length")
    if head_dim is None:
        embedding = get("embedding_length")
        if embedding is None:
            raise ValueError(f"GGUF file lacks {arch}.embedding_length")
        head_dim = embedding // n_heads
    v_dim = get("attention.value_length")
    return ArchInfo(
        n_layers=n_layers,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        n_ctx_train=get("context_length"),
        n_params=meta.n_params,
        v_head_dim=v_dim if v_dim is not None and v_dim != head_dim else None,
    )


def arch_from_gguf(path: Path) -> ArchInfo:
    """The architecture of a GGUF model, read from its header (no weights loaded).

    Raises:
        OSError, ValueError: unreadable or not a usable GGUF file.
    """
    return arch_from_gguf_meta(read_gguf(path))


# -- the arithmetic ---------------------------------------------------------------------------


def kv_bytes_per_token(arch: ArchInfo, dtype_bytes: float) -> int:
    """Bytes of KV cache one token of context takes: 2 × layers × kv_heads × head_dim × dtype."""
    k_dim = arch.head_dim
    v_dim = arch.v_head_dim if arch.v_head_dim is not None else arch.head_dim
    return int(round(arch.n_layers * arch.n_kv_heads * (k_dim + v_dim) * dtype_bytes))


@dataclass
class Estimate:
    """What fits: the numbers behind `max_context`, as `estimate_model` reports them."""

    kv_bytes_per_token: int
    weights_bytes: int
    available_bytes: int  # left for the KV cache after weights, overhead and margin
    max_context: int
    n_ctx_train: int | None
    device: str

    def public(self) -> dict[str, Any]:
        """JSON-safe view, with MiB figures for people reading it."""
        data = asdict(self)
        data["weights_mb"] = round(self.weights_bytes / MiB, 1)
        data["available_mb"] = round(self.available_bytes / MiB, 1)
        data["kv_mb_per_1k_tokens"] = round(self.kv_bytes_per_token * 1000 / MiB, 2)
        return data


def _device_index(device: str) -> int:
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


def free_memory_bytes(device: str) -> int:
    """Free memory on `device`: VRAM through NVML (torch as a fallback) for "cuda[:N]", else RAM.

    A CUDA device whose memory cannot be read falls back to RAM, logged, rather than
    reporting zero.
    """
    if device.startswith("cuda"):
        from llmws_core.engine.resources import nvml_free_bytes, torch_free_bytes

        index = _device_index(device)
        free = nvml_free_bytes(index)
        if free is None:
            free = torch_free_bytes(index)
        if free is not None:
            return free
        logger.warning("cannot read free memory of %s; estimating against RAM", device)
    import psutil

    return int(psutil.virtual_memory().available)


def estimate(
    arch: ArchInfo,
    weights_bytes: int,
    *,
    dtype_bytes: float = 2,
    device: str = "cpu",
    free_bytes: int | None = None,
    safety: float = 0.9,
    overhead_bytes: int = 256 * MiB,
    weights_loaded: bool = False,
) -> Estimate:
    """The largest context that fits in memory, capped by the trained context.

    Args:
        arch: the model's architecture.
        weights_bytes: size of the weights in memory (file size for GGUF).
        dtype_bytes: bytes per KV element (2 for f16/bf16, 1 for q8_0 caches).
        device: "cpu" or "cuda:N"; says which memory `free_bytes=None` reads.
        free_bytes: free memory to plan against; None reads it now.
        safety: fraction of free memory that may be used.
        overhead_bytes: compute buffers, CUDA context, fragmentation.
        weights_loaded: the weights are already in memory, so `free_bytes` excludes them.
    """
    if free_bytes is None:
        free_bytes = free_memory_bytes(device)
    usable = int(free_bytes * safety) - overhead_bytes
    if not weights_loaded:
        usable -= weights_bytes
    available = max(0, usable)
    per_token = kv_bytes_per_token(arch, dtype_bytes)
    if per_token > 0:
        max_context = available // per_token
    else:
        max_context = arch.n_ctx_train or 0
    if arch.n_ctx_train:
        max_context = min(max_context, arch.n_ctx_train)
    return Estimate(
        kv_bytes_per_token=per_token,
        weights_bytes=int(weights_bytes),
        available_bytes=available,
        max_context=max(0, int(max_context)),
        n_ctx_train=arch.n_ctx_train,
        device=device,
    )


def arch_for_entry(entry: ModelEntry) -> ArchInfo:
    """The architecture of a listed model, from its GGUF header or its `config.json`.

    Raises:
        OSError, ValueError: the metadata cannot be read.
    """
    if entry.format == "gguf":
        return arch_from_gguf(entry.path)
    cfg = json.loads((entry.path / "config.json").read_text(encoding="utf-8"))
    if not isinstance(cfg, dict):
        raise ValueError("config.json is not an object")
    arch = arch_from_hf_config(cfg)
    arch.n_params = entry.parameters
    return arch


def weights_bytes_for_entry(entry: ModelEntry) -> int:
    """Bytes of weights on disk: the GGUF file (all split parts) or the folder's safetensors."""
    if entry.format == "gguf":
        return sum(p.stat().st_size for p in split_parts(entry.path))
    return sum(p.stat().st_size for p in entry.path.glob("*.safetensors"))


def estimate_for_entry(entry: ModelEntry, **kw: Any) -> Estimate:
    """`estimate` for a listed model without loading it; `weights_bytes=` overrides the disk size
    (e.g. a 4-bit load of a bf16 folder); other keywords go to `estimate`.

    Raises:
        OSError, ValueError: the model's metadata cannot be read.
    """
    weights = kw.pop("weights_bytes", None)
    if weights is None:
        weights = weights_bytes_for_entry(entry)
    return estimate(arch_for_entry(entry), weights, **kw)
