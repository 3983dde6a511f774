"""The response service on a scripted backend: the stored events, reads from every
point of a stream, text and calls in one reply, owners, and the close-out of a
response that a restart interrupted."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from llmws_core import errors
from llmws_core.chat import ChatService
from llmws_core.config import Settings
from llmws_core.engine.backends.base import GenerationResult
from llmws_core.services.generation import GenerationRequest, GenerationService, Sampling
from llmws_core.services.models import ModelService
from llmws_core.services.responses import NewResponse, ResponseService, accumulate, session_of
from llmws_core.sessions.crypto import Sealer
from llmws_core.sessions.store import SessionStore
from tests.scripted import ScriptedBackend, scripted_manager

KEY = b"k" * 32
ADD = {"name": "add", "parameters": {"type": "object"}}


class StepBackend(ScriptedBackend):
    """Sends one piece per release of `steps`, so a test knows exactly how far the reply got."""

    def __init__(self, pieces: list[str]) -> None:
        super().__init__(pieces)
        self.steps = threading.Semaphore(0)

    def generate(self, messages, params, on_token, cancelled):  # type: ignore[no-untyped-def]
        out = 0
        for piece in self.pieces:
            while not self.steps.acquire(timeout=0.01):
                if cancelled():
                    return GenerationResult("cancelled", 1, out)
            on_token(piece)
            out += 1
        return GenerationResult("stop", 1, out)


async def _service(tmp_path: Path, backend: ScriptedBackend) -> ResponseService:
    settings = Settings.model_validate(
        {"paths": {"var_dir": str(tmp_path / "var"), "models_dir": str(tmp_path / "models")}}
    )
    (tmp_path / "models").mkdir(exist_ok=True)
    manager = await scripted_manager(settings, backend, settings.models_dir)
    chat = ChatService(settings, SessionStore(tmp_path / "sessions", Sealer(KEY)), manager)
    return ResponseService(GenerationService(chat, ModelService(manager, chat, settings)), chat)


def _new(text: str = "Say hi", *, background: bool = False, **fields: Any) -> NewResponse:
    request = GenerationRequest([{"role": "user", "content": text}], Sampling(max_tokens=64), **fields)
    head = {"model": "scripted", "tools": [], "metadata": {}}
    items = [{"id": "msg_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]
    return NewResponse(head=head, input_items=items, request=request, background=background)


async def _all(service: ResponseService, rid: str, owner: str = "me", after: int | None = None) -> list[dict[str, Any]]:
    return [event async for event in service.events(rid, owner, after)]


async def test_events_from_every_point_are_exactly_the_rest(tmp_path: Path) -> None:
    """Reading a finished response's stream after any sequence_number gives exactly the
    events after it; the whole stream is OpenAI's sequence and its text is the reply."""
    service = await _service(tmp_path, ScriptedBackend(["Hel", "lo", " there", "!"]))
    created = await service.create(_new(), "me")
    done = await service.result(created["id"], "me")
    assert done["status"] == "completed" and done["usage"]["output_tokens"] == 4
    events = await _all(service, created["id"])
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events][:2] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["output"] == done["output"]
    assert "".join(e.get("delta", "") for e in events if e["type"] == "response.output_text.delta") == "Hello there!"
    for n in range(-1, len(events)):
        assert await _all(service, created["id"], after=n) == events[n + 1 :]


