"""The chat service: sessions, generation jobs and their events, shared by both doors.

A generation job writes its events into the session (sealed and flushed before
anyone sees them); connected sockets *tail* the session. A dropped client does not
stop the job unless its request said `on_disconnect: "cancel"`; a client that
comes back replays what it missed, then tails live events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import errors, protocol
from .config import Settings
from .engine.backends.base import Backend, GenerationParams, GenerationResult, Message, after_burst
from .engine.manager import ModelManager
from .sessions.store import Session, SessionStore

logger = logging.getLogger("llmws.chat")

# Room kept free for the reply when old turns are dropped to fit the context.
REPLY_RESERVE_TOKENS = 256

#: Most generations running at once across all backends. Each holds a worker thread
#: for its whole length, so they get a pool of their own: in the loop's default pool
#: (cores + 4 threads) the 7th concurrent stream would wait for a free thread, and
#: fsyncs and tokenization would queue behind generations.
GENERATION_THREADS = 256

Subscriber = Callable[[dict[str, Any]], None]

#: The state key of a session that holds a stored response (services/responses.py)
#: rather than a conversation: never resumed as one, never sent broadcasts.
RESPONSE_STATE = "response"

#: Who the current request comes from, for the per-client limit: the door sets it
#: ("<address>|<key digest or none>") when a connection or request starts; tasks it
#: creates (session jobs) inherit it. None: no limit applies (internal work).
CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmws_client", default=None)


class Handoff:
    """Hands items from worker threads to asyncio queues with one loop wake-up per burst.

    A batched decode step emits a token for every running generation within
    microseconds; `call_soon_threadsafe` per token would wake the loop (a pipe
    write and a select) once per token. Here the first item of a burst schedules
    one delivery and the rest ride along; a backend that marks its step's callbacks
    as one `token_burst` has the wake-up wait for the last of them, so the loop
    wakes once per decode step, not once per sequence.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Any], Any]] = []

    def put(self, queue: asyncio.Queue[Any], item: Any) -> None:
        """Any thread: `queue.put_nowait(item)` on the loop, soon, in order."""
        with self._lock:
            self._pending.append((queue, item))
            first = len(self._pending) == 1
        if first and not after_burst(self._wake):
            self._wake()

    def _wake(self) -> None:
        self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for queue, item in items:
            queue.put_nowait(item)


@dataclass
class Job:
    """One inference request of one session."""

    request_id: str
    session_id: str
    on_disconnect: str = "continue"
    origin: object | None = None  # the connection that asked, for on_disconnect
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None
    start_seq: int | None = None
    #: The checked images of the prompt (`images.CheckedImage`), on its user message.
    images: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Chunk:
    """A piece of a stateless generation: text, or the final result."""

    text: str = ""
    #: Tokens whose text `text` holds (more than one when chunks were joined).
    count: int = 1
    result: GenerationResult | None = None
    tokens_in: int = 0
    dropped_messages: int = 0
    #: On the first chunk: whether the serving backend constrains the reply to
    #: `params.grammar` / `params.response_format` (its `supports_grammar`).
    constrained: bool = False


def readable_by(backend: Backend, messages: Sequence[Message]) -> list[Message]:
    """The messages as `backend` reads them: a vision model gets their images; a
    text-only one gets none from earlier turns (a conversation may have begun on a
    vision model), and images in the newest user message are refused.

    Raises:
        Unsupported: the newest user message has images and the model takes text only.
    """
    msgs = list(messages)
    if backend.info.vision or not any(m.get("images") for m in msgs):
        return msgs
    last_user = next((m for m in reversed(msgs) if m.get("role") == "user"), None)
    if last_user is not None and last_user.get("images"):
        raise errors.Unsupported(
            f"The model {backend.info.name} takes text only, so this prompt's images cannot be read; "
            "send it without images or use a vision model."
        )
    return [{k: v for k, v in m.items() if k != "images"} if m.get("images") else m for m in msgs]


