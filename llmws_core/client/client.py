"""The async Python client for the LLMWS WebSocket daemon.

One reader task owns the socket: it reads every server event, drops the ones it
has already seen (by `seq`), routes the rest to the request that is waiting for
them (by `request_id`, or `job_id` for downloads), acks what it has processed,
and -- when the connection drops -- reconnects with exponential backoff and
resumes the session with `session_id` + `last_seq`. Callers therefore see each
token exactly once and in order, whatever happens to the network.

This module needs only `websockets` (no pydantic, no model code), so programs
that just talk to a daemon can import it cheaply::

    from llm import LLMWSEnhancedClient

    client = LLMWSEnhancedClient("ws://127.0.0.1:8765")
    await client.connect()
    text = await client.inference("What is AI?", system="Be brief.", temperature=0)
    async with client.stream("Tell me a story") as stream:
        async for token in stream:
            print(token, end="", flush=True)
    await client.disconnect()
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import inspect
import ipaddress
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from llmws_core.errors import LLMWSError

logger = logging.getLogger("llmws.client")

__all__ = [
    "DEFAULT_URL",
    "BadRequestError",
    "BusyError",
    "ClientState",
    "ConnectFailedError",
    "ConnectionLostError",
    "ContextTooLongError",
    "CorruptRecordError",
    "DownloadFailedError",
    "GenerationFailedError",
    "InferenceStream",
    "LLMWSClientError",
    "LLMWSConnectionError",
    "LLMWSEnhancedClient",
    "ModelNotFoundError",
    "ModelNotLoadedError",
    "RequestTimeoutError",
    "SessionLostError",
    "UnauthorizedError",
    "error_from_event",
]

DEFAULT_URL = "ws://127.0.0.1:8765"
CLIENT_NAME = "llmws-python/1"
#: The protocol this client speaks, said in its handshake (a handshake without it is
#: served the original clients' legacy dialect).
PROTOCOL = 1

EventCallback = Callable[[dict[str, Any]], Any]


# --------------------------------------------------------------------------- exceptions


class LLMWSClientError(LLMWSError):
    """An error the daemon reported (an `error` event), or one the client detected.

    `code` is the wire code (`context_too_long`, `unauthorized`, ...), `message`
    the server's user-safe text, `fields` any extra fields of the event.
    """

    code = "error"

    def __init__(self, code: str, message: str, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message, **(fields or {}))
        self.code = code

    @property
    def request_id(self) -> str | None:
        """The request the error answers, where the server said."""
        value = self.fields.get("request_id")
        return value if isinstance(value, str) else None

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


class BadRequestError(LLMWSClientError):
    """The daemon rejected a message as malformed (bad_request, unknown_type, frame_too_large)."""


class ContextTooLongError(LLMWSClientError):
    """The prompt does not fit the model's usable context."""

    @property
    def max_context(self) -> int | None:
        return self.fields.get("max_context")

    @property
    def input_length(self) -> int | None:
        return self.fields.get("input_length")


class UnauthorizedError(LLMWSClientError):
    """A key is required and was missing or wrong, or the request needs the admin key."""


class ModelNotFoundError(LLMWSClientError):
    """No model of that name or path exists on the daemon."""


class ModelNotLoadedError(LLMWSClientError):
    """The daemon has no model loaded (yet)."""


class BusyError(LLMWSClientError):
    """The daemon refused the request because a bounded queue or rate limit is full."""


class SessionLostError(LLMWSClientError):
    """The session could not be resumed (expired, unknown); its in-flight replies are gone."""


class CorruptRecordError(LLMWSClientError):
    """A sealed record on the daemon failed authentication; its content was not returned."""


class GenerationFailedError(LLMWSClientError):
    """The model failed mid-generation."""


class DownloadFailedError(LLMWSClientError):
    """A model download failed."""


class LLMWSConnectionError(LLMWSClientError):
    """Base of the errors about the connection itself rather than a request."""


class ConnectFailedError(LLMWSConnectionError):
    """The daemon could not be reached or refused the WebSocket handshake."""


class ConnectionLostError(LLMWSConnectionError):
    """The connection dropped and could not be resumed (or the client was disconnected)."""


class RequestTimeoutError(LLMWSClientError):
    """The daemon did not answer a request in time."""


