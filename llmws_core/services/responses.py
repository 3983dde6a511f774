"""Stored, resumable responses (OpenAI's Responses API) on the sealed session store.

A response is a session of the store whose buffer holds the response's stream
events (`response.created`, `response.output_text.delta`, ..., `response.completed`)
and whose state holds the response object, its input items, its owner and the
conversation so far. Its generation is a job that runs on the generation service,
as every door's does, and writes each event into the session (sealed, handed to
the OS) before any reader sees it; readers tail the session. So:

- a response is retrievable, polled or streamed, while it runs and after it ended;
- a stream read from any point (`starting_after`) replays exactly the stored events
  after it and then the live ones, with no gap and no repeat (the seq of an event
  is its `sequence_number` + 1);
- after a SIGKILL and restart a stored response is found on disk: complete if it
  completed, otherwise closed out as `incomplete` (reason "interrupted") with the
  output it had;
- it expires with the sessions' TTL and lives nowhere else, never in plaintext.

`previous_response_id` continues the conversation that response ended: its state
keeps the messages (without the instructions, which OpenAI does not carry over), so
the next prompt starts with the same tokens and the model's prompt cache reuses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import errors
from ..chat import RESPONSE_STATE, Job
from .generation import (
    ChatMessage,
    DoneEvent,
    ErrorEvent,
    Generation,
    GenerationRequest,
    GenerationService,
    TokenEvent,
    ToolCallEvent,
)
from .tools import ToolCall

if TYPE_CHECKING:
    from ..chat import ChatService
    from ..sessions.store import Session

logger = logging.getLogger("llmws.services.responses")

ID_PREFIX = "resp_"
#: The state key that marks a session as a stored response (the WebSocket door never
#: resumes such a session, broadcasts skip it).
STATE_KEY = RESPONSE_STATE
#: Events after which a response's stream ends.
FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed", "response.cancelled"})
RUNNING = frozenset({"queued", "in_progress"})
INTERRUPTED = {"reason": "interrupted"}
_NOT_FOUND = "No response with that id exists."


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def session_of(response_id: str) -> str | None:
    """The session id behind a response id (`resp_` + the session's 32 hex digits)."""
    if not isinstance(response_id, str) or not response_id.startswith(ID_PREFIX):
        return None
    digits = response_id[len(ID_PREFIX) :]
    if len(digits) != 32:
        return None
    try:
        return str(uuid.UUID(hex=digits))
    except ValueError:
        return None


def response_id_of(session_id: str) -> str:
    return ID_PREFIX + uuid.UUID(session_id).hex


def wire(event: dict[str, Any]) -> dict[str, Any]:
    """A stored event as the client sees it: its seq becomes `sequence_number` (from 0)."""
    out = {k: v for k, v in event.items() if k != "seq"}
    out["sequence_number"] = int(event["seq"]) - 1
    return out


def usage(tokens_in: int, tokens_out: int) -> dict[str, Any]:
    return {
        "input_tokens": tokens_in,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": tokens_out,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": tokens_in + tokens_out,
    }


def output_messages(output: list[dict[str, Any]]) -> list[ChatMessage]:
    """A response's output items as the conversation's assistant message."""
    text = "".join(
        part.get("text", "")
        for item in output
        if item.get("type") == "message"
        for part in item.get("content", [])
        if part.get("type") == "output_text"
    )
    calls = [
        {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}
        for item in output
        if item.get("type") == "function_call"
    ]
    if not text and not calls:
        return []
    message: ChatMessage = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    return [message]


def accumulate(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output items stored events describe (what a client that read them has)."""
    items: dict[int, dict[str, Any]] = {}
    for ev in events:
        kind, index = ev.get("type"), ev.get("output_index")
        if not isinstance(index, int):
            continue
        if kind in ("response.output_item.added", "response.output_item.done"):
            items[index] = _copy_item(ev["item"])
        elif kind == "response.content_part.added" and index in items:
            items[index].setdefault("content", []).append(dict(ev["part"]))
        elif kind == "response.output_text.delta" and index in items:
            parts = items[index].get("content") or []
            if parts:
                parts[-1]["text"] = parts[-1].get("text", "") + ev.get("delta", "")
        elif kind == "response.function_call_arguments.delta" and index in items:
            items[index]["arguments"] = items[index].get("arguments", "") + ev.get("delta", "")
    return [items[i] for i in sorted(items)]


class _Builder:
    """Turns the generation service's events into Responses stream events and keeps
    the output items they describe."""

    def __init__(self) -> None:
        self.output: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None
        self._text: list[str] = []

    def text(self, delta: str) -> list[dict[str, Any]]:
        events = []
        if self._message is None:
            self._message = {
                "id": _item_id("msg"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self.output.append(self._message)
            index = len(self.output) - 1
            events.append(
                {"type": "response.output_item.added", "output_index": index, "item": dict(self._message, content=[])}
            )
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self._message["content"].append(part)
            events.append(
                {
                    "type": "response.content_part.added",
                    "item_id": self._message["id"],
                    "output_index": index,
                    "content_index": 0,
                    "part": dict(part),
                }
            )
        if delta:
            self._text.append(delta)
            self._message["content"][0]["text"] = "".join(self._text)
            events.append(
                {
                    "type": "response.output_text.delta",
                    "item_id": self._message["id"],
                    "output_index": self.output.index(self._message),
                    "content_index": 0,
                    "delta": delta,
                    "logprobs": [],
                }
            )
        return events

    def close_message(self, final: str | None = None, status: str = "completed") -> list[dict[str, Any]]:
        """End the open message item; `final` is the reply's whole text (the part not
        streamed yet, if any, goes out as one last delta)."""
        streamed = "".join(self._text)
        events: list[dict[str, Any]] = []
        if final and self._message is None:
            events += self.text(final)
        elif final and final != streamed and final.startswith(streamed):
            events += self.text(final[len(streamed) :])
        message = self._message
        if message is None:
            return events
        self._message = None
        part = message["content"][0]
        if final is not None and final != part["text"]:
            part["text"] = final
        index = self.output.index(message)
        message["status"] = status
        events += [
            {
                "type": "response.output_text.done",
                "item_id": message["id"],
                "output_index": index,
                "content_index": 0,
                "text": part["text"],
                "logprobs": [],
            },
            {
                "type": "response.content_part.done",
                "item_id": message["id"],
                "output_index": index,
                "content_index": 0,
                "part": dict(part),
            },
            {"type": "response.output_item.done", "output_index": index, "item": _copy_item(message)},
        ]
        return events

    def calls(self, calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
        events = self.close_message()
        for call in calls:
            item = {
                "id": _item_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": call.id,
                "name": call.name,
                "arguments": "",
            }
            self.output.append(item)
            index = len(self.output) - 1
            events.append({"type": "response.output_item.added", "output_index": index, "item": dict(item)})
            item["arguments"] = call.arguments_json
            events.append(
                {
                    "type": "response.function_call_arguments.delta",
                    "item_id": item["id"],
                    "output_index": index,
                    "delta": call.arguments_json,
                }
            )
            item["status"] = "completed"
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "name": call.name,
                    "arguments": call.arguments_json,
                }
            )
            events.append({"type": "response.output_item.done", "output_index": index, "item": dict(item)})
        return events


def _copy_item(item: dict[str, Any]) -> dict[str, Any]:
    if item.get("type") == "message":
        return dict(item, content=[dict(p) for p in item.get("content", [])])
    return dict(item)


@dataclass
class NewResponse:
    """A response to create, as the door parsed it."""

    #: The response object's fields that come from the request (model, instructions,
    #: tools, text, metadata, ...), in OpenAI's shape.
    head: dict[str, Any]
    #: The input items (each with its id), as `input_items` lists them.
    input_items: list[dict[str, Any]]
    #: The new turn's messages; the previous response's conversation goes before them.
    request: GenerationRequest
    instructions: str | None = None
    previous_response_id: str | None = None
    background: bool = False
    store: bool = True


@dataclass
class _Job:
    response_id: str
    session: Session
    gen: Generation
    builder: _Builder = field(default_factory=_Builder)
    task: asyncio.Task[None] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: bool = False


class ResponseService:
    """Create, run, read, stream, cancel and delete stored responses."""

    def __init__(self, generation: GenerationService, chat: ChatService) -> None:
        self._generation = generation
        self._chat = chat
        self._store = chat.store
        self._jobs: dict[str, _Job] = {}

    # ------------------------------------------------------------------ reading

    def _session(self, response_id: str, owner: str) -> Session:
        """The response's session; NotFound for an unknown id or another owner's."""
        sid = session_of(response_id)
        if sid is None:
            raise errors.NotFound(_NOT_FOUND)
        try:
            session = self._store.get(sid)
        except (errors.SessionNotFound, errors.CorruptRecord):
            raise errors.NotFound(_NOT_FOUND) from None
        state = session.state
        if STATE_KEY not in state or state.get("owner") != owner:
            raise errors.NotFound(_NOT_FOUND)
        return session

    async def _open(self, response_id: str, owner: str) -> Session:
        """`_session` (loading from disk in a worker thread), with a response that a
        restart interrupted closed out first."""
        job = self._jobs.get(response_id)
        if job is not None:  # running: in memory (a store=false one is on disk only meanwhile)
            if job.session.state.get("owner") != owner:
                raise errors.NotFound(_NOT_FOUND)
            return job.session
        session = await asyncio.to_thread(self._session, response_id, owner)
        state = session.state[STATE_KEY]
        if state.get("status") in RUNNING and response_id not in self._jobs:
            await self._close_out(session)
        return session

    def _snapshot(self, session: Session) -> dict[str, Any]:
        response = dict(session.state[STATE_KEY])
        job = self._jobs.get(response["id"])
        if job is not None and response.get("status") in RUNNING:
            response["output"] = [_copy_item(i) for i in job.builder.output]
        return response

    async def get(self, response_id: str, owner: str) -> dict[str, Any]:
        """The response object as it is now (output so far while it runs)."""
        return self._snapshot(await self._open(response_id, owner))

    async def input_items(self, response_id: str, owner: str) -> list[dict[str, Any]]:
        """The response's input items, in the order they were given."""
        session = await self._open(response_id, owner)
        return list(session.state.get("input_items", []))

    async def events(self, response_id: str, owner: str, after: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """The response's stream events with sequence_number > `after` (all: None),
        stored ones first, then live ones, until its last event."""
        session = await self._open(response_id, owner)
        after_seq = 0 if after is None else after + 1
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        backlog = self._chat.subscribe(session, after_seq, queue.put_nowait)
        # Read with the backlog, before any await: the status changes just before the last
        # event is emitted, so a response running now sends that event to the queue.
        running = session.state[STATE_KEY].get("status") in RUNNING
        try:
            last = after_seq
            for event in backlog:
                last = max(last, int(event.get("seq", last)))
                yield wire(event)
                if event.get("type") in FINAL_EVENTS:
                    return
            if not running:
                return  # it ended before `after`
            while True:
                event = await queue.get()
                if int(event.get("seq", 0)) <= last:
                    continue
                last = int(event["seq"])
                yield wire(event)
                if event.get("type") in FINAL_EVENTS:
                    return
        finally:
            self._chat.unsubscribe(session, queue.put_nowait)

    # ------------------------------------------------------------------ creating

    async def create(
        self,
        new: NewResponse,
        owner: str,
        watch: Callable[[Callable[[], None]], AbstractAsyncContextManager[Any]] | None = None,
    ) -> dict[str, Any]:
        """Store a new response and start its generation; returns the response object.

        A background response returns at once (status "queued"); any other returns
        once the model has begun (status "in_progress"), so a request the model cannot
        serve (context_too_long, no model) raises here and nothing is kept.

        `watch(cancel)`: a context in which the caller's going away calls `cancel` (the
        request then leaves the model's queue and `create` raises Cancelled).

        Raises:
            BadRequest: bad input, or a previous response that is unknown or still running.
            LLMWSError: (not background) the model cannot serve the request.
        """
        conversation: list[ChatMessage] = []
        conversation_id = uuid.uuid4().hex
        if new.previous_response_id:
            try:
                previous = await self._open(new.previous_response_id, owner)
            except errors.NotFound:
                raise errors.BadRequest(
                    f"Previous response with id {new.previous_response_id[:64]!r} not found."
                ) from None
            prev = previous.state[STATE_KEY]
            if prev.get("status") in RUNNING:
                raise errors.BadRequest("The previous response is still in progress; wait for it to end.")
            conversation = list(previous.state.get("conversation", []))
            conversation_id = previous.state.get("conversation_id") or conversation_id
        system = [{"role": "system", "content": new.instructions}] if new.instructions else []
        turn = list(new.request.messages)
        new.request.messages = system + conversation + turn
        if new.background:
            new.request.on_disconnect = "continue"
        # Each conversation keeps its own prompt cache (within the owner's): its next
        # turn finds its KV prefix, whatever else the owner asked in between.
        new.request.principal = f"{new.request.principal}/responses/{conversation_id}"
        gen = self._generation.prepare(new.request)  # BadRequest before anything is stored

        session = await asyncio.to_thread(self._store.create)
        rid = response_id_of(session.id)
        response = {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": "queued" if new.background else "in_progress",
            "error": None,
            "incomplete_details": None,
            "output": [],
            "usage": None,
            **new.head,
            "previous_response_id": new.previous_response_id,
            "background": new.background,
            "store": new.store,
        }
        session.state.update(
            {
                STATE_KEY: response,
                "owner": owner,
                "input_items": new.input_items,
                "conversation": conversation + turn,
                "conversation_id": conversation_id,
            }
        )
        job = _Job(rid, session, gen)
        self._jobs[rid] = job
        try:
            self._chat.emit(session, {"type": "response.created", "response": dict(response)})
            if new.background:
                self._chat.emit(session, {"type": "response.queued", "response": dict(response)})
            await session.save_state_async()
            if not new.background:
                async with watch(gen.cancel) if watch is not None else contextlib.nullcontext():
                    await gen.start()
        except BaseException:
            self._jobs.pop(rid, None)
            await gen.close()
            await asyncio.to_thread(self._store.delete, session.id)
            raise
        job.task = asyncio.create_task(self._run(job, started=not new.background))
        self._chat.jobs.setdefault(session.id, {})[rid] = _chat_job(job)
        return self._snapshot(session)

    async def result(self, response_id: str, owner: str) -> dict[str, Any]:
        """The response object once its generation has ended (also for store=false)."""
        job = self._jobs.get(response_id)
        if job is None or job.session.state.get("owner") != owner:
            return await self.get(response_id, owner)
        await job.ended.wait()
        return dict(job.session.state[STATE_KEY])

    async def _stop(self, response_id: str) -> None:
        job = self._jobs.get(response_id)
        if job is not None:
            self.abandon(response_id)
            await job.ended.wait()

    def abandon(self, response_id: str) -> None:
        """The client of a foreground response went away: stop its generation."""
        job = self._jobs.get(response_id)
        if job is not None:
            job.cancel_requested = True
            job.gen.cancel()

    # ------------------------------------------------------------------ running

    async def _run(self, job: _Job, *, started: bool) -> None:
        session, gen, builder = job.session, job.gen, job.builder
        response = session.state[STATE_KEY]
        emit = self._emit_to(session)
        try:
            try:
                if not started:
                    await gen.start()
            except errors.Cancelled:
                await self._finish(job, "cancelled", None, None, None)
                return
            except Exception as exc:  # the model cannot serve it: a failed response
                event = ErrorEvent.of(exc)
                await self._finish(job, "failed", {"code": event.code, "message": event.message}, None, None)
                return
            assert gen.started is not None
            response["model"] = gen.started.model
            response["status"] = "in_progress"
            emit({"type": "response.in_progress", "response": dict(response)})
            async with gen:
                async for ev in gen:
                    if isinstance(ev, TokenEvent):
                        for out in builder.text(ev.text):
                            emit(out)
                    elif isinstance(ev, ToolCallEvent):
                        for out in builder.calls(ev.calls):
                            emit(out)
                    elif isinstance(ev, DoneEvent):
                        await self._done(job, ev)
                        return
                    elif isinstance(ev, ErrorEvent):
                        for out in builder.close_message(status="incomplete"):
                            emit(out)
                        await self._finish(job, "failed", {"code": ev.code, "message": ev.message}, None, None)
                        return
            await self._finish(
                job,
                "failed",
                {"code": "generation_failed", "message": "The generation ended without a result."},
                None,
                None,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store refused: logged; readers see the stream end
            ErrorEvent.of(exc)
            with contextlib.suppress(Exception):
                await self._finish(
                    job, "failed", {"code": "storage_error", "message": "The response could not be stored."}, None, None
                )
            if session.state[STATE_KEY].get("status") in RUNNING:
                session.state[STATE_KEY]["status"] = "failed"
            # Live readers must hear the end even if the disk refused it (not stored).
            self._chat.send_transient(
                session,
                {
                    "type": "response.failed",
                    "response": dict(session.state[STATE_KEY]),
                    "seq": session.last_seq + 1,
                },
            )
        finally:
            self._end(job)

    async def _done(self, job: _Job, done: DoneEvent) -> None:
        emit = self._emit_to(job.session)
        if done.finish_reason == "cancelled":
            status, incomplete = (
                ("cancelled", None) if job.cancel_requested or not self._chat.closing else ("incomplete", INTERRUPTED)
            )
            for out in job.builder.close_message(status="incomplete"):
                emit(out)
        elif done.finish_reason == "length":
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
            for out in job.builder.close_message(done.content, status="incomplete"):
                emit(out)
        else:
            status, incomplete = "completed", None
            for out in job.builder.close_message(done.content):
                emit(out)
        if done.tool_calls and not any(item["type"] == "function_call" for item in job.builder.output):
            # Calls found only in the whole reply (after prose that was already streamed).
            for out in job.builder.calls(done.tool_calls):
                emit(out)
        await self._finish(job, status, None, incomplete, usage(done.tokens_in, done.tokens_out))

    async def _finish(
        self,
        job: _Job,
        status: str,
        error: dict[str, Any] | None,
        incomplete: dict[str, Any] | None,
        used: dict[str, Any] | None,
    ) -> None:
        """Seal the final response into the state and emit the event that ends the stream."""
        session = job.session
        response = session.state[STATE_KEY]
        output = [_copy_item(i) for i in job.builder.output]
        response.update(status=status, error=error, incomplete_details=incomplete, output=output, usage=used)
        session.state["conversation"] = list(session.state.get("conversation", [])) + output_messages(output)
        kind = {
            "completed": "response.completed",
            "incomplete": "response.incomplete",
            "cancelled": "response.cancelled",
        }.get(status, "response.failed")
        emit = self._emit_to(session)
        if error is not None:
            emit({"type": "error", "code": error["code"], "message": error["message"], "param": None})
        emit({"type": kind, "response": dict(response)})
        await session.save_state_async()

    def _end(self, job: _Job) -> None:
        self._jobs.pop(job.response_id, None)
        self._chat.end_job(job.session.id, job.response_id)
        job.ended.set()
        if not job.session.state[STATE_KEY].get("store", True):
            self._spawn_delete(job.session.id)

    def _spawn_delete(self, session_id: str) -> None:
        task = asyncio.create_task(asyncio.to_thread(self._store.delete, session_id))
        self._generation._tasks.add(task)  # kept from the GC until it ends
        task.add_done_callback(self._generation._tasks.discard)

    def _emit_to(self, session: Session) -> Callable[[dict[str, Any]], None]:
        """Seal an event into the response's session and hand it to its readers."""
        chat = self._chat

        def emit(event: dict[str, Any]) -> None:
            chat.emit(session, event)

        return emit

    async def _close_out(self, session: Session) -> None:
        """Close out a response a restart interrupted: what its stored events hold
        becomes its output, status incomplete (reason "interrupted"). A response whose
        last event was stored before the state saying so only takes that event's object."""
        response = session.state[STATE_KEY]
        events = session.replay(0)
        final = next((e for e in reversed(events) if e.get("type") in FINAL_EVENTS), None)
        if final is not None and isinstance(final.get("response"), dict):
            session.state[STATE_KEY] = dict(final["response"])
        else:
            output = accumulate(events)
            for item in output:
                if item.get("status") == "in_progress":
                    item["status"] = "incomplete"
            response.update(status="incomplete", incomplete_details=INTERRUPTED, output=output)
            session.state["conversation"] = list(session.state.get("conversation", [])) + output_messages(output)
            self._chat.emit(session, {"type": "response.incomplete", "response": dict(response)})
            logger.info("response %s: closed out as incomplete after a restart", response.get("id"))
        await session.save_state_async()

    # ------------------------------------------------------------------ cancel, delete

    async def cancel(self, response_id: str, owner: str) -> dict[str, Any]:
        """Stop a running response (status "cancelled"); an ended one is returned as it is."""
        session = await self._open(response_id, owner)
        await self._stop(response_id)
        return self._snapshot(session)

    async def delete(self, response_id: str, owner: str) -> None:
        """Forget a response (cancelled first if it runs): its session is deleted."""
        session = await self._open(response_id, owner)
        await self._stop(response_id)
        await asyncio.to_thread(self._store.delete, session.id)


def _chat_job(job: _Job) -> Job:
    """The chat service's record of a response's job: shutdown drains it like any job,
    and its session is busy (never expired) while it runs."""
    record = Job(job.response_id, job.session.id, job.gen.request.on_disconnect, None, task=job.task)
    record.cancel = job.gen._cancel  # a drain's cancel stops this generation's model
    return record
