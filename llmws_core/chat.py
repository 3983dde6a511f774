"""The chat service: sessions, generation jobs and their events, shared by both doors.

A generation job writes its events into the session (sealed and flushed before
anyone sees them); connected sockets *tail* the session. A dropped client does not
stop the job unless its request said `on_disconnect: "cancel"`; a client that
comes back replays what it missed, then tails live events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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

    # ------------------------------------------------------------------ sessions

    def open_session(
        self, session_id: str | None, *, null_origin: bool = False
    ) -> tuple[Session, bool, str | None]:
        """Return (session, resumed, notice). An unknown id is never silently swapped:
        a new session is made and the notice says why.

        `null_origin`: the peer is a page opened from disk or a sandboxed frame
        (`Origin: null`, which any web site can produce); it may resume only sessions
        that such peers created, never a conversation started elsewhere."""
        if session_id is None:
            return self._new_session(null_origin), False, None
        try:
            session = self.store.get(session_id)
        except errors.SessionExpired:
            return self._new_session(null_origin), False, "That session expired; a new one was started."
        except errors.SessionNotFound:
            return self._new_session(null_origin), False, "No session with that id exists; a new one was started."
        except errors.CorruptRecord:
            return self._new_session(null_origin), False, "That session's stored data failed its integrity check; a new one was started."
        if RESPONSE_STATE in session.state:  # a stored response, not a conversation
            return self._new_session(null_origin), False, "No session with that id exists; a new one was started."
        if null_origin and not session.state.get("null_origin"):
            return self._new_session(null_origin), False, (
                "That session was not started from a page opened from disk, so such a page cannot "
                "resume it; a new one was started."
            )
        self._recover(session)
        session.touch()
        return session, True, None

    async def open_session_async(
        self, session_id: str | None, *, null_origin: bool = False
    ) -> tuple[Session, bool, str | None]:
        """`open_session` for the event loop: a new session is made in a worker thread
        (a folder, two files and four fsyncs), so other streams do not stall."""
        if session_id is None:
            return await asyncio.to_thread(self._new_session, null_origin), False, None
        return self.open_session(session_id, null_origin=null_origin)

    def _new_session(self, null_origin: bool = False) -> Session:
        session = self.store.create()
        session.state.setdefault("history", [])
        session.state.setdefault("config", {})
        if null_origin:
            session.state["null_origin"] = True
        if self.settings.generation_defaults.system:
            session.state["config"]["system"] = self.settings.generation_defaults.system
        session.save_state()
        return session

    def _recover(self, session: Session) -> None:
        """Close out a generation that a crash interrupted (once, at first load)."""
        inflight = session.state.get("inflight")
        if not inflight or session.id in self.jobs and inflight.get("request_id") in self.jobs[session.id]:
            return
        rid = inflight.get("request_id")
        events = [e for e in session.replay(0) if e.get("request_id") == rid]
        tokens = [
            e for e in events
            if e.get("type") == "token"
            and e.get("stage") in (None, "final")  # improvement passes: only the final one
        ]
        text = "".join(e.get("data", "") for e in tokens)
        history = session.state.setdefault("history", [])
        history.append({"role": "user", "content": inflight.get("user", "")})
        history.append({"role": "assistant", "content": text})
        session.state.pop("inflight", None)
        # The reply may have ended (its `done` is in the buffer) with the daemon killed
        # before the state saying so reached the disk: its clients have seen that
        # `done`, so only the history is mended.
        finished = any(e.get("type") in ("done", "error") for e in events)
        if not finished:
            self.emit(session, {
                "type": "done", "request_id": rid, "total_tokens": sum(int(e.get("tokens", 1)) for e in tokens),
                "finish_reason": "interrupted",
            })
        session.save_state()
        session.sync()
        logger.info("session %s: closed out request %s interrupted by a restart", session.id, rid)

    @property
    def connected_sessions(self) -> int:
        """Sessions with a connected client (a WebSocket, or an HTTP stream tailing it)."""
        return len(self._subscribers)

    def broadcast(self, event: dict[str, Any], origin: Session | None = None, extra: dict[str, Any] | None = None) -> None:
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
    def fit_history(
        backend: Backend, messages: list[Message], reserve: int
    ) -> tuple[list[Message], int, int]:
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
    ) -> AsyncIterator[Chunk]:
        """Stream a reply: waits its FIFO turn, fits the context, runs the backend in a
        worker thread, yields text chunks and finally a Chunk with the result.

        `model` names the model for this request only (None: the loaded one; a
        remote model's name: its LiteLLM backend, see `ModelManager.backend_for`).
        If the consumer stops iterating, the generation is cancelled.

        Text that arrived while the consumer was busy comes as one chunk (one event,
        one write), so a loaded loop does less work per token, never less text."""
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
            reserve = min(params.max_new_tokens, REPLY_RESERVE_TOKENS) if trim_history else 1
            msgs, n_in, dropped = await asyncio.to_thread(
                self.fit_history, backend, list(messages), reserve
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

    def submit(self, session: Session, msg: protocol.Inference, origin: object | None = None) -> Job:
        """Start an inference job in `session`; its events go to the session."""
        if self.closing:
            raise errors.Busy("The server is shutting down.")
        jobs = self.jobs.setdefault(session.id, {})
        if len(jobs) >= self.settings.limits.max_queued_per_session:
            raise errors.Busy("This session already has the maximum number of requests in flight.")
        rid = msg.request_id or uuid.uuid4().hex
        if rid in jobs:
            raise errors.BadRequest("A request with that request_id is already running.", request_id=rid)
        if msg.prompt is None and not msg.messages:
            raise errors.BadRequest("inference needs a prompt or messages.", request_id=rid)
        if isinstance(msg.prompt, protocol.PromptParts) and msg.prompt.images:
            info = self.models.model_info() or {}
            if not info.get("vision"):
                name = info.get("name") or "no model"
                raise errors.Unsupported(
                    f"The loaded model ({name}) takes text only, so this prompt's images cannot be "
                    "read; send it without images or switch to a vision model.",
                    request_id=rid,
                )
        job = Job(rid, session.id, msg.on_disconnect, origin)
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

    def _build_messages(self, session: Session, msg: protocol.Inference, cfg: dict[str, Any]) -> tuple[list[Message], list[Message]]:
        """(full prompt messages, the new turn's messages to keep in history)."""
        new = protocol.prompt_to_messages(msg.prompt)
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
            messages, turn = self._build_messages(session, msg, cfg)
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
                    session.state.pop("inflight", None)
                    self.emit(session, {
                        "type": "done", "request_id": rid, "total_tokens": res.tokens_out,
                        "tokens_in": res.tokens_in, "finish_reason": res.finish_reason,
                    })
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
                await self.announce_start(session, job, user_text, chunk.tokens_in, chunk.dropped_messages, params.max_new_tokens)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            session.state.pop("inflight", None)
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
        self, session: Session, job: Job, user_text: str, tokens_in: int, dropped: int,
        max_tokens: int, **extra: Any,
    ) -> None:
        """The prompt fits: drop what had to go (with a warning), mark the reply as in
        flight (so a crash can close it out; on disk before `start` goes out, with the
        fsyncs in a worker thread), and emit `start`."""
        rid = job.request_id
        if dropped:
            self._drop_oldest(session, dropped)
            self.emit(session, {
                "type": "warning", "request_id": rid, "code": "history_truncated",
                "message": f"The conversation no longer fits the model's context; the oldest {dropped} messages were dropped.",
                "dropped_messages": dropped,
            })
        session.state["inflight"] = {"request_id": rid, "user": user_text}
        await session.save_state_async()
        started = self.emit(session, {
            "type": "start", "request_id": rid, "tokens_in": tokens_in,
            "max_tokens": max_tokens, "prompt": user_text, **extra,
        })
        job.start_seq = started["seq"]

    def _drop_oldest(self, session: Session, count: int) -> None:
        history = session.state.get("history", [])
        del history[: min(count, len(history))]

    def _cap_history(self, session: Session) -> None:
        history = session.state.get("history", [])
        limit = self.settings.sessions.max_history_messages
        if len(history) > limit:
            del history[: len(history) - limit]

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
