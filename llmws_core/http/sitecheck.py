"""What a web page may make the HTTP adapter do, and how /ui may be shown.

A page on any site can send the user's browser to a loopback server: an <img>
or <script> tag for `GET /chat/blocking?...`, a form POST, a fetch in `no-cors`
mode. The response stays unreadable to that page, but the work is done (a
generation, a model switch). So requests that a browser marks as coming from
another site are refused on every route except the few read-only pages a link may
open; curl, SDKs and the daemon's own pages send no such marks and are served.

Cross-site means: an `Origin` that is not the daemon's own origin nor listed in
`security.allowed_origins` / `security.cors_origins`; `Origin: null` (a sandboxed
frame or a page opened from disk; any site can produce it); or `Sec-Fetch-Site`
`cross-site` / `same-site` (another port of localhost is same-site) without such
an allowed Origin.

/ui is sent with `X-Frame-Options: DENY`, `frame-ancestors 'none'` and a strict
Content-Security-Policy: scripts only from the daemon's origin or inline blocks
whose SHA-256 matches the served file, nothing loaded from elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import errors
from ..security import origin_allowed

if TYPE_CHECKING:
    from ..services import Services

logger = logging.getLogger("llmws.http.sitecheck")

#: Read-only pages another site may link to (GET and HEAD only).
NAVIGABLE = frozenset({"/", "/ui", "/health", "/ping", "/favicon.ico"})
#: Files the web client loads from its own origin (read-only).
NAVIGABLE_PREFIXES = ("/vendor/",)

_INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S | re.I)


def is_cross_site(app: Services, headers: dict[bytes, bytes]) -> bool:
    """Whether a browser says this request comes from a page of another site."""
    origin = headers.get(b"origin")
    allowed_origin = False
    if origin is not None:
        value = origin.decode("latin-1")
        if value == "null":
            return True
        sec = app.settings.security
        allowed_origin = value in sec.cors_origins or origin_allowed(value, app.settings, app.runtime.http_port)
        if not allowed_origin:
            return True
    site = headers.get(b"sec-fetch-site", b"").lower()
    return site in (b"cross-site", b"same-site") and not allowed_origin


class CrossSiteGuard:
    """ASGI middleware: refuse cross-site requests outside `NAVIGABLE`, in the error
    shape of the route asked for (`respond`)."""

    def __init__(
        self,
        asgi: ASGIApp,
        app: Services,
        respond: Callable[[Request, BaseException], Response | Awaitable[Response]],
    ) -> None:
        self.asgi = asgi
        self.app = app
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._navigable(scope):
            headers = dict(scope.get("headers") or [])
            if is_cross_site(self.app, headers):
                logger.warning(
                    "refused a cross-site %s %s (Origin %r)",
                    scope.get("method"),
                    scope.get("path", "")[:100],
                    headers.get(b"origin", b"").decode("latin-1")[:100],
                )
                exc = errors.Forbidden("Requests from other web sites are not accepted here.")
                response = self.respond(Request(scope), exc)
                if not isinstance(response, Response):
                    response = await response
                await response(scope, receive, send)
                return
        await self.asgi(scope, receive, send)

    @staticmethod
    def _navigable(scope: Scope) -> bool:
        path = scope.get("path", "")
        return scope.get("method") in ("GET", "HEAD") and (path in NAVIGABLE or path.startswith(NAVIGABLE_PREFIXES))


def ui_headers(page: bytes) -> dict[str, str]:
    """Headers for the web client's page: no framing, and a CSP that runs only the
    daemon's own scripts (files from its origin, inline blocks by hash)."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(block).digest()).decode("ascii") + "'"
        for block in _INLINE_SCRIPT.findall(page)
    )
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src 'self' {hashes}".strip(),
            # Styles: the page's own and inline ones (style attributes, highlighting);
            # CSS cannot run code, and nothing is loaded from elsewhere.
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data: blob:",
            "font-src 'self' data:",
            # The user may point the page at any LLMWS daemon (ws:// or wss://).
            "connect-src 'self' ws: wss:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return {
        "Content-Security-Policy": policy,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
