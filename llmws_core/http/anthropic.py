"""The Anthropic Messages API: `POST /v1/messages`, `POST /v1/messages/count_tokens`.

Stateless, as Anthropic's API is: the conversation comes with each request. The
official `anthropic` SDK (`Anthropic(base_url=...)`), Claude-Code-style tools and
curl work unmodified. A request is translated into the chat service's request
(content blocks into messages, tools and `tool_choice` into the service's tool
calls), and its events are rendered as a `message` object or as Anthropic's
server-sent event sequence. Errors are Anthropic error objects.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import errors
from ..services.generation import (
    ChatMessage,
    DoneEvent,
    ErrorEvent,
    Generation,
    GenerationRequest,
    ResponseFormat,
    Sampling,
    TokenEvent,
    ToolCallEvent,
)
from ..services.tools import Tool, ToolCall, ToolChoice
from .auth import user_key
from .common import SSE_HEADERS, cancel_when_gone, generation, sampling_request, sse, start_or_gone

logger = logging.getLogger("llmws.http.anthropic")

router = APIRouter(tags=["Anthropic Messages"], dependencies=[Depends(user_key)])

#: Paths whose errors are Anthropic error objects.
PATH_PREFIX = "/v1/messages"

#: Anthropic error `type` by HTTP status (anything else at 500 and above: api_error).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


# ---------------------------------------------------------------------- wire models


class InputMessage(BaseModel):
    """One turn: `content` is a string or a list of content blocks."""

    model_config = ConfigDict(extra="allow")

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class TokenCountRequest(BaseModel):
    """What `count_tokens` reads: the prompt parts of a Messages request. Unknown
    fields are accepted and ignored, so newer SDKs keep working."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(
        ...,
        max_length=1024,
        description="A local model name switches to it; other names are served by the loaded model.",
    )
    messages: list[InputMessage] = Field(..., min_length=1, max_length=10_000)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: dict[str, Any] | None = None


class MessagesRequest(TokenCountRequest):
    """An Anthropic Messages request."""

    max_tokens: int = Field(..., ge=1, description="Most tokens to generate (required, as in Anthropic's API).")
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[str] | None = Field(None, max_length=16)
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = Field(
        None, description="Structured outputs: `format` {type: json_schema, schema} constrains the reply."
    )
    output_format: dict[str, Any] | None = Field(None, description="The earlier spelling of output_config.format.")
    stream: bool = False


# ---------------------------------------------------------------------- translation


def block_text(blocks: Any, where: str) -> str:
    """The text of a string or a list of text blocks (`system`, a tool result's content)."""
    if blocks is None:
        return ""
    if isinstance(blocks, str):
        return blocks
    parts = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind in ("image", "document"):
            raise errors.Unsupported(f"{where}: {kind} blocks are not supported; the model reads text only.")
        else:
            raise errors.BadRequest(f"{where}: expected text blocks.")
    return "\n".join(parts) if where == "system" else "".join(parts)


def chat_messages(body: TokenCountRequest) -> list[ChatMessage]:
    """The request's `system` and `messages` as the service's chat messages.

    `tool_use` blocks become an assistant's `tool_calls`, `tool_result` blocks become
    `tool` messages (in the order they appear), `thinking` blocks of earlier turns are
    dropped (they are not replayed to the model). A user message's `image` blocks
    become its images (their `source`, base64 or url, checked by the generation
    service); document blocks are a typed `unsupported` error.
    """
    out: list[ChatMessage] = []
    system = block_text(body.system, "system")
    if system:
        out.append({"role": "system", "content": system})
    for i, msg in enumerate(body.messages):
        where = f"messages.{i}.content"
        if isinstance(msg.content, str):
            out.append({"role": msg.role, "content": msg.content})
            continue
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        pics: list[Any] = []
        for j, block in enumerate(msg.content):
            kind = block.get("type")
            if kind == "text":
                if not isinstance(block.get("text"), str):
                    raise errors.BadRequest(f"{where}.{j}.text: a text block needs text.")
                text.append(block["text"])
            elif kind == "tool_use" and msg.role == "assistant":
                if not isinstance(block.get("name"), str) or not isinstance(block.get("input", {}), dict):
                    raise errors.BadRequest(f"{where}.{j}: a tool_use block needs a name and an input object.")
                calls.append({"name": block["name"], "arguments": block.get("input", {})})
            elif kind == "tool_result" and msg.role == "user":
                if text:
                    out.append({"role": "user", "content": "".join(text)})
                    text = []
                result = block_text(block.get("content"), f"{where}.{j}.content")
                out.append({"role": "tool", "content": "Error: " + result if block.get("is_error") else result})
            elif kind in ("thinking", "redacted_thinking") and msg.role == "assistant":
                continue
            elif kind == "image" and msg.role == "user":
                if not isinstance(block.get("source"), dict):
                    raise errors.BadRequest(f"{where}.{j}.source: an image block needs a source.")
                pics.append(block["source"])
            elif kind in ("image", "document"):
                raise errors.Unsupported(f"{where}.{j}: {kind} blocks are not supported here.")
            else:
                raise errors.BadRequest(
                    f"{where}.{j}: a {str(kind)[:32]!r} block is not valid in a {msg.role} message."
                )
        if msg.role == "assistant":
            entry: ChatMessage = {"role": "assistant", "content": "".join(text)}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
        elif text or pics:
            user: ChatMessage = {"role": "user", "content": "".join(text)}
            if pics:
                user["images"] = pics
            out.append(user)
    return out


