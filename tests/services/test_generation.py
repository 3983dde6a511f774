"""The generation service on a scripted backend: the events a door gets, tool calls and
JSON mode held back and parsed, cancellation while queued and while streaming, errors."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from llmws_core import errors
from llmws_core.chat import ChatService
from llmws_core.config import Settings
from llmws_core.services.generation import (
    DoneEvent,
    ErrorEvent,
    GenerationRequest,
    GenerationService,
    ResponseFormat,
    Sampling,
    StartEvent,
    TokenEvent,
    ToolCallEvent,
    WarningEvent,
    render_messages,
)
from llmws_core.services.models import ModelService
from llmws_core.sessions.crypto import Sealer
from llmws_core.sessions.store import SessionStore
from tests.scripted import ScriptedBackend, scripted_manager

HI = [{"role": "user", "content": "Say hi"}]
ADD = {"name": "add", "parameters": {"type": "object"}}


async def _service(tmp_path: Path, backend: ScriptedBackend) -> GenerationService:
    settings = Settings.model_validate(
        {"paths": {"var_dir": str(tmp_path / "var"), "models_dir": str(tmp_path / "models")}}
    )
    manager = await scripted_manager(settings, backend, settings.models_dir)
    chat = ChatService(settings, SessionStore(tmp_path / "sessions", Sealer(b"k" * 32)), manager)
    return GenerationService(chat, ModelService(manager, chat, settings))


async def _events(service: GenerationService, request: GenerationRequest) -> list[object]:
    gen = await service.start(request)
    async with gen:
        return [gen.started, *[ev async for ev in gen]]


async def test_a_reply_is_start_tokens_done(tmp_path: Path) -> None:
    """A plain reply comes as a start, its text pieces in order, and a done with the whole text."""
    service = await _service(tmp_path, ScriptedBackend(["Hel", "lo", "!"]))
    events = await _events(service, GenerationRequest(HI, Sampling(max_tokens=16)))
    start, *tokens, done = events
    assert isinstance(start, StartEvent) and start.model == "scripted" and start.max_tokens == 16
    assert "".join(t.text for t in tokens if isinstance(t, TokenEvent)) == "Hello!"
    assert isinstance(done, DoneEvent) and done.content == "Hello!" and done.finish_reason == "stop"
    assert done.tokens_out == 3 and done.tokens_in == start.tokens_in > 0


async def test_max_tokens_ends_the_reply_with_length(tmp_path: Path) -> None:
    """A reply cut by max_tokens says finish_reason length."""
    service = await _service(tmp_path, ScriptedBackend(["a", "b", "c"]))
    done = await service.complete(GenerationRequest(HI, Sampling(max_tokens=2)))
    assert (done.content, done.finish_reason) == ("ab", "length")


async def test_a_tool_call_is_held_back_and_parsed(tmp_path: Path) -> None:
    """With tools offered, a reply that is a call never streams as text: one ToolCallEvent, then done."""
    service = await _service(
        tmp_path, ScriptedBackend(["<tool_", 'call>{"name": "add", ', '"arguments": {"a": 1}}</tool_call>'])
    )
    events = await _events(service, GenerationRequest(HI, tools=[ADD]))
    assert not any(isinstance(e, TokenEvent) for e in events)
    (call_event,) = [e for e in events if isinstance(e, ToolCallEvent)]
    assert [(c.name, c.arguments) for c in call_event.calls] == [("add", {"a": 1})]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.finish_reason == "tool_calls" and done.content is None


async def test_prose_with_tools_offered_is_released_once_it_cannot_be_a_call(tmp_path: Path) -> None:
    """Text that turns out to be prose is streamed as soon as it cannot become a call,
    not held to the end of the reply."""
    gate = threading.Event()
    service = await _service(tmp_path, ScriptedBackend(["Hello", " there", "!"], gate=gate, gate_from=1))
    gen = await service.start(GenerationRequest(HI, tools=[ADD]))
    async with gen:
        events = aiter(gen)
        first = await asyncio.wait_for(anext(events), 5)  # the model is still held at the gate
        assert isinstance(first, TokenEvent) and first.text == "Hello"
        gate.set()
        rest = [ev async for ev in events]
    assert "".join(e.text for e in rest if isinstance(e, TokenEvent)) == " there!"
    assert isinstance(rest[-1], DoneEvent) and rest[-1].content == "Hello there!"


async def test_a_forced_tool_call_asks_the_backend_for_its_schema(tmp_path: Path) -> None:
    """tool_choice naming a tool gives the backend that call's JSON schema; an unknown name is refused."""
    backend = ScriptedBackend(['{"name": "add", "arguments": {}}'], grammar=True)
    service = await _service(tmp_path, backend)
    done = await service.complete(GenerationRequest(HI, tools=[ADD], tool_choice="add"))
    assert done.tool_calls[0].name == "add"
    fmt = backend.seen[-1].response_format
    assert fmt is not None and fmt["json_schema"]["schema"]["properties"]["name"] == {"const": "add"}
    with pytest.raises(errors.BadRequest):
        service.prepare(GenerationRequest(HI, tools=[ADD], tool_choice="rm"))


