"""API keys and the Host check of the HTTP adapter, on the rules of `security.py`.

Keys come from `security.api_keys` / `security.admin_keys` (config or LLMWS_API_KEYS /
LLMWS_ADMIN_KEYS) and are read from `X-API-Key`, `Authorization: Bearer`, or the
`x_api_key` query parameter (browser-friendly GET tests), compared in constant time;
a key gives the same roles here as on the WebSocket.

The Host check defeats DNS rebinding: a web page on evil.example whose name is
re-pointed at 127.0.0.1 would otherwise reach this loopback server with the user's
browser. Such requests carry `Host: evil.example` and are refused.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import errors
from ..chat import CLIENT
from ..security import Access, access, allowed_hosts, host_name, key_from, key_matches, key_owner

if TYPE_CHECKING:
    from ..services import Services

logger = logging.getLogger("llmws.http.auth")

# Declared as FastAPI security schemes so /openapi.json documents them; auto_error is
# off because keys are optional on loopback and the decision is ours.
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")
_bearer = HTTPBearer(auto_error=False, description="API key as a Bearer token")
_query = APIKeyQuery(name="x_api_key", auto_error=False, description="API key in the query (GET tests)")


def llmws(request: Request) -> Services:
    """The services behind this request."""
    return request.app.state.services  # type: ignore[no-any-return]


def given_key(request: Request) -> str | None:
    """The key the client sent, from the header, the Bearer token or the query."""
    return key_from(request.headers.get, request.query_params.get)


def roles(request: Request) -> Access:
    """What this request's key (or none) allows (`security.access`)."""
    app = llmws(request)
    return access(given_key(request), app.settings, keys_required=app.keys_required)


def principal(request: Request) -> str:
    """Who is asking, for cache isolation: a digest of the key, or 'local' without one.

    Prompt-prefix caches are shared only between requests of the same principal, so
    one key holder can never time another's cached prompt."""
    key = given_key(request)
    if not key:
        return "http:local"
    return "http:" + hashlib.sha256(key.encode()).hexdigest()[:16]


async def user_key(
    request: Request,
    _header_key: str | None = Depends(_header),
    _bearer_key: HTTPAuthorizationCredentials | None = Depends(_bearer),
    _query_key: str | None = Depends(_query),
) -> None:
    """Dependency: a valid user or admin key when keys are required.

    The three scheme parameters only document the ways to send a key in
    /openapi.json; `given_key` reads them in order of precedence."""
    if roles(request).allowed:
        return
    if given_key(request) is None:
        raise errors.Unauthorized("An API key is required (X-API-Key header, Bearer token or x_api_key).")
    raise errors.Unauthorized("That API key is not valid.")


async def admin_key(
    request: Request,
    _header_key: str | None = Depends(_header),
    _bearer_key: HTTPAuthorizationCredentials | None = Depends(_bearer),
    _query_key: str | None = Depends(_query),
) -> None:
    """Dependency: the admin key when admin keys exist (else the user rules apply)."""
    if not llmws(request).settings.security.admin_keys:
        await user_key(request)
        return
    if roles(request).admin:
        return
    key = given_key(request)
    if key is None:
        raise errors.Unauthorized("This action needs the admin key.")
    if key_matches(key, llmws(request).settings.security.api_keys):
        raise errors.Forbidden("This action needs the admin key.")
    raise errors.Unauthorized("That API key is not valid.")


def is_admin(request: Request) -> bool:
    """Whether this request may do admin actions (switch models)."""
    return roles(request).admin


class HostCheck:
    """ASGI middleware: refuse requests whose Host header names another server."""

    def __init__(self, asgi: ASGIApp, app: Services) -> None:
        self.asgi = asgi
        self.allowed = allowed_hosts(app.settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.allowed is not None:
            raw = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(raw) not in self.allowed:
                logger.warning("refused a request for Host %r (DNS rebinding guard)", raw[:100])
                response = JSONResponse({"detail": "Invalid Host header."}, status_code=400)
                await response(scope, receive, send)
                return
        await self.asgi(scope, receive, send)


class ClientTag:
    """ASGI middleware: name the client of each request (its address and key) for the
    chat service's per-client limit on waiting and running generations."""

    def __init__(self, asgi: ASGIApp, app: Services) -> None:
        self.asgi = asgi
        sec = app.settings.security
        self.keys = [*sec.api_keys, *sec.admin_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.asgi(scope, receive, send)
            return
        address = (scope.get("client") or ("?", 0))[0]
        owner = key_owner(given_key(Request(scope)), self.keys) if self.keys else None
        token = CLIENT.set(f"{address}|{owner or 'none'}")
        try:
            await self.asgi(scope, receive, send)
        finally:
            CLIENT.reset(token)