_ERROR_CLASSES: dict[str, type[LLMWSClientError]] = {
    "bad_request": BadRequestError,
    "unknown_type": BadRequestError,
    "frame_too_large": BadRequestError,
    "context_too_long": ContextTooLongError,
    "unauthorized": UnauthorizedError,
    "forbidden": UnauthorizedError,
    "model_not_found": ModelNotFoundError,
    "not_found": ModelNotFoundError,
    "model_not_loaded": ModelNotLoadedError,
    "busy": BusyError,
    "rate_limited": BusyError,
    "session_not_found": SessionLostError,
    "session_expired": SessionLostError,
    "corrupt_record": CorruptRecordError,
    "generation_failed": GenerationFailedError,
    "download_failed": DownloadFailedError,
}


def error_from_event(event: dict[str, Any]) -> LLMWSClientError:
    """Build the exception that matches an `error` event's code."""
    code = str(event.get("code") or "error")
    message = str(event.get("message") or "The server reported an error.")
    fields = {k: v for k, v in event.items() if k not in ("type", "code", "message")}
    return _ERROR_CLASSES.get(code, LLMWSClientError)(code, message, fields)


# --------------------------------------------------------------------------- helpers


class ClientState(enum.Enum):
    """Where the connection stands; methods check it to catch misuse early."""

    IDLE = "idle"  # never connected
    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"  # disconnect() was called or reconnecting gave up


class _Route:
    """Where the reader puts the events of one request."""

    def __init__(self, request_id: str, types: Iterable[str] = ()) -> None:
        self.request_id = request_id
        #: Event types this request accepts when the server sends them without a request_id.
        self.types = frozenset(types)
        self.queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()


def _new_request_id() -> str:
    return uuid.uuid4().hex


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _call(callback: Callable[..., Any] | None, *args: Any) -> None:
    """Run a user callback (plain or async); its failure is logged, never fatal to the reader."""
    if callback is None:
        return
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("client callback %r failed", callback)


# --------------------------------------------------------------------------- streaming


class InferenceStream:
    """One inference request as it streams: iterate it for token strings.

    Use it through `LLMWSEnhancedClient.stream`. After iteration, `text` holds the
    whole reply and `finish_reason`/`total_tokens` what `done` said. Leaving the
    `async with` block before `done` cancels the generation on the daemon.
    """

    def __init__(self, client: LLMWSEnhancedClient, message: dict[str, Any]) -> None:
        self._client = client
        self._message = message
        self.request_id: str = message["request_id"]
        self._route = _Route(self.request_id)
        self.text = ""
        self.tokens: list[str] = []
        self.started: dict[str, Any] | None = None
        self.done: dict[str, Any] | None = None
        self.warnings: list[str] = []
        self.queued_position: int | None = None
        self._finished = False

    @property
    def finish_reason(self) -> str | None:
        return self.done.get("finish_reason") if self.done else None

    @property
    def total_tokens(self) -> int | None:
        return self.done.get("total_tokens") if self.done else None

    @property
    def tokens_in(self) -> int | None:
        return self.started.get("tokens_in") if self.started else None

    async def _open(self) -> None:
        self._client._routes[self.request_id] = self._route
        try:
            await self._client._send(self._message)
        except BaseException:
            self._client._routes.pop(self.request_id, None)
            raise

    def __aiter__(self) -> AsyncIterator[str]:
        return self._tokens()

    async def _tokens(self) -> AsyncIterator[str]:
        while not self._finished:
            item = await self._route.queue.get()
            if isinstance(item, BaseException):
                self._finish()
                raise item
            kind = item.get("type")
            if kind == "token":
                data = item.get("data")
                if isinstance(data, str) and data:
                    self.tokens.append(data)
                    self.text += data
                    yield data
            elif kind == "start":
                self.started = item
            elif kind == "queued":
                self.queued_position = item.get("position")
            elif kind in ("warning", "notice"):
                self.warnings.append(str(item.get("message", "")))
            elif kind == "error":
                self._finish()
                raise error_from_event(item)
            elif kind == "done":
                self.done = item
                self._finish()
                if item.get("finish_reason") == "error":
                    raise GenerationFailedError("generation_failed", "The generation failed on the server.", item)

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._client._forget(self.request_id)

    async def cancel(self) -> None:
        """Ask the daemon to stop this generation; iteration then ends with `done`."""
        if not self._finished:
            await self._client.cancel(self.request_id)

    async def _close(self) -> None:
        """Leave the stream: cancel on the daemon if it has not finished, and wait briefly."""
        if self._finished:
            return
        try:
            await self.cancel()
            # Wait (bounded) for the `done` so the daemon is idle before the caller's next
            # request; late events of this request are dropped by the reader.
            async with asyncio.timeout(self._client.cancel_timeout):
                async for _ in self:
                    pass
        except (LLMWSClientError, TimeoutError):
            pass
        finally:
            self._finish()


