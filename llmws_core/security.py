"""The security rules both doors follow: API keys (where a client puts one, constant-time
comparison, which roles a key gives), loopback addresses, the Origin allowlist of the
WebSocket, the Host check against DNS rebinding, and the redaction of keys from logs.

No I/O and no framework here: each door reads its own headers and hands the values in.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings

#: Host names and addresses of this machine's loopback interface.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: Bind addresses that listen on every interface.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
#: Query parameters that may carry a key, in order of precedence (browser-friendly GET
#: tests and WebSocket URLs; headers come first).
KEY_QUERY_PARAMS = ("x_api_key", "api_key")


def is_loopback(host: str) -> bool:
    """Whether `host` (a bind address or a peer's) is this machine's loopback."""
    host = host.strip("[]")
    return host in LOOPBACK_HOSTS or host.startswith("127.")


# ---------------------------------------------------------------------- keys


def key_matches(given: str | None, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key."""
    if not given:
        return False
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode(), key.encode())
    return ok


def key_owner(given: str | None, keys: list[str]) -> str | None:
    """The owner a valid key makes of the sessions it creates: a digest of the key
    (kept in the sealed session state, never the key itself); None without one."""
    if not given or not key_matches(given, keys):
        return None
    return "key:" + hashlib.sha256(given.encode()).hexdigest()[:32]


def key_from(
    header: Callable[[str], str | None],
    query: Callable[[str], str | None],
    handshake: str | None = None,
) -> str | None:
    """The key a client sent: the handshake frame's, `X-API-Key`, `Authorization:
    Bearer`, then the query parameters (`x_api_key`, then `api_key`).

    `header` and `query` read one value each (None when absent), in the door's own way."""
    if handshake:
        return handshake
    key = header("x-api-key")
    if not key:
        auth = header("authorization") or ""
        if auth.lower().startswith("bearer "):
            key = auth[7:].strip()
    for name in KEY_QUERY_PARAMS:
        if key:
            break
        key = query(name)
    return key or None


@dataclass(frozen=True)
class Access:
    """What a client may do: `allowed` to use the daemon at all (chat, sessions),
    `admin` to manage models (switch, download, delete)."""

    allowed: bool
    admin: bool


def access(given: str | None, settings: Settings, *, keys_required: bool, null_origin: bool = False) -> Access:
    """The roles a key (or none) gives, the same on every door.

    Without required keys everyone is allowed in; admin actions then need the admin
    key if admin keys exist, else anyone may do them. With required keys a user or
    admin key is needed; admin keys, if any, are the only ones that allow admin
    actions, else every valid key does. A `null_origin` peer (a page opened from disk,
    a sandboxed frame on any site) never gets admin without a key that allows it."""
    sec = settings.security
    is_user = key_matches(given, sec.api_keys)
    is_admin_key = key_matches(given, sec.admin_keys)
    admin = is_admin_key if sec.admin_keys else is_user or not keys_required
    if null_origin and not keys_required:
        admin = key_matches(given, sec.admin_keys or sec.api_keys)
    return Access(allowed=not keys_required or is_user or is_admin_key, admin=admin)


def keys_required(settings: Settings) -> bool:
    """Whether every client needs a key: configured so, or listening beyond loopback."""
    return settings.security.require_api_key or not is_loopback(settings.server.host)


# ---------------------------------------------------------------------- Origin and Host


def origin_allowed(origin: str, settings: Settings, http_port: int | None) -> bool:
    """Whether a browser page from `origin` may open a WebSocket.

    `null` (a page opened from disk, a sandboxed frame) is allowed when
    `allow_file_origin` says so (what such a peer may do is limited, see `access`);
    else the allowlist, and this daemon's own HTTP origin (the web client at /ui)."""
    sec = settings.security
    if origin == "null":
        return sec.allow_file_origin
    if origin in sec.allowed_origins:
        return True
    if http_port:
        own = {f"http://{h}:{http_port}" for h in ("127.0.0.1", "localhost", "[::1]", settings.server.host)}
        if origin in own:
            return True
    return False


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """Host names this server answers to; None: any (bound to a wildcard address)."""
    host = settings.server.host.strip("[]")
    if host in WILDCARD_HOSTS:
        return None
    return LOOPBACK_HOSTS | {host.lower()}


def host_name(header: str) -> str:
    """The host part of a Host header: without the port, IPv6 brackets removed."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


# ---------------------------------------------------------------------- logs

#: Where a key can sit in anything a library logs: headers, query strings, JSON frames.
_KEY_PATTERN = re.compile(
    r"""(?ix)
    ( x-api-key \s* [:=] \s*
    | authorization \s* [:=] \s* (?: bearer \s+ | basic \s+ )?
    | \b (?: x_)? api_key \s* = \s*
    | ["']? (?: x_)? api_key ["']? \s* : \s* ["']?
    )
    ( [^\s&"',}\\]+ )
    """
)


class KeyRedactor(logging.Filter):
    """Strip API keys out of log records before any handler writes them.

    websockets logs every request header and frame at DEBUG (X-API-Key, Bearer
    tokens, `?api_key=`, `{"api_key": ...}` handshakes); keys must never reach a log
    file, so the message is rewritten: configured keys by value, and anything in a
    key-carrying position by pattern (that catches wrong keys too)."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__()
        self.keys = sorted({k for k in keys if k}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for key in self.keys:
            text = text.replace(key, "[redacted]")
        return _KEY_PATTERN.sub(lambda m: m.group(1) + "[redacted]", text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's business
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_key_redaction(keys: list[str]) -> KeyRedactor:
    """Attach a `KeyRedactor` to the websockets loggers and to every root handler.

    Logger filters catch records of that logger wherever they are handled; the
    root handlers' filter catches every other library that propagates to root."""
    redactor = KeyRedactor(keys)
    for name in ("websockets.server", "uvicorn.error"):
        logging.getLogger(name).addFilter(redactor)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor)
    return redactor
