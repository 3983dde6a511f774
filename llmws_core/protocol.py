"""Pydantic models of every WebSocket message, and parse/encode. No I/O here.

Client messages are verbs (`inference`, `cancel`, ...); server messages are
events (`token`, `done`, ...). Client messages forbid unknown fields and are a
discriminated union on `type`, so a typo is an error rather than a silent no-op.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from .errors import BadRequest, UnknownType

PROTOCOL_VERSION = 1

RequestId = Annotated[str, Field(min_length=1, max_length=128)]
SessionId = Annotated[str, Field(min_length=1, max_length=128)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: Upper bounds every door applies: more tokens than any context holds, a top-k past
#: any vocabulary.
MAX_NEW_TOKENS = 1_000_000
MAX_TOP_K = 100_000


def not_a_boolean(value: Any) -> Any:
    """A field validator's body for numbers: JSON `true`/`false` is not 1/0.

    Raises:
        ValueError: `value` is a boolean (pydantic reports it as a validation error).
    """
    if isinstance(value, bool):
        raise ValueError("a number is required, not a boolean")
    return value


# --------------------------------------------------------------------------- handshake


class Handshake(_Strict):
    """The client's first frame: `{}` for a new session, or an id (and last_seq) to resume."""

    session_id: SessionId | None = None
    last_seq: Annotated[int, Field(ge=0)] | None = None
    api_key: str | None = None
    client: Annotated[str, Field(max_length=128)] | None = None
    #: The dialect: `1` is the current protocol. A first frame without it is an
    #: original LLMWS client, served the legacy dialect (see `legacy.py`).
    protocol: Literal[1] | None = None


# --------------------------------------------------------------------------- generation config


class GenerationConfig(_Strict):
    """Per-session or per-request generation settings; unset fields inherit."""

    temperature: Annotated[float, Field(ge=0.0, le=5.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K)] | None = None
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] | None = None
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(default=None, max_length=16)
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0, le=5.0)] | None = None
    system: Annotated[str, Field(max_length=100_000)] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        # OpenAI accepts a single string as well as a list.
        return [value] if isinstance(value, str) else value

    @field_validator("temperature", "top_p", "top_k", "max_new_tokens", "seed", "repeat_penalty", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any) -> Any:
        return not_a_boolean(value)


# --------------------------------------------------------------------------- client messages


class ImageRef(_Strict):
    """An image in a prompt: base64 `data` (with its media type), a `data:` URL, or a
    `path` on the daemon's machine. Accepted by the schema; whether the loaded model
    takes images is the chat service's decision."""

    data: Annotated[str, Field(max_length=64 * 1024 * 1024)] | None = None
    media_type: Annotated[str, Field(max_length=128)] | None = None
    url: Annotated[str, Field(max_length=64 * 1024 * 1024)] | None = None
    path: Annotated[str, Field(max_length=4096)] | None = None


class PromptParts(_Strict):
    system: str | None = None
    user: str
    images: list[ImageRef | Annotated[str, Field(max_length=64 * 1024 * 1024)]] | None = Field(
        default=None, max_length=64
    )


