"""llama.cpp server's `POST /tokenize` and `POST /detokenize`, over the loaded chat model.

Plain text, no chat template: `{"content", "add_special"?, "with_pieces"?}` gives
`{"tokens": [ids]}` (or `[{"id", "piece"}]` with `with_pieces`), and `{"tokens"}` gives
`{"content"}`. Errors are OpenAI-shaped, as llama.cpp's server answers.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from ..services.generation import ErrorEvent
from . import openai
from .auth import user_key
from .common import generation

router = APIRouter(tags=["llama.cpp server"], dependencies=[Depends(user_key)])

PATHS = frozenset({"/tokenize", "/detokenize"})


def owns_path(path: str) -> bool:
    """Whether errors of `path` take this surface's (OpenAI's) shape."""
    return path in PATHS


def error_body(event: ErrorEvent, param: str | None = None) -> dict[str, Any]:
    return openai.error_body(event, param)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    content: str = Field(..., max_length=4 * 1024 * 1024)
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[int] = Field(..., max_length=1_000_000)


@router.post("/tokenize", summary="Token ids of text (llama.cpp server shape)")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    """The loaded model's token ids of `content` (with their text pieces if asked)."""
    service = generation(request)
    tokens = await service.tokenize(body.content, add_special=body.add_special)
    if not body.with_pieces:
        return {"tokens": tokens}
    pieces = [await service.detokenize([t]) for t in tokens]
    return {"tokens": [{"id": t, "piece": p} for t, p in zip(tokens, pieces, strict=True)]}


@router.post("/detokenize", summary="Text of token ids (llama.cpp server shape)")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    """The text the loaded model's token ids spell."""
    return {"content": await generation(request).detokenize(body.tokens)}
