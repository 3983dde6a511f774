"""nash-llm-server's protocol: `POST /v1/chat/completions/stream` and `POST /v1/chat/summarize`.

The stream is stateless by default, as nash-llm-server was: the history comes with
each call, and `session_id` is only echoed (a new one when none is given):

    data: {"session_id": "..."}
    data: {"content": "..."}            (repeated)
    data: {"warning": {...}}            (near or over the limits)
    data: {"error": "..."}              (on failure)
    data: {"session_id": "..."}
    data: [DONE]

When `session_id` names an LLMWS session (one the WebSocket door or the web client
made), the stream is *session-backed*: the reply is a job of that session, its
events are sealed in the session's buffer, and every SSE event carries `id: <seq>`.
A client that drops and re-sends the request with `Last-Event-ID` (or GETs
`/v1/sessions/{id}/events`) resumes without losing or repeating a token; the job
itself runs on when the client goes away, as on the WebSocket.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import errors, protocol
from ..security import key_owner
from ..services.generation import (
    MAX_MESSAGES_WARN,
    ErrorEvent,
    Generation,
    Sampling,
    TokenEvent,
    WarningEvent,
    render_messages,
)
from ..sessions.store import Session
from .auth import given_key, is_admin, llmws, principal, user_key
from .common import (
    SSE_HEADERS,
    cancel_when_gone,
    generation,
    normalize_messages,
    sampling_request,
    sse,
)

logger = logging.getLogger("llmws.http.nash")

router = APIRouter(tags=["nash-llm-server (SSE)"], dependencies=[Depends(user_key)])


class StreamRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]] = Field(..., min_length=1, max_length=10_000)
    model: str | None = Field(None, max_length=1024)
    session_id: str | None = Field(None, max_length=128)
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=protocol.MAX_NEW_TOKENS)
    stop: list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)

    _numbers = field_validator("temperature", "top_p", "max_tokens", "seed", mode="before")(protocol.not_a_boolean)


class SummarizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)
    session_id: str | None = Field(None, max_length=128)
    max_tokens: int | None = Field(None, ge=8, le=4096)


SUMMARIZE_SUGGESTION = "Summarize the conversation (POST /v1/chat/summarize) and continue with the shorter history."


def nash_warning(
    fields: dict[str, Any], n_messages: int | None, tokens_in: int | None, max_context: int | None
) -> dict[str, Any]:
    """A warning in nash-llm-server's shape, which its clients index directly:
    `{"warning": str, "suggestions": [str], "details": {"message_count",
    "estimated_tokens", "limits": {"max_messages", "max_tokens"}}}`; LLMWS's own fields
    (`code`, `message`, ...) ride along."""
    return {
        **fields,
        "warning": str(fields.get("message") or "The conversation is near the model's limits."),
        "suggestions": [SUMMARIZE_SUGGESTION],
        "details": {
            "message_count": n_messages,
            "estimated_tokens": tokens_in,
            "limits": {"max_messages": MAX_MESSAGES_WARN, "max_tokens": max_context},
        },
    }


def session_backed(request: Request, session_id: str | None) -> Session | None:
    """The LLMWS session a request names, if it exists (else the stream is stateless)."""
    if not session_id:
        return None
    app = llmws(request)
    sec = app.settings.security
    owner = key_owner(given_key(request), [*sec.api_keys, *sec.admin_keys])
    return app.sessions.find(session_id, owner)


@router.post("/v1/chat/completions/stream", summary="Streaming chat (nash-llm-server SSE protocol)")
async def chat_stream(
    body: StreamRequest,
    request: Request,
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
) -> StreamingResponse:
    """Stream a reply as SSE. Stateless unless `session_id` names an LLMWS session;
    then `Last-Event-ID` resumes the session's stream instead of asking again."""
    remote = await llmws(request).models.serve_request_model(body.model, may_switch=is_admin(request))
    session = session_backed(request, body.session_id)
    if session is not None:
        after = _seq(last_event_id)
        if after is None:
            # Events after this seq belong to the new job: tail from here, so none is missed.
            start = session.last_seq
            rid = _submit(request, session, body, remote)
            source = tail_session(request, session, start, rid)
        else:
            source = tail_session(request, session, after, None)
        return StreamingResponse(source, media_type="text/event-stream", headers=SSE_HEADERS)
    sid = body.session_id or str(uuid.uuid4())
    gen = generation(request).prepare(
        sampling_request(
            request,
            normalize_messages(body.messages),
            sampling=Sampling(
                temperature=body.temperature,
                top_p=body.top_p,
                max_tokens=body.max_tokens,
                stop=body.stop,
                seed=body.seed,
            ),
            # Served per request when it names a remote model; the local switch is done above.
            model=remote,
            keep_reply_room=True,
        )
    )
    return StreamingResponse(stateless_stream(request, sid, gen), media_type="text/event-stream", headers=SSE_HEADERS)


async def stateless_stream(request: Request, sid: str, gen: Generation) -> AsyncIterator[str]:
    n = 0

    def event(data: Any) -> str:
        nonlocal n
        n += 1
        return sse(data, event_id=n)

    yield event({"session_id": sid})
    # nash's clients stop reading at a warning, so it follows the reply's text: a
    # client that stops there has the whole reply already.
    warning = None
    async with gen, cancel_when_gone(request, gen.cancel):
        try:
            await gen.start()
        except Exception as exc:
            yield event({"error": ErrorEvent.of(exc).message})
        else:
            async for ev in gen:
                if isinstance(ev, TokenEvent):
                    yield event({"content": ev.text})
                elif isinstance(ev, WarningEvent):
                    d = ev.details
                    warning = nash_warning(ev.body(), d.get("messages"), d.get("tokens"), d.get("max_context"))
                elif isinstance(ev, ErrorEvent):
                    yield event({"error": ev.message})
    if warning:
        yield event({"warning": warning})
    yield event({"session_id": sid})
    yield sse("[DONE]")


