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
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import errors
from ..protocol import MAX_NEW_TOKENS, MAX_TOP_K, not_a_boolean
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
from . import choices
from .auth import llmws, user_key
from .common import (
    SSE_HEADERS,
    normalize_messages,
    sampling_request,
    sse,
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
    model: str | None = Field(
        None,
        max_length=1024,
        description="A local model name switches to it; other names are served by the loaded model.",
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    repeat_penalty: float | None = Field(None, gt=0, le=5)
    n: int = Field(
        1,
        ge=1,
        le=choices.MAX_N,
        description="Choices to generate (decoded together as one batch where the backend batches).",
    )
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=choices.MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None

    _numbers = field_validator(
        "temperature",
        "top_p",
        "top_k",
        "max_tokens",
        "max_completion_tokens",
        "seed",
        "repeat_penalty",
        "n",
        mode="before",
    )(not_a_boolean)


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
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            stop=stop,
            seed=body.seed,
            repeat_penalty=body.repeat_penalty,
        ),
        model=body.model,
        tools=openai_tools(body),
        tool_choice=openai_tool_choice(body.tool_choice),
        response_format=parse_response_format(body.response_format),
        logprobs=chat_logprobs(body),
    )


def chat_logprobs(body: ChatCompletionRequest) -> int | None:
    """The alternatives per token the request asks for (None: no logprobs)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise errors.BadRequest("top_logprobs needs logprobs: true.", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


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
OPENAI_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/chat/completions"}
)


def owns_path(path: str) -> bool:
    """Whether errors of `path` take OpenAI's shape."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


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


def capabilities(model: dict[str, Any]) -> list[str]:
    """What a listed model serves: "embeddings", or "chat", "tools" and (local models) "completion"."""
    if model.get("kind") == "embedding":
        return ["embeddings"]
    if model.get("format") == "remote":
        caps = ["chat", "tools"]  # raw-text completion is served by local backends only
    else:
        caps = ["chat", "tools"] if model.get("vision") else ["chat", "completion", "tools"]
    return [*caps, "vision"] if model.get("vision") else caps


def model_object(model: dict[str, Any]) -> dict[str, Any]:
    """One `models_list` entry as an OpenAI model object (plus what LLMWS knows of it)."""
    return {
        "id": model["name"],
        "object": "model",
        "created": 0,
        "owned_by": model.get("source", "local"),
        "loaded": model.get("loaded", False),
        "kind": model.get("kind", "chat"),
        "capabilities": capabilities(model),
        "vision": bool(model.get("vision")),
        **({"max_context": model["max_context"]} if model.get("max_context") else {}),
    }


@router.get("/v1/models", summary="List the local models (OpenAI shape)")
async def list_models(request: Request) -> dict[str, Any]:
    """Every model in models/, var/models/, the embedded ones and the remote ones, as
    OpenAI model objects."""
    models = await llmws(request).models.list()
    return {"object": "list", "data": [model_object(m) for m in models]}


@router.get("/v1/models/{model_id:path}", summary="One model (OpenAI shape)")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    """The model listed under `model_id` (its name or its path), or an OpenAI 404."""
    models = await llmws(request).models.list()
    for m in models:
        if model_id in (m["name"], m.get("path")):
            return model_object(m)
    exc = errors.ModelNotFound(f"The model '{model_id[:120]}' does not exist.", param="model")
    raise exc


@router.post("/v1/chat/completions", summary="Chat completion (OpenAI-compatible; stream or not)")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """Generate a reply to `messages`. With `stream: true` the reply comes as
    `chat.completion.chunk` server-sent events ending with `data: [DONE]`; with
    `stream_options.include_usage` a last chunk carries the usage."""
    return await complete(body, request)


async def complete(body: ChatCompletionRequest, request: Request) -> Response:
    """The shared handler of /v1/chat/completions and the legacy /chat/completions."""
    gens = choices.prepare(request, generation_request(request, body), body.n)
    if not await choices.start_all(request, gens):
        return Response(status_code=499)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            stream_events(request, gens, created, include_usage, body.logprobs),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    dones = await choices.collect_all(request, gens)
    started = gens[0].started
    assert started is not None
    out = []
    for i, done in enumerate(dones):
        message: dict[str, Any] = {"role": "assistant", "content": done.content}
        if done.tool_calls:
            message["tool_calls"] = [tool_call_json(c) for c in done.tool_calls]
        out.append(
            {
                "index": i,
                "message": message,
                "logprobs": {"content": choices.logprob_entries(done.logprobs or ())} if body.logprobs else None,
                "finish_reason": finish_reason(done.finish_reason),
            }
        )
    return JSONResponse(
        {
            "id": "chatcmpl-" + gens[0].id,
            "object": "chat.completion",
            "created": created,
            "model": started.model,
            "choices": out,
            "usage": usage(dones[0].tokens_in, sum(d.tokens_out for d in dones)),
            "system_fingerprint": choices.fingerprint(started.model),
        }
    )


async def stream_events(
    request: Request,
    gens: list[Generation],
    created: int,
    include_usage: bool,
    logprobs: bool,
) -> AsyncIterator[str]:
    """chat.completion.chunk events for the generations (one choice each), then `[DONE]`."""
    started = gens[0].started
    assert started is not None
    n = 0
    head = {
        "id": "chatcmpl-" + gens[0].id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": started.model,
        "system_fingerprint": choices.fingerprint(started.model),
    }

    def event(index: int, delta: dict[str, Any], finish: str | None = None, lps: Any = None) -> str:
        nonlocal n
        n += 1
        lp = {"content": choices.logprob_entries(lps)} if logprobs and lps is not None else None
        return sse(
            {**head, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}, event_id=n
        )

    for i in range(len(gens)):
        yield event(i, {"role": "assistant", "content": ""})
    tokens_in, tokens_out = 0, 0
    async for i, ev in choices.merged(request, gens):
        if isinstance(ev, TokenEvent):
            yield event(i, {"content": ev.text}, lps=ev.logprobs)
        elif isinstance(ev, ToolCallEvent):
            yield event(i, {"tool_calls": [{"index": k, **tool_call_json(c)} for k, c in enumerate(ev.calls)]})
        elif isinstance(ev, ErrorEvent):
            n += 1
            yield sse(openai_error(ev), event_id=n)
            yield sse("[DONE]")
            return
        elif isinstance(ev, DoneEvent):
            yield event(i, {}, finish_reason(ev.finish_reason))
            tokens_in, tokens_out = ev.tokens_in, tokens_out + ev.tokens_out
    if include_usage:
        n += 1
        yield sse({**head, "choices": [], "usage": usage(tokens_in, tokens_out)}, event_id=n)
    yield sse("[DONE]")