class _StreamContext(contextlib.AbstractAsyncContextManager["InferenceStream"]):
    def __init__(self, stream: InferenceStream) -> None:
        self._stream = stream

    async def __aenter__(self) -> InferenceStream:
        await self._stream._open()
        return self._stream

    async def __aexit__(self, *exc_info: Any) -> None:
        await asyncio.shield(self._stream._close())


# --------------------------------------------------------------------------- the client


class LLMWSEnhancedClient:
    """An async client of the LLMWS daemon that survives dropped connections.

    Args:
        url: the daemon's WebSocket address. A bare host name (no `ws://`) is taken
            as the original client's `host`, with `port` as its second argument.
        port: the daemon's port, with a host instead of a URL (default 8765).
        host: the original client's keyword: `LLMWSEnhancedClient(host=..., port=...)`.

        # Authentication
        api_key: sent as `X-API-Key` and in the handshake; None sends no key.

        # Resilience
        auto_reconnect: reconnect and resume by itself after a drop; False makes a drop
            fail every in-flight request with `ConnectionLostError`.
        reconnect_attempts: how many reconnects to try before giving up.
        reconnect_delay: first backoff delay in seconds; it doubles up to `reconnect_max_delay`.
        ack_every: ack after this many new buffered events (and always at `done`), so the
            daemon can trim the session's replay buffer.

        # Timeouts (seconds; None waits forever)
        open_timeout: for the TCP + WebSocket + LLMWS handshake.
        request_timeout: for quick queries (ping, status, list_models, ...).
        long_timeout: for switch_model and delete_model.

        # Hooks (plain functions or coroutines)
        on_event: called with every server event after deduplication (welcome included);
            for logging or raw output.
        on_unsolicited: called with events no pending request claims: notices, warnings,
            replayed events of requests from an earlier connection of this session.
        on_connection: called as `(state, info)` with state "reconnecting" (info: attempt,
            delay), "resumed" (the welcome), "new_session" (the welcome, when the old session
            could not be resumed) or "lost" (info: reason).
    """

    def __init__(
        self,
        url: str | None = None,
        port: int | None = None,
        *,
        host: str | None = None,
        api_key: str | None = None,
        auto_reconnect: bool = True,
        reconnect_attempts: int = 8,
        reconnect_delay: float = 0.25,
        reconnect_max_delay: float = 5.0,
        ack_every: int = 32,
        open_timeout: float | None = 10.0,
        request_timeout: float | None = 30.0,
        long_timeout: float | None = 600.0,
        cancel_timeout: float = 5.0,
        max_frame_bytes: int = 16 * 1024 * 1024,
        on_event: EventCallback | None = None,
        on_unsolicited: EventCallback | None = None,
        on_connection: Callable[[str, dict[str, Any]], Any] | None = None,
    ) -> None:
        if host is None and url is not None and "://" not in url:
            host, url = url, None  # LLMWSEnhancedClient("localhost", 8765), as the original
        if host is not None or port is not None:
            if url is not None:
                raise ValueError("give either url, or host and port")
            name = host or "127.0.0.1"
            if ":" in name and not name.startswith("["):
                name = f"[{name}]"  # an IPv6 address
            url = f"ws://{name}:{port or 8765}"
        self.url = url or DEFAULT_URL
        self.host = urlsplit(self.url).hostname
        self.port = urlsplit(self.url).port
        self.api_key = api_key
        self.auto_reconnect = auto_reconnect
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_delay = reconnect_delay
        self.reconnect_max_delay = reconnect_max_delay
        self.ack_every = max(1, ack_every)
        self.open_timeout = open_timeout
        self.request_timeout = request_timeout
        self.long_timeout = long_timeout
        self.cancel_timeout = cancel_timeout
        self.max_frame_bytes = max_frame_bytes
        self.on_event = on_event
        self.on_unsolicited = on_unsolicited
        self.on_connection = on_connection

        self.session_id: str | None = None
        #: Highest buffered `seq` processed; events at or below it are duplicates.
        self.last_seq: int = 0
        #: The last `welcome` event (model, max_context, ...).
        self.welcome: dict[str, Any] = {}
        self.state = ClientState.IDLE
        self.reconnects = 0

        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._open_event = asyncio.Event()
        self._routes: dict[str, _Route] = {}
        self._job_routes: dict[str, _Route] = {}
        # Requests that finished or were abandoned: their late events are dropped quietly.
        self._finished: collections.deque[str] = collections.deque(maxlen=256)
        self._acked_seq = 0
        self._unacked = 0

    # ------------------------------------------------------------------ connection

    @property
    def model(self) -> dict[str, Any]:
        """The loaded model as the last welcome or model switch described it."""
        model = self.welcome.get("model")
        return model if isinstance(model, dict) else {}

    @property
    def max_context(self) -> int | None:
        return self.welcome.get("max_context")

    @property
    def connected(self) -> bool:
        return self.state is ClientState.OPEN

    async def connect(self, session_id: str | None = None, last_seq: int | None = None) -> str:
        """Connect and open (or resume) a session; returns the session id.

        Args:
            session_id: resume this session; None starts a new one. If the daemon cannot
                resume it, the welcome says `resumed: false` and `on_unsolicited` gets the
                daemon's notice; `self.welcome["resumed"]` tells the caller.
            last_seq: the last event seq already seen; the daemon replays what follows.
                None replays everything the session still buffers.

        Raises:
            ConnectFailedError: the daemon is unreachable or refused the handshake.
            UnauthorizedError: the API key was missing or wrong.
        """
        if self.state in (ClientState.OPEN, ClientState.CONNECTING, ClientState.RECONNECTING):
            raise RuntimeError("already connected; call disconnect() first")
        self.state = ClientState.CONNECTING
        if session_id is not None:
            self.session_id = session_id
            self.last_seq = last_seq or 0
        else:
            self.session_id = None
            self.last_seq = 0
        self._acked_seq = self.last_seq
        try:
            ws, welcome, early = await self._open(session_id, last_seq)
        except BaseException:
            self.state = ClientState.CLOSED
            raise
        self._adopt(ws, welcome)
        self._reader = asyncio.create_task(self._read_loop(early), name="llmws-client-reader")
        assert self.session_id is not None
        return self.session_id

    async def disconnect(self, send_ack: bool = True) -> None:
        """Ack what was received (unless `send_ack` is false), close the socket and fail
        anything still waiting."""
        if self.state is ClientState.IDLE:
            self.state = ClientState.CLOSED
            return
        was_open = self.state is ClientState.OPEN
        self.state = ClientState.CLOSED
        self._open_event.clear()
        ws = self._ws
        if ws is not None and was_open and send_ack and self.last_seq > self._acked_seq:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await ws.send(json.dumps({"type": "ack", "seq": self.last_seq}))
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self._reader = None
        self._ws = None
        self._fail_all(ConnectionLostError("disconnected", "The client disconnected."))

    async def __aenter__(self) -> LLMWSEnhancedClient:
        if self.state is not ClientState.OPEN:
            await self.connect()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.disconnect()

    def _handshake_frame(self, session_id: str | None, last_seq: int | None) -> dict[str, Any]:
        frame: dict[str, Any] = {}
        if session_id is not None:
            frame["session_id"] = session_id
            if last_seq is not None:
                frame["last_seq"] = last_seq
        if self.api_key:
            frame["api_key"] = self.api_key
        frame["client"] = CLIENT_NAME
        frame["protocol"] = PROTOCOL
        return frame

    async def _open(
        self, session_id: str | None, last_seq: int | None
    ) -> tuple[ClientConnection, dict[str, Any], list[dict[str, Any]]]:
        """Open a socket and do the LLMWS handshake; returns (socket, welcome, early events)."""
        headers = {"X-API-Key": self.api_key} if self.api_key else None
        options: dict[str, Any] = {}
        if _is_loopback(self.url):
            options["proxy"] = None  # never route a local daemon through an HTTP proxy
        try:
            ws = await ws_connect(
                self.url,
                additional_headers=headers,
                open_timeout=self.open_timeout,
                max_size=self.max_frame_bytes,
                user_agent_header=CLIENT_NAME,
                **options,
            )
        except InvalidURI as exc:
            raise ConnectFailedError("bad_url", f"Not a WebSocket URL: {self.url}") from exc
        except InvalidHandshake as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise UnauthorizedError(
                    "unauthorized", f"The server at {self.url} refused the key (HTTP {status})."
                ) from exc
            raise ConnectFailedError(
                "connect_failed", f"The server at {self.url} refused the WebSocket handshake."
            ) from exc
        except (OSError, TimeoutError) as exc:
            raise ConnectFailedError("connect_failed", f"Cannot reach the LLMWS server at {self.url}.") from exc
        try:
            await ws.send(json.dumps(self._handshake_frame(session_id, last_seq)))
            early: list[dict[str, Any]] = []
            async with asyncio.timeout(self.open_timeout):
                while True:
                    event = self._decode(await ws.recv())
                    if event is None:
                        continue
                    kind = event.get("type")
                    if kind == "welcome":
                        return ws, event, early
                    if kind == "error":
                        raise error_from_event(event)
                    # A notice (e.g. "session expired") may precede the welcome.
                    early.append(event)
        except ConnectionClosed as exc:
            await ws.close()
            raise ConnectFailedError(
                "connect_failed", "The server closed the connection during the handshake."
            ) from exc
        except TimeoutError as exc:
            await ws.close()
            raise ConnectFailedError("connect_failed", "The server did not answer the handshake in time.") from exc
        except BaseException:
            await ws.close()
            raise

    def _adopt(self, ws: ClientConnection, welcome: dict[str, Any]) -> None:
        """Take a freshly opened socket into use."""
        self._ws = ws
        self.welcome = welcome
        self.session_id = str(welcome.get("session_id") or self.session_id or "")
        server_seq = welcome.get("last_seq")
        if not welcome.get("resumed", False):
            # A new session numbers its events from scratch.
            self.last_seq = 0
            self._acked_seq = 0
        elif isinstance(server_seq, int) and server_seq < self.last_seq:
            # The daemon is behind us (it should not be: events are written before they are
            # sent). Trust it, or every new event would be dropped as a duplicate.
            logger.warning(
                "server last_seq %s is below ours (%s); following the server",
                server_seq,
                self.last_seq,
            )
            self.last_seq = server_seq
            self._acked_seq = min(self._acked_seq, server_seq)
        self.state = ClientState.OPEN
        self._open_event.set()

    @staticmethod
    def _decode(raw: str | bytes) -> dict[str, Any] | None:
        try:
            event = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            logger.warning("ignoring a frame that is not JSON")
            return None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            logger.warning("ignoring a frame that is not an event object")
            return None
        return event

    # ------------------------------------------------------------------ the reader

    async def _read_loop(self, early: list[dict[str, Any]]) -> None:
        """Read events for the life of the client, reconnecting after drops."""
        try:
            await _call(self.on_event, self.welcome)
            for event in early:
                await self._dispatch(event)
            while True:
                ws = self._ws
                assert ws is not None
                try:
                    async for raw in ws:
                        event = self._decode(raw)
                        if event is not None:
                            await self._dispatch(event)
                except ConnectionClosed:
                    pass
                if self.state is ClientState.CLOSED:
                    return
                logger.info("connection to %s lost", self.url)
                if not self.auto_reconnect or not await self._reconnect():
                    self.state = ClientState.CLOSED
                    self._open_event.clear()
                    await _call(self.on_connection, "lost", {"reason": "connection lost"})
                    self._fail_all(ConnectionLostError("connection_lost", f"Lost the connection to {self.url}."))
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave callers waiting forever
            logger.exception("client reader failed")
            self.state = ClientState.CLOSED
            self._fail_all(ConnectionLostError("client_error", f"Client reader failed: {exc}"))

    async def _reconnect(self) -> bool:
        """Reconnect with exponential backoff and resume; False when it gives up."""
        self.state = ClientState.RECONNECTING
        self._open_event.clear()
        delay = self.reconnect_delay
        for attempt in range(1, self.reconnect_attempts + 1):
            await _call(self.on_connection, "reconnecting", {"attempt": attempt, "delay": delay})
            # Jitter keeps many clients of one restarted daemon from reconnecting in lockstep.
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.reconnect_max_delay)
            if self.state is ClientState.CLOSED:
                return False
            try:
                ws, welcome, early = await self._open(self.session_id, self.last_seq)
            except (UnauthorizedError, BadRequestError) as exc:
                logger.warning("reconnect refused: %s", exc)
                return False
            except LLMWSClientError as exc:
                logger.info("reconnect attempt %d failed: %s", attempt, exc)
                continue
            old_session = self.session_id
            self._adopt(ws, welcome)
            self.reconnects += 1
            await _call(self.on_event, welcome)
            if welcome.get("resumed", False) and welcome.get("session_id") == old_session:
                logger.info("resumed session %s after seq %s", self.session_id, self.last_seq)
                await _call(self.on_connection, "resumed", welcome)
            else:
                # The daemon lost the session: nothing in flight can finish.
                logger.warning("session %s could not be resumed", old_session)
                await _call(self.on_connection, "new_session", welcome)
                self._fail_all(
                    SessionLostError(
                        "session_lost",
                        "The server could not resume the session; its replies in flight are lost.",
                    )
                )
            for event in early:
                await self._dispatch(event)
            return True
        return False

    async def _dispatch(self, event: dict[str, Any]) -> None:
        """Deduplicate by seq, then hand the event to whoever waits for it."""
        seq = event.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            if seq <= self.last_seq:
                logger.debug("dropping duplicate event seq=%s", seq)
                return
            self.last_seq = seq
            self._unacked += 1
        await _call(self.on_event, event)
        kind = event.get("type")
        if kind == "model_switched":
            # Keep `model`/`max_context` current for callers that read them from the welcome.
            self.welcome = {
                **self.welcome,
                "model": event.get("model", self.welcome.get("model")),
                "max_context": event.get("max_context", self.welcome.get("max_context")),
            }
        route = self._route_for(event)
        if route is not None:
            job_id = event.get("job_id")
            if isinstance(job_id, str) and route.request_id in self._routes:
                # Later events of this job (progress) may carry only the job id; register it
                # here, before they can arrive, rather than when the caller gets to this one.
                self._job_routes.setdefault(job_id, route)
            route.queue.put_nowait(event)
        elif event.get("request_id") in self._finished:
            pass  # a late event of an abandoned request
        elif kind != "ack_received":
            await _call(self.on_unsolicited, event)
        if isinstance(seq, int) and (kind == "done" or self._unacked >= self.ack_every):
            await self._ack()

    def _route_for(self, event: dict[str, Any]) -> _Route | None:
        request_id = event.get("request_id")
        if isinstance(request_id, str) and request_id in self._routes:
            return self._routes[request_id]
        job_id = event.get("job_id")
        if isinstance(job_id, str) and job_id in self._job_routes:
            return self._job_routes[job_id]
        if request_id is None:
            # An answer the server sent without our request_id: the oldest waiter for its type.
            kind = event.get("type")
            for route in self._routes.values():
                if kind in route.types:
                    return route
        return None

    async def _ack(self) -> None:
        """Tell the daemon we have everything up to last_seq, so it can trim its buffer."""
        self._unacked = 0
        if self.last_seq <= self._acked_seq or self._ws is None:
            return
        seq = self.last_seq
        try:
            await self._ws.send(json.dumps({"type": "ack", "seq": seq}))
            self._acked_seq = seq
        except ConnectionClosed:
            pass  # the next connection resumes from last_seq anyway

    def _forget(self, request_id: str) -> None:
        route = self._routes.pop(request_id, None)
        self._finished.append(request_id)
        if route is not None:
            for job_id in [j for j, r in self._job_routes.items() if r is route]:
                del self._job_routes[job_id]

    def _fail_all(self, error: LLMWSClientError) -> None:
        for route in list(self._routes.values()):
            route.queue.put_nowait(error)

    # ------------------------------------------------------------------ sending

    async def _send(self, message: dict[str, Any]) -> None:
        """Send one message, waiting (bounded) for a reconnect in progress."""
        if self.state in (ClientState.IDLE, ClientState.CLOSED):
            raise ConnectionLostError("not_connected", "The client is not connected.")
        if self.state is not ClientState.OPEN:
            try:
                async with asyncio.timeout(self._reconnect_budget()):
                    await self._open_event.wait()
            except TimeoutError:
                raise ConnectionLostError("connection_lost", f"Lost the connection to {self.url}.") from None
        if self.state is not ClientState.OPEN or self._ws is None:
            raise ConnectionLostError("connection_lost", f"Lost the connection to {self.url}.")
        try:
            await self._ws.send(json.dumps(message))
        except ConnectionClosed:
            # The reader notices the drop and resumes; a message that did not leave is lost,
            # and the caller hears so instead of waiting for an answer that cannot come.
            raise ConnectionLostError("connection_lost", "The connection dropped while sending.") from None

    def _reconnect_budget(self) -> float:
        total, delay = 0.0, self.reconnect_delay
        for _ in range(self.reconnect_attempts):
            total += delay + (self.open_timeout or 10.0)
            delay = min(delay * 2, self.reconnect_max_delay)
        return total

    async def request(
        self,
        message: dict[str, Any],
        answer: str | Iterable[str],
        *,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
    ) -> dict[str, Any]:
        """Send `message` and wait for the event of type `answer` that answers it.

        Events of other types for the same request (progress, logs) go to `on_event`.

        Raises:
            LLMWSClientError: the daemon answered with an `error` event.
            RequestTimeoutError: no answer within `timeout` seconds.
        """
        answers = frozenset([answer] if isinstance(answer, str) else answer)
        request_id = message.setdefault("request_id", _new_request_id())
        route = _Route(request_id, answers)
        self._routes[request_id] = route
        try:
            await self._send(message)
            async with asyncio.timeout(timeout):
                while True:
                    item = await route.queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    kind = item.get("type")
                    if kind == "error":
                        raise error_from_event(item)
                    if kind in answers:
                        return item
                    await _call(on_event, item)
        except TimeoutError:
            raise RequestTimeoutError("timeout", f"No answer to {message.get('type')} within {timeout} s.") from None
        finally:
            self._forget(request_id)

    # ------------------------------------------------------------------ inference

    def _inference_message(
        self,
        prompt: str | None,
        system: str | None,
        *,
        messages: list[dict[str, Any]] | None,
        request_id: str | None,
        on_disconnect: str,
        config: dict[str, Any],
        images: list[Any] | None = None,
    ) -> dict[str, Any]:
        message: dict[str, Any] = {
            "type": "inference",
            "request_id": request_id or _new_request_id(),
            "on_disconnect": on_disconnect,
        }
        if prompt is not None:
            message["prompt"] = {"system": system, "user": prompt} if system else {"user": prompt}
            if images:
                message["prompt"]["images"] = images
        if messages is not None:
            message["messages"] = messages
        config = {k: v for k, v in config.items() if v is not None}
        if config:
            message["config"] = config
        return message

    def stream(
        self,
        prompt: str | None,
        system: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        on_disconnect: str = "continue",
        images: list[Any] | None = None,
        **config: Any,
    ) -> contextlib.AbstractAsyncContextManager[InferenceStream]:
        """Stream one reply: `async with client.stream("Hi") as s: async for tok in s: ...`.

        Args:
            prompt: the user's message (the session keeps the conversation so far).
            system: a system prompt for this turn.
            messages: an OpenAI-style message list instead of (or besides) `prompt`.
            request_id: your own id for the request; None makes a random one.
            on_disconnect: "continue" (default) keeps generating while the client is away;
                "cancel" stops the generation when the connection drops.
            images: images for the prompt (`{"data": base64, "media_type": ...}` or
                `{"path": ...}`); a text-only model answers with an `unsupported` error.
            **config: generation settings for this request (temperature, top_p, top_k,
                max_new_tokens, stop, seed); None values are left out.

        Leaving the block before the reply is done cancels it on the daemon.
        """
        message = self._inference_message(
            prompt,
            system,
            messages=messages,
            request_id=request_id,
            on_disconnect=on_disconnect,
            config=config,
            images=images,
        )
        return _StreamContext(InferenceStream(self, message))

    async def inference(
        self,
        prompt: str | None,
        system: str | None = None,
        *,
        on_token: Callable[[str], Any] | None = None,
        messages: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        on_disconnect: str = "continue",
        images: list[Any] | None = None,
        **config: Any,
    ) -> str:
        """Generate a reply and return its full text.

        Args:
            on_token: called with each token as it arrives (plain function or coroutine).
            Others: as for `stream`.

        Raises:
            ContextTooLongError, ModelNotLoadedError, ...: the daemon's error for the request.
            ConnectionLostError: the connection dropped and could not be resumed.
        """
        async with self.stream(
            prompt,
            system,
            messages=messages,
            request_id=request_id,
            on_disconnect=on_disconnect,
            images=images,
            **config,
        ) as stream:
            async for token in stream:
                if on_token is not None:
                    result = on_token(token)
                    if inspect.isawaitable(result):
                        await result
            return stream.text

    async def cancel(self, request_id: str | None = None) -> None:
        """Stop a generation (by request id; None: whatever the session is generating)."""
        message: dict[str, Any] = {"type": "cancel"}
        if request_id is not None:
            message["request_id"] = request_id
        await self._send(message)

    # ------------------------------------------------------------------ queries

    async def ping(self) -> float:
        """Round trip to the daemon; returns the latency in seconds."""
        started = time.perf_counter()
        await self.request({"type": "ping"}, "pong", timeout=self.request_timeout)
        return time.perf_counter() - started

    async def get_status(self) -> dict[str, Any]:
        """The daemon's status event (model, queue, sessions, ...)."""
        return await self.request({"type": "get_status"}, "status", timeout=self.request_timeout)

    async def get_resources(self) -> dict[str, Any]:
        """GPU, CPU, RAM, process and model figures (the `resources` event)."""
        return await self.request({"type": "get_resources"}, "resources", timeout=self.request_timeout)

    async def list_models(self) -> list[dict[str, Any]]:
        """The models the daemon can serve: name, path, format, size_mb, source, loaded."""
        event = await self.request({"type": "list_models"}, "models_list", timeout=self.request_timeout)
        models = event.get("models")
        return models if isinstance(models, list) else []

    async def set_config(self, **config: Any) -> dict[str, Any]:
        """Change the session's generation defaults; returns the resulting config."""
        event = await self.request({"type": "config", "data": config}, "config_ack", timeout=self.request_timeout)
        result = event.get("config")
        return result if isinstance(result, dict) else {}

    async def reset(self) -> None:
        """Forget the session's conversation (its config stays)."""
        await self.request({"type": "reset"}, "reset_done", timeout=self.request_timeout)

    async def switch_model(self, model_path: str, *, on_progress: EventCallback | None = None) -> dict[str, Any]:
        """Load another model; returns the `model_switched` event (model, max_context).

        `on_progress` receives `model_loading` events while the model loads.
        """
        return await self.request(
            {"type": "switch_model", "model_path": model_path},
            "model_switched",
            timeout=self.long_timeout,
            on_event=on_progress,
        )

    async def delete_model(self, model_name: str) -> dict[str, Any]:
        """Delete a model from the daemon's model folders; returns the `model_deleted` event."""
        return await self.request(
            {"type": "delete_model", "model_name": model_name},
            "model_deleted",
            timeout=self.long_timeout,
        )

    async def download_model(
        self,
        repo: str,
        target_dir: str,
        on_progress: EventCallback | None = None,
        *,
        filename: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Download a model on the daemon; returns the `download_done` event (path).

        `on_progress` receives `download_started`, `download_progress` (file, done, total,
        rate, eta) and `log` events. Cancelling the awaiting task cancels the download.

        Raises:
            DownloadFailedError: the download failed (the daemon's error event).
        """
        request_id = _new_request_id()
        message: dict[str, Any] = {
            "type": "download_model",
            "repo": repo,
            "target_dir": target_dir,
            "request_id": request_id,
        }
        if filename is not None:
            message["filename"] = filename
        route = _Route(request_id, {"download_started"})
        self._routes[request_id] = route
        job_id: str | None = None
        finished = False
        try:
            await self._send(message)
            async with asyncio.timeout(timeout):
                while True:
                    item = await route.queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    kind = item.get("type")
                    if kind == "error":
                        finished = True
                        raise error_from_event(item)
                    if kind == "download_started" and isinstance(item.get("job_id"), str):
                        job_id = item["job_id"]  # the reader routes by it from now on
                    if kind == "download_done":
                        finished = True
                        return item
                    await _call(on_progress, item)
        except TimeoutError:
            raise RequestTimeoutError("timeout", "The download did not finish in time.") from None
        finally:
            if not finished and job_id is not None and self.state is ClientState.OPEN:
                with contextlib.suppress(LLMWSClientError):
                    await self._send({"type": "cancel_download", "job_id": job_id})
            self._forget(request_id)

    async def cancel_download(self, job_id: str) -> None:
        """Stop a download by its job id."""
        await self._send({"type": "cancel_download", "job_id": job_id})

    async def ack(self) -> None:
        """Ack everything received so far now (the client also does this by itself)."""
        await self._ack()


def events_as_text(events: Iterable[dict[str, Any]]) -> str:
    """Concatenate the token data of a list of events (handy in tests and scripts)."""
    return "".join(e.get("data", "") for e in events if e.get("type") == "token" and isinstance(e.get("data"), str))
