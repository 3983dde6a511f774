"""OpenAI's `POST /v1/embeddings` over the embedding service.

`input` is a string, a list of strings, a token array or a list of token arrays
(OpenAI's four shapes; a list may also mix strings and token arrays, as llama.cpp's
server allows). `encoding_format: "base64"` (what the official SDK asks for by
default) packs each vector as little-endian float32.
"""

from __future__ import annotations

import base64
import struct
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from .. import errors
from ..services.embeddings import EmbedRequest
from .auth import llmws, user_key

router = APIRouter(tags=["OpenAI-compatible"], dependencies=[Depends(user_key)])


class EmbeddingRequest(BaseModel):
    """An OpenAI embeddings request. Unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    input: Any = Field(..., description="A string, a list of strings, a token array or a list of token arrays.")
    model: str | None = Field(
        None,
        max_length=1024,
        description="A local embedding model; any other name is served by the default embedding model.",
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        None, ge=1, description="Keep the first `dimensions` values of each vector, re-normalised."
    )
    user: str | None = None


class InvalidInput(errors.BadRequest):
    """`input` is not one of the shapes OpenAI defines."""


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_input(raw: Any) -> list[str | list[int]]:
    """The inputs of a request body's `input`, one per vector to make."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if _is_tokens(raw):
            return [list(raw)]
        items: list[str | list[int]] = []
        for item in raw:
            if isinstance(item, str):
                items.append(item)
            elif _is_tokens(item) and item:
                items.append(list(item))
            else:
                raise InvalidInput("Each entry of input must be a string or a non-empty array of token ids.")
        return items
    raise InvalidInput("input must be a string, a non-empty list of strings, a token array or a list of token arrays.")


def encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


@router.post("/v1/embeddings", summary="Embeddings (OpenAI-compatible)")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    """Vectors of `input` from an embedding model, served beside the chat model
    (the first request loads it). Vectors have unit length."""
    try:
        inputs = parse_input(body.input)
    except InvalidInput as exc:
        exc.fields["param"] = "input"
        raise
    result = await llmws(request).embeddings.embed(
        EmbedRequest(inputs=inputs, model=body.model, dimensions=body.dimensions)
    )
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v, body.encoding_format)}
            for i, v in enumerate(result.vectors)
        ],
        "model": result.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
