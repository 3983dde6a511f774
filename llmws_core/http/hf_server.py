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

from ..protocol import MAX_NEW_TOKENS, not_a_boolean
from ..services.generation import (
    ChatMessage,
    ErrorEvent,
    Generation,
    ImproveEvent,
    Sampling,
    TokenEvent,
)
from .auth import llmws, principal, user_key
from .common import (
    cancel_when_gone,
    generation,
    normalize_messages,
    sampling_request,
    start_or_gone,
)

logger = logging.getLogger("llmws.http.hf_server")

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
        prompt=prompt,
        improvement=improvement,
        intermediate_steps=intermediate_steps,
        max_tokens=max_tokens,
        temperature=temperature,
    )


def conversation(request: Request, body: ChatRequest) -> list[ChatMessage]:
    """The role system prompt (unless the history has one), the history, the prompt."""
    history = normalize_messages(body.history) if body.history else []
    roles = llmws(request).settings.roles
    system = (
        []
        if any(m["role"] == "system" for m in history)
        else [{"role": "system", "content": roles.get("assistant", "")}]
    )
    return [m for m in system if m["content"]] + history + [{"role": "user", "content": body.prompt}]


def _sampling(body: ChatRequest) -> Sampling:
    return Sampling(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed)


def _prepare(request: Request, body: ChatRequest) -> Generation:
    """The plain (no improvement) reply, checked; old turns give way to the reply's room."""
    req = sampling_request(request, conversation(request, body), sampling=_sampling(body), keep_reply_room=True)
    return generation(request).prepare(req)


async def blocking_reply(request: Request, body: ChatRequest) -> dict[str, Any]:
    if body.improvement:
        events = _improve(request, body, cancel := threading.Event())
        async with cancel_when_gone(request, cancel.set):
            stages: list[dict[str, Any]] = []
            async for ev in events:
                if ev.kind == "stage_done":
                    stages.append({"stage": ev.stage, "label": ev.label, "text": ev.text})
                elif ev.kind == "done":
                    out: dict[str, Any] = {**ev.result, "reply": ev.text, "improvement": True}
                    out["usage"] = {"prompt_tokens": ev.tokens_in, "completion_tokens": ev.tokens_out}
                    out["finish_reason"] = ev.finish_reason
                    if body.intermediate_steps:
                        out["steps"] = stages
                    return out
    gen = _prepare(request, body)
    if not await start_or_gone(request, gen):
        return {
            "reply": "",
            "improvement": False,
            "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "finish_reason": "cancelled",
        }
    async with gen, cancel_when_gone(request, gen.cancel):
        done = await gen.collect()
    return {
        "reply": done.content or "",
        "improvement": False,
        "usage": {"prompt_tokens": done.tokens_in, "completion_tokens": done.tokens_out},
        "finish_reason": done.finish_reason,
    }


def _improve(request: Request, body: ChatRequest, cancel: threading.Event) -> AsyncIterator[ImproveEvent]:
    """The improvement pipeline's events for this request (checked now)."""
    return generation(request).improve(
        conversation(request, body), _sampling(body), principal=principal(request), cancel=cancel
    )


async def improved_text(
    request: Request, body: ChatRequest, events: AsyncIterator[ImproveEvent], cancel: threading.Event
) -> AsyncIterator[str]:
    """The improved reply's text chunks (each pass under a label with intermediate_steps)."""
    try:
        async with cancel_when_gone(request, cancel.set):
            async for ev in events:
                if body.intermediate_steps:
                    if ev.kind == "stage":
                        yield ("" if ev.index == 1 else "\n\n") + f"### {ev.label}\n\n"
                    elif ev.kind == "token":
                        yield ev.text
                elif ev.kind == "token" and ev.stage == "final":
                    yield ev.text
    finally:
        cancel.set()  # harmless after a normal end; stops the model after an abrupt one


async def reply_text(request: Request, gen: Generation) -> AsyncIterator[str]:
    """The plain reply's text chunks."""
    await gen.start()
    async with gen, cancel_when_gone(request, gen.cancel):
        async for ev in gen:
            if isinstance(ev, TokenEvent):
                yield ev.text
            elif isinstance(ev, ErrorEvent):
                assert ev.exc is not None
                raise ev.exc


async def text_stream(source: AsyncIterator[str]) -> AsyncIterator[str]:
    """`source`'s chunks, then END_MARK. Errors end the stream with a line saying so
    (the status is already sent)."""
    try:
        async for chunk in source:
            yield chunk
    except Exception as exc:
        yield f"\n[error: {ErrorEvent.of(exc).message}]"
    yield END_MARK


def _stream_response(request: Request, body: ChatRequest) -> StreamingResponse:
    # Checked before the 200 goes out: a bad history must be a 400, not a cut stream.
    if body.improvement:
        cancel = threading.Event()
        source = improved_text(request, body, _improve(request, body, cancel), cancel)
    else:
        source = reply_text(request, _prepare(request, body))
    return StreamingResponse(
        text_stream(source),
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


@router.post(
    "/chat/stream", summary="Chat, streamed as plain text ending with [[END]]", dependencies=[Depends(user_key)]
)
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
