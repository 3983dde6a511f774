"""The project's own exceptions and the one place that maps exceptions to wire errors.

Backends, the store and the chat service raise these; `to_wire` turns any
exception into an `error` event. Unexpected exceptions are logged here and reach
the peer only as a generic `internal_error` -- never their text or a traceback
(exception details may be security-sensitive).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("llmws.errors")


class LLMWSError(Exception):
    """Base of every error whose message is safe to show to a client."""

    code = "error"
    http_status = 400

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields


class BadRequest(LLMWSError):
    """The message was not valid JSON or did not match the protocol."""

    code = "bad_request"


class UnknownType(BadRequest):
    """The message's `type` is not one the server knows."""

    code = "unknown_type"


class FrameTooLarge(BadRequest):
    """A frame exceeded the configured size limit."""

    code = "frame_too_large"
    http_status = 413


class ContextTooLong(LLMWSError):
    """The prompt does not fit the model's usable context."""

    code = "context_too_long"

    def __init__(self, input_length: int, max_context: int) -> None:
        super().__init__(
            f"Context too long ({input_length} tokens). Max: {max_context}. Shorten the prompt or reset the session.",
            input_length=input_length,
            max_context=max_context,
        )


class InputTooLarge(ContextTooLong):
    """An input to embed is longer than the embedding model takes."""

    def __init__(self, input_length: int, max_tokens: int) -> None:
        LLMWSError.__init__(
            self,
            f"Input is too large to embed ({input_length} tokens); this model takes at most "
            f"{max_tokens}. Shorten it, or split it into several inputs.",
            input_length=input_length,
            max_context=max_tokens,
        )


class ModelNotLoaded(LLMWSError):
    """No model is loaded (yet)."""

    code = "model_not_loaded"
    http_status = 503


class ModelLoadError(LLMWSError):
    """A model could not be loaded; the previous model keeps serving."""

    code = "model_load_failed"
    http_status = 500


class ModelNotFound(LLMWSError):
    """No model of that name or path exists."""

    code = "model_not_found"
    http_status = 404


class Forbidden(LLMWSError):
    """The request names a path outside the model folders, or lacks the key it needs."""

    code = "forbidden"
    http_status = 403


class Unauthorized(LLMWSError):
    """A key is required and was missing or wrong."""

    code = "unauthorized"
    http_status = 401


class Busy(LLMWSError):
    """A bounded queue or limit refused the request."""

    code = "busy"
    http_status = 429


class RateLimited(Busy):
    """Too many messages in too short a time."""

    code = "rate_limited"


class NotFound(LLMWSError):
    """A referenced job or request does not exist."""

    code = "not_found"
    http_status = 404


class CorruptRecord(LLMWSError):
    """A sealed record failed authentication: edited, reordered, spliced or damaged."""

    code = "corrupt_record"
    http_status = 500


class SessionNotFound(LLMWSError):
    """No session with that id exists."""

    code = "session_not_found"
    http_status = 404


class SessionExpired(SessionNotFound):
    """The session existed but was idle past its TTL."""

    code = "session_expired"


class StorageError(LLMWSError):
    """The disk refused a write or fsync; the session stays readable."""

    code = "storage_error"
    http_status = 507


class GenerationError(LLMWSError):
    """The backend failed mid-generation."""

    code = "generation_failed"
    http_status = 500


class Cancelled(LLMWSError):
    """The request was cancelled before its generation began (its client went away)."""

    code = "cancelled"
    http_status = 499


class Unsupported(LLMWSError):
    """The loaded backend or this machine cannot do what was asked."""

    code = "unsupported"
    http_status = 400


class DownloadError(LLMWSError):
    """A model download failed."""

    code = "download_failed"
    http_status = 502


def to_wire(exc: BaseException, request_id: str | None = None) -> dict[str, Any]:
    """Map any exception to an `error` event body (without `seq`).

    Known errors keep their message and extra fields; anything else is logged
    with its traceback and becomes a generic `internal_error`.
    """
    if isinstance(exc, LLMWSError):
        body: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.message}
        body.update({k: v for k, v in exc.fields.items() if v is not None})
    else:
        logger.error("unexpected error", exc_info=exc)
        body = {
            "type": "error",
            "code": "internal_error",
            "message": "The server hit an unexpected error; it is logged on the server.",
        }
    if request_id is not None:
        body["request_id"] = request_id
    return body
