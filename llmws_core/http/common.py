"""Helpers every HTTP surface shares: the services behind a request, SSE framing,
cancel-on-disconnect, OpenAI-shaped messages (which several surfaces take).

Each surface module stays a thin door: it turns its wire shape into a service
request and the service's events back into its wire shape, with these helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request

from .. import errors, protocol
from ..services.generation import (
    ChatMessage,
    Generation,
    GenerationRequest,
    GenerationService,
)
from .auth import llmws, principal

logger = logging.getLogger("llmws.http")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: Any, *, event_id: int | str | None = None, event: str | None = None) -> str:
    """One server-sent event: optional `id:` and `event:` lines, then `data:`, then a blank line."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    lines.extend(f"data: {part}" for part in text.split("\n"))
    return "\n".join(lines) + "\n\n"


def message_text(content: Any) -> str:
    """Flatten OpenAI message content (a string or a list of parts) into text."""
    text, images = message_parts(content)
    if images:
        raise errors.Unsupported("Only text message content is supported here.")
    return text


def message_parts(content: Any) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI message content as (its text, its image references).

    Image parts are `{"type": "image_url", "image_url": {"url": ...}}` (Chat
    Completions) or `{"type": "input_image", "image_url": "..."}` (Responses); each
    becomes `{"url": ...}`, which the generation service checks (`images.resolve`)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if isinstance(content, list):
        parts: list[str] = []
        refs: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text"):
                parts.append(str(part.get("text") or ""))
            elif isinstance(part, str):
                parts.append(part)
            elif kind in ("image_url", "input_image"):
                url = part.get("image_url")
                if isinstance(url, dict):
                    url = url.get("url")
                if not isinstance(url, str) or not url:
                    raise errors.BadRequest("An image_url part needs a url.")
                refs.append({"url": url})
            else:
                raise errors.Unsupported("Only text and image_url message content is supported by this server.")
        return "".join(parts), refs
    raise errors.BadRequest("A message's content must be a string or a list of text and image parts.")


def normalize_messages(raw: list[dict[str, Any]]) -> list[ChatMessage]:
    """OpenAI messages into the generation service's messages.

    Content parts become text (image parts: the message's `images`), `developer` is the system role, a tool's (or legacy
    function's) result has role `tool`, an assistant's calls are {name, arguments}.
    Roles are checked by the service."""
    out: list[ChatMessage] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m:
            raise errors.BadRequest("Each message needs a role.")
        role = m["role"]
        text, refs = message_parts(m.get("content"))
        msg: ChatMessage = {"role": role, "content": text}
        if refs:
            msg["images"] = refs
        if role == "developer":
            msg["role"] = "system"
        elif role == "function":
            msg["role"] = "tool"
        elif role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list) or not all(
                isinstance(c, dict) and isinstance(c.get("function") or {}, dict) for c in m["tool_calls"]
            ):
                raise errors.BadRequest(
                    "An assistant message's tool_calls must be a list of {type, function} objects.",
                    param=f"messages.[{i}].tool_calls",
                )
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                fn = call.get("function") or {}
                args = fn.get("arguments") or "{}"
                if isinstance(args, str):
                    try:
                        json.loads(args)
                    except ValueError:
                        raise errors.BadRequest(
                            "A tool call's arguments must be a JSON object in a string.",
                            param=f"messages.[{i}].tool_calls.[{j}].function.arguments",
                        ) from None
                calls.append({"name": fn.get("name"), "arguments": args})
            msg["tool_calls"] = calls
        if not protocol.is_unicode(msg["content"]):  # refused before a stream starts, not inside it
            raise errors.BadRequest(protocol.LONE_SURROGATE_MESSAGE)
        out.append(msg)
    if not out:
        raise errors.BadRequest("messages must not be empty.")
    return out


def generation(request: Request) -> GenerationService:
    """The generation service behind this request."""
    return llmws(request).generation


def sampling_request(request: Request, messages: list[ChatMessage], **fields: Any) -> GenerationRequest:
    """A GenerationRequest from this HTTP request: the caller's principal (its prompt
    prefixes are reused for it and for nobody else) and its right to switch models."""
    from .auth import is_admin  # local: auth imports this module's siblings only

    return GenerationRequest(messages=messages, principal=principal(request), may_switch=is_admin(request), **fields)


async def client_gone(request: Request) -> None:
    """Return once the client has gone away: waits on the request's own `receive()`
    for `http.disconnect` (Starlette's StreamingResponse pattern), no polling."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@contextlib.asynccontextmanager
async def cancel_when_gone(request: Request, cancel: Callable[[], None]) -> AsyncIterator[None]:
    """Call `cancel` if the client goes away while the body of this block runs."""

    async def watch() -> None:
        await client_gone(request)
        logger.info("client of %s went away: cancelling its generation", request.url.path)
        cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


async def start_or_gone(request: Request, gen: Generation) -> bool:
    """Start `gen`, giving up if the client leaves while it waits for its turn.

    Returns False (the generation cancelled) if the client went away; errors of the
    start (context_too_long, ...) raise, for the door's status code."""
    try:
        async with cancel_when_gone(request, gen.cancel):
            await gen.start()
    except errors.Cancelled:
        return False
    return True
