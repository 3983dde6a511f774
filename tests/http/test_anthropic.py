"""The Anthropic Messages door through the official `anthropic` SDK and raw SSE, on a real daemon."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pydantic
import pytest

from tests.conftest import DaemonProcess, scaled
from tests.http.conftest import pick_stop, sse_events

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]
#: Greedy decoding (deterministic replies). The SDK has no `temperature` argument any
#: more; the API still takes the field, so it goes in the body as is.
GREEDY = {"temperature": 0}
COUNT = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    },
}


@pytest.fixture
def client(module_daemon: DaemonProcess) -> Iterator[anthropic.Anthropic]:
    """The official SDK pointed at the daemon (no key configured: any api_key works)."""
    with anthropic.Anthropic(
        base_url=module_daemon.http_url, api_key="unused", timeout=scaled(120), max_retries=0
    ) as c:
        yield c


def text_of(message: Any) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_create_returns_a_message_with_text_and_real_usage(client: anthropic.Anthropic) -> None:
    """messages.create answers an assistant message with a text block and token counts."""
    m = client.messages.create(model="claude-sonnet-4-5", max_tokens=16, messages=HELLO, extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant"
    assert m.id.startswith("msg_")
    assert m.content[0].type == "text" and text_of(m)
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens > 5
    assert 0 < m.usage.output_tokens <= 16
    assert m.model.startswith("SmolLM2")


def test_system_prompt_string_and_blocks_are_the_same_prompt(client: anthropic.Anthropic) -> None:
    """A system prompt given as a string or as text blocks reaches the model identically."""
    as_text = client.messages.count_tokens(model="x", system="You are terse.", messages=HELLO)
    as_blocks = client.messages.count_tokens(
        model="x", system=[{"type": "text", "text": "You are terse."}], messages=HELLO
    )
    without = client.messages.count_tokens(model="x", messages=HELLO)
    assert as_text.input_tokens == as_blocks.input_tokens != without.input_tokens


def test_max_tokens_ends_the_reply_with_stop_reason_max_tokens(client: anthropic.Anthropic) -> None:
    """A reply cut by max_tokens says so and used exactly that many tokens."""
    m = client.messages.create(model="x", max_tokens=3, messages=COUNT, extra_body=GREEDY)
    assert m.stop_reason == "max_tokens"
    assert m.stop_sequence is None
    assert m.usage.output_tokens == 3


def test_a_stop_sequence_ends_the_reply_and_is_named(client: anthropic.Anthropic) -> None:
    """A requested stop sequence the model produces ends the reply before it, with stop_reason stop_sequence."""
    full = text_of(client.messages.create(model="x", max_tokens=40, messages=COUNT, extra_body=GREEDY))
    stop = pick_stop(full)
    m = client.messages.create(model="x", max_tokens=40, messages=COUNT, extra_body=GREEDY, stop_sequences=[stop])
    assert m.stop_reason == "stop_sequence"
    assert m.stop_sequence == stop
    assert text_of(m) == full[: full.index(stop)]


def test_stream_text_matches_create_and_the_final_message(client: anthropic.Anthropic) -> None:
    """messages.stream yields the same text as create at temperature 0, and a final message with usage."""
    full = client.messages.create(model="x", max_tokens=24, messages=HELLO, extra_body=GREEDY)
    with client.messages.stream(model="x", max_tokens=24, messages=HELLO, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == text_of(full) == text_of(final)
    assert final.stop_reason == full.stop_reason
    assert final.usage.input_tokens == full.usage.input_tokens
    assert final.usage.output_tokens == full.usage.output_tokens


def test_raw_stream_follows_anthropics_event_sequence(module_daemon: DaemonProcess) -> None:
    """The raw SSE stream: message_start, a text block (start, ping, deltas, stop), message_delta, message_stop."""
    body = {"model": "x", "max_tokens": 12, "messages": HELLO, "temperature": 0, "stream": True}
    with httpx.Client(base_url=module_daemon.http_url, timeout=scaled(120)) as http:
        with http.stream("POST", "/v1/messages", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = list(sse_events(r.iter_lines()))
    kinds = [e["data"]["type"] for e in events]
    assert all(e["event"] == e["data"]["type"] for e in events)
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    start = events[0]["data"]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 5
    assert events[1]["data"]["content_block"] == {"type": "text", "text": ""}
    assert all(e["data"]["delta"]["type"] == "text_delta" for e in events[3:-3])
    delta = events[-2]["data"]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert 0 < delta["usage"]["output_tokens"] <= 12


def test_forced_tool_use_and_its_result_round_trip(client: anthropic.Anthropic) -> None:
    """tool_choice naming a tool yields a tool_use block matching its schema; the tool_result is answered."""
    question = {"role": "user", "content": "What is the weather in Paris?"}
    m = client.messages.create(
        model="x",
        max_tokens=64,
        messages=[question],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body=GREEDY,
    )
    assert m.stop_reason == "tool_use"
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1
    use = uses[0]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    assert isinstance(use.input, dict) and isinstance(use.input.get("city"), str)
    reply = client.messages.create(
        model="x",
        max_tokens=32,
        tools=[WEATHER_TOOL],
        extra_body=GREEDY,
        messages=[
            question,
            {"role": "assistant", "content": [b.model_dump() for b in m.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 25 C"}]},
        ],
    )
    assert reply.content and reply.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_tool_choice_any_streams_the_call_as_input_json(client: anthropic.Anthropic) -> None:
    """With tool_choice any, the stream carries a tool_use block whose input arrives as input_json_delta."""
    with client.messages.stream(
        model="x",
        max_tokens=64,
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "any"},
        extra_body=GREEDY,
    ) as stream:
        kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in stream]
        final = stream.get_final_message()
    assert ("content_block_delta", "input_json_delta") in kinds
    assert final.stop_reason == "tool_use"
    use = next(b for b in final.content if b.type == "tool_use")
    assert use.name == "get_weather" and isinstance(use.input.get("city"), str)


def test_tool_choice_none_answers_in_prose(client: anthropic.Anthropic) -> None:
    """tool_choice none keeps the tools away from the model: the reply is text."""
    m = client.messages.create(
        model="x",
        max_tokens=16,
        messages=HELLO,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "none"},
        extra_body=GREEDY,
    )
    assert [b.type for b in m.content] == ["text"]
    assert m.stop_reason in ("end_turn", "max_tokens")


def test_output_config_format_constrains_the_reply_to_a_schema(client: anthropic.Anthropic) -> None:
    """Structured outputs (output_config.format with a JSON schema) yield JSON with the schema's keys and types."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    m = client.messages.create(
        model="x",
        max_tokens=48,
        messages=[{"role": "user", "content": "Bob is 30 years old. Give his name and age."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body=GREEDY,
    )
    data = json.loads(text_of(m))
    assert isinstance(data["name"], str) and isinstance(data["age"], int)


class Person(pydantic.BaseModel):
    """What the structured-output test asks for."""

    name: str = pydantic.Field(max_length=12)
    age: int


def test_messages_parse_returns_the_pydantic_object(client: anthropic.Anthropic) -> None:
    """The SDK's messages.parse(output_format=Model) gets JSON it can validate into the model."""
    m = client.messages.parse(
        model="x",
        max_tokens=48,
        messages=[{"role": "user", "content": "Bob is 30 years old. Give his name and age."}],
        output_format=Person,
        extra_body=GREEDY,
    )
    assert isinstance(m.parsed_output, Person)


def test_count_tokens_matches_the_prompt_a_reply_reports(client: anthropic.Anthropic) -> None:
    """count_tokens counts what create then reports as input_tokens, tools included."""
    counted = client.messages.count_tokens(model="x", messages=HELLO)
    m = client.messages.create(model="x", max_tokens=4, messages=HELLO, extra_body=GREEDY)
    assert counted.input_tokens == m.usage.input_tokens
    with_tools = client.messages.count_tokens(model="x", messages=HELLO, tools=[WEATHER_TOOL])
    m2 = client.messages.create(model="x", max_tokens=4, messages=HELLO, tools=[WEATHER_TOOL], extra_body=GREEDY)
    assert with_tools.input_tokens == m2.usage.input_tokens > counted.input_tokens


def test_errors_are_anthropic_error_objects_and_the_server_keeps_serving(
    client: anthropic.Anthropic, module_daemon: DaemonProcess
) -> None:
    """Bad requests get Anthropic's error shape and status; the next good request is answered."""
    with httpx.Client(base_url=module_daemon.http_url, timeout=scaled(60)) as http:
        r = http.post("/v1/messages", json={"model": "x", "messages": HELLO})
        assert r.status_code == 400
        assert r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in r.json()["error"]["message"]
        r = http.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = http.get("/v1/messages")
        assert r.status_code == 405 and r.json()["type"] == "error"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="x", max_tokens=8, messages=[{"role": "user", "content": [image]}])
    assert bad.value.status_code == 400
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert "text only" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as unknown:
        client.messages.create(
            model="x",
            max_tokens=8,
            messages=HELLO,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "tool", "name": "no_such_tool"},
        )
    assert "tool" in unknown.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as long:
        client.messages.create(model="x", max_tokens=8, messages=[{"role": "user", "content": "word " * 40_000}])
    assert "too long" in long.value.body["error"]["message"].lower()
    m = client.messages.create(model="x", max_tokens=4, messages=HELLO)
    assert m.content


def test_closing_a_stream_early_leaves_the_server_serving(client: anthropic.Anthropic) -> None:
    """A client that leaves a long stream after its first text frees the model for the next request."""
    with client.messages.stream(model="x", max_tokens=400, messages=COUNT, extra_body=GREEDY) as stream:
        first = next(iter(stream.text_stream))
        assert first
    m = client.messages.create(model="x", max_tokens=4, messages=HELLO, extra_body=GREEDY)
    assert m.content and m.usage.output_tokens <= 4