# ---------------------------------------------------------------------- session-backed


def _seq(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        seq = int(value)
    except ValueError:
        raise errors.BadRequest("Last-Event-ID must be an event id from this stream.") from None
    if seq < 0:
        raise errors.BadRequest("Last-Event-ID must be an event id from this stream.")
    return seq


def _submit(request: Request, session: Session, body: StreamRequest, remote: str | None) -> str:
    """Submit the new turn as a job of `session`; the session's history is the context.

    From `messages`, only what follows the last assistant message is new (a client
    of the stateless protocol sends the whole history each time); a system message
    sets this reply's system prompt."""
    msgs = render_messages(normalize_messages(body.messages))
    last_assistant = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
    system = [m for m in msgs if m["role"] == "system"][:1]
    turn = [m for m in msgs[last_assistant + 1 :] if m["role"] != "system"]
    if not turn:
        raise errors.BadRequest("messages must end with a new user message.")
    config = {
        k: v
        for k, v in {
            "temperature": body.temperature,
            "top_p": body.top_p,
            "max_new_tokens": body.max_tokens,
            "stop": body.stop,
            "seed": body.seed,
        }.items()
        if v is not None
    }
    msg = protocol.Inference(
        type="inference",
        messages=[protocol.ChatMessage(**m) for m in system + turn],
        config=protocol.GenerationConfig(**config) if config else None,
        on_disconnect="continue",
        model=remote,
    )
    return llmws(request).sessions.submit(session, msg)


FOLLOWED_TYPES = frozenset({"start", "token", "warning", "stage", "done", "error"})


async def tail_session(request: Request, session: Session, after_seq: int, rid: str | None) -> AsyncIterator[str]:
    """Replay the session's events after `after_seq`, then tail live ones, as nash
    chunks with `id: <seq>`, until the followed request is done (or failed).

    `rid` None (a resume) follows the request the first replayed event belongs to,
    or the session's running job."""
    sessions = llmws(request).sessions
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    backlog = sessions.subscribe(session, after_seq, queue.put_nowait)
    try:
        if rid is None:
            rid = next(
                (e.get("request_id") for e in backlog if e.get("type") in FOLLOWED_TYPES and e.get("request_id")), None
            )
        if rid is None:
            running = sessions.running(session)
            rid = running[0] if running else None
        yield sse({"session_id": session.id})
        last = after_seq
        pending = list(backlog)
        held: list[dict[str, Any]] = []
        while rid is not None:
            if pending:
                event = pending.pop(0)
            else:
                event = await queue.get()
            seq = event.get("seq")
            if seq is not None:
                if seq <= last:
                    continue
                last = seq
            if event.get("request_id") != rid:
                continue
            kind = event.get("type")
            if kind == "token":
                yield sse({"content": event.get("data", "")}, event_id=seq)
            elif kind == "warning":  # held until the reply's text is out (see stateless_stream)
                fields = {k: v for k, v in event.items() if k not in ("type", "seq", "request_id")}
                held.append({"warning": nash_warning(fields, None, None, llmws(request).models.max_context)})
            elif kind == "error":
                yield sse({"error": event.get("message", "The request failed.")}, event_id=seq)
                break
            elif kind == "done":
                for body in held:  # no id: ids stay in order for Last-Event-ID
                    yield sse(body)
                yield sse({"session_id": session.id}, event_id=seq)
                yield sse("[DONE]")
                return
        yield sse({"session_id": session.id})
        yield sse("[DONE]")
    finally:
        sessions.unsubscribe(session, queue.put_nowait)


@router.get("/v1/sessions/{session_id}/events", summary="Resume a session-backed stream (SSE)")
async def session_events(
    session_id: str,
    request: Request,
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
    after: int | None = Query(None, ge=0, description="Resume after this event id (when no Last-Event-ID header)."),
) -> StreamingResponse:
    """Replay a session's reply after `Last-Event-ID` (EventSource sends it on
    reconnect) or `?after=`, then tail it live until it is done."""
    session = session_backed(request, session_id)
    if session is None:
        raise errors.SessionNotFound("No session with that id exists.")
    start = _seq(last_event_id)
    if start is None:
        start = after if after is not None else session.acked_seq
    return StreamingResponse(
        tail_session(request, session, start, None), media_type="text/event-stream", headers=SSE_HEADERS
    )


# ---------------------------------------------------------------------- summarize


@router.post("/v1/chat/summarize", summary="Summarize a conversation into a shorter history")
async def summarize(body: SummarizeRequest, request: Request) -> dict[str, Any]:
    """Summarize `messages` (or, for an LLMWS session with no messages given, its
    history, which is then replaced) into a shorter replacement history that keeps
    the system message. `token_reduction` holds real tokenizer counts."""
    sessions = llmws(request).sessions
    session = session_backed(request, body.session_id)
    sid = body.session_id or str(uuid.uuid4())
    if body.messages:
        messages = normalize_messages(body.messages)
    elif session is not None:
        messages = sessions.conversation(session)
    else:
        raise errors.BadRequest("messages must not be empty.")
    result = await generation(request).summarize(messages, max_tokens=body.max_tokens, principal=principal(request))
    if session is not None and not body.messages:
        await sessions.replace_history(session, result.messages)
    return {
        "success": True,
        "summary": result.summary,
        "messages": result.messages,
        "token_reduction": {"before": result.tokens_before, "after": result.tokens_after},
        "session_id": sid,
    }