def chat_tools(tools: list[dict[str, Any]] | None) -> list[Tool] | None:
    """Anthropic tool definitions (client tools) as the service's tools."""
    if not tools:
        return None
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise errors.Unsupported(
                f"tools.{i}: {str(kind)[:40]!r} server tools are not supported; define client tools with name and input_schema."
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise errors.BadRequest(f"tools.{i}.name: each tool needs a name.")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise errors.BadRequest(f"tools.{i}.input_schema: each tool needs an input_schema object.")
        spec: Tool = {"name": name, "parameters": schema}
        if isinstance(tool.get("description"), str):
            spec["description"] = tool["description"]
        out.append(spec)
    return out


def chat_tool_choice(choice: dict[str, Any] | None) -> ToolChoice:
    """Anthropic `tool_choice` (auto, any, tool, none) as the service's."""
    if choice is None:
        return "auto"
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return str(kind)
    if kind == "any":
        return "required"
    if kind == "tool":
        if not isinstance(choice.get("name"), str) or not choice["name"]:
            raise errors.BadRequest("tool_choice: type 'tool' needs the tool's name.")
        return str(choice["name"])
    raise errors.BadRequest("tool_choice.type must be auto, any, tool or none.")


def output_format(body: MessagesRequest) -> ResponseFormat | None:
    """Structured outputs (`output_config.format`, or `output_format`) as the service's JSON mode."""
    fmt = (body.output_config or {}).get("format") or body.output_format
    if not fmt:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise errors.BadRequest('output_config.format must be {"type": "json_schema", "schema": {...}}.')
    return ResponseFormat(schema=fmt["schema"])


def generation_request(request: Request, body: MessagesRequest) -> GenerationRequest:
    """A Messages request as the generation service's request."""
    return sampling_request(
        request,
        chat_messages(body),
        sampling=Sampling(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            max_tokens=body.max_tokens,
            stop=body.stop_sequences,
        ),
        model=body.model,
        tools=chat_tools(body.tools),
        tool_choice=chat_tool_choice(body.tool_choice),
        response_format=output_format(body),
    )


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    """A tool call as an Anthropic `tool_use` content block."""
    return {
        "type": "tool_use",
        "id": "toolu_" + call.id.removeprefix("call_"),
        "name": call.name,
        "input": call.arguments,
    }


def stop_reason(done: DoneEvent, requested: list[str] | None) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished reply.

    A stop string counts as `stop_sequence` only when it is one the request gave (a
    chat template's own end marker is a natural `end_turn`)."""
    if done.tool_calls:
        return "tool_use", None
    if done.finish_reason == "length":
        return "max_tokens", None
    if done.stop_sequence is not None and done.stop_sequence in (requested or []):
        return "stop_sequence", done.stop_sequence
    return "end_turn", None


def usage(tokens_in: int, tokens_out: int) -> dict[str, int]:
    return {
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def message_object(
    msg_id: str,
    model: str,
    content: list[dict[str, Any]],
    reason: str | None,
    sequence: str | None,
    use: dict[str, int],
) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": use,
    }


# ---------------------------------------------------------------------- errors


def error_object(status: int, message: str) -> dict[str, Any]:
    """An Anthropic error object: its `type` follows the HTTP status."""
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def owns_path(path: str) -> bool:
    """Whether errors of `path` take Anthropic's shape."""
    return path == PATH_PREFIX or path.startswith(PATH_PREFIX + "/")


def error_body(event: ErrorEvent, param: str | None = None) -> dict[str, Any]:
    """The Anthropic error object of an error (user-safe text only; the status is `event.status`)."""
    return error_object(event.status, event.message)


def sse_event(data: dict[str, Any]) -> str:
    """One Anthropic server-sent event: `event:` is the data's own `type`."""
    return sse(data, event=data["type"])


# ---------------------------------------------------------------------- routes


@router.post("/v1/messages", summary="Create a message (Anthropic Messages API; stream or not)")
async def create_message(body: MessagesRequest, request: Request) -> Response:
    """Generate the assistant's next message. With `stream: true` the reply comes as
    Anthropic's server-sent events (`message_start` ... `message_stop`)."""
    gen = generation(request).prepare(generation_request(request, body))
    if not await start_or_gone(request, gen):
        return Response(status_code=499)
    msg_id = "msg_" + gen.id
    if body.stream:
        return StreamingResponse(
            stream_events(request, gen, body, msg_id), media_type="text/event-stream", headers=SSE_HEADERS
        )
    async with gen, cancel_when_gone(request, gen.cancel):
        done = await gen.collect()
    assert gen.started is not None
    content: list[dict[str, Any]] = []
    if done.content or not done.tool_calls:
        content.append({"type": "text", "text": done.content or ""})
    content.extend(tool_use_block(c) for c in done.tool_calls)
    reason, sequence = stop_reason(done, body.stop_sequences)
    return JSONResponse(
        message_object(msg_id, gen.started.model, content, reason, sequence, usage(done.tokens_in, done.tokens_out))
    )


@router.post("/v1/messages/count_tokens", summary="Count a request's input tokens (Anthropic shape)")
async def count_tokens(body: TokenCountRequest, request: Request) -> dict[str, int]:
    """`{"input_tokens": N}`: the real prompt tokens of the request under the loaded
    model's chat template, the tools' description included."""
    count = await generation(request).count_tokens(
        chat_messages(body), tools=chat_tools(body.tools), tool_choice=chat_tool_choice(body.tool_choice)
    )
    return {"input_tokens": count}


async def stream_events(request: Request, gen: Generation, body: MessagesRequest, msg_id: str) -> AsyncIterator[str]:
    """Anthropic's event sequence for one generation.

    `message_start`, then per content block `content_block_start`, its deltas
    (`text_delta`, or one `input_json_delta` for a tool call) and
    `content_block_stop`, a `ping` after the first block starts, then
    `message_delta` (stop_reason, usage) and `message_stop`. An error after the
    start is one `event: error`."""
    started = gen.started
    assert started is not None
    yield sse_event(
        {
            "type": "message_start",
            "message": message_object(msg_id, started.model, [], None, None, usage(started.tokens_in, 0)),
        }
    )
    index = -1
    text_open = False

    def begin(block: dict[str, Any]) -> list[str]:
        nonlocal index
        index += 1
        out = [sse_event({"type": "content_block_start", "index": index, "content_block": block})]
        if index == 0:
            out.append(sse_event({"type": "ping"}))
        return out

    def stop() -> str:
        return sse_event({"type": "content_block_stop", "index": index})

    async with gen, cancel_when_gone(request, gen.cancel):
        async for event in gen:
            if isinstance(event, TokenEvent):
                if not text_open:
                    for line in begin({"type": "text", "text": ""}):
                        yield line
                    text_open = True
                yield sse_event(
                    {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": event.text}}
                )
            elif isinstance(event, ToolCallEvent):
                if text_open:
                    yield stop()
                    text_open = False
                for call in event.calls:
                    block = tool_use_block(call)
                    for line in begin({**block, "input": {}}):
                        yield line
                    delta = {"type": "input_json_delta", "partial_json": call.arguments_json}
                    yield sse_event({"type": "content_block_delta", "index": index, "delta": delta})
                    yield stop()
            elif isinstance(event, DoneEvent):
                if index == -1:  # an empty reply still has its (empty) text block
                    for line in begin({"type": "text", "text": ""}):
                        yield line
                    text_open = True
                if text_open:
                    yield stop()
                reason, sequence = stop_reason(event, body.stop_sequences)
                yield sse_event(
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": sequence},
                        "usage": {"output_tokens": event.tokens_out},
                    }
                )
                yield sse_event({"type": "message_stop"})
            elif isinstance(event, ErrorEvent):
                yield sse_event(error_body(event))
