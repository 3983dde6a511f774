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
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import errors, protocol
from ..engine.backends.base import Message
from ..sessions.store import Session
from .auth import llmws, user_key
from .common import (
    SSE_HEADERS,
    cancel_on_disconnect,
    count_tokens,
    ensure_model,
    make_params,
    normalize_messages,
    remote_model,
    sse,
)

logger = logging.getLogger("llmws.http.stream")

router = APIRouter(tags=["nash-llm-server (SSE)"], dependencies=[Depends(user_key)])

#: Warn when a conversation grows past this many messages (summarizing helps).
MAX_MESSAGES_WARN = 50
#: Warn when the prompt uses more than this share of the model's context.
NEAR_LIMIT_SHARE = 0.75
SUMMARY_SYSTEM = (
    "You summarize conversations. Keep names, facts, numbers, decisions and open "
    "questions. Write a short paragraph."
)


class StreamRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]] = Field(..., min_length=1, max_length=10_000)
    model: str | None = Field(None, max_length=1024)
    session_id: str | None = Field(None, max_length=128)
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)


class SummarizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)
    session_id: str | None = Field(None, max_length=128)
    max_tokens: int | None = Field(None, ge=8, le=4096)


SUMMARIZE_SUGGESTION = (
    "Summarize the conversation (POST /v1/chat/summarize) and continue with the shorter history."
)


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


def limits_warning(n_messages: int, tokens_in: int, dropped: int, max_context: int | None) -> dict[str, Any] | None:
    """The warning for a conversation near or over the limits, with a suggestion."""
    base = {"messages": n_messages, "tokens": tokens_in, "max_context": max_context, "suggestion": SUMMARIZE_SUGGESTION}
    if dropped:
        fields = {
            "code": "history_truncated",
            "message": f"The conversation does not fit the model's context; the oldest {dropped} messages were left out of this reply.",
            "dropped_messages": dropped, **base,
        }
    elif max_context and tokens_in >= NEAR_LIMIT_SHARE * max_context:
        share = round(100 * tokens_in / max_context)
        fields = {
            "code": "context_near_limit",
            "message": f"The conversation uses {share}% of the model's context ({tokens_in} of {max_context} tokens).",
            **base,
        }
    elif n_messages > MAX_MESSAGES_WARN:
        fields = {
            "code": "too_many_messages",
            "message": f"The conversation has {n_messages} messages (more than {MAX_MESSAGES_WARN}).",
            **base,
        }
    else:
        return None
    return nash_warning(fields, n_messages, tokens_in, max_context)


def session_backed(request: Request, session_id: str | None) -> Session | None:
    """The LLMWS session a request names, if it exists (else the stream is stateless)."""
    if not session_id:
        return None
    app = llmws(request)
    if not app.store.exists(session_id):
        return None
    try:
        session, resumed, _ = app.chat.open_session(session_id)
    except errors.LLMWSError:
        return None
    return session if resumed else None


