"""Connection guards for the HTTP adapter: header timeouts and a bound on connections.

uvicorn times out idle keep-alive connections but not a connection that never
finishes its request headers (idle from the start, or a slow trickle): each one
holds a file descriptor until the process runs out. The guard closes such a
connection `header_timeout` seconds after it began waiting for a request, and
closes any connection beyond `max_connections` as soon as it is accepted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

logger = logging.getLogger("llmws.http.guard")


class Guard:
    """What the guarded protocol needs to know, and when it last complained."""

    def __init__(self, *, header_timeout: float, max_connections: int, report_every: float = 10.0) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.report_every = report_every
        self.refused = 0
        self.timed_out = 0
        self._reported = float("-inf")
        self._unreported = 0

    def refuse(self) -> None:
        """Count a connection closed for being over the bound; log once per interval."""
        self.refused += 1
        self._unreported += 1
        now = time.monotonic()
        if now - self._reported >= self.report_every:
            logger.warning(
                "HTTP connection limit (%d) reached: closed %d new connection(s) since the last report",
                self.max_connections,
                self._unreported,
            )
            self._reported, self._unreported = now, 0


def guarded_protocol(guard: Guard, http: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (`http` as in uvicorn.Config) with the guard."""
    base: Any = import_from_string(HTTP_PROTOCOLS[http]) if http in HTTP_PROTOCOLS else import_from_string(http)

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        _waiting_since: float | None = None
        _guard_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            if len(self.connections) > guard.max_connections:
                guard.refuse()
                transport.abort()  # type: ignore[attr-defined]
                return
            self._waiting_since = time.monotonic()
            self._arm(guard.header_timeout)

        def _arm(self, delay: float) -> None:
            self._guard_timer = self.loop.call_later(delay, self._check_headers)

        def _check_headers(self) -> None:
            self._guard_timer = None
            if self.transport is None or self.transport.is_closing():
                return
            if self.transport.get_protocol() is not self:  # upgraded (WebSocket): not ours
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                self._waiting_since = None  # a request is being answered: not idle
                self._arm(guard.header_timeout)
                return
            since = self._waiting_since
            if since is None:
                since = self._waiting_since = time.monotonic()
            left = since + guard.header_timeout - time.monotonic()
            if left > 0:
                self._arm(left)
                return
            guard.timed_out += 1
            self.transport.close()

        def on_response_complete(self) -> None:
            self._waiting_since = time.monotonic()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
                self._guard_timer = None
            super().connection_lost(exc)

    return GuardedProtocol