async def test_a_live_reader_misses_nothing_and_sees_nothing_twice(tmp_path: Path) -> None:
    """A reader that joins a background response mid-way gets the stored events, then the
    live ones, consecutively to the end."""
    gate = threading.Event()
    service = await _service(tmp_path, ScriptedBackend(["a", "b", "c", "d", "e", "f"], gate=gate))
    created = await service.create(_new(background=True), "me")
    assert created["status"] == "queued"
    reader = asyncio.create_task(_all(service, created["id"], after=0))
    await asyncio.sleep(0.05)
    gate.set()
    events = await asyncio.wait_for(reader, 30)
    assert [e["sequence_number"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "response.queued" and events[-1]["type"] == "response.completed"


async def test_a_reader_after_the_last_event_of_a_just_ended_response_returns(tmp_path: Path) -> None:
    """Reading after the last sequence_number of a response that has just ended returns
    at once (it never waits for an event that will not come)."""
    service = await _service(tmp_path, ScriptedBackend(["ok"]))
    created = await service.create(_new(), "me")
    events = await _all(service, created["id"])  # read while it ran, to its end
    assert await asyncio.wait_for(_all(service, created["id"], after=events[-1]["sequence_number"]), 5) == []


async def test_text_then_a_call_are_two_output_items(tmp_path: Path) -> None:
    """Prose followed by a tool call gives a message item and a function_call item, and the
    stored events describe the same output (what a restart would rebuild)."""
    pieces = ["Let me add. ", '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>']
    service = await _service(tmp_path, ScriptedBackend(pieces))
    created = await service.create(_new(tools=[ADD]), "me")
    done = await service.result(created["id"], "me")
    assert [item["type"] for item in done["output"]] == ["message", "function_call"]
    call = done["output"][1]
    assert call["name"] == "add" and call["arguments"] == '{"a": 1}' and call["call_id"]
    events = await _all(service, created["id"])
    assert accumulate(events) == done["output"]


async def test_a_response_is_only_its_owners(tmp_path: Path) -> None:
    """Another owner gets NotFound for every read, and cannot continue from it."""
    service = await _service(tmp_path, ScriptedBackend(["ok"]))
    created = await service.create(_new(), "me")
    await service.result(created["id"], "me")
    for read in (service.get, service.input_items, service.cancel, service.delete):
        with pytest.raises(errors.NotFound):
            await read(created["id"], "you")
    with pytest.raises(errors.NotFound):
        await _all(service, created["id"], "you")
    follow = _new()
    follow.previous_response_id = created["id"]
    with pytest.raises(errors.BadRequest):
        await service.create(follow, "you")
    assert (await service.get(created["id"], "me"))["status"] == "completed"


async def test_restart_closes_out_an_interrupted_response_with_what_was_stored(tmp_path: Path) -> None:
    """A response cut off by a crash is found by the next process as `incomplete`
    (reason interrupted) holding every stored delta, and its stream ends with
    response.incomplete; its conversation can be continued."""
    backend = StepBackend([f"w{i} " for i in range(10)])
    first = await _service(tmp_path, backend)
    created = await first.create(_new(background=True), "me")
    rid = created["id"]
    seen: list[str] = []
    for _ in range(3):  # three pieces, then the model stalls, as if the process had died
        backend.steps.release()
    async for event in first.events(rid, "me"):
        if event["type"] == "response.output_text.delta":
            seen.append(event["delta"])
            if "".join(seen) == "w0 w1 w2 ":  # pieces that came together are one delta
                break
    stored = [e for e in await _all_stored(tmp_path, rid) if e["type"] == "response.output_text.delta"]
    second = await _service(tmp_path, ScriptedBackend(["again"]))  # a new process on the same disk
    after = await second.get(rid, "me")
    assert after["status"] == "incomplete" and after["incomplete_details"] == {"reason": "interrupted"}
    text = after["output"][0]["content"][0]["text"]
    assert text == "".join(e["delta"] for e in stored) == "".join(seen) == "w0 w1 w2 "
    events = await _all(second, rid)
    assert events[-1]["type"] == "response.incomplete"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    follow = _new("Go on")
    follow.previous_response_id = rid
    continued = await second.create(follow, "me")
    assert (await second.result(continued["id"], "me"))["status"] == "completed"
    first.abandon(rid)


async def _all_stored(tmp_path: Path, rid: str) -> list[dict[str, Any]]:
    """The events on disk of a response, read by a store of its own."""
    sid = session_of(rid)
    assert sid is not None
    session = await asyncio.to_thread(SessionStore(tmp_path / "sessions", Sealer(KEY)).get, sid)
    return session.replay(0)
