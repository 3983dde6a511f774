"""OpenAI's Responses API: `POST /v1/responses`, `GET /v1/responses/{id}` (poll, or
`?stream=true&starting_after=N` to resume a stream), `POST /v1/responses/{id}/cancel`,
`DELETE /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`.

The door parses OpenAI's request shape (input items, function tools, `text.format`)
into a generation request and hands it to the response service, which stores each
response sealed in the session store and runs it on the generation service. The
official `openai` SDK's `client.responses` works unmodified, streams included.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import errors
from ..services.generation import ChatMessage, ErrorEvent, Sampling, parse_response_format
from ..services.responses import NewResponse, ResponseService
from ..services.tools import Tool, ToolChoice
from .auth import llmws, principal, user_key
from .common import SSE_HEADERS, cancel_when_gone, sampling_request, sse
from .openai import error_body as openai_error_body

logger = logging.getLogger("llmws.http.responses")

router = APIRouter(tags=["OpenAI Responses"], dependencies=[Depends(user_key)])

MAX_INPUT_ITEMS = 10_000
BUILTIN_TOOLS_MESSAGE = (
    "Only function tools are available on this server; built-in tools such as web search, "
    "file search or code interpreter are not."
)


class ResponseCreate(BaseModel):
    """A Responses API request. Unknown fields are accepted and ignored, so newer SDKs
    keep working."""

    model_config = ConfigDict(extra="allow")

    input: str | list[dict[str, Any]]
    model: str | None = Field(None, max_length=1024)
    instructions: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    max_output_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    store: bool | None = None
    previous_response_id: str | None = Field(None, max_length=128)
    background: bool | None = None
    stream: bool | None = None
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None


# ---------------------------------------------------------------------- errors


def owns_path(path: str) -> bool:
    """Whether errors of `path` take OpenAI's shape (they do for every Responses route)."""
    return path == "/v1/responses" or path.startswith("/v1/responses/")


def error_body(event: ErrorEvent, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object of an error."""
    return openai_error_body(event, param)


# ---------------------------------------------------------------------- parsing


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text"):
        return str(part.get("text") or "")
    kind = part.get("type") if isinstance(part, dict) else None
    raise errors.Unsupported(f"Input content of type {str(kind)[:32]!r} is not supported; this server takes text only.")


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_part_text(p) for p in content)
    raise errors.BadRequest("A message's content must be a string or a list of text parts.")


def parse_input(raw: str | list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[ChatMessage]]:
    """The request's `input` as (input items with ids, the service's messages).

    Messages (roles user, system, developer, assistant), `function_call` items (a
    client replaying the model's calls) and `function_call_output` items (their
    results) are taken; reasoning items are skipped; other types are refused."""
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    if len(raw) > MAX_INPUT_ITEMS:
        raise errors.BadRequest(f"input may hold at most {MAX_INPUT_ITEMS} items.")
    items: list[dict[str, Any]] = []
    messages: list[ChatMessage] = []
    for item in raw:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise errors.BadRequest(f"Unknown message role {str(role)[:32]!r}.")
            text = _content_text(item.get("content"))
            part = "output_text" if role == "assistant" else "input_text"
            items.append(
                {
                    "id": item.get("id") or f"msg_{uuid.uuid4().hex}",
                    "type": "message",
                    "role": role,
                    "content": [{"type": part, "text": text, **({"annotations": []} if role == "assistant" else {})}],
                    "status": "completed",
                }
            )
            messages.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            name, arguments = item.get("name"), item.get("arguments") or "{}"
            if not isinstance(name, str) or not isinstance(arguments, str):
                raise errors.BadRequest("A function_call item needs a name and its arguments as JSON text.")
            items.append(
                {
                    "id": item.get("id") or f"fc_{uuid.uuid4().hex}",
                    "type": "function_call",
                    "call_id": item.get("call_id") or f"call_{uuid.uuid4().hex[:24]}",
                    "name": name,
                    "arguments": arguments,
                    "status": "completed",
                }
            )
            call = {"name": name, "arguments": arguments}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _content_text(output)
            items.append(
                {
                    "id": item.get("id") or f"fco_{uuid.uuid4().hex}",
                    "type": "function_call_output",
                    "call_id": item.get("call_id"),
                    "output": text,
                    "status": "completed",
                }
            )
            messages.append({"role": "tool", "content": text})
        elif kind == "reasoning":
            continue
        else:
            raise errors.Unsupported(f"Input items of type {str(kind)[:32]!r} are not supported by this server.")
    if not messages:
        raise errors.BadRequest("input must hold at least one message.")
    return items, messages


def parse_tools(tools: list[dict[str, Any]] | None) -> list[Tool] | None:
    """Function tools ({"type": "function", "name", "description", "parameters"})."""
    if not tools:
        return None
    out: list[Tool] = []
    for tool in tools:
        if tool.get("type") != "function":
            raise errors.Unsupported(BUILTIN_TOOLS_MESSAGE)
        if not isinstance(tool.get("name"), str):
            raise errors.BadRequest("Each function tool needs a name.")
        spec: Tool = {"name": tool["name"]}
        if tool.get("description"):
            spec["description"] = tool["description"]
        if tool.get("parameters"):
            spec["parameters"] = tool["parameters"]
        out.append(spec)
    return out


def parse_tool_choice(choice: str | dict[str, Any] | None) -> ToolChoice:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise errors.BadRequest("tool_choice must be 'auto', 'none', 'required' or a function.")
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return str(choice["name"])
    raise errors.Unsupported(BUILTIN_TOOLS_MESSAGE)


def parse_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format` (None: plain text)."""
    fmt = (text or {}).get("format")
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    return {"type": fmt.get("type")}


