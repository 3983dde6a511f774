"""The legacy dialect of the WebSocket protocol: what the original LLMWS clients expect.

The original clients (the LLMWS project's `llm.py` and its browser pages) send `{}` or
`{"session_id": ...}` first, read the welcome as the very first frame, and then read
exactly one frame per command (`config` -> `config_ack`, `list_models` -> `models_list`,
`get_resources` -> `resources`, `delete_model` -> `model_deleted`); an inference is read
until its `done` or `error`, a switch until `model_switched`, a download until
`download_started`. They send generation keys of their own (`repetition_penalty`,
`do_sample`) and read old field shapes (`welcome.model` as a name, `capabilities`,
`resources.cuda`, `message` on `model_switched` and `model_deleted`).

A connection whose first frame does not carry `"protocol": 1` speaks this dialect
(`ws.Connection` decides). For it:

- every request gets a request id (the server's, when the client sent none), and only
  the events that answer this connection's own requests reach it, up to the request's
  last event (`TERMINAL`); broadcasts, other connections' replies and the events that
  follow a request's last one (a download's progress) are not sent;
- what a resumed session missed travels inside the welcome (`missed`), so the first
  frame is still the welcome and nothing arrives unasked; a notice goes into it too;
- an `ack` without `seq` acknowledges what this connection was given, never a reply
  it did not see (those stay buffered for the next connection);
- unknown `config` keys are ignored with a log line (the current dialect keeps strict
  validation, which catches typos).

A third, oldest dialect (`RAW`): the first page of the project sent its prompt as plain
text (`<|system|>...<|end|><|user|>...<|end|><|assistant|>`) and showed every frame it
got as text. Such a connection gets the reply's tokens as plain text frames, then a
normal close.

This module holds the rules only (no sockets): `ws.py` applies them.
"""

from __future__ import annotations

import enum
import json
import logging
import uuid
from typing import Any

logger = logging.getLogger("llmws.legacy")


class Dialect(enum.Enum):
    CURRENT = "current"
    LEGACY = "legacy"
    RAW = "raw"


#: For each request type a legacy client sends, the events that end its answer.
TERMINAL: dict[str, frozenset[str]] = {
    "inference": frozenset({"done", "error"}),
    "config": frozenset({"config_ack", "error"}),
    "switch_model": frozenset({"model_switched", "error"}),
    "download_model": frozenset({"download_started", "error"}),
    "delete_model": frozenset({"model_deleted", "error"}),
    "reset": frozenset({"reset_done", "error"}),
}

#: Events of a conversation: one withheld from a legacy connection must stay in the
#: buffer (its ack stops short of it); other withheld events (broadcasts, progress)
#: are notifications the original clients never read, and may be trimmed.
CONVERSATION = frozenset({"start", "token", "done", "error", "warning", "stage", "cancelled"})

#: Generation keys of the current protocol (`protocol.GenerationConfig`).
_KNOWN_CONFIG = frozenset(
    {"temperature", "top_p", "top_k", "max_new_tokens", "stop", "seed", "repeat_penalty", "system"}
)

#: The most bytes of missed events a welcome carries; the rest waits in the buffer for
#: the next connection (the original client reads at most 16 MiB per frame).
MAX_MISSED_BYTES = 8 * 1024 * 1024


def translate_config(data: Any) -> Any:
    """The original clients' generation keys in the current protocol's terms.

    `repetition_penalty` is the engine's repeat penalty, `do_sample: false` is greedy
    decoding (temperature 0); null values mean "unchanged"; any other unknown key is
    ignored with a log line."""
    if not isinstance(data, dict):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:
            continue
        if key == "repetition_penalty":
            out.setdefault("repeat_penalty", value)
        elif key == "do_sample":
            if value is False:
                out["temperature"] = 0.0
        elif key == "max_tokens":
            out.setdefault("max_new_tokens", value)
        elif key in _KNOWN_CONFIG:
            out[key] = value
        else:
            logger.info("legacy client: ignoring unknown config key %r", str(key)[:64])
    if data.get("do_sample") is False:
        out["temperature"] = 0.0  # greedy wins over a temperature sent beside it
    return out


def _num(value: Any) -> float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _gb(mb: Any) -> float:
    return round(_num(mb) / 1024, 2)


def capabilities(model: dict[str, Any] | None, max_context: int | None) -> dict[str, Any]:
    """The original welcome's `capabilities` object."""
    model = model or {}
    return {
        "vision": bool(model.get("vision")),
        "flash_attention": model.get("attention") == "flash_attention_2",
        "max_context": max_context,
    }


def cuda_view(snapshot: dict[str, Any]) -> dict[str, Any] | None:
    """The original `resources.cuda` object (the first GPU), None without a GPU."""
    gpus = snapshot.get("gpus") or []
    if not gpus:
        return None
    gpu = gpus[0]
    capability = gpu.get("compute_capability")
    if not (isinstance(capability, list | tuple) and len(capability) == 2):
        capability = [0, 0]
    return {
        "device": gpu.get("name"),
        "total_gb": _gb(gpu.get("memory_total_mb")),
        "free_gb": _gb(gpu.get("memory_free_mb")),
        "compute_capability": list(capability),
    }


