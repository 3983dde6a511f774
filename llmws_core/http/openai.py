"""The OpenAI-compatible surface: `GET /v1/models`, `POST /v1/chat/completions`.

Stateless: the history comes with each request, as the OpenAI API defines it. The
official `openai` SDK, LiteLLM and curl work unmodified. The same handler also
serves the earlier llama-cpp server's `POST /chat/completions` (see llamacpp_server.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import errors
from ..services.generation import (
    DoneEvent,
    ErrorEvent,
    Generation,
    GenerationRequest,
    Sampling,
    TokenEvent,
    ToolCallEvent,
    parse_response_format,
)
from ..services.tools import Tool, ToolCall, ToolChoice
from .auth import llmws, user_key
from .common import (
    SSE_HEADERS,
    cancel_when_gone,
    generation,
    normalize_messages,
    sampling_request,
    sse,
    start_or_gone,
)

logger = logging.getLogger("llmws.http.openai")

router = APIRouter(tags=["OpenAI-compatible"], dependencies=[Depends(user_key)])

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """An OpenAI chat completion request. Unknown fields are accepted and ignored,
    as OpenAI-compatible servers do, so newer SDKs keep working."""

    model_config = ConfigDict(extra="allow")

    messages: list[dict[str, Any]] = Field(..., min_length=1, max_length=10_000)
    model: str | None = Field(None, max_length=1024, description="A local model name switches to it; other names are served by the loaded model.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    repeat_penalty: float | None = Field(None, gt=0, le=5)
    n: int = Field(1, ge=1, le=1)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None


def openai_tools(body: ChatCompletionRequest) -> list[Tool] | None:
    """The request's tools as the service's function specs (checked unless tool_choice is "none")."""
    if not body.tools or body.tool_choice == "none":
        return None
    out = []
    for tool in body.tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise errors.BadRequest("Each tool needs {'type': 'function', 'function': {'name': ...}}.")
        out.append(fn)
    return out


def openai_tool_choice(choice: str | dict[str, Any] | None) -> ToolChoice:
    """OpenAI's tool_choice ("none", "auto", "required" or {"function": {"name"}}) as the service's."""
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        return name if isinstance(name, str) else "auto"
    return choice or "auto"


def generation_request(request: Request, body: ChatCompletionRequest) -> GenerationRequest:
    """The chat completion request as the generation service's request."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return sampling_request(
        request,
        normalize_messages(body.messages),
        sampling=Sampling(
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            max_tokens=body.max_completion_tokens or body.max_tokens, stop=stop, seed=body.seed,
            repeat_penalty=body.repeat_penalty,
        ),
        model=body.model,
        tools=openai_tools(body),
        tool_choice=openai_tool_choice(body.tool_choice),
        response_format=parse_response_format(body.response_format),
    )


#: OpenAI error `type` by HTTP status.
OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error(exc: BaseException | ErrorEvent) -> dict[str, Any]:
    """An OpenAI error object for any exception or error event (user-safe text only)."""
    event = exc if isinstance(exc, ErrorEvent) else ErrorEvent.of(exc)
    body: dict[str, Any] = {
        "message": event.message,
        "type": OPENAI_ERROR_TYPES.get(event.status, "server_error"),
        "param": None,
        "code": event.code,
    }
    for key in ("max_context", "input_length"):
        if key in event.details:
            body[key] = event.details[key]
    return {"error": body}


#: Routes whose errors are OpenAI error objects.
OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/models", "/chat/completions"})


def owns_path(path: str) -> bool:
    """Whether errors of `path` take OpenAI's shape."""
    return path in OPENAI_PATHS


def error_body(event: ErrorEvent, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object of an error (`param`: the request field at fault)."""
    body = openai_error(event)
    body["error"]["param"] = param
    return body


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}


def usage(tokens_in: int, tokens_out: int) -> dict[str, int]:
    return {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}


def finish_reason(reason: str) -> str:
    if reason in ("tool_calls", "length"):
        return reason
    return "stop"


@router.get("/v1/models", summary="List the local models (OpenAI shape)")
async def list_models(request: Request) -> dict[str, Any]:
    """Every model in models/, var/models/ and the embedded one, as OpenAI model objects."""
    models = await llmws(request).models.list()
    return {
        "object": "list",
        "data": [
            {
                "id": m["name"],
                "object": "model",
                "created": 0,
                "owned_by": m.get("source", "local"),
                "loaded": m.get("loaded", False),
                **({"max_context": m["max_context"]} if m.get("max_context") else {}),
            }
            for m in models
        ],
    }


@router.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible; stream or not)")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """Generate a reply to `messages`. With `stream: true` the reply comes as
    `chat.completion.chunk` server-sent events ending with `data: [DONE]`; with
    `stream_options.include_usage` a last chunk carries the usage."""
    return await complete(body, request)


async def complete(body: ChatCompletionRequest, request: Request) -> Response:
    """The shared handler of /v1/chat/completions and the legacy /chat/completions."""
    gen = generation(request).prepare(generation_request(request, body))
    if not await start_or_gone(request, gen):
        return Response(status_code=499)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            stream_events(request, gen, created, include_usage), media_type="text/event-stream", headers=SSE_HEADERS
        )
    async with gen, cancel_when_gone(request, gen.cancel):
        done = await gen.collect()
    message: dict[str, Any] = {"role": "assistant", "content": done.content}
    if done.tool_calls:
        message["tool_calls"] = [tool_call_json(c) for c in done.tool_calls]
    assert gen.started is not None
    return JSONResponse({
        "id": "chatcmpl-" + gen.id,
        "object": "chat.completion",
        "created": created,
        "model": gen.started.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason(done.finish_reason),
        }],
        "usage": usage(done.tokens_in, done.tokens_out),
        "system_fingerprint": None,
    })


async def stream_events(request: Request, gen: Generation, created: int, include_usage: bool) -> AsyncIterator[str]:
    """chat.completion.chunk events for one generation, then `[DONE]`."""
    assert gen.started is not None
    n = 0
    head = {"id": "chatcmpl-" + gen.id, "object": "chat.completion.chunk", "created": created, "model": gen.started.model}

    def event(delta: dict[str, Any], finish: str | None = None) -> str:
        nonlocal n
        n += 1
        return sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}, event_id=n)

    yield event({"role": "assistant", "content": ""})
    async with gen, cancel_when_gone(request, gen.cancel):
        async for ev in gen:
            if isinstance(ev, TokenEvent):
                yield event({"content": ev.text})
            elif isinstance(ev, ToolCallEvent):
                yield event({"tool_calls": [{"index": i, **tool_call_json(c)} for i, c in enumerate(ev.calls)]})
            elif isinstance(ev, ErrorEvent):
                n += 1
                yield sse(openai_error(ev), event_id=n)
                yield sse("[DONE]")
                return
            elif isinstance(ev, DoneEvent):
                yield event({}, finish_reason(ev.finish_reason))
                if include_usage:
                    n += 1
                    yield sse({**head, "choices": [], "usage": usage(ev.tokens_in, ev.tokens_out)}, event_id=n)
    yield sse("[DONE]")
