"""The OpenAI-compatible surface through the official `openai` SDK and raw SSE, on a real daemon."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from llmws_core.http import tools as toolcalls
from llmws_core.http.openai import extract_json
from tests.conftest import DaemonProcess, scaled
from tests.http.conftest import sse_events

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


@pytest.fixture
def client(module_daemon: DaemonProcess) -> Iterator[openai.OpenAI]:
    """The official SDK pointed at the daemon (no key configured: any api_key works)."""
    with openai.OpenAI(base_url=module_daemon.http_url + "/v1", api_key="unused", timeout=scaled(120), max_retries=0) as c:
        yield c


def test_sdk_completion_has_text_and_consistent_usage(client: openai.OpenAI) -> None:
    """A non-streaming completion returns text and usage counts that add up."""
    r = client.chat.completions.create(model="anything", messages=HELLO, max_tokens=16, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model.startswith("SmolLM2")


def test_sdk_stream_matches_blocking_and_reports_usage(client: openai.OpenAI) -> None:
    """Streaming at temperature 0 yields the same text as non-streaming, then a usage chunk."""
    full = client.chat.completions.create(model="x", messages=HELLO, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model="x", messages=HELLO, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        text.append(delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(text) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_sdk_lists_the_loaded_model(client: openai.OpenAI) -> None:
    """GET /v1/models lists the embedded model as loaded."""
    models = client.models.list().data
    assert any(m.id.startswith("SmolLM2") for m in models)


def test_sdk_raises_openai_error_objects(client: openai.OpenAI) -> None:
    """Bad requests come back as OpenAI error objects the SDK turns into exceptions."""
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="x", messages=HELLO, n=2)
    assert bad.value.status_code == 400
    body = bad.value.body
    assert isinstance(body, dict) and body.get("type") == "invalid_request_error"
    assert "n" in (body.get("param") or "")
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "word " * 20000}], max_tokens=4,
        )
    assert long.value.body["code"] == "context_too_long"  # type: ignore[index]
    assert "Traceback" not in str(long.value)


def test_raw_sse_framing_has_ids_data_and_done(http: httpx.Client) -> None:
    """The raw stream is `id:` + `data:` events, chunk objects, and a final `data: [DONE]`."""
    body = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == {"data": "[DONE]"}
    ids = [int(e["id"]) for e in events[:-1]]
    assert ids == list(range(1, len(ids) + 1))
    chunks = [e["data"] for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len({c["id"] for c in chunks}) == 1


def test_legacy_chat_completions_route_is_the_same(http: httpx.Client) -> None:
    """POST /chat/completions (the llama-cpp server's route) answers like /v1/chat/completions."""
    body = {"messages": HELLO, "max_tokens": 8, "temperature": 0}
    a = http.post("/chat/completions", json=body).json()
    b = http.post("/v1/chat/completions", json=body).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["usage"] == b["usage"]


def test_tools_request_answers_with_text_or_valid_tool_calls(http: httpx.Client) -> None:
    """With `tools`, the reply is either text or tool calls naming an offered tool with JSON arguments."""
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}]
    body = {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": tools, "tool_choice": "required", "max_tokens": 48, "temperature": 0,
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "tool_calls":
        call = choice["message"]["tool_calls"][0]
        assert call["function"]["name"] == "get_weather"
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
    else:
        assert isinstance(choice["message"]["content"], str)


def test_client_disconnect_cancels_the_generation(module_daemon: DaemonProcess, http: httpx.Client) -> None:
    """Closing a stateless stream stops its generation: the model is free again at once."""
    body = {"messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}],
            "max_tokens": 4000, "temperature": 0.8, "seed": 1, "stream": True}
    with httpx.Client(base_url=module_daemon.http_url, timeout=scaled(60)) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            seen = 0
            for line in lines:
                if line.startswith("data:"):
                    seen += 1
                if seen >= 3:
                    break
    deadline = time.monotonic() + scaled(10)
    running = None
    while time.monotonic() < deadline:
        text = http.get("/metrics").text
        running = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("llmws_generations_running "))
        if running == 0:
            break
        time.sleep(0.1)
    assert running == 0
    finished = http.get("/metrics").text
    assert 'llmws_generations_finished_total{finish_reason="cancelled"}' in finished


# ---------------------------------------------------------------------- pure helpers

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def test_tool_call_parser_reads_tagged_and_bare_json() -> None:
    """Tool calls are recognised in <tool_call> tags and as a bare JSON object, only for offered tools."""
    content, calls = toolcalls.parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', TOOLS)
    assert content == "" and calls[0]["function"] == {"name": "add", "arguments": '{"a": 1}'}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    _, calls = toolcalls.parse_tool_calls('{"name": "add", "arguments": {"b": 2}}', TOOLS)
    assert json.loads(calls[0]["function"]["arguments"]) == {"b": 2}
    content, calls = toolcalls.parse_tool_calls('{"name": "rm_rf", "arguments": {}}', TOOLS)
    assert calls == [] and "rm_rf" in content
    content, calls = toolcalls.parse_tool_calls("Just text.", TOOLS)
    assert calls == [] and content == "Just text."


def test_tool_call_hold_back_decision() -> None:
    """A streamed reply is held back only while it could still become a tool call."""
    assert toolcalls.may_be_tool_call("<tool")
    assert toolcalls.may_be_tool_call(' {"name"')
    assert not toolcalls.may_be_tool_call("Hello")


def test_json_extraction_finds_the_first_json_value() -> None:
    """Without a grammar, JSON mode keeps the first complete JSON value of the reply."""
    assert json.loads(extract_json('Sure! {"a": [1, 2]} hope that helps')) == {"a": [1, 2]}
    assert extract_json("no json here") == "no json here"