def welcome_resources(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The original welcome's `resources` object: the device and its free memory."""
    cuda = cuda_view(snapshot)
    if cuda is not None:
        return {"device": cuda["device"], "free_gb": cuda["free_gb"], "total_gb": cuda["total_gb"]}
    ram = snapshot.get("ram") or {}
    return {
        "device": "cpu",
        "free_gb": _gb(ram.get("available_mb")),
        "total_gb": _gb(ram.get("total_mb")),
    }


def model_entries(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Model list entries with the numeric fields the original clients format."""
    return [{**m, "size_mb": _num(m.get("size_mb"))} for m in models]


def shape(event: dict[str, Any]) -> dict[str, Any]:
    """Add the original clients' fields to an event (the current ones stay)."""
    kind = event.get("type")
    if kind == "model_switched":
        model = event.get("model") or {}
        ctx = event.get("max_context")
        text = f"Switched to {model.get('name') or 'the model'}"
        return {**event, "message": text + (f" (max context {ctx} tokens)" if ctx else "")}
    if kind == "model_deleted":
        return {**event, "message": f"Deleted {event.get('model_name') or 'the model'}"}
    if kind == "models_list":
        return {**event, "models": model_entries(event.get("models") or [])}
    return event


def resources_event(event: dict[str, Any], snapshot: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    """A `resources` answer with the original `cuda`, `model` and `available_models`."""
    model = dict(event.get("model") or {})
    model.setdefault("name", None)
    model["vision"] = bool(model.get("vision"))
    return {
        **event,
        "cuda": cuda_view(snapshot),
        "model": model,
        "available_models": model_entries(models),
    }


def legacy_welcome(
    welcome: dict[str, Any],
    snapshot: dict[str, Any],
    notice: dict[str, Any] | None,
    missed: list[dict[str, Any]],
    more: bool,
) -> dict[str, Any]:
    """The welcome as the original clients read it, plus everything the current one has."""
    model = welcome.get("model")
    out = dict(welcome)
    out["dialect"] = Dialect.LEGACY.value
    out["model"] = model.get("name") if isinstance(model, dict) else model
    out["model_info"] = model
    out["capabilities"] = capabilities(model, welcome.get("max_context"))
    out["resources"] = welcome_resources(snapshot)
    if notice is not None:
        out["notice"] = notice
    out["missed"] = missed
    if more:
        out["missed_more"] = True
    return out


def split_missed(backlog: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """The events a welcome can carry (oldest first, up to `MAX_MISSED_BYTES`), and
    whether more wait in the buffer."""
    size = 0
    for i, event in enumerate(backlog):
        frame = getattr(event, "frame", None)
        size += len(frame) if frame is not None else len(json.dumps(event))
        if size > MAX_MISSED_BYTES:
            return backlog[:i], True
    return backlog, False


class LegacyView:
    """Which events a legacy connection is given, and what its ack may trim."""

    def __init__(self) -> None:
        #: request id -> the request's type, for requests whose answer is not complete.
        self.pending: dict[str, str] = {}
        #: The first conversation event this connection was not given (its acks stop
        #: before it), or None.
        self.withheld_from: int | None = None

    def inbound(self, data: dict[str, Any]) -> dict[str, Any]:
        """A client message in current terms: generation keys translated, and a request
        id on every request whose answer the client waits for."""
        kind = data.get("type")
        data = dict(data)
        if kind == "inference" and "config" in data:
            data["config"] = translate_config(data["config"])
        elif kind == "config" and "data" in data:
            data["data"] = translate_config(data["data"])
        if isinstance(kind, str) and kind in TERMINAL:
            rid = data.get("request_id")
            if not isinstance(rid, str) or not rid:
                rid = data["request_id"] = "legacy-" + uuid.uuid4().hex[:16]
            self.pending[rid] = kind
        return data

    def settle(self, request_id: str | None) -> None:
        """The request was answered directly (an error before it started)."""
        if request_id is not None:
            self.pending.pop(request_id, None)

    def admit(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """The event if it is for this connection, else None."""
        rid = event.get("request_id")
        kind = self.pending.get(rid) if isinstance(rid, str) else None
        if kind is None:
            seq = event.get("seq")
            if isinstance(seq, int) and event.get("type") in CONVERSATION:
                if self.withheld_from is None or seq < self.withheld_from:
                    self.withheld_from = seq
            return None
        if event.get("type") in TERMINAL[kind]:
            del self.pending[rid]  # type: ignore[arg-type]
        return event

    def withhold_from(self, seq: int) -> None:
        """Events from `seq` on were not given to this connection (a long backlog)."""
        if self.withheld_from is None or seq < self.withheld_from:
            self.withheld_from = seq

    def ack_limit(self, last_seq: int) -> int:
        """What an `ack` without `seq` acknowledges: everything up to the first event
        this connection was not given."""
        if self.withheld_from is None:
            return last_seq
        return min(last_seq, self.withheld_from - 1)
