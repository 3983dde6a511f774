"""The OpenAI-compatible surface through the official `openai` SDK and raw SSE, on a real daemon."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from llmws_core import errors
from llmws_core.services import tools as toolcalls
from llmws_core.services.generation import extract_json
from tests.conftest import DaemonProcess, scaled
from tests.http.conftest import sse_events

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


@pytest.fixture
def client(module_daemon: DaemonProcess) -> Iterator[openai.OpenAI]:
    """The official SDK pointed at the daemon (no key configured: any api_key works)."""
    with openai.OpenAI(
        base_url=module_daemon.http_url + "/v1", api_key="unused", timeout=scaled(120), max_retries=0
    ) as c:
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
        model="x",
        messages=HELLO,
        max_tokens=16,
        temperature=0,
        stream=True,
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
        client.chat.completions.create(model="x", messages=HELLO, n=17)
    assert bad.value.status_code == 400
    body = bad.value.body
    assert isinstance(body, dict) and body.get("type") == "invalid_request_error"
    assert "n" in (body.get("param") or "")
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": "word " * 20000}],
            max_tokens=4,
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


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
    },
}
REQUIRED_ARGS = {"get_weather": {"city": str}, "add": {"a": (int, float), "b": (int, float)}}
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]

PERSON = {
    "type": "json_schema",
    "json_schema": {
        "name": "person",
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        },
    },
}
BOB = [{"role": "user", "content": "Bob is 30 years old. Give his name and age."}]


def assert_person(text: str | None) -> None:
    """`text` is a JSON object with exactly a string `name` and an integer `age`."""
    data = json.loads(text or "")
    assert isinstance(data, dict) and set(data) == {"name", "age"}
    assert isinstance(data["name"], str)
    assert isinstance(data["age"], int) and not isinstance(data["age"], bool)


def assert_call(name: str, arguments: str, offered: set[str]) -> None:
    """A call names an offered tool, with JSON arguments holding its required keys, well typed."""
    assert name in offered
    args = json.loads(arguments)
    assert isinstance(args, dict)
    for key, kind in REQUIRED_ARGS[name].items():
        assert isinstance(args[key], kind), (key, args)


def test_json_schema_reply_is_json_matching_the_schema(client: openai.OpenAI) -> None:
    """With a json_schema response_format the content parses as JSON with the schema's keys and types."""
    r = client.chat.completions.create(
        model="x",
        messages=BOB,
        response_format=PERSON,
        max_tokens=128,
        temperature=0,  # type: ignore[arg-type]
    )
    assert r.choices[0].finish_reason == "stop"
    assert_person(r.choices[0].message.content)