@router.post("/v1/chat/completions/stream", summary="Streaming chat (nash-llm-server SSE protocol)")
async def chat_stream(
    body: StreamRequest,
    request: Request,
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
) -> StreamingResponse:
    """Stream a reply as SSE. Stateless unless `session_id` names an LLMWS session;
    then `Last-Event-ID` resumes the session's stream instead of asking again."""
    await ensure_model(request, body.model)
    session = session_backed(request, body.session_id)
    if session is not None:
        after = _seq(last_event_id)
        if after is None:
            # Events after this seq belong to the new job: tail from here, so none is missed.
            start = session.last_seq
            rid = _submit(request, session, body)
            source = tail_session(request, session, start, rid)
        else:
            source = tail_session(request, session, after, None)
        return StreamingResponse(source, media_type="text/event-stream", headers=SSE_HEADERS)
    sid = body.session_id or str(uuid.uuid4())
    messages = normalize_messages(body.messages)
    params = make_params(
        request, temperature=body.temperature, top_p=body.top_p, max_new_tokens=body.max_tokens,
        stop=body.stop, seed=body.seed,
    )
    cancel = threading.Event()
    return StreamingResponse(
        cancel_on_disconnect(
            request, stateless_stream(request, sid, messages, params, cancel, remote_model(request, body.model)), cancel
        ),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


async def stateless_stream(
    request: Request, sid: str, messages: list[Message], params: Any, cancel: threading.Event, model: str | None = None
) -> AsyncIterator[str]:
    app = llmws(request)
    n = 0

    def event(data: Any) -> str:
        nonlocal n
        n += 1
        return sse(data, event_id=n)

    yield event({"session_id": sid})
    # nash's clients stop reading at a warning, so it follows the reply's text: a
    # client that stops there has the whole reply already.
    warning = None
    try:
        async for chunk in app.chat.generate(messages, params, cancel=cancel, trim_history=True, model=model):
            if chunk.result is not None:
                break
            if chunk.text:
                yield event({"content": chunk.text})
            else:
                warning = limits_warning(len(messages), chunk.tokens_in, chunk.dropped_messages, app.models.max_context)
    except Exception as exc:
        yield event({"error": errors.to_wire(exc)["message"]})
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


def _submit(request: Request, session: Session, body: StreamRequest) -> str:
    """Submit the new turn as a job of `session`; the session's history is the context.

    From `messages`, only what follows the last assistant message is new (a client
    of the stateless protocol sends the whole history each time); a system message
    sets this reply's system prompt."""
    msgs = normalize_messages(body.messages)
    last_assistant = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
    system = [m for m in msgs if m["role"] == "system"][:1]
    turn = [m for m in msgs[last_assistant + 1 :] if m["role"] != "system"]
    if not turn:
        raise errors.BadRequest("messages must end with a new user message.")
    config = {
        k: v for k, v in {
            "temperature": body.temperature, "top_p": body.top_p, "max_new_tokens": body.max_tokens,
            "stop": body.stop, "seed": body.seed,
        }.items() if v is not None
    }
    msg = protocol.Inference(
        type="inference",
        messages=[protocol.ChatMessage(**m) for m in system + turn],
        config=protocol.GenerationConfig(**config) if config else None,
        on_disconnect="continue",
        model=remote_model(request, body.model),
    )
    job = llmws(request).chat.submit(session, msg)
    return job.request_id


FOLLOWED_TYPES = frozenset({"start", "token", "warning", "stage", "done", "error"})


async def tail_session(request: Request, session: Session, after_seq: int, rid: str | None) -> AsyncIterator[str]:
    """Replay the session's events after `after_seq`, then tail live ones, as nash
    chunks with `id: <seq>`, until the followed request is done (or failed).

    `rid` None (a resume) follows the request the first replayed event belongs to,
    or the session's running job."""
    chat = llmws(request).chat
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    backlog = chat.subscribe(session, after_seq, queue.put_nowait)
    try:
        if rid is None:
            rid = next((e.get("request_id") for e in backlog if e.get("type") in FOLLOWED_TYPES and e.get("request_id")), None)
        if rid is None:
            running = list(chat.jobs.get(session.id, {}))
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
        chat.unsubscribe(session, queue.put_nowait)


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
    return StreamingResponse(tail_session(request, session, start, None), media_type="text/event-stream", headers=SSE_HEADERS)


# ---------------------------------------------------------------------- summarize


def transcript(messages: list[Message]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages if m["role"] != "system")


@router.post("/v1/chat/summarize", summary="Summarize a conversation into a shorter history")
async def summarize(body: SummarizeRequest, request: Request) -> dict[str, Any]:
    """Summarize `messages` (or, for an LLMWS session with no messages given, its
    history, which is then replaced) into a shorter replacement history that keeps
    the system message. `token_reduction` holds real tokenizer counts."""
    app = llmws(request)
    session = session_backed(request, body.session_id)
    sid = body.session_id or str(uuid.uuid4())
    if body.messages:
        messages = normalize_messages(body.messages)
    elif session is not None:
        system = app.chat.effective_config(session).get("system")
        messages = ([{"role": "system", "content": system}] if system else []) + list(session.state.get("history", []))
    else:
        raise errors.BadRequest("messages must not be empty.")
    if not any(m["role"] != "system" for m in messages):
        raise errors.BadRequest("There is no conversation to summarize.")
    before = await count_tokens(request, messages)
    text = transcript(messages)
    max_ctx = app.models.max_context or 2048
    budget = body.max_tokens or max(32, min(512, before // 3))
    room = max_ctx - budget - 128
    if before > room:  # keep the most recent part of a transcript that does not fit
        text = text[-max(256, int(len(text) * room / before)) :]
    prompt = [
        {"role": "system", "content": SUMMARY_SYSTEM},
        {"role": "user", "content": f"Summarize this conversation:\n\n{text}"},
    ]
    params = make_params(request, max_new_tokens=budget, temperature=0.0, stop=None, seed=0)
    parts: list[str] = []
    cancel = threading.Event()
    async for chunk in app.chat.generate(prompt, params, cancel=cancel, trim_history=False):
        if chunk.text:
            parts.append(chunk.text)
    summary = "".join(parts).strip()
    if not summary:
        raise errors.GenerationError("The model returned an empty summary.")
    new_messages: list[Message] = [m for m in messages if m["role"] == "system"][:1]
    new_messages.append({"role": "assistant", "content": f"Summary of the conversation so far: {summary}"})
    after = await count_tokens(request, new_messages)
    if session is not None and not body.messages:
        session.state["history"] = [m for m in new_messages if m["role"] != "system"]
        await session.save_state_async()
    return {
        "success": True,
        "summary": summary,
        "messages": new_messages,
        "token_reduction": {"before": before, "after": after},
        "session_id": sid,
    }
