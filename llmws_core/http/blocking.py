"""The HF "LLM Server" routes: `/chat/blocking`, `/chat/stream` (POST, and GET for quick
tests in a browser), and `/ping`.

    POST /chat/blocking {prompt, history?, improvement?, intermediate_steps?} -> {reply, ...}
    POST /chat/stream   (same body) -> plain text chunks, then "[[END]]"

With `improvement`, the reply goes through draft -> review -> revision -> second
review -> final revision (improve.py); with `intermediate_steps` every pass is
shown, each under a label ("### Draft", "### Review", ...).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..engine.backends.base import Message
from ..improve import improve_stream
from ..protocol import MAX_NEW_TOKENS, not_a_boolean
from .auth import llmws, user_key
from .common import cancel_on_disconnect, make_params, normalize_messages, watch_disconnect

logger = logging.getLogger("llmws.http.blocking")

router = APIRouter(tags=["HF LLM Server"])
END_MARK = "[[END]]"


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str = Field(..., min_length=1, max_length=1_000_000)
    history: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)
    improvement: bool = False
    intermediate_steps: bool = False
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)

    _numbers = field_validator("max_tokens", "temperature", "top_p", "seed", mode="before")(not_a_boolean)


def _query_request(
    prompt: str = Query(..., min_length=1, max_length=100_000),
    improvement: bool = Query(False),
    intermediate_steps: bool = Query(False),
    max_tokens: int | None = Query(None, ge=1, le=MAX_NEW_TOKENS),
    temperature: float | None = Query(None, ge=0, le=5),
) -> ChatRequest:
    return ChatRequest(
        prompt=prompt, improvement=improvement, intermediate_steps=intermediate_steps,
        max_tokens=max_tokens, temperature=temperature,
    )


def conversation(request: Request, body: ChatRequest) -> list[Message]:
    """The role system prompt (unless the history has one), the history, the prompt."""
    history = normalize_messages(body.history) if body.history else []
    roles = llmws(request).settings.roles
    system = [] if any(m["role"] == "system" for m in history) else [{"role": "system", "content": roles.get("assistant", "")}]
    return [m for m in system if m["content"]] + history + [{"role": "user", "content": body.prompt}]


def _params(request: Request, body: ChatRequest) -> Any:
    return make_params(
        request, max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
    )


async def blocking_reply(request: Request, body: ChatRequest) -> dict[str, Any]:
    chat = llmws(request).chat
    messages = conversation(request, body)
    params = _params(request, body)
    cancel = threading.Event()
    async with watch_disconnect(request, cancel):
        if body.improvement:
            stages: list[dict[str, Any]] = []
            async for ev in improve_stream(chat, messages, params, cancel=cancel):
                if ev.kind == "stage_done":
                    stages.append({"stage": ev.stage, "label": ev.label, "text": ev.text})
                elif ev.kind == "done":
                    out: dict[str, Any] = {**ev.result, "reply": ev.text, "improvement": True}
                    out["usage"] = {"prompt_tokens": ev.tokens_in, "completion_tokens": ev.tokens_out}
                    out["finish_reason"] = ev.finish_reason
                    if body.intermediate_steps:
                        out["steps"] = stages
                    return out
        parts: list[str] = []
        result = None
        async for chunk in chat.generate(messages, params, cancel=cancel, trim_history=True):
            if chunk.result is not None:
                result = chunk.result
            elif chunk.text:
                parts.append(chunk.text)
    return {
        "reply": "".join(parts),
        "improvement": False,
        "usage": {"prompt_tokens": result.tokens_in if result else 0, "completion_tokens": result.tokens_out if result else 0},
        "finish_reason": result.finish_reason if result else "cancelled",
    }


async def text_stream(
    request: Request, body: ChatRequest, messages: list[Message], params: Any, cancel: threading.Event
) -> AsyncIterator[str]:
    """Reply text chunks (labelled passes with intermediate_steps), then END_MARK.
    Errors end the stream with a line saying so (the status is already sent)."""
    chat = llmws(request).chat
    try:
        if body.improvement:
            async for ev in improve_stream(chat, messages, params, cancel=cancel):
                if body.intermediate_steps:
                    if ev.kind == "stage":
                        yield ("" if ev.index == 1 else "\n\n") + f"### {ev.label}\n\n"
                    elif ev.kind == "token":
                        yield ev.text
                elif ev.kind == "token" and ev.stage == "final":
                    yield ev.text
        else:
            async for chunk in chat.generate(messages, params, cancel=cancel, trim_history=True):
                if chunk.text:
                    yield chunk.text
    except Exception as exc:
        from .. import errors

        yield f"\n[error: {errors.to_wire(exc)['message']}]"
    yield END_MARK


def _stream_response(request: Request, body: ChatRequest) -> StreamingResponse:
    # Validate before the 200 goes out: a bad history must be a 400, not a cut stream.
    messages = conversation(request, body)
    params = _params(request, body)
    cancel = threading.Event()
    return StreamingResponse(
        cancel_on_disconnect(request, text_stream(request, body, messages, params, cancel), cancel),
        media_type="text/plain; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/chat/blocking", summary="Chat, whole reply at once", dependencies=[Depends(user_key)])
async def chat_blocking(body: ChatRequest, request: Request) -> dict[str, Any]:
    """The reply as JSON; with `improvement`, also every pass (`draft_answer`,
    `suggestions1`, `revision1`, `suggestions2`, `revision2`)."""
    return await blocking_reply(request, body)


@router.get("/chat/blocking", summary="Chat, whole reply at once (query parameters)", dependencies=[Depends(user_key)])
async def chat_blocking_get(request: Request, body: ChatRequest = Depends(_query_request)) -> dict[str, Any]:
    """`/chat/blocking?prompt=Hello&x_api_key=...` for a quick test in a browser."""
    return await blocking_reply(request, body)


@router.post("/chat/stream", summary="Chat, streamed as plain text ending with [[END]]", dependencies=[Depends(user_key)])
async def chat_stream(body: ChatRequest, request: Request) -> StreamingResponse:
    """Text chunks as they are generated, then `[[END]]`."""
    return _stream_response(request, body)


@router.get("/chat/stream", summary="Chat, streamed (query parameters)", dependencies=[Depends(user_key)])
async def chat_stream_get(request: Request, body: ChatRequest = Depends(_query_request)) -> StreamingResponse:
    """`/chat/stream?prompt=Hello&x_api_key=...` for a quick test in a browser."""
    return _stream_response(request, body)


@router.get("/ping", summary="Liveness (no key needed)")
async def ping() -> dict[str, str]:
    """Answers `pong` (keys are not checked, so monitors need none)."""
    return {"status": "ok", "message": "pong"}
