"""The wire protocol's models, without sockets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmws_core import errors, protocol

DOC = Path(__file__).resolve().parent.parent / "DOCUMENTATION.md"


def doc_examples() -> list[str]:
    """The JSON examples of the WebSocket protocol section."""
    text = DOC.read_text()
    section = text.split("## WebSocket protocol", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```json\n(.*?)\n```", section, re.DOTALL)


def test_documentation_has_an_example_of_every_message() -> None:
    """DOCUMENTATION.md shows a JSON example of every client message and every main server event."""
    types = {json.loads(x).get("type") for x in doc_examples()}
    assert protocol.CLIENT_TYPES <= types
    needed = {
        "welcome",
        "notice",
        "queued",
        "start",
        "token",
        "done",
        "warning",
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
    }
    assert needed <= types


@pytest.mark.parametrize("example", doc_examples())
def test_every_documented_example_parses(example: str) -> None:
    """Every JSON example in the docs is valid and matches the protocol models."""
    data = json.loads(example)
    kind = data.get("type")
    if kind is None:
        protocol.parse_handshake(data)
    elif kind in protocol.CLIENT_TYPES:
        protocol.parse_client_message(data)
    else:
        protocol.ServerEvent.model_validate(data)


def test_three_prompt_shapes_become_the_same_messages() -> None:
    """Structured, legacy-string and plain prompts map to the same chat messages."""
    structured = protocol.prompt_to_messages(protocol.PromptParts(system="S", user="U"))
    legacy = protocol.prompt_to_messages("<|system|>S<|end|><|user|>U<|end|>")
    assert structured == legacy == [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert protocol.prompt_to_messages("just text") == [{"role": "user", "content": "just text"}]
    assert protocol.prompt_to_messages("<|user|>only<|end|>") == [{"role": "user", "content": "only"}]


@pytest.mark.parametrize(
    "data, exc",
    [
        ({"type": 3}, errors.BadRequest),
        ({"type": "nope"}, errors.UnknownType),
        ({"type": "ping", "extra": 1}, errors.BadRequest),
        ({"type": "inference", "prompt": {"user": "x", "admin": True}}, errors.BadRequest),
        ({"type": "inference", "prompt": "x", "config": {"temperature": -1}}, errors.BadRequest),
        ({"type": "inference", "prompt": "x", "on_disconnect": "explode"}, errors.BadRequest),
        ({"type": "ack", "seq": "three"}, errors.BadRequest),
    ],
)
def test_invalid_messages_raise_typed_errors(data, exc) -> None:
    """Wrong fields and values become typed, user-safe errors."""
    with pytest.raises(exc) as info:
        protocol.parse_client_message(data)
    assert "Traceback" not in info.value.message


def test_stop_accepts_a_string() -> None:
    """`stop` may be one string, as in the OpenAI API."""
    msg = protocol.parse_client_message({"type": "inference", "prompt": "x", "config": {"stop": "END"}})
    assert msg.config.stop == ["END"]


def test_decode_json_rejects_non_objects_and_bad_utf8() -> None:
    """Frames that are not JSON objects are bad requests."""
    for frame in ("[]", "1", "nul", b"\xff\xfe"):
        with pytest.raises(errors.BadRequest):
            protocol.decode_json(frame)


def test_unexpected_exception_never_reaches_the_peer() -> None:
    """An unexpected exception becomes internal_error without its text."""
    body = errors.to_wire(RuntimeError("secret /home/user/path"), "r")
    assert body["code"] == "internal_error" and "secret" not in body["message"] and body["request_id"] == "r"
    known = errors.to_wire(errors.ContextTooLong(100, 50))
    assert known["max_context"] == 50 and known["input_length"] == 100