class ChatMessage(BaseModel):
    """An OpenAI-style chat message (extra fields such as `name` are tolerated)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""


class Inference(_Strict):
    type: Literal["inference"]
    prompt: PromptParts | str | None = None
    messages: list[ChatMessage] | None = Field(default=None, max_length=10_000)
    config: GenerationConfig | None = None
    on_disconnect: Literal["continue", "cancel"] = "continue"
    request_id: RequestId | None = None
    mode: Literal["chat", "improve"] = "chat"
    model: Annotated[str, Field(max_length=512)] | None = None


class Ack(_Strict):
    type: Literal["ack"]
    seq: Annotated[int, Field(ge=0)] | None = None


class Cancel(_Strict):
    type: Literal["cancel"]
    request_id: RequestId | None = None


class Config(_Strict):
    type: Literal["config"]
    data: GenerationConfig
    request_id: RequestId | None = None


class ListModels(_Strict):
    type: Literal["list_models"]
    request_id: RequestId | None = None


class SwitchModel(_Strict):
    type: Literal["switch_model"]
    model_path: Annotated[str, Field(min_length=1, max_length=1024)]
    request_id: RequestId | None = None


class DownloadModel(_Strict):
    type: Literal["download_model"]
    repo: Annotated[str, Field(min_length=1, max_length=2048)]
    target_dir: Annotated[str, Field(min_length=1, max_length=255)]
    filename: Annotated[str, Field(max_length=1024)] | None = None
    request_id: RequestId | None = None


class CancelDownload(_Strict):
    type: Literal["cancel_download"]
    job_id: Annotated[str, Field(min_length=1, max_length=128)]
    request_id: RequestId | None = None


class DeleteModel(_Strict):
    type: Literal["delete_model"]
    model_name: Annotated[str, Field(min_length=1, max_length=1024)]
    request_id: RequestId | None = None


class EstimateModel(_Strict):
    type: Literal["estimate_model"]
    model_path: Annotated[str, Field(min_length=1, max_length=1024)]
    request_id: RequestId | None = None


class GetResources(_Strict):
    type: Literal["get_resources"]
    request_id: RequestId | None = None


class Reset(_Strict):
    type: Literal["reset"]
    request_id: RequestId | None = None


class GetStatus(_Strict):
    type: Literal["get_status"]
    request_id: RequestId | None = None


class Ping(_Strict):
    type: Literal["ping"]
    request_id: RequestId | None = None


class GetHistory(_Strict):
    """Ask for this session's conversation (its turns), to rebuild a view of it."""

    type: Literal["get_history"]
    request_id: RequestId | None = None


class Rewind(_Strict):
    """Take back the last `turns` user turns (each user message and all after it)."""

    type: Literal["rewind"]
    turns: Annotated[int, Field(ge=1, le=10_000)] = 1
    request_id: RequestId | None = None


class DeleteSession(_Strict):
    """Delete this session: its history, buffer and folder on disk."""

    type: Literal["delete_session"]
    request_id: RequestId | None = None


ClientMessage = Annotated[
    Union[
        Inference,
        Ack,
        Cancel,
        Config,
        ListModels,
        SwitchModel,
        DownloadModel,
        CancelDownload,
        DeleteModel,
        EstimateModel,
        GetResources,
        Reset,
        GetStatus,
        Ping,
        GetHistory,
        Rewind,
        DeleteSession,
    ],
    Field(discriminator="type"),
]

_client_adapter: TypeAdapter[Any] = TypeAdapter(ClientMessage)
CLIENT_TYPES = frozenset(
    m.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
    for m in (
        Inference,
        Ack,
        Cancel,
        Config,
        ListModels,
        SwitchModel,
        DownloadModel,
        CancelDownload,
        DeleteModel,
        EstimateModel,
        GetResources,
        Reset,
        GetStatus,
        Ping,
        GetHistory,
        Rewind,
        DeleteSession,
    )
)


def _describe(err: ValidationError) -> str:
    """A short, safe description of what was wrong (field paths and reasons only)."""
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int) or True)
        parts.append(f"{loc or 'message'}: {e['msg']}")
    return "; ".join(parts)


def decode_json(text: str | bytes) -> dict[str, Any]:
    """Parse one frame into a JSON object, or raise `BadRequest`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("Frames must be UTF-8 JSON text.") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise BadRequest("Invalid JSON.") from None
    if not isinstance(data, dict):
        raise BadRequest("A message must be a JSON object.")
    # JSON may spell a lone surrogate (`"\ud800"`), which is no Unicode text: it could
    # be neither echoed back nor sealed. Only frames that contain such an escape pay
    # for the walk.
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        try:
            lone = has_lone_surrogate(data)
        except RecursionError:
            raise BadRequest("Invalid JSON.") from None
        if lone:
            raise BadRequest(LONE_SURROGATE_MESSAGE)
    return data


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
LONE_SURROGATE_MESSAGE = "Text must be valid Unicode; a lone surrogate (such as \\ud800) was sent."


def is_unicode(text: str) -> bool:
    """Whether `text` is valid Unicode (no lone surrogate), so it can be UTF-8 encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def has_lone_surrogate(value: Any) -> bool:
    """Whether any string (or key) in a parsed JSON value holds a lone surrogate."""
    if isinstance(value, str):
        return not is_unicode(value)
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_lone_surrogate(v) for v in value)
    return False


