"""The embedding service every door calls (OpenAI `/v1/embeddings`, Ollama `/api/embed`).

A door parses its wire format into an `EmbedRequest`, awaits `EmbeddingService.embed`
and renders the `EmbedResult` (floats, base64, ...) in its own shape. Which embedding
model serves a request, loading it beside the chat model, truncation and `dimensions`
are decided here, once.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import errors
from ..engine.embedding import EmbeddingModels, EmbedInput, embedded_entry
from ..engine.scan import ModelEntry

if TYPE_CHECKING:
    from ..config import Settings
    from ..engine.manager import ModelManager

#: Inputs one request may carry (OpenAI's limit).
MAX_INPUTS = 2048


@dataclass
class EmbedRequest:
    """One embedding request, whatever door it came through.

    Args:
        inputs: texts, or token id lists made with the model's own tokenizer.
        model: the model a client named; None, or a name that is no local model (an
            SDK's default "text-embedding-3-small"), means the default embedding model.
        dimensions: cut each vector to its first `dimensions` values and re-normalise
            (Matryoshka style); None: the model's full width.
        truncate: cut an input longer than the model takes (Ollama's default) instead
            of refusing it with `InputTooLarge` (OpenAI's behaviour).
    """

    inputs: list[EmbedInput]
    model: str | None = None
    dimensions: int | None = None
    truncate: bool = False


@dataclass
class EmbedResult:
    """Unit-length vectors in input order, and what they cost."""

    vectors: list[list[float]]
    #: Tokens each input took (special tokens included), in input order.
    tokens: list[int]
    #: The name of the model that made them.
    model: str
    dimensions: int

    @property
    def prompt_tokens(self) -> int:
        return sum(self.tokens)


class EmbeddingService:
    """Resolves, loads (beside the chat model) and runs embedding models."""

    def __init__(self, settings: Settings, manager: ModelManager) -> None:
        self.settings = settings
        self.manager = manager
        self.dirs = manager.dirs
        self.models: EmbeddingModels = manager.embedders

    def entries(self) -> list[ModelEntry]:
        """Every embedding model: those in the model folders, then the embedded one. Blocking."""
        found = [e for e in self.dirs.scan() if e.kind == "embedding"]
        embedded = embedded_entry(self.settings.var_dir)
        if embedded is not None:
            found.append(embedded)
        return found

    def _resolve_blocking(self, name: str | None) -> ModelEntry:
        entries = self.entries()
        wanted = name or self.settings.model.embedding_path
        if wanted:
            for e in entries:
                if wanted in (e.name, e.rel_path):
                    return e
            try:
                entry = self.manager.resolve(wanted)
            except errors.ModelNotFound:
                entry = None
            if entry is not None:
                if entry.format == "remote":
                    raise errors.Unsupported(
                        f"'{entry.name}' is a remote model; embeddings are served by local embedding models only."
                    )
                if entry.kind != "embedding":
                    raise errors.Unsupported(
                        f"'{entry.name}' is a chat model, not an embedding model "
                        "(GET /v1/models says each model's kind)."
                    )
                return entry
        if not entries:
            raise errors.ModelNotLoaded("No embedding model is installed.")
        return entries[0]

    async def resolve(self, name: str | None) -> ModelEntry:
        """The embedding model that serves a request naming `name` (see `EmbedRequest.model`).

        Raises:
            Unsupported: `name` is a local chat model.
            Forbidden: `name` is a path leading out of the model folders.
            ModelNotLoaded: no embedding model is installed at all.
        """
        return await asyncio.to_thread(self._resolve_blocking, name)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embed `request.inputs` with the model it names, loading that model on first use.

        Raises:
            BadRequest: no inputs, too many, bad token ids or `dimensions`.
            InputTooLarge: an input is longer than the model takes (unless `truncate`).
        """
        if not request.inputs:
            raise errors.BadRequest("input must not be empty.")
        if len(request.inputs) > MAX_INPUTS:
            raise errors.BadRequest(f"At most {MAX_INPUTS} inputs per request.")
        entry = await self.resolve(request.model)
        backend = await self.models.get(entry)
        width = backend.info.dimensions
        if request.dimensions is not None and not 1 <= request.dimensions <= width:
            raise errors.BadRequest(f"dimensions must lie in 1..{width} for {entry.name}.")
        vectors, tokens = await asyncio.to_thread(backend.embed, request.inputs, truncate=request.truncate)
        if request.dimensions is not None and request.dimensions < width:
            vectors = [_renormalised(v[: request.dimensions]) for v in vectors]
            width = request.dimensions
        return EmbedResult(vectors=vectors, tokens=tokens, model=entry.name, dimensions=width)

    async def tokenize(self, text: str, model: str | None = None) -> list[int]:
        """Token ids of `text` under an embedding model (for clients that send token arrays)."""
        backend = await self.models.get(await self.resolve(model))
        return await asyncio.to_thread(backend.tokenize, text)


def _renormalised(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]