async def test_json_mode_without_a_grammar_extracts_the_json(tmp_path: Path) -> None:
    """On a backend without grammars, JSON mode holds the text back and keeps its JSON value."""
    service = await _service(tmp_path, ScriptedBackend(["Sure: ", '{"a": ', "1}", " hope it helps"]))
    events = await _events(service, GenerationRequest(HI, response_format=ResponseFormat()))
    assert [e.text for e in events if isinstance(e, TokenEvent)] == ['{"a": 1}']
    assert isinstance(events[-1], DoneEvent) and events[-1].content == '{"a": 1}'


async def test_json_mode_with_a_grammar_streams(tmp_path: Path) -> None:
    """On a backend that follows grammars, JSON mode streams the text as it comes (nothing held back)."""
    gate = threading.Event()
    backend = ScriptedBackend(['{"a": ', "1}"], grammar=True, gate=gate, gate_from=1)
    service = await _service(tmp_path, backend)
    gen = await service.start(GenerationRequest(HI, response_format=ResponseFormat(schema={"type": "object"})))
    assert gen.started is not None and gen.started.constrained
    async with gen:
        events = aiter(gen)
        first = await asyncio.wait_for(anext(events), 5)  # the model is still held at the gate
        assert isinstance(first, TokenEvent) and first.text == '{"a": '
        gate.set()
        rest = [ev async for ev in events]
    assert isinstance(rest[-1], DoneEvent) and rest[-1].content == '{"a": 1}'
    assert backend.seen[-1].response_format == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": {"type": "object"}},
    }


async def test_a_request_cancelled_while_queued_leaves_the_queue(tmp_path: Path) -> None:
    """Cancelling a generation that waits for the model ends its wait at once (Cancelled), and
    the queue no longer counts it; the running one is not disturbed."""
    gate = threading.Event()
    service = await _service(tmp_path, ScriptedBackend(["a", "b"], gate=gate))
    first = await service.start(GenerationRequest(HI))
    second = service.prepare(GenerationRequest(HI))
    waiting = asyncio.create_task(second.start())
    await asyncio.sleep(0.05)
    assert service.models.queue_depth == 1
    second.cancel()
    with pytest.raises(errors.Cancelled):
        await asyncio.wait_for(waiting, 5)
    assert service.models.queue_depth == 0
    gate.set()
    assert (await first.collect()).content == "ab"


async def test_closing_a_generation_early_cancels_the_model(tmp_path: Path) -> None:
    """A door that leaves mid-reply (async with) stops the model: the reply ends cancelled."""
    gate = threading.Event()
    service = await _service(tmp_path, ScriptedBackend(["a", "b", "c"], gate=gate))
    gen = await service.start(GenerationRequest(HI))
    async with gen:
        pass  # the door's client went away before any token
    gate.set()
    events = [ev async for ev in gen]
    assert isinstance(events[-1], DoneEvent) and events[-1].finish_reason == "cancelled"


async def test_an_error_after_the_start_is_an_event_without_its_text(tmp_path: Path) -> None:
    """A backend failure mid-reply ends the events with an ErrorEvent whose message hides the exception text."""
    service = await _service(tmp_path, ScriptedBackend(["a", "b"], fail_after=1))
    events = await _events(service, GenerationRequest(HI))
    error = events[-1]
    assert isinstance(error, ErrorEvent) and error.code == "internal_error" and error.status == 500
    assert "shadow" not in error.message


async def test_a_prompt_beyond_the_context_is_refused_before_the_start(tmp_path: Path) -> None:
    """A prompt that does not fit raises context_too_long from start (for the door's status code)."""
    service = await _service(tmp_path, ScriptedBackend(["a"], max_context=8))
    long = [{"role": "user", "content": "word " * 50}]
    with pytest.raises(errors.ContextTooLong):
        await service.start(GenerationRequest(long))


async def test_dropped_turns_come_with_a_warning(tmp_path: Path) -> None:
    """With keep_reply_room, old turns that do not fit are dropped and a history_truncated warning says so."""
    service = await _service(tmp_path, ScriptedBackend(["ok"], max_context=300))
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 40} for i in range(10)]
    events = await _events(service, GenerationRequest([*history, *HI], Sampling(max_tokens=8), keep_reply_room=True))
    warnings = [e for e in events if isinstance(e, WarningEvent)]
    assert warnings and warnings[0].code == "history_truncated"
    assert (
        isinstance(events[0], StartEvent) and events[0].dropped_messages == warnings[0].details["dropped_messages"] > 0
    )


def test_tool_traffic_is_rendered_as_text_every_template_accepts() -> None:
    """An assistant's calls and a tool's result become Hermes-style text in ordinary roles."""
    out = render_messages(
        [
            {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": '{"a": 1}'}]},
            {"role": "tool", "content": "2"},
        ]
    )
    assert out[0] == {"role": "assistant", "content": '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'}
    assert out[1] == {"role": "user", "content": "<tool_response>\n2\n</tool_response>"}
    with pytest.raises(errors.BadRequest):
        render_messages([{"role": "wizard", "content": "x"}])