class ChatService:
    """Sessions, jobs and the model, behind both the WebSocket and HTTP doors."""

    def __init__(self, settings: Settings, store: SessionStore, models: ModelManager) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.jobs: dict[str, dict[str, Job]] = {}  # session id -> request id -> job
        self._subscribers: dict[str, set[Subscriber]] = {}
        self.metrics = Metrics()
        self.closing = False
        self._pool = concurrent.futures.ThreadPoolExecutor(GENERATION_THREADS, thread_name_prefix="llmws-gen")
        self._handoff: Handoff | None = None
        self._per_client: dict[str, int] = {}  # client -> generations waiting or running
        #: Sessions deleted while connections to them stay open: they take no new jobs.
        self.deleted: set[str] = set()

    # ------------------------------------------------------------------ sessions

    def open_session(
        self, session_id: str | None, owner: str | None = None, *, null_origin: bool = False
    ) -> tuple[Session, bool, str | None]:
        """Return (session, resumed, notice). An unknown id is never silently swapped:
        a new session is made and the notice says why.

        `owner` is who asks (`ws.key_owner`: a digest of a valid API key; None: no
        key). A session created with a key can be resumed only with that key; asked
        for by anyone else it reads as unknown, so its existence is not revealed.

        `null_origin`: the peer is a page opened from disk or a sandboxed frame
        (`Origin: null`, which any web site can produce); it may resume only sessions
        that such peers created, never a conversation started elsewhere."""
        if session_id is None:
            return self._new_session(owner, null_origin), False, None
        unknown = "No session with that id exists; a new one was started."
        try:
            session = self.store.get(session_id)
        except errors.SessionExpired:
            return self._new_session(owner, null_origin), False, "That session expired; a new one was started."
        except errors.SessionNotFound:
            return self._new_session(owner, null_origin), False, unknown
        except errors.CorruptRecord:
            return (
                self._new_session(owner, null_origin),
                False,
                "That session's stored data failed its integrity check; a new one was started.",
            )
        if RESPONSE_STATE in session.state:  # a stored response, not a conversation
            return self._new_session(owner, null_origin), False, unknown
        if not self._owned_by(session, owner):
            logger.warning("session %s: refused a resume by another key", session.id)
            return self._new_session(owner, null_origin), False, unknown
        if null_origin and not session.state.get("null_origin"):
            return (
                self._new_session(owner, null_origin),
                False,
                (
                    "That session was not started from a page opened from disk, so such a page cannot "
                    "resume it; a new one was started."
                ),
            )
        self._recover(session)
        session.touch()
        return session, True, None

    @staticmethod
    def _owned_by(session: Session, owner: str | None) -> bool:
        bound = session.state.get("owner")
        return bound is None or bound == owner

    def may_resume(self, session_id: str, owner: str | None) -> bool:
        """Whether `open_session(session_id, owner)` would resume that session."""
        try:
            return self._owned_by(self.store.get(session_id), owner)
        except errors.LLMWSError:
            return False

    async def open_session_async(
        self, session_id: str | None, owner: str | None = None, *, null_origin: bool = False
    ) -> tuple[Session, bool, str | None]:
        """`open_session` for the event loop: a new session is made in a worker thread
        (a folder, two files and four fsyncs), so other streams do not stall."""
        if session_id is None:
            return await asyncio.to_thread(self._new_session, owner, null_origin), False, None
        return self.open_session(session_id, owner, null_origin=null_origin)

    def _new_session(self, owner: str | None = None, null_origin: bool = False) -> Session:
        session = self.store.create()
        if owner is not None:
            session.state["owner"] = owner
        session.state.setdefault("history", [])
        session.state.setdefault("config", {})
        if null_origin:
            session.state["null_origin"] = True
        if self.settings.generation_defaults.system:
            session.state["config"]["system"] = self.settings.generation_defaults.system
        session.save_state()
        return session

    @staticmethod
    def _inflight(session: Session) -> dict[str, dict[str, Any]]:
        """The replies in flight, request id -> {"user": prompt text}. A state saved by
        an earlier version holds one marker {"request_id", "user"}; it reads as one entry."""
        marks = session.state.get("inflight")
        if not isinstance(marks, dict):
            return {}
        if isinstance(marks.get("request_id"), str):
            return {marks["request_id"]: {"user": marks.get("user", "")}}
        return {rid: m for rid, m in marks.items() if isinstance(m, dict)}

    def mark_inflight(
        self, session: Session, request_id: str, user_text: str, images: list[dict[str, str]] | None = None
    ) -> None:
        """Record a reply as running (saved with the next state), beside any other."""
        marks = self._inflight(session)
        marks[request_id] = {"user": user_text, **({"images": images} if images else {})}
        session.state["inflight"] = marks

    def clear_inflight(self, session: Session, request_id: str) -> None:
        """The reply no longer needs closing out after a crash; the others keep theirs."""
        marks = self._inflight(session)
        marks.pop(request_id, None)
        if marks:
            session.state["inflight"] = marks
        else:
            session.state.pop("inflight", None)

    def _recover(self, session: Session) -> None:
        """Close out every generation that a crash interrupted (once, at first load).

        Replies are mended in the order they started, so the history reads as the
        client saw the `start` events."""
        running = self.jobs.get(session.id, {})
        marks = {rid: m for rid, m in self._inflight(session).items() if rid not in running}
        if not marks:
            return
        backlog = session.replay(0)
        starts = {e.get("request_id"): e["seq"] for e in backlog if e.get("type") == "start"}
        history = session.state.setdefault("history", [])
        for rid in sorted(marks, key=lambda r: starts.get(r, session.last_seq + 1)):
            events = [e for e in backlog if e.get("request_id") == rid]
            tokens = [
                e
                for e in events
                if e.get("type") == "token"
                and e.get("stage") in (None, "final")  # improvement passes: only the final one
            ]
            text = "".join(e.get("data", "") for e in tokens)
            user: Message = {"role": "user", "content": marks[rid].get("user", "")}
            if marks[rid].get("images"):
                user["images"] = marks[rid]["images"]
            history.append(user)
            history.append({"role": "assistant", "content": text})
            self.clear_inflight(session, rid)
            # The reply may have ended (its `done` is in the buffer) with the daemon killed
            # before the state saying so reached the disk: its clients have seen that
            # `done`, so only the history is mended.
            finished = any(e.get("type") in ("done", "error") for e in events)
            if not finished:
                self.emit(
                    session,
                    {
                        "type": "done",
                        "request_id": rid,
                        "total_tokens": sum(int(e.get("tokens", 1)) for e in tokens),
                        "finish_reason": "interrupted",
                    },
                )
            logger.info("session %s: closed out request %s interrupted by a restart", session.id, rid)
        self._cap_history(session)
        session.save_state()
        session.sync()

    @property
    def connected_sessions(self) -> int:
        """Sessions with a connected client (a WebSocket, or an HTTP stream tailing it)."""
        return len(self._subscribers)

    def broadcast(
        self, event: dict[str, Any], origin: Session | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        """Emit `event` into every session with a connected client (and the origin's).

        `extra` (the asking request's id) is merged into the origin's copy only."""
        targets = set(self._subscribers)
        if origin is not None:
            targets.add(origin.id)
        for sid in targets:
            try:
                session = self.store.get(sid)
            except errors.LLMWSError:
                continue
            if RESPONSE_STATE in session.state:  # a stored response's stream holds its own events only
                continue
            body = dict(event)
            if origin is not None and sid == origin.id and extra:
                body.update(extra)
            self.emit(session, body)

    def subscribe(self, session: Session, after_seq: int, sink: Subscriber) -> list[dict[str, Any]]:
        """Register `sink` for live events and return the backlog after `after_seq`.

        Both happen without an await in between, so no event falls in a gap or
        arrives twice."""
        backlog = session.replay(after_seq)
        self._subscribers.setdefault(session.id, set()).add(sink)
        return backlog

    def unsubscribe(self, session: Session, sink: Subscriber, origin: object | None = None) -> None:
        subs = self._subscribers.get(session.id)
        if subs is not None:
            subs.discard(sink)
            if not subs:
                del self._subscribers[session.id]
        if origin is not None:
            for job in list(self.jobs.get(session.id, {}).values()):
                if job.origin is origin and job.on_disconnect == "cancel":
                    job.cancel.set()

    def connected(self, session_id: str) -> bool:
        return bool(self._subscribers.get(session_id))

    def emit(self, session: Session, event: dict[str, Any]) -> dict[str, Any]:
        """Seal and write the event (flushed to the OS), then hand it to every tail."""
        stored = session.append(event)
        for sink in list(self._subscribers.get(session.id, ())):
            try:
                sink(stored)
            except Exception:  # one broken tail must not break the job
                logger.exception("subscriber failed")
        return stored

    def send_transient(self, session: Session, event: dict[str, Any]) -> None:
        """An event that is not buffered (queue positions): live tails only."""
        for sink in list(self._subscribers.get(session.id, ())):
            try:
                sink(event)
            except Exception:
                logger.exception("subscriber failed")

    # ------------------------------------------------------------------ config and state

    def session_config(self, session: Session) -> dict[str, Any]:
        return dict(session.state.get("config", {}))

    async def set_config(self, session: Session, data: protocol.GenerationConfig) -> dict[str, Any]:
        cfg = session.state.setdefault("config", {})
        cfg.update(data.model_dump(exclude_none=True))
        await session.save_state_async()
        return self.effective_config(session)

    def effective_config(self, session: Session | None, override: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = self.settings.generation_defaults.model_dump()
        if session is not None:
            cfg.update(session.state.get("config", {}))
        if override:
            cfg.update({k: v for k, v in override.items() if v is not None})
        return cfg

    async def reset(self, session: Session) -> None:
        for job in self.jobs.get(session.id, {}).values():
            job.cancel.set()
        session.state["history"] = []
        await session.save_state_async()

    async def ack(self, session: Session, seq: int | None) -> int:
        """Trim the buffer, but never inside a reply that is still being generated:
        a crash would otherwise lose the text needed to close it out. The disk work
        runs in worker threads."""
        limit = seq if seq is not None else session.last_seq
        for job in self.jobs.get(session.id, {}).values():
            if job.start_seq is not None:
                limit = min(limit, job.start_seq - 1)
        return await session.ack_async(max(limit, session.acked_seq))

    # ------------------------------------------------------------------ conversations

    async def history(self, session: Session) -> dict[str, Any]:
        """The session's conversation for a client rebuilding its view of it: the
        completed turns, the session's own settings, and the reply still being
        generated (its prompt and its text so far) if there is one."""
        out: dict[str, Any] = {
            "session_id": session.id,
            "messages": [dict(m) for m in session.state.get("history", [])],
            "config": self.session_config(session),
        }
        # The reply being generated: the earliest started of those running (a session may
        # run several; each has its own in-flight mark).
        jobs = self.jobs.get(session.id, {})
        running = sorted(
            (jobs[rid].start_seq, rid, mark)
            for rid, mark in self._inflight(session).items()
            if rid in jobs and jobs[rid].start_seq is not None
        )
        if running:
            start_seq, rid, mark = running[0]
            # Decrypting the reply's events is proportional to its length: a worker thread.
            events = await asyncio.to_thread(session.replay, start_seq - 1)
            text = "".join(
                e.get("data", "")
                for e in events
                if e.get("request_id") == rid and e.get("type") == "token" and e.get("stage") in (None, "final")
            )
            out["inflight"] = {"request_id": rid, "user": mark.get("user", ""), "text": text}
        return out

    async def rewind(self, session: Session, turns: int) -> int:
        """Take back the last `turns` user turns: each user message and everything after
        it leaves the history (a reply to regenerate, a message to edit and resend).

        Returns the number of messages removed. Raises Busy while a reply of this
        session is being generated, NotFound when the history has fewer user turns."""
        if self.jobs.get(session.id):
            raise errors.Busy("Wait for the running reply to finish (or stop it) before rewinding.")
        history = session.state.setdefault("history", [])
        users = [i for i, m in enumerate(history) if m.get("role") == "user"]
        if len(users) < turns:
            raise errors.NotFound(f"The conversation has {len(users)} user turns, fewer than {turns}.")
        cut = users[-turns]
        removed = len(history) - cut
        del history[cut:]
        await session.save_state_async()
        return removed

    async def delete_session(self, session: Session) -> None:
        """Stop the session's replies, tell its tails, and delete it from memory and disk."""
        jobs = list(self.jobs.get(session.id, {}).values())
        for job in jobs:
            job.cancel.set()
        tasks = [j.task for j in jobs if j.task is not None and j.task is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        self.deleted.add(session.id)
        self.send_transient(session, {"type": "session_deleted", "session_id": session.id})
        self._subscribers.pop(session.id, None)
        await asyncio.to_thread(self.store.delete, session.id)

    # ------------------------------------------------------------------ generation (shared)

    def params_from(self, cfg: dict[str, Any]) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=int(cfg["max_new_tokens"]),
            temperature=float(cfg["temperature"]),
            top_p=float(cfg["top_p"]),
            top_k=int(cfg["top_k"]),
            stop=list(cfg.get("stop") or []),
            seed=cfg.get("seed"),
            repeat_penalty=float(cfg.get("repeat_penalty") or 1.0),
        )

    @staticmethod
    def fit_history(backend: Backend, messages: list[Message], reserve: int) -> tuple[list[Message], int, int]:
        """Drop the oldest non-system turns until the prompt leaves `reserve` tokens.

        Returns (messages, tokens_in, number of messages dropped). The newest
        message is never dropped; if it alone does not fit, ContextTooLong."""
        max_ctx = backend.info.max_context
        dropped = 0
        msgs = list(messages)
        n = backend.count_tokens(msgs)
        while n + reserve > max_ctx:
            first = next((i for i, m in enumerate(msgs[:-1]) if m.get("role") != "system"), None)
            if first is None:
                break
            # Drop a whole turn (user + following assistant) so roles stay alternating.
            count = 2 if first + 1 < len(msgs) - 1 and msgs[first + 1].get("role") == "assistant" else 1
            del msgs[first : first + count]
            dropped += count
            n = backend.count_tokens(msgs)
        if n + 1 > max_ctx:
            raise errors.ContextTooLong(n, max_ctx)
        return msgs, n, dropped

    async def generate(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        *,
        cancel: threading.Event,
        on_queued: Callable[[int], None] | None = None,
        trim_history: bool = True,
        on_ready: Callable[[int, int], None] | None = None,
        model: str | None = None,
        prompt: str | list[int] | None = None,
    ) -> AsyncIterator[Chunk]:
        """Stream a reply: waits its FIFO turn, fits the context, runs the backend in a
        worker thread, yields text chunks and finally a Chunk with the result.

        `model` names the model for this request only (None: the loaded one; a
        remote model's name: its LiteLLM backend, see `ModelManager.backend_for`).
        If the consumer stops iterating, the generation is cancelled.
        `prompt` (raw text or token ids) is continued as it is, without the chat
        template (`messages` is then ignored): backends whose `supports_completion` is true.

        Text that arrived while the consumer was busy comes as one chunk (one event,
        one write), so a loaded loop does less work per token, never less text.

        Raises:
            errors.BadRequest: a message's text is not valid Unicode (a lone surrogate,
                which JSON can spell); no template or tokenizer could take it."""
        if not all(protocol.is_unicode(m["content"]) for m in messages if isinstance(m.get("content"), str)):
            raise errors.BadRequest(protocol.LONE_SURROGATE_MESSAGE)
        with self._client_slot():
            inner = self._generate(
                messages,
                params,
                cancel=cancel,
                on_queued=on_queued,
                trim_history=trim_history,
                on_ready=on_ready,
                model=model,
                prompt=prompt,
            )
            # Closed here, not left to the garbage collector, so a consumer that stops
            # early cancels the generation before the slot is given back.
            async with contextlib.aclosing(inner):
                async for chunk in inner:
                    yield chunk

    @contextlib.contextmanager
    def _client_slot(self) -> Any:
        """Count a generation against its client (`CLIENT`) while it waits or runs.

        Raises:
            errors.Busy: that client already has `limits.max_requests_per_client`
                generations waiting or running, so it cannot fill the shared queue.
        """
        client = CLIENT.get()
        if client is None:
            yield
            return
        limit = self.settings.limits.max_requests_per_client
        if self._per_client.get(client, 0) >= limit:
            raise errors.Busy(f"This client already has {limit} requests waiting or running; wait for one to finish.")
        self._per_client[client] = self._per_client.get(client, 0) + 1
        try:
            yield
        finally:
            left = self._per_client[client] - 1
            if left:
                self._per_client[client] = left
            else:
                del self._per_client[client]

    async def _generate(
        self,
        messages: Sequence[Message],
        params: GenerationParams,
        *,
        cancel: threading.Event,
        on_queued: Callable[[int], None] | None,
        trim_history: bool,
        on_ready: Callable[[int, int], None] | None,
        model: str | None,
        prompt: str | list[int] | None,
    ) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        if self._handoff is None or self._handoff._loop is not loop:
            self._handoff = Handoff(loop)
        handoff = self._handoff
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        started = time.perf_counter()
        async with self.models.use(on_queued, model=model) as backend:
            if cancel.is_set():
                yield Chunk(result=GenerationResult("cancelled", 0, 0))
                return
            if params.logprobs is not None and not backend.supports_logprobs:
                raise errors.Unsupported(f"The {backend.name} backend cannot report logprobs.")
            if prompt is not None:
                if not backend.supports_completion:
                    raise errors.Unsupported(
                        f"The {backend.name} backend cannot continue raw text; use chat completions."
                    )
                msgs, dropped = [], 0
                n_in = await asyncio.to_thread(backend.count_prompt, prompt)
                if n_in + 1 > backend.info.max_context:
                    raise errors.ContextTooLong(n_in, backend.info.max_context)
            else:
                reserve = min(params.max_new_tokens, REPLY_RESERVE_TOKENS) if trim_history else 1
                msgs, n_in, dropped = await asyncio.to_thread(
                    self.fit_history, backend, readable_by(backend, messages), reserve
                )
            if on_ready:
                on_ready(n_in, dropped)
            yield Chunk(tokens_in=n_in, dropped_messages=dropped, constrained=backend.supports_grammar)
            first_token: list[float] = []

            def on_token(text: str) -> None:
                if not first_token:
                    first_token.append(time.perf_counter())
                handoff.put(queue, Chunk(text=text))

            def run() -> None:
                try:
                    if prompt is not None:
                        result = backend.complete(prompt, params, on_token, cancel.is_set)
                    else:
                        result = backend.generate(msgs, params, on_token, cancel.is_set)
                except BaseException as exc:  # handed to the loop, raised there
                    handoff.put(queue, exc)
                else:
                    handoff.put(queue, Chunk(result=result))

            self.metrics.requests += 1
            worker = loop.run_in_executor(self._pool, run)
            finished = False
            held: Chunk | BaseException | None = None
            try:
                while True:
                    item = held if held is not None else await queue.get()
                    held = None
                    if isinstance(item, Chunk) and item.text:
                        parts = [item.text]
                        while not queue.empty():
                            nxt = queue.get_nowait()
                            if isinstance(nxt, Chunk) and nxt.text:
                                parts.append(nxt.text)
                            else:
                                held = nxt
                                break
                        if len(parts) > 1:
                            item = Chunk(text="".join(parts), count=len(parts))
                    if isinstance(item, BaseException):
                        finished = True
                        raise item
                    if item.result is not None:
                        self.metrics.record(item.result, started, first_token)
                        finished = True
                        yield item
                        return
                    yield item
            finally:
                # Only a consumer that stopped early cancels; a finished worker may not
                # be marked done yet, and setting the flag then would leak into the
                # caller's next use of the same event.
                if not finished:
                    cancel.set()
                await asyncio.shield(worker)

    # ------------------------------------------------------------------ session jobs (WebSocket)

    def require_vision(self, request_id: str | None = None) -> None:
        """Raises Unsupported unless the loaded model takes images."""
        info = self.models.model_info() or {}
        if not info.get("vision"):
            name = info.get("name") or "no model"
            raise errors.Unsupported(
                f"The loaded model ({name}) takes text only, so this prompt's images cannot be "
                "read; send it without images or switch to a vision model.",
                request_id=request_id,
            )

    def submit(
        self,
        session: Session,
        msg: protocol.Inference,
        origin: object | None = None,
        images: list[dict[str, str]] | None = None,
    ) -> Job:
        """Start an inference job in `session`; its events go to the session.

        `images`: the prompt's images, already checked (`images.resolve`)."""
        if self.closing:
            raise errors.Busy("The server is shutting down.")
        if session.id in self.deleted:
            raise errors.SessionNotFound("This session was deleted; start a new one.", request_id=msg.request_id)
        jobs = self.jobs.setdefault(session.id, {})
        if len(jobs) >= self.settings.limits.max_queued_per_session:
            raise errors.Busy("This session already has the maximum number of requests in flight.")
        rid = msg.request_id or uuid.uuid4().hex
        if rid in jobs:
            raise errors.BadRequest("A request with that request_id is already running.", request_id=rid)
        if msg.prompt is None and not msg.messages:
            raise errors.BadRequest("inference needs a prompt or messages.", request_id=rid)
        if isinstance(msg.prompt, protocol.PromptParts) and msg.prompt.images:
            self.require_vision(rid)
            if images is None:
                raise errors.BadRequest("The prompt's images were not checked.", request_id=rid)
        job = Job(rid, session.id, msg.on_disconnect, origin, images=list(images or []))
        jobs[rid] = job
        job.task = asyncio.create_task(self._run_job(session, job, msg))
        return job

    def cancel(self, session: Session, request_id: str | None) -> list[str]:
        jobs = self.jobs.get(session.id, {})
        targets = [request_id] if request_id else list(jobs)
        found = [rid for rid in targets if rid in jobs]
        for rid in found:
            jobs[rid].cancel.set()
        if request_id and not found:
            raise errors.NotFound("No running request with that request_id.", request_id=request_id)
        return found

    def _build_messages(
        self, session: Session, msg: protocol.Inference, cfg: dict[str, Any], images: list[dict[str, str]] | None = None
    ) -> tuple[list[Message], list[Message]]:
        """(full prompt messages, the new turn's messages to keep in history)."""
        new: list[Message] = list(protocol.prompt_to_messages(msg.prompt))
        if images:
            new[-1] = {**new[-1], "images": images}  # the prompt's user message
        if msg.messages:
            # content may be null (OpenAI allows it); downstream code and templates need a str.
            new = [{**m.model_dump(exclude_none=True), "content": m.content or ""} for m in msg.messages] + new
        system = next((m["content"] for m in new if m["role"] == "system"), None) or cfg.get("system")
        turn = [m for m in new if m["role"] != "system"]
        history = list(session.state.get("history", []))
        msgs: list[Message] = [{"role": "system", "content": system}] if system else []
        return msgs + history + turn, turn

    async def _run_job(self, session: Session, job: Job, msg: protocol.Inference) -> None:
        rid = job.request_id
        try:
            override = msg.config.model_dump(exclude_none=True) if msg.config else {}
            cfg = self.effective_config(session, override)
            params = self.params_from(cfg)
            params.cache_key = session.id
            messages, turn = self._build_messages(session, msg, cfg, job.images)
            user_text = "\n".join(str(m.get("content") or "") for m in turn if m["role"] == "user")
            if msg.mode == "improve":
                from .improve import improve_job  # the improvement pipeline (HTTP issue)

                await improve_job(self, session, job, messages, turn, params)
                return
            text_parts: list[str] = []

            def queued(pos: int) -> None:
                self.send_transient(session, {"type": "queued", "request_id": rid, "position": pos})

            async for chunk in self.generate(messages, params, cancel=job.cancel, on_queued=queued, model=msg.model):
                if chunk.result is not None:
                    res = chunk.result
                    history = session.state.setdefault("history", [])
                    history.extend(turn)
                    history.append({"role": "assistant", "content": "".join(text_parts)})
                    self._cap_history(session)
                    self.clear_inflight(session, rid)
                    self.emit(
                        session,
                        {
                            "type": "done",
                            "request_id": rid,
                            "total_tokens": res.tokens_out,
                            "tokens_in": res.tokens_in,
                            "finish_reason": res.finish_reason,
                        },
                    )
                    # The reply is complete and sealed into the next state (this save, or
                    # any later one, lands with it): acks may trim it, and status no
                    # longer lists it (clients see `done` at once). A crash before the
                    # state reaches the disk is mended from the buffer (`_recover`).
                    job.start_seq = None
                    self.end_job(session.id, rid)
                    await session.save_state_async()
                    return
                if chunk.text:
                    text_parts.append(chunk.text)
                    event = {"type": "token", "request_id": rid, "data": chunk.text}
                    if chunk.count > 1:
                        event["tokens"] = chunk.count
                    self.emit(session, event)
                    continue
                # The first chunk: the prompt fits; announce the start.
                await self.announce_start(
                    session, job, user_text, chunk.tokens_in, chunk.dropped_messages, params.max_new_tokens
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.clear_inflight(session, rid)
            body = errors.to_wire(exc, rid)
            try:
                self.emit(session, body)
            except errors.LLMWSError:
                # The disk refused the error too (storage_error): the connected
                # clients must still hear why their request ended.
                logger.error("session %s: error event not stored; sent live only", session.id)
                self.send_transient(session, body)
            else:
                self.end_job(session.id, rid)
                try:
                    await session.save_state_async()
                except errors.StorageError:
                    pass  # logged by the store; the state on disk stays the previous one
        finally:
            self.end_job(session.id, rid)

    def end_job(self, session_id: str, request_id: str) -> None:
        """The job no longer runs: status stops listing it (idempotent)."""
        self.jobs.get(session_id, {}).pop(request_id, None)
        if not self.jobs.get(session_id):
            self.jobs.pop(session_id, None)

    async def announce_start(
        self,
        session: Session,
        job: Job,
        user_text: str,
        tokens_in: int,
        dropped: int,
        max_tokens: int,
        **extra: Any,
    ) -> None:
        """The prompt fits: drop what had to go (with a warning), mark the reply as in
        flight (so a crash can close it out; on disk before `start` goes out, with the
        fsyncs in a worker thread), and emit `start`."""
        rid = job.request_id
        if dropped:
            self._drop_oldest(session, dropped)
            self.emit(
                session,
                {
                    "type": "warning",
                    "request_id": rid,
                    "code": "history_truncated",
                    "message": f"The conversation no longer fits the model's context; the oldest {dropped} messages were dropped.",
                    "dropped_messages": dropped,
                },
            )
        self.mark_inflight(session, rid, user_text, job.images)
        await session.save_state_async()
        started = self.emit(
            session,
            {
                "type": "start",
                "request_id": rid,
                "tokens_in": tokens_in,
                "max_tokens": max_tokens,
                "prompt": user_text,
                **extra,
            },
        )
        job.start_seq = started["seq"]

    def _drop_oldest(self, session: Session, count: int) -> None:
        history = session.state.get("history", [])
        del history[: min(count, len(history))]

    def _cap_history(self, session: Session) -> None:
        history = session.state.get("history", [])
        limit = self.settings.sessions.max_history_messages
        if len(history) > limit:
            del history[: len(history) - limit]
        # The state is sealed and rewritten at every turn: it keeps the newest images
        # only, as many as one request may carry; older turns keep their text.
        keep = self.settings.limits.max_images_per_request
        for i in range(len(history) - 1, -1, -1):
            pics = history[i].get("images")
            if not pics:
                continue
            if keep <= 0:
                history[i] = {k: v for k, v in history[i].items() if k != "images"}
            elif len(pics) > keep:
                history[i] = {**history[i], "images": pics[-keep:]}
            keep -= len(pics)

    def close(self) -> None:
        """Release the generation threads (after `drain`, at shutdown)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def drain(self, timeout: float) -> None:
        """Let running jobs finish for up to `timeout` seconds, then cancel the rest."""
        self.closing = True
        tasks = [j.task for js in self.jobs.values() for j in js.values() if j.task]
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for js in self.jobs.values():
            for j in js.values():
                j.cancel.set()
        if pending:
            await asyncio.wait(pending, timeout=5)


class Metrics:
    """Counters and histograms both doors report (Prometheus at /metrics)."""

    def __init__(self) -> None:
        self.requests = 0
        self.tokens_out = 0
        self.tokens_in = 0
        self.ttft: list[float] = []
        self.decode_rates: list[float] = []

    def record(self, result: GenerationResult, started: float, first_token: list[float]) -> None:
        self.tokens_out += result.tokens_out
        self.tokens_in += result.tokens_in
        now = time.perf_counter()
        if first_token:
            self.ttft.append(first_token[0] - started)
            if result.tokens_out > 1 and now > first_token[0]:
                self.decode_rates.append((result.tokens_out - 1) / (now - first_token[0]))
        del self.ttft[:-1000], self.decode_rates[:-1000]
