"""The WebSocket door: the only code that touches a WebSocket.

It authenticates and checks the Origin, performs the session handshake, replays
what the client missed, tails the session, and routes typed messages to the chat
service. A bad message gets an `error` event; the connection keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from . import errors, protocol
from .chat import CLIENT
from .legacy import Dialect, LegacyView, legacy_welcome, shape, split_missed
from .security import access, install_key_redaction, is_loopback, key_from, key_owner
from .sessions.store import Session

if TYPE_CHECKING:
    from .daemon import App

logger = logging.getLogger("llmws.ws")

# A client that stops reading gets disconnected rather than growing our memory;
# it resumes from the sealed buffer when it reconnects.
MAX_OUTBOX = 20_000
#: Bytes the socket may hold unsent before events wait in the outbox for the writer
#: task (which waits for the socket to drain) instead of being written at once.
DIRECT_WRITE_LIMIT = 256 * 1024


def frame_size(frame: str | bytes, limit: int) -> int:
    """A frame's size in bytes for the limit check (a text frame's UTF-8 length).

    A str of n characters is at most 4n bytes, so only a frame that might be over
    `limit` pays for an encode; under it, the character count is returned."""
    if isinstance(frame, bytes) or len(frame) * 4 <= limit:
        return len(frame)
    return len(frame.encode("utf-8", "surrogatepass"))


def single_header(headers: Any, name: str) -> str | None:
    """One header's value; a header sent twice counts as absent-and-suspicious (None
    is never returned for it: the empty string is, which matches no key or origin)."""
    values = headers.get_all(name)
    if not values:
        return None
    return values[0] if len(values) == 1 else ""


class RateLimiter:
    """Token bucket: `rate` messages per second sustained, bursts of 2x."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = rate * 2
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Connection:
    """One client socket bound to one session."""

    def __init__(self, app: App, ws: ServerConnection) -> None:
        self.app = app
        self.ws = ws
        self.session: Session | None = None
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue()  # UTF-8 JSON frames
        self.closed = False
        self.is_admin = False
        self.owner: str | None = None  # see `key_owner`
        self.limiter = RateLimiter(app.settings.limits.messages_per_second)
        # What the writer closes with when it reaches the end of the outbox.
        self.close_code: tuple[int, str] = (1013, "client too slow; reconnect to resume")
        # The replay on resume may be longer than MAX_OUTBOX (a long unacknowledged
        # session resumed from 0); it is already in memory, so it is allowed on top,
        # else such a session could never be resumed.
        self.backlog_allowance = 0
        #: Which dialect the peer speaks, decided by its first frame (see legacy.py).
        self.dialect = Dialect.CURRENT
        #: The legacy dialect's bookkeeping (None for the current dialect).
        self.legacy: LegacyView | None = None
        #: A page opened from disk or a sandboxed frame (`Origin: null`): it chats in
        #: sessions such pages made, and manages models only with a key that allows it.
        request = ws.request
        self.null_origin = request is not None and single_header(request.headers, "Origin") == "null"

    @property
    def may_read_paths(self) -> bool:
        """Whether prompt images may name files on this machine: a loopback peer that is
        not a page opened from disk."""
        address = self.ws.remote_address
        return bool(address) and is_loopback(str(address[0])) and not self.null_origin

    # ------------------------------------------------------------------ output

    def send(self, event: dict[str, Any]) -> None:
        """Queue an event for this socket (never blocks; the writer task sends)."""
        if self.closed:
            return
        if self.legacy is not None:
            event = shape(event)
        if self.outbox.qsize() > MAX_OUTBOX + self.backlog_allowance:
            logger.warning("client is not reading; closing so it can resume later")
            self.closed = True
            self.outbox.put_nowait(None)
            return
        # A stored event carries its JSON as sealed: the same bytes go to the socket.
        frame = getattr(event, "frame", None) or protocol.encode(event).encode()
        if self.outbox.empty() and self._write_now(frame):
            return
        self.outbox.put_nowait(frame)

    def deliver(self, event: dict[str, Any]) -> None:
        """A session event for this socket (the session's tail): a legacy connection
        gets only the answers to its own requests."""
        if self.legacy is None:
            self.send(event)
            return
        shaped = self.legacy.admit(event)
        if shaped is not None:
            self.send(shaped)

    def _write_now(self, frame: bytes) -> bool:
        """Write a frame to the socket right away when nothing is queued before it and
        the socket keeps up: one event per token then costs no writer-task wake-up.
        False: queue it (connection not open, or the client is reading slowly)."""
        ws = self.ws
        try:
            transport = ws.transport
            if ws.protocol.state is not State.OPEN or transport.get_write_buffer_size() > DIRECT_WRITE_LIMIT:
                return False
        except Exception:  # not a connection we know how to write to directly
            return False
        try:
            ws.protocol.send_text(frame)
            ws.send_data()
        except Exception as exc:  # the socket broke; the client resumes with last_seq
            logger.info("direct write failed: %s", exc)
        return True

    def error(self, exc: BaseException, request_id: str | None = None) -> None:
        body = errors.to_wire(exc, request_id)
        if request_id is None and isinstance(exc, errors.LLMWSError) and exc.fields.get("request_id"):
            body["request_id"] = exc.fields["request_id"]
        if self.legacy is not None:
            self.legacy.settle(body.get("request_id"))
        self.send(body)

    async def writer(self) -> None:
        try:
            while True:
                frame = await self.outbox.get()
                if frame is None:
                    code, reason = self.close_code
                    await self.ws.close(code, reason)
                    return
                await self.ws.send(frame.decode())
        except ConnectionClosed:
            pass

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        app = self.app
        writer = asyncio.create_task(self.writer())
        try:
            first = await self._handshake()
            if first is None:
                return
            handshake, pending = first
            # Session jobs started from this connection inherit it (per-client limit).
            peer = self.ws.remote_address[0] if self.ws.remote_address else "?"
            CLIENT.set(f"{peer}|{self.owner or 'none'}")
            if self.dialect is Dialect.RAW:
                await self._serve_raw(pending["prompt"] if pending else "")
                return
            try:
                session, resumed, notice = await app.chat.open_session_async(
                    handshake.session_id, self.owner, null_origin=self.null_origin
                )
            except errors.LLMWSError as exc:  # e.g. storage_error: the disk refused a new session
                self.error(exc)
                await self._close_soon(1011, "could not open a session")
                return
            self.session = session
            last_seq = (
                handshake.last_seq
                if resumed and handshake.last_seq is not None
                else (session.acked_seq if resumed else 0)
            )
            if self.legacy is not None:
                await self._welcome_legacy(session, resumed, notice, last_seq)
            else:
                self.send(app.welcome(session, resumed))
                if notice:
                    self.send({"type": "notice", "code": "session_not_resumed", "message": notice})
                backlog = app.chat.subscribe(session, last_seq, self.deliver)
                self.backlog_allowance = len(backlog)
                for event in backlog:
                    self.send(event)
            if pending is not None:
                await self.dispatch(pending)
            async for frame in self.ws:
                await self.handle_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            if self.session is not None:
                app.chat.unsubscribe(self.session, self.deliver, origin=self)
                self.session.touch()
            # The socket is closed or closing here (the peer left, or `_close_soon` ran, or
            # the handler failed and `App.handle` closes with 1011): nothing is left for
            # the writer to send.
            writer.cancel()

    async def _welcome_legacy(self, session: Session, resumed: bool, notice: str | None, last_seq: int) -> None:
        """The welcome of the legacy dialect: one frame, with what the session missed
        and any notice inside it (the original clients read one frame per command)."""
        from .engine.resources import snapshot

        app = self.app
        snap = await asyncio.to_thread(snapshot, app.models.model_info())
        # Subscribing returns the backlog and starts the tail with no await between,
        # and the welcome that carries the backlog is queued before any live event.
        backlog = app.chat.subscribe(session, last_seq, self.deliver)
        missed, more = split_missed(backlog)
        assert self.legacy is not None
        if more:
            self.legacy.withhold_from(int(backlog[len(missed)].get("seq") or last_seq + 1))
        body = {"code": "session_not_resumed", "message": notice} if notice else None
        self.send(legacy_welcome(app.welcome(session, resumed), snap, body, missed, more))

    async def _serve_raw(self, prompt: str) -> None:
        """The oldest dialect: a plain-text prompt in, the reply's text out as plain
        text frames, then a normal close."""
        app = self.app
        try:
            session, _, _ = await app.chat.open_session_async(None, self.owner, null_origin=self.null_origin)
        except errors.LLMWSError as exc:
            self._send_text(f"[error: {exc.message}]")
            await self._close_soon(1011, "could not open a session")
            return
        self.session = session
        rid = "raw-" + session.id[:8]
        finished = asyncio.Event()

        def sink(event: dict[str, Any]) -> None:
            if event.get("request_id") != rid:
                return
            kind = event.get("type")
            if kind == "token":
                self._send_text(str(event.get("data", "")))
            elif kind == "error":
                self._send_text(f"\n[error: {event.get('message')}]")
                finished.set()
            elif kind == "done":
                finished.set()

        app.chat.subscribe(session, session.last_seq, sink)
        try:
            app.chat.submit(session, protocol.Inference(type="inference", prompt=prompt, request_id=rid), origin=self)
            closed = asyncio.ensure_future(self.ws.wait_closed())
            waiter = asyncio.ensure_future(finished.wait())
            try:
                await asyncio.wait({closed, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                waiter.cancel()
        except errors.LLMWSError as exc:
            self._send_text(f"[error: {exc.message}]")
        finally:
            app.chat.unsubscribe(session, sink, origin=self)
        await self._close_soon(1000, "reply complete")

    def _send_text(self, text: str) -> None:
        """A plain-text frame (the raw dialect)."""
        if not self.closed:
            self.outbox.put_nowait(text.encode("utf-8", "surrogatepass"))

    async def _handshake(self) -> tuple[protocol.Handshake, dict[str, Any] | None] | None:
        """Read the first frame and decide the dialect. A current client's handshake
        says `"protocol": 1`; any other first frame is an original LLMWS client (the
        legacy dialect): `{}` / `{"session_id"}`, or a message instead of a handshake
        (a new session is made and the message processed), or a plain-text prompt (the
        raw dialect).

        The whole handshake has one deadline (`limits.handshake_timeout`), however
        many bad frames come first, and bad frames count against the message rate:
        an unauthenticated peer can neither linger nor make us answer at line speed."""
        limits = self.app.settings.limits
        deadline = time.monotonic() + limits.handshake_timeout
        while True:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                # cancel (daemon shutdown) that lands together with the frame.
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    frame = await self.ws.recv()
            except TimeoutError:
                self.error(errors.BadRequest("No handshake within the time limit."))
                await self._close_soon(1008, "handshake timeout")
                return None
            try:
                if not self.limiter.allow():
                    raise errors.RateLimited("Too many messages; slow down.")
                if frame_size(frame, limits.max_frame_bytes) > limits.max_frame_bytes:
                    raise errors.FrameTooLarge("Frame exceeds the size limit.")
                raw = _raw_prompt(frame)
                if raw is not None:
                    if not self.authorized(None):
                        raise errors.Unauthorized("An API key is required.")
                    self.dialect = Dialect.RAW
                    return protocol.Handshake(), {"prompt": raw}
                data = protocol.decode_json(frame)
                if "type" in data:
                    data = dict(data)
                    key = data.pop("api_key", None)
                    if not self.authorized(key if isinstance(key, str) else None):
                        raise errors.Unauthorized("An API key is required.")
                    self._speak(Dialect.LEGACY)
                    return protocol.Handshake(), data
                hs = protocol.parse_handshake(data)
                if not self.authorized(hs.api_key):
                    raise errors.Unauthorized("An API key is required.")
                self._speak(Dialect.CURRENT if hs.protocol == 1 else Dialect.LEGACY)
                return hs, None
            except errors.Unauthorized as exc:
                self.error(exc)
                await self._close_soon(1008, "unauthorized")
                return None
            except errors.LLMWSError as exc:
                self.error(exc)

    def _speak(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.legacy = LegacyView() if dialect is Dialect.LEGACY else None

    async def close_soon(self, code: int, reason: str) -> None:
        """Close after the queued events (the error saying why) have been written."""
        await self._close_soon(code, reason)

    async def _close_soon(self, code: int, reason: str) -> None:
        """Close after the queued events (the error saying why) have been written."""
        self.close_code = (code, reason)
        self.outbox.put_nowait(None)
        self.closed = True
        for _ in range(100):
            if self.outbox.empty():
                break
            await asyncio.sleep(0.01)
        await self.ws.close(code, reason)

    def authorized(self, handshake_key: str | None) -> bool:
        """Whether the peer may use this daemon; also decides `is_admin`.

        The key comes from the handshake frame, the headers or the query (see
        `security.key_from`); the roles it gives are the HTTP door's too (`security.access`)."""
        request = self.ws.request
        given = handshake_key
        if request is not None and not given:
            headers = request.headers
            query = parse_qs(urlsplit(request.path).query)
            given = key_from(lambda name: single_header(headers, name), lambda name: (query.get(name) or [None])[0])
        sec = self.app.settings.security
        self.owner = key_owner(given, [*sec.api_keys, *sec.admin_keys])
        roles = access(given, self.app.settings, keys_required=self.app.keys_required, null_origin=self.null_origin)
        self.is_admin = roles.admin
        return roles.allowed

    # ------------------------------------------------------------------ input

    async def handle_frame(self, frame: str | bytes) -> None:
        if not self.limiter.allow():
            self.error(errors.RateLimited("Too many messages; slow down."))
            return
        try:
            limit = self.app.settings.limits.max_frame_bytes
            size = frame_size(frame, limit)
            if size > limit:
                raise errors.FrameTooLarge(f"Frame of {size} bytes exceeds the limit of {limit}.")
            data = protocol.decode_json(frame)
        except errors.LLMWSError as exc:
            self.error(exc)
            return
        await self.dispatch(data)

    async def dispatch(self, data: dict[str, Any]) -> None:
        if self.legacy is not None:
            data = self.legacy.inbound(data)
            if data.get("type") == "ack" and data.get("seq") is None and self.session is not None:
                data["seq"] = self.legacy.ack_limit(self.session.last_seq)
        request_id = data.get("request_id") if isinstance(data.get("request_id"), str) else None
        try:
            msg = protocol.parse_client_message(data)
            handler = self.app.handlers.get(msg.type)
            if handler is None:  # a known type with no handler here is a server bug
                raise errors.Unsupported(f"{msg.type} is not available on this server.")
            assert self.session is not None
            await handler(self, self.session, msg)
        except Exception as exc:
            self.error(exc, request_id)


Handler = Callable[[Connection, Session, Any], Awaitable[None]]


def _raw_prompt(frame: str | bytes) -> str | None:
    """The prompt of a raw-dialect first frame, else None: plain text (not JSON) in
    the original page's prompt format (`<|user|>...<|end|>`); other text stays a bad
    handshake."""
    if not isinstance(frame, str) or "<|user|>" not in frame:
        return None
    text = frame.strip()
    if text[:1] in ("{", "["):
        return None
    try:
        json.loads(text)
    except ValueError:
        return frame
    return None


def make_origin_check(app: App) -> Callable[[ServerConnection, Request], Response | None]:
    """Refuse WebSocket handshakes from browser pages not on the allowlist, and
    connections beyond the configured limits, before any frame is exchanged.

    Building the check also installs the log redaction of API keys (this is the one
    place the daemon calls before it starts accepting connections)."""
    sec = app.settings.security
    install_key_redaction([*sec.api_keys, *sec.admin_keys])

    def check(connection: ServerConnection, request: Request) -> Response | None:
        # A header sent twice reads as "" and matches nothing (browsers send one Origin).
        origin = single_header(request.headers, "Origin")
        if origin is not None and not app.origin_allowed(origin):
            logger.warning("refused WebSocket from origin %r", origin[:200])
            return connection.respond(HTTPStatus.FORBIDDEN, "Origin not allowed\n")
        peer = connection.remote_address[0] if connection.remote_address else "?"
        if app.connection_count >= app.fd_budget.ws_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Too many connections\n")
        if app.per_ip.get(peer, 0) >= app.settings.limits.max_connections_per_ip:
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "Too many connections from this address\n")
        return None

    return check
