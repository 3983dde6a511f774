"""The OpenAI-compatible surface: `GET /v1/models`, `POST /v1/chat/completions`.

Stateless: the history comes with each request, as the OpenAI API defines it. The
official `openai` SDK, LiteLLM and curl work unmodified. The same handler also
serves the earlier llama-cpp server's `POST /chat/completions` (see legacy.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..engine import grammar
from ..engine.backends.base import Message
from ..protocol import MAX_NEW_TOKENS, MAX_TOP_K, not_a_boolean
from . import tools as toolcalls
from .auth import llmws, user_key
from .common import (
    SSE_HEADERS,
    cancel_on_disconnect,
    ensure_model,
    first_chunk,
    make_params,
    normalize_messages,
    openai_error,
    remote_model,
    sse,
    watch_disconnect,
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
    top_k: int | None = Field(None, ge=0, le=MAX_TOP_K)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    repeat_penalty: float | None = Field(None, gt=0, le=5)
    n: int = Field(1, ge=1, le=1)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None

    _numbers = field_validator(
        "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "seed",
        "repeat_penalty", "n", mode="before",
    )(not_a_boolean)


def generation_overrides(body: ChatCompletionRequest) -> dict[str, Any]:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "max_new_tokens": body.max_completion_tokens or body.max_tokens,
        "stop": stop,
        "seed": body.seed,
        "repeat_penalty": body.repeat_penalty,
    }


def with_json_instruction(messages: list[Message], fmt: dict[str, Any]) -> list[Message]:
    text = "Reply with a single valid JSON object and nothing else."
    if fmt.get("schema"):
        text += " It must match this JSON schema: " + json.dumps(fmt["schema"])
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = (out[0]["content"] + "\n\n" + text).strip()
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def extract_json(text: str) -> str:
    """The first complete JSON value in `text` (best effort without a grammar)."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                value, _ = decoder.raw_decode(text[i:])
            except ValueError:
                continue
            return json.dumps(value, ensure_ascii=False)
    return text


class Prepared:
    """A request turned into chat-service inputs.

    JSON mode and forced tool calls set `params.response_format`: a llama.cpp model
    follows it as a grammar, a remote model gets it passed on, and for a backend
    without grammars (transformers) the prompt instruction and `extract_json` are
    all there is. Which of these happened is known at the first chunk (`constrained`).
    """

    def __init__(self, request: Request, body: ChatCompletionRequest) -> None:
        self.body = body
        messages = normalize_messages(body.messages)
        self.tools = body.tools if body.tools and body.tool_choice != "none" else None
        messages = toolcalls.with_tools(messages, self.tools, body.tool_choice)
        self.params = make_params(request, **generation_overrides(body))
        forced = toolcalls.forced_call_format(self.tools, body.tool_choice)
        # A forced call is the whole reply, so response_format (which shapes content) yields.
        self.json = None if forced else grammar.parse_format(body.response_format)
        if self.json is not None:
            messages = with_json_instruction(messages, self.json)
        self.params.response_format = forced or (body.response_format if self.json is not None else None)
        # A schema no grammar can be made of is the client's error on every backend, and
        # must be a 400 before a stream starts (the grammar is cached for the backend).
        grammar.grammar_for(self.params.response_format)
        #: Whether the serving backend constrained the reply (set from the first chunk).
        self.constrained = False
        self.messages = messages
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        info = llmws(request).models.model_info() or {}
        self.remote = remote_model(request, body.model)
        self.model = self.remote or info.get("name") or body.model or "llmws"

    def finish_content(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """Final (content, tool_calls) of a complete reply."""
        calls: list[dict[str, Any]] = []
        if self.tools:
            text, calls = toolcalls.parse_tool_calls(text, self.tools)
        if self.json is not None and not self.constrained and not calls:
            text = extract_json(text)
        return (text if text or not calls else None), calls


def usage(tokens_in: int, tokens_out: int) -> dict[str, int]:
    return {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}


def finish_reason(reason: str, calls: list[dict[str, Any]]) -> str:
    if calls:
        return "tool_calls"
    return "length" if reason == "length" else "stop"


@router.get("/v1/models", summary="List the local models (OpenAI shape)")
async def list_models(request: Request) -> dict[str, Any]:
    """Every model in models/, var/models/ and the embedded one, as OpenAI model objects."""
    import asyncio

    app = llmws(request)
    models = await asyncio.to_thread(app.models.list_models)
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
    await ensure_model(request, body.model)
    prep = Prepared(request, body)
    cancel = threading.Event()
    agen = llmws(request).chat.generate(prep.messages, prep.params, cancel=cancel, trim_history=False, model=prep.remote)
    try:
        first = await first_chunk(request, agen, cancel)
    except BaseException:
        await agen.aclose()
        raise
    if first is None:
        return Response(status_code=499)
    prep.constrained = first.constrained
    if body.stream:
        return StreamingResponse(
            cancel_on_disconnect(request, stream_events(prep, agen), cancel),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    try:
        parts: list[str] = []
        result = None
        async with watch_disconnect(request, cancel):
            async for chunk in agen:
                if chunk.result is not None:
                    result = chunk.result
                elif chunk.text:
                    parts.append(chunk.text)
    finally:
        cancel.set()
        await agen.aclose()
    assert result is not None
    content, calls = prep.finish_content("".join(parts))
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return JSONResponse({
        "id": prep.id,
        "object": "chat.completion",
        "created": prep.created,
        "model": prep.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": finish_reason(result.finish_reason, calls),
        }],
        "usage": usage(result.tokens_in, result.tokens_out),
        "system_fingerprint": None,
    })


async def stream_events(prep: Prepared, agen: AsyncIterator[Any]) -> AsyncIterator[str]:
    """chat.completion.chunk events for one generation, then `[DONE]`."""
    n = 0

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        nonlocal n
        n += 1
        body = {
            "id": prep.id,
            "object": "chat.completion.chunk",
            "created": prep.created,
            "model": prep.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **extra,
        }
        return sse(body, event_id=n)

    include_usage = bool(prep.body.stream_options and prep.body.stream_options.include_usage)
    # Held back while the reply may still become a tool call or must be JSON-extracted.
    hold = bool(prep.tools) or (prep.json is not None and not prep.constrained)
    held: list[str] = []
    yield event({"role": "assistant", "content": ""})
    try:
        result = None
        async for chunk in agen:
            if chunk.result is not None:
                result = chunk.result
            elif chunk.text:
                if hold:
                    held.append(chunk.text)
                    text = "".join(held)
                    if prep.json is None and not toolcalls.may_be_tool_call(text):
                        hold, held = False, []
                        yield event({"content": text})
                else:
                    yield event({"content": chunk.text})
    except Exception as exc:
        n += 1
        yield sse(openai_error(exc), event_id=n)
        yield sse("[DONE]")
        return
    assert result is not None
    calls: list[dict[str, Any]] = []
    if held:
        content, calls = prep.finish_content("".join(held))
        if calls:
            deltas = [{"index": i, **call} for i, call in enumerate(calls)]
            yield event({"tool_calls": deltas})
        elif content:
            yield event({"content": content})
    yield event({}, finish_reason(result.finish_reason, calls))
    if include_usage:
        n += 1
        yield sse({
            "id": prep.id,
            "object": "chat.completion.chunk",
            "created": prep.created,
            "model": prep.model,
            "choices": [],
            "usage": usage(result.tokens_in, result.tokens_out),
        }, event_id=n)
    yield sse("[DONE]")