def new_response(request: Request, body: ResponseCreate) -> NewResponse:
    """The request as the response service's new response."""
    items, messages = parse_input(body.input)
    tools = parse_tools(body.tools)
    background = bool(body.background)
    store = body.store is not False
    if background and not store:
        raise errors.BadRequest("A background response must be stored (store: true).")
    req = sampling_request(
        request,
        messages,
        sampling=Sampling(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            max_tokens=body.max_output_tokens,
            seed=body.seed,
        ),
        model=body.model,
        tools=tools,
        tool_choice=parse_tool_choice(body.tool_choice),
        response_format=parse_response_format(parse_format(body.text)),
        keep_reply_room=body.truncation == "auto",
    )
    head = {
        "model": body.model or llmws(request).models.name or "llmws",
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "truncation": body.truncation or "disabled",
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "user": body.user,
    }
    return NewResponse(
        head=head,
        input_items=items,
        request=req,
        instructions=body.instructions,
        previous_response_id=body.previous_response_id,
        background=background,
        store=store,
    )


# ---------------------------------------------------------------------- routes


def responses(request: Request) -> ResponseService:
    return llmws(request).responses


def owner(request: Request) -> str:
    """Whose responses a request may see: its key's, when keys are required; without
    keys every client is the same local user (whatever dummy key its SDK sends)."""
    return principal(request) if llmws(request).keys_required else "local"


async def event_stream(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Responses stream events as SSE (`event: <type>`, then the event as data)."""
    async for event in events:
        yield sse(event, event=event["type"])


def streaming(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    return StreamingResponse(event_stream(events), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/v1/responses", summary="Create a response (OpenAI Responses API; stored, resumable)")
async def create_response(body: ResponseCreate, request: Request) -> Response:
    """Generate a response to `input`. Stored by default (sealed, retrievable until the
    sessions' TTL); `previous_response_id` continues a conversation; `background: true`
    returns at once while the generation runs on; `stream: true` streams its events."""
    service, who = responses(request), owner(request)
    new = new_response(request, body)
    if new.background:
        response = await service.create(new, who)
        if body.stream:
            return streaming(service.events(response["id"], who))
        return JSONResponse(response)
    try:
        response = await service.create(new, who, watch=lambda cancel: cancel_when_gone(request, cancel))
    except errors.Cancelled:
        return Response(status_code=499)
    rid = response["id"]
    if body.stream:
        return streaming(_foreground(request, service, rid, who))
    async with cancel_when_gone(request, lambda: service.abandon(rid)):
        final = await service.result(rid, who)
    return JSONResponse(final)


async def _foreground(request: Request, service: ResponseService, rid: str, who: str) -> AsyncIterator[dict[str, Any]]:
    """A foreground response's events; its client going away stops the generation."""
    async with cancel_when_gone(request, lambda: service.abandon(rid)):
        async for event in service.events(rid, who):
            yield event


@router.get("/v1/responses/{response_id}", summary="Retrieve a response, or resume its stream")
async def retrieve_response(
    response_id: str,
    request: Request,
    stream: bool = Query(False, description="Stream the response's events (stored ones, then live ones)."),
    starting_after: int | None = Query(None, ge=-1, description="Stream only the events after this sequence_number."),
) -> Response:
    """The response object (its output so far while it runs), or with `stream=true` its
    events after `starting_after` and then live ones until it ends."""
    service, who = responses(request), owner(request)
    if stream:
        await service.get(response_id, who)  # unknown ids answer 404 before the stream starts
        return streaming(service.events(response_id, who, starting_after))
    return JSONResponse(await service.get(response_id, who))


@router.post("/v1/responses/{response_id}/cancel", summary="Cancel a running response")
async def cancel_response(response_id: str, request: Request) -> dict[str, Any]:
    """Stop a running response (its status becomes "cancelled", the output it had is
    kept); an ended response is returned unchanged."""
    return await responses(request).cancel(response_id, owner(request))


@router.delete("/v1/responses/{response_id}", summary="Delete a stored response")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    """Delete a stored response (cancelled first if it runs)."""
    await responses(request).delete(response_id, owner(request))
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items", summary="List a response's input items")
async def list_input_items(
    response_id: str,
    request: Request,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = Query("desc"),
    after: str | None = Query(None, max_length=128, description="List the items after this item id."),
    before: str | None = Query(None, max_length=128, description="List the items before this item id."),
) -> dict[str, Any]:
    """The input items the response was created with (newest first unless order=asc)."""
    items = await responses(request).input_items(response_id, owner(request))
    if order == "desc":
        items.reverse()
    ids = [i["id"] for i in items]
    if after is not None:
        items = items[ids.index(after) + 1 :] if after in ids else []
    if before is not None:
        ids = [i["id"] for i in items]
        items = items[: ids.index(before)] if before in ids else items
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
