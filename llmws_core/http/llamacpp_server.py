"""The earlier llama-cpp FastAPI server's routes, kept so its clients work unmodified:
`GET /`, `GET /models`, `POST /setModel`, `POST /chat/completions`, `POST /restore_cache`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__, errors
from .auth import admin_key, llmws, principal, user_key
from .common import normalize_messages
from .openai import ChatCompletionRequest, complete

logger = logging.getLogger("llmws.http.llamacpp_server")

router = APIRouter(tags=["llama-cpp server (legacy)"])


class SetModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modelName: str = Field(
        ..., min_length=1, max_length=1024, description="A name from GET /models (or a path inside the model folders)."
    )


class RestoreCacheRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]] = Field(..., min_length=1, max_length=10_000)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)


@router.get("/", summary="Server status")
async def root(request: Request) -> dict[str, Any]:
    """Whether the server is up and which model serves (no key needed to see this)."""
    models = llmws(request).models
    info = models.info()
    return {
        "status": "ok" if info else "no_model",
        "server": f"llmws/{__version__}",
        "model": info["name"] if info else None,
        "loading": models.loading,
        "max_context": models.max_context,
    }


@router.get("/models", summary="List the local models", dependencies=[Depends(user_key)])
async def models(request: Request) -> dict[str, Any]:
    """GGUF (and other) models in models/, var/models/ and the embedded one."""
    models = llmws(request).models
    entries = await models.list()
    return {"models": [m["name"] for m in entries], "current": models.current, "data": entries}


@router.post(
    "/setModel", summary="Switch the model (admin key when admin keys exist)", dependencies=[Depends(admin_key)]
)
async def set_model(body: SetModelRequest, request: Request) -> dict[str, Any]:
    """Load `modelName` and make it current; the old model serves until the swap."""
    models = llmws(request).models
    entry = await models.resolve(body.modelName)
    switched = await models.switch(entry)
    return {
        "status": "ok",
        "message": f"Model set to {entry.name}",
        "model": switched["model"],
        "max_context": switched["max_context"],
    }


@router.post(
    "/chat/completions", summary="Chat completion (same as /v1/chat/completions)", dependencies=[Depends(user_key)]
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """The earlier server's OpenAI-style route; identical to `/v1/chat/completions`."""
    return await complete(body, request)


@router.post("/restore_cache", summary="Pre-evaluate a prompt prefix", dependencies=[Depends(user_key)])
async def restore_cache(body: RestoreCacheRequest, request: Request) -> dict[str, Any]:
    """Evaluate `messages` (and `tools`) into the model's KV cache, so the next request
    that starts with them skips their prefill. The cache belongs to the caller's key."""
    services = llmws(request)
    tools = None
    if body.tools:
        tools = [t.get("function") if isinstance(t, dict) else None for t in body.tools]
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
            raise errors.BadRequest("Each tool needs {'type': 'function', 'function': {'name': ...}}.")
    cached, persistent = await services.generation.warm(
        normalize_messages(body.messages),
        tools,
        principal=principal(request),  # type: ignore[arg-type]
    )
    return {
        "status": "ok",
        "cached_tokens": cached,
        "messages": len(body.messages),
        "tools": len(body.tools or []),
        "model": services.models.name,
        "persistent": persistent,
    }