def test_json_schema_stream_joins_into_the_same_json(client: openai.OpenAI) -> None:
    """Streamed json_schema deltas join into the same schema-valid JSON as the non-streamed reply."""
    full = client.chat.completions.create(
        model="x",
        messages=BOB,
        response_format=PERSON,
        max_tokens=128,
        temperature=0,  # type: ignore[arg-type]
    )
    stream = client.chat.completions.create(
        model="x",
        messages=BOB,
        response_format=PERSON,
        max_tokens=128,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    parts, finish = [], None
    for chunk in stream:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    assert_person("".join(parts))
    assert "".join(parts) == full.choices[0].message.content


def test_json_object_reply_is_a_json_object(client: openai.OpenAI) -> None:
    """With response_format json_object the content parses as a JSON object."""
    r = client.chat.completions.create(
        model="x",
        messages=BOB,
        response_format={"type": "json_object"},
        max_tokens=128,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


def test_invalid_schema_is_a_400_and_the_server_keeps_serving(http: httpx.Client) -> None:
    """A schema no grammar can follow is a 400 OpenAI error, and the next request is served normally."""
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": 5}}}
    for stream in (False, True):
        r = http.post(
            "/v1/chat/completions", json={"messages": BOB, "response_format": bad, "max_tokens": 8, "stream": stream}
        )
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and "schema" in error["message"]
        assert "Unrecognized" not in error["message"] and "Traceback" not in r.text
    unknown = {"messages": PARIS, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "rm"}}}
    r = http.post("/v1/chat/completions", json=unknown)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    ok = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 8, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_named_tool_choice_always_calls_that_tool(client: openai.OpenAI) -> None:
    """tool_choice naming a function makes the answer a call of it, with arguments matching its schema."""
    r = client.chat.completions.create(
        model="x",
        messages=PARIS,
        tools=[ADD, WEATHER],
        max_tokens=128,
        temperature=0,  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert_call(calls[0].function.name, calls[0].function.arguments, {"get_weather"})


def test_required_tool_choice_calls_an_offered_tool(client: openai.OpenAI) -> None:
    """tool_choice "required" makes the answer a call of one of the offered tools, with valid arguments."""
    r = client.chat.completions.create(
        model="x",
        messages=PARIS,
        tools=[WEATHER, ADD],
        tool_choice="required",
        max_tokens=128,
        temperature=0,  # type: ignore[list-item]
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    assert_call(calls[0].function.name, calls[0].function.arguments, {"get_weather", "add"})


def test_forced_tool_call_streams_as_tool_call_deltas(client: openai.OpenAI) -> None:
    """A streamed forced call arrives as OpenAI tool_call deltas and ends with finish_reason tool_calls."""
    stream = client.chat.completions.create(
        model="x",
        messages=PARIS,
        tools=[WEATHER, ADD],
        tool_choice="required",
        max_tokens=128,  # type: ignore[list-item]
        temperature=0,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    content, finish = [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert "".join(content) == ""
    assert list(calls) == [0]
    assert_call(calls[0]["name"], calls[0]["arguments"], {"get_weather", "add"})


def test_auto_tool_choice_answers_with_text_or_valid_tool_calls(http: httpx.Client) -> None:
    """With tool_choice "auto" (prompt and parse, no grammar) the reply is text or calls of offered tools."""
    body = {"messages": PARIS, "tools": [WEATHER], "tool_choice": "auto", "max_tokens": 48, "temperature": 0}
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
    body = {
        "messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}],
        "max_tokens": 4000,
        "temperature": 0.8,
        "seed": 1,
        "stream": True,
    }
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
        running = next(
            float(line.split()[-1]) for line in text.splitlines() if line.startswith("llmws_generations_running ")
        )
        if running == 0:
            break
        time.sleep(0.1)
    assert running == 0
    finished = http.get("/metrics").text
    assert 'llmws_generations_finished_total{finish_reason="cancelled"}' in finished


# ---------------------------------------------------------------------- pure helpers

TOOLS = [{"name": "add", "parameters": {"type": "object"}}]


def test_tool_call_parser_reads_tagged_and_bare_json() -> None:
    """Tool calls are recognised in <tool_call> tags and as a bare JSON object, only for offered tools."""
    content, calls = toolcalls.parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', TOOLS)
    assert content == "" and (calls[0].name, calls[0].arguments_json) == ("add", '{"a": 1}')
    assert calls[0].id.startswith("call_")
    _, calls = toolcalls.parse_tool_calls('{"name": "add", "arguments": {"b": 2}}', TOOLS)
    assert calls[0].arguments == {"b": 2}
    content, calls = toolcalls.parse_tool_calls('{"name": "rm_rf", "arguments": {}}', TOOLS)
    assert calls == [] and "rm_rf" in content
    content, calls = toolcalls.parse_tool_calls("Just text.", TOOLS)
    assert calls == [] and content == "Just text."


def test_forced_tool_choice_becomes_a_call_schema() -> None:
    """A named or "required" tool_choice gives a json_schema of calls; "auto" gives none."""
    tools = [WEATHER["function"], ADD["function"]]
    named = toolcalls.forced_call_format(tools, "add")
    assert named is not None and named["type"] == "json_schema"
    schema = named["json_schema"]["schema"]
    assert schema["properties"]["name"] == {"const": "add"}
    assert schema["properties"]["arguments"] == ADD["function"]["parameters"]
    assert schema["required"] == ["name", "arguments"]
    required = toolcalls.forced_call_format(tools, "required")
    assert required is not None
    alts = required["json_schema"]["schema"]["anyOf"]
    assert [a["properties"]["name"]["const"] for a in alts] == ["get_weather", "add"]
    assert toolcalls.forced_call_format(tools, "auto") is None
    assert toolcalls.forced_call_format(tools, None) is None
    assert toolcalls.forced_call_format(None, "required") is None
    bare = toolcalls.forced_call_format(TOOLS, "required")
    assert bare is not None and bare["json_schema"]["schema"]["properties"]["arguments"] == {"type": "object"}
    with pytest.raises(errors.BadRequest):
        toolcalls.forced_call_format(tools, "rm")


def test_tool_call_hold_back_decision() -> None:
    """A streamed reply is held back only while it could still become a tool call."""
    assert toolcalls.may_be_tool_call("<tool")
    assert toolcalls.may_be_tool_call(' {"name"')
    assert not toolcalls.may_be_tool_call("Hello")


def test_json_extraction_finds_the_first_json_value() -> None:
    """Without a grammar, JSON mode keeps the first complete JSON value of the reply."""
    assert json.loads(extract_json('Sure! {"a": [1, 2]} hope that helps')) == {"a": [1, 2]}
    assert extract_json("no json here") == "no json here"
