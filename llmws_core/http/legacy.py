"""The earlier llama-cpp FastAPI server's routes, kept so its clients work unmodified:
`GET /`, `GET /models`, `POST /setModel`, `POST /chat/completions`, `POST /restore_cache`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__, errors
from . import tools as toolcalls
from .auth import admin_key, llmws, user_key
from .common import make_params, normalize_messages
from .openai import ChatCompletionRequest, complete

logger = logging.getLogger("llmws.http.legacy")

router = APIRouter(tags=["llama-cpp server (legacy)"])


class SetModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modelName: str = Field(..., min_length=1, max_length=1024, description="A name from GET /models (or a path inside the model folders).")


class RestoreCacheRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]] = Field(..., min_length=1, max_length=10_000)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)


@router.get("/", summary="Server status")
async def root(request: Request) -> dict[str, Any]:
    """Whether the server is up and which model serves (no key needed to see this)."""
    app = llmws(request)
    info = app.models.model_info()
    return {
        "status": "ok" if info else "no_model",
        "server": f"llmws/{__version__}",
        "model": info["name"] if info else None,
        "loading": app.models.loading,
        "max_context": app.models.max_context,
    }


@router.get("/models", summary="List the local models", dependencies=[Depends(user_key)])
async def models(request: Request) -> dict[str, Any]:
    """GGUF (and other) models in models/, var/models/ and the embedded one."""
    app = llmws(request)
    entries = await asyncio.to_thread(app.models.list_models)
    current = app.models.entry.name if app.models.entry else None
    return {"models": [m["name"] for m in entries], "current": current, "data": entries}


@router.post("/setModel", summary="Switch the model (admin key when admin keys exist)", dependencies=[Depends(admin_key)])
async def set_model(body: SetModelRequest, request: Request) -> dict[str, Any]:
    """Load `modelName` and make it current; the old model serves until the swap."""
    app = llmws(request)
    entry = await asyncio.to_thread(app.models.resolve, body.modelName)
    await app.models.load(entry)
    return {
        "status": "ok",
        "message": f"Model set to {entry.name}",
        "model": app.models.model_info(),
        "max_context": app.models.max_context,
    }


@router.post("/chat/completions", summary="Chat completion (same as /v1/chat/completions)", dependencies=[Depends(user_key)])
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """The earlier server's OpenAI-style route; identical to `/v1/chat/completions`."""
    return await complete(body, request)


@router.post("/restore_cache", summary="Pre-evaluate a prompt prefix", dependencies=[Depends(user_key)])
async def restore_cache(body: RestoreCacheRequest, request: Request) -> dict[str, Any]:
    """Evaluate `messages` (and `tools`) into the model's KV cache, so the next request
    that starts with them skips their prefill. The cache belongs to the caller's key."""
    app = llmws(request)
    messages = toolcalls.with_tools(normalize_messages(body.messages), body.tools, "auto")
    params = make_params(request, max_new_tokens=1, temperature=0.0, stop=None, seed=0)
    persistent = False
    if hasattr(app.models.backend, "warm_prefix"):
        # A backend with a real prefix cache (kept in RAM, sealed on disk).
        async with app.models.use() as backend:
            cached, persistent = await asyncio.to_thread(backend.warm_prefix, messages, params.cache_key)  # type: ignore[attr-defined]
        tokens_in = cached
    else:
        # llama.cpp keeps the KV state of its last evaluation and reuses the longest
        # common prefix: evaluating the prompt (one token out) leaves it warm.
        cancel = threading.Event()
        tokens_in = 0
        async for chunk in app.chat.generate(messages, params, cancel=cancel, trim_history=False):
            if chunk.result is not None:
                tokens_in = chunk.result.tokens_in
            elif chunk.tokens_in:
                tokens_in = chunk.tokens_in
        cached = tokens_in
    if not tokens_in:
        raise errors.GenerationError("The prompt could not be evaluated.")
    info = app.models.model_info() or {}
    return {
        "status": "ok",
        "cached_tokens": cached,
        "messages": len(body.messages),
        "tools": len(body.tools or []),
        "model": info.get("name"),
        "persistent": persistent,
    }