def parse_handshake(data: dict[str, Any]) -> Handshake:
    """Validate the first frame."""
    try:
        return Handshake.model_validate(data)
    except ValidationError as err:
        raise BadRequest(f"Invalid handshake: {_describe(err)}") from None


def parse_client_message(data: dict[str, Any]) -> Any:
    """Validate a client message into its model, or raise `BadRequest`/`UnknownType`."""
    kind = data.get("type")
    if not isinstance(kind, str):
        raise BadRequest("Missing or non-string 'type'.", request_id=_safe_request_id(data))
    if kind not in CLIENT_TYPES:
        raise UnknownType(f"Unknown message type {kind[:64]!r}.", request_id=_safe_request_id(data))
    try:
        return _client_adapter.validate_python(data)
    except ValidationError as err:
        raise BadRequest(f"Invalid {kind}: {_describe(err)}", request_id=_safe_request_id(data)) from None


def _safe_request_id(data: dict[str, Any]) -> str | None:
    rid = data.get("request_id")
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None


# --------------------------------------------------------------------------- prompts

_LEGACY = re.compile(
    r"^\s*(?:<\|system\|>(?P<system>.*?)<\|end\|>)?\s*<\|user\|>(?P<user>.*?)<\|end\|>"
    r"\s*(?:<\|assistant\|>)?\s*$",  # the original page ends its prompt with the reply's marker
    re.DOTALL,
)


def prompt_to_messages(prompt: PromptParts | str | None) -> list[dict[str, str]]:
    """Turn any of the three prompt shapes into chat messages (system first)."""
    if prompt is None:
        return []
    if isinstance(prompt, PromptParts):
        system, user = prompt.system, prompt.user
    else:
        match = _LEGACY.match(prompt)
        if match:
            system, user = match.group("system"), match.group("user")
            system = system.strip() if system is not None else None
            user = user.strip()
        else:
            system, user = None, prompt
    out = []
    if system:
        out.append({"role": "system", "content": system})
    out.append({"role": "user", "content": user})
    return out


# --------------------------------------------------------------------------- server events

SERVER_EVENT_TYPES = frozenset(
    {
        "welcome",
        "notice",
        "queued",
        "start",
        "token",
        "done",
        "warning",
        "stage",
        "ack_received",
        "config_ack",
        "models_list",
        "model_loading",
        "model_switched",
        "download_started",
        "download_progress",
        "log",
        "download_done",
        "model_deleted",
        "model_estimate",
        "resources",
        "reset_done",
        "status",
        "pong",
        "error",
        "cancelled",
        "history",
        "rewound",
        "session_deleted",
    }
)

#: Events that are stored in the session's sealed buffer (and so replayed).
#: Answers to pure queries (pong, status, resources...) are sent but not buffered.
EPHEMERAL_EVENTS = frozenset({"welcome", "pong", "status", "ack_received", "queued", "history", "session_deleted"})


class ServerEvent(BaseModel):
    """Any server event: a known `type`, a `seq` where buffered, and its own fields."""

    model_config = ConfigDict(extra="allow")

    type: str
    seq: int | None = None
    request_id: str | None = None

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in SERVER_EVENT_TYPES:
            raise ValueError(f"unknown server event {value!r}")
        return value


def encode(event: dict[str, Any]) -> str:
    """Serialize one event into a text frame."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))
