"""Helpers every HTTP surface shares: SSE framing, cancel-on-disconnect, error bodies.

Each surface module (openai, legacy, stream, blocking, mcp, metrics) stays a thin
adapter: it turns its wire shape into chat-service calls and back, with these helpers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from .. import errors, protocol
from ..engine.backends.base import GenerationParams, Message
from .auth import llmws, principal

logger = logging.getLogger("llmws.http")

#: How often a streaming route checks whether its client went away (seconds).
DISCONNECT_POLL = 0.25

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

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


def status_of(exc: BaseException) -> int:
    return exc.http_status if isinstance(exc, errors.LLMWSError) else 500


def openai_error(exc: BaseException) -> dict[str, Any]:
    """An OpenAI error object for any exception (user-safe text only)."""
    wire = errors.to_wire(exc)
    status = status_of(exc)
    body: dict[str, Any] = {
        "message": wire["message"],
        "type": OPENAI_ERROR_TYPES.get(status, "server_error"),
        "param": None,
        "code": wire["code"],
    }
    for key in ("max_context", "input_length"):
        if key in wire:
            body[key] = wire[key]
    return {"error": body}


def message_text(content: Any) -> str:
    """Flatten OpenAI message content (a string or a list of parts) into text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text"):
                parts.append(str(part.get("text") or ""))
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise errors.Unsupported("Only text message content is supported by this server.")
        return "".join(parts)
    raise errors.BadRequest("A message's content must be a string or a list of text parts.")


def normalize_messages(raw: list[dict[str, Any]]) -> list[Message]:
    """OpenAI messages into the {role, content} shape every chat template accepts.

    Tool traffic is rendered as text in the Hermes/Qwen convention (an assistant's
    calls as `<tool_call>` blocks, a tool's result as a user turn wrapped in
    `<tool_response>`), so templates without tool support still see it."""
    out: list[Message] = []
    for m in raw:
        if not isinstance(m, dict) or "role" not in m:
            raise errors.BadRequest("Each message needs a role.")
        role = m["role"]
        text = message_text(m.get("content"))
        if role == "developer":
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list) or not all(
                isinstance(c, dict) and isinstance(c.get("function") or {}, dict) for c in m["tool_calls"]
            ):
                raise errors.BadRequest("An assistant message's tool_calls must be a list of {type, function} objects.")
            calls = []
            for call in m["tool_calls"]:
                fn = call.get("function") or {}
                args = fn.get("arguments") or "{}"
                try:
                    args_obj = json.loads(args) if isinstance(args, str) else args
                except ValueError:
                    args_obj = args
                calls.append("<tool_call>" + json.dumps({"name": fn.get("name"), "arguments": args_obj}) + "</tool_call>")
            text = (text + "\n" if text else "") + "\n".join(calls)
        elif role in ("tool", "function"):
            role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
        elif role not in ("system", "user", "assistant"):
            raise errors.BadRequest(f"Unknown message role {str(role)[:32]!r}.")
        if not protocol.is_unicode(text):  # refused before a stream starts, not inside it
            raise errors.BadRequest(protocol.LONE_SURROGATE_MESSAGE)
        out.append({"role": role, "content": text})
    if not out:
        raise errors.BadRequest("messages must not be empty.")
    return out


def make_params(request: Request, **override: Any) -> GenerationParams:
    """Generation parameters: server defaults under the request's own values.

    The cache key is the caller's principal, so its prompt prefixes (restore_cache,
    a growing conversation) are reused for it and for nobody else."""
    chat = llmws(request).chat
    params = chat.params_from(chat.effective_config(None, override))
    params.cache_key = principal(request)
    return params


async def count_tokens(request: Request, messages: list[Message]) -> int:
    """Real prompt tokens of `messages` under the loaded model's chat template."""
    backend = llmws(request).models.backend
    if backend is None:
        raise errors.ModelNotLoaded("No model is loaded yet.")
    return await asyncio.to_thread(backend.count_tokens, messages)


#: Generations whose client left, finishing in the background (kept from the GC).
_orphans: set[asyncio.Task[None]] = set()


@contextlib.asynccontextmanager
async def watch_disconnect(request: Request, cancel: threading.Event) -> AsyncIterator[None]:
    """Set `cancel` if the client goes away while the body of this block runs.

    Races the work against `request.is_disconnected()` (Starlette's pattern): the
    model stops within one token even while waiting for the queue or a token."""

    async def watch() -> None:
        while not cancel.is_set():
            if await request.is_disconnected():
                logger.info("client of %s went away: cancelling its generation", request.url.path)
                cancel.set()
                return
            await asyncio.sleep(DISCONNECT_POLL)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


async def cancel_on_disconnect(
    request: Request, source: AsyncIterator[str], cancel: threading.Event
) -> AsyncIterator[str]:
    """Yield from `source`, cancelling the generation if the client goes away.

    `source` runs in its own task, so a response task cancelled by the server (the
    client closed the connection) never interrupts the generation half-way: it sets
    `cancel`, and the generation ends through its normal path (finish_reason
    "cancelled", metrics recorded, the model released) in the background."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    end = object()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except BaseException as exc:  # handed to the consumer, re-raised there
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(end)

    task = asyncio.create_task(pump())
    _orphans.add(task)
    task.add_done_callback(_orphans.discard)
    try:
        async with watch_disconnect(request, cancel):
            while True:
                item = await queue.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        cancel.set()  # harmless after a normal end; stops the model after an abrupt one


async def ensure_model(request: Request, name: str | None) -> None:
    """Serve the model a request names, switching to it if it is a local model.

    Names that are no local model (an SDK's default "gpt-4o", say) are served by the
    loaded model, as llama.cpp's server and LM Studio do. Switching needs the admin
    key when admin keys exist."""
    from .auth import is_admin  # local: auth imports this module's siblings only

    if not name:
        return
    app = llmws(request)
    if app.models.is_remote(name):
        return  # served per request by its LiteLLM backend (see `remote_model`), no switch
    current = app.models.entry
    if current is not None and name in (current.name, current.rel_path):
        return
    try:
        entry = await asyncio.to_thread(app.models.resolve, name)
    except (errors.ModelNotFound, errors.Forbidden):
        return
    if current is not None and entry.path == current.path:
        return
    if not is_admin(request):
        raise errors.Forbidden("Switching the model needs the admin key.")
    logger.info("request names %s: switching the model", entry.name)
    await app.models.load(entry)


def remote_model(request: Request, name: str | None) -> str | None:
    """`name` if it is a configured remote model (passed to `ChatService.generate(model=)`), else None."""
    return name if name and llmws(request).models.is_remote(name) else None


async def first_chunk(request: Request, agen: AsyncIterator[Any], cancel: threading.Event) -> Any:
    """Start a generation and wait for its first chunk (the prompt fits and the model
    is ours), so errors such as context_too_long still get a proper HTTP status.

    Gives up (returns None, cancelling the wait) if the client leaves while queued."""

    async def gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL)

    nxt: asyncio.Future[Any] = asyncio.ensure_future(agen.__anext__())
    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if nxt in done:
        return nxt.result()
    cancel.set()
    nxt.cancel()
    with contextlib.suppress(BaseException):
        await nxt
    return None
