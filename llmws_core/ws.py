"""The WebSocket door: the only code that touches a WebSocket.

It authenticates and checks the Origin, performs the session handshake, replays
what the client missed, tails the session, and routes typed messages to the chat
service. A bad message gets an `error` event; the connection keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import errors, protocol
from .sessions.store import Session

if TYPE_CHECKING:
    from .daemon import App

logger = logging.getLogger("llmws.ws")

# A client that stops reading gets disconnected rather than growing our memory;
# it resumes from the sealed buffer when it reconnects.
MAX_OUTBOX = 20_000
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def key_matches(given: str | None, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key."""
    if not given:
        return False
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode(), key.encode())
    return ok


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
        self.outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self.closed = False
        self.is_admin = False
        self.limiter = RateLimiter(app.settings.limits.messages_per_second)

    # ------------------------------------------------------------------ output

    def send(self, event: dict[str, Any]) -> None:
        """Queue an event for this socket (never blocks; the writer task sends)."""
        if self.closed:
            return
        if self.outbox.qsize() > MAX_OUTBOX:
            logger.warning("client is not reading; closing so it can resume later")
            self.closed = True
            self.outbox.put_nowait(None)
            return
        self.outbox.put_nowait(protocol.encode(event))

    def error(self, exc: BaseException, request_id: str | None = None) -> None:
        body = errors.to_wire(exc, request_id)
        if request_id is None and isinstance(exc, errors.LLMWSError) and exc.fields.get("request_id"):
            body["request_id"] = exc.fields["request_id"]
        self.send(body)

    async def writer(self) -> None:
        try:
            while True:
                frame = await self.outbox.get()
                if frame is None:
                    await self.ws.close(1013, "client too slow; reconnect to resume")
                    return
                await self.ws.send(frame)
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
            session, resumed, notice = app.chat.open_session(handshake.session_id)
            self.session = session
            last_seq = handshake.last_seq if resumed and handshake.last_seq is not None else (session.acked_seq if resumed else 0)
            self.send(app.welcome(session, resumed))
            if notice:
                self.send({"type": "notice", "code": "session_not_resumed", "message": notice})
            backlog = app.chat.subscribe(session, last_seq, self.send)
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
                app.chat.unsubscribe(self.session, self.send, origin=self)
                self.session.touch()
            self.outbox.put_nowait(None) if not writer.done() else None
            writer.cancel()

    async def _handshake(self) -> tuple[protocol.Handshake, dict[str, Any] | None] | None:
        """Read the first frame. An old-style client that starts with a message
        instead of a handshake gets a new session and that message is processed."""
        limits = self.app.settings.limits
        try:
            frame = await asyncio.wait_for(self.ws.recv(), timeout=limits.handshake_timeout)
        except TimeoutError:
            self.error(errors.BadRequest("No handshake within the time limit."))
            await asyncio.sleep(0)
            await self.ws.close(1008, "handshake timeout")
            return None
        while True:
            try:
                if len(frame) > limits.max_frame_bytes:
                    raise errors.FrameTooLarge("Frame exceeds the size limit.")
                data = protocol.decode_json(frame)
                if "type" in data:
                    if not self.authorized(data.get("api_key") if isinstance(data.get("api_key"), str) else None):
                        raise errors.Unauthorized("An API key is required.")
                    return protocol.Handshake(), data
                hs = protocol.parse_handshake(data)
                if not self.authorized(hs.api_key):
                    raise errors.Unauthorized("An API key is required.")
                return hs, None
            except errors.Unauthorized as exc:
                self.error(exc)
                await asyncio.sleep(0.05)
                await self.ws.close(1008, "unauthorized")
                return None
            except errors.LLMWSError as exc:
                self.error(exc)
            frame = await asyncio.wait_for(self.ws.recv(), timeout=limits.handshake_timeout)

    def authorized(self, handshake_key: str | None) -> bool:
        sec = self.app.settings.security
        request = self.ws.request
        given = handshake_key
        if request is not None and not given:
            given = request.headers.get("X-API-Key")
            auth = request.headers.get("Authorization", "")
            if not given and auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not given:
                query = parse_qs(urlsplit(request.path).query)
                given = (query.get("api_key") or query.get("x_api_key") or [None])[0]
        self.is_admin = key_matches(given, sec.admin_keys) if sec.admin_keys else not self.app.keys_required
        if not self.app.keys_required:
            return True
        return self.is_admin or key_matches(given, sec.api_keys)

    # ------------------------------------------------------------------ input

    async def handle_frame(self, frame: str | bytes) -> None:
        if not self.limiter.allow():
            self.error(errors.RateLimited("Too many messages; slow down."))
            return
        try:
            if len(frame) > self.app.settings.limits.max_frame_bytes:
                raise errors.FrameTooLarge(
                    f"Frame of {len(frame)} bytes exceeds the limit of {self.app.settings.limits.max_frame_bytes}."
                )
            data = protocol.decode_json(frame)
        except errors.LLMWSError as exc:
            self.error(exc)
            return
        await self.dispatch(data)

    async def dispatch(self, data: dict[str, Any]) -> None:
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


def make_origin_check(app: App) -> Callable[[ServerConnection, Request], Response | None]:
    """Refuse WebSocket handshakes from browser pages not on the allowlist, and
    connections beyond the configured limits, before any frame is exchanged."""

    def check(connection: ServerConnection, request: Request) -> Response | None:
        sec = app.settings.security
        origin = request.headers.get("Origin")
        if origin is not None and not app.origin_allowed(origin):
            logger.warning("refused WebSocket from origin %r", origin)
            return connection.respond(HTTPStatus.FORBIDDEN, "Origin not allowed\n")
        peer = connection.remote_address[0] if connection.remote_address else "?"
        if app.connection_count >= app.settings.limits.max_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Too many connections\n")
        if app.per_ip.get(peer, 0) >= app.settings.limits.max_connections_per_ip:
            return connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "Too many connections from this address\n")
        del sec
        return None

    return check
