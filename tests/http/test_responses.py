"""OpenAI's Responses API through the official `openai` SDK, on a real daemon with the
real embedded model: stored responses, conversations, background runs, resumed
streams, tools, JSON schemas, cancel, delete, and a SIGKILL in the middle."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pydantic
import pytest

from tests.conftest import DaemonProcess, scaled
from tests.wire import Peer

STORY = "Write a long story about a lighthouse keeper and the sea."
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]},
}
PERSON = {
    "type": "json_schema",
    "name": "person",
    "schema": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
}


def sdk(daemon: DaemonProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.http_url + "/v1", api_key=key, timeout=scaled(120), max_retries=0)


@pytest.fixture
def client(module_daemon: DaemonProcess) -> Iterator[openai.OpenAI]:
    """The official SDK pointed at the daemon (no key configured: any api_key works)."""
    with sdk(module_daemon) as c:
        yield c


def wait_done(client: openai.OpenAI, response_id: str) -> openai.types.responses.Response:
    """Poll a response until it is no longer queued or in progress."""
    deadline = time.monotonic() + scaled(120)
    while time.monotonic() < deadline:
        r = client.responses.retrieve(response_id)
        if r.status not in ("queued", "in_progress"):
            return r
        time.sleep(0.1)
    raise AssertionError("the response did not end")


def prefix_reused(client: openai.OpenAI) -> float:
    """The daemon's count of prompt tokens reused from a cached KV prefix (/metrics)."""
    text = httpx.get(str(client.base_url).removesuffix("/v1/") + "/metrics").text
    names = ("llmws_prefix_reused_tokens", "llmws_prefix_reused_tokens_total")
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] in names)


def test_create_returns_a_completed_stored_response(client: openai.OpenAI) -> None:
    """A plain create answers with a completed response in OpenAI's shape, retrievable by its id."""
    r = client.responses.create(
        model="x", input="Say hello in one short sentence.", max_output_tokens=64, temperature=0
    )
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status == "completed" and r.incomplete_details is None
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output_text
    assert r.usage is not None and r.usage.input_tokens > 5 and 0 < r.usage.output_tokens <= 64
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.model.startswith("SmolLM2")
    again = client.responses.retrieve(r.id)
    assert again.output_text == r.output_text and again.status == "completed"


def test_length_limit_makes_the_response_incomplete(client: openai.OpenAI) -> None:
    """A reply cut by max_output_tokens is `incomplete` with reason max_output_tokens."""
    r = client.responses.create(model="x", input=STORY, max_output_tokens=8, temperature=0)
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 8


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    """Turn 2 through previous_response_id sees turn 1: its prompt is exactly the one chat
    completions builds from turn 1's messages spelled out, token for token, and that prefix
    comes from the model's cache."""
    first = client.responses.create(
        model="x",
        input="My name is Ada. Say hello to me.",
        instructions="Be brief.",
        max_output_tokens=32,
        temperature=0,
    )
    reused = prefix_reused(client)
    second = client.responses.create(
        model="x",
        input="What is my name?",
        previous_response_id=first.id,
        instructions="Be brief.",
        max_output_tokens=32,
        temperature=0,
    )
    # The prompt prefix (turn 1 and its reply) came from the model's cache, not a new prefill.
    assert first.usage is not None
    assert prefix_reused(client) - reused >= first.usage.input_tokens
    assert second.previous_response_id == first.id
    explicit = client.chat.completions.create(
        model="x",
        max_tokens=1,
        temperature=0,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "My name is Ada. Say hello to me."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is my name?"},
        ],
    )
    assert second.usage is not None and explicit.usage is not None
    assert second.usage.input_tokens == explicit.usage.prompt_tokens
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.output_text


def test_streamed_events_follow_openais_sequence(client: openai.OpenAI) -> None:
    """client.responses.stream yields OpenAI's event sequence with consecutive sequence
    numbers, and its final response holds the streamed text."""
    with client.responses.stream(
        model="x", input="Say hello in one short sentence.", max_output_tokens=64, temperature=0
    ) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == final.output_text
    assert client.responses.retrieve(final.id).output_text == text


def test_background_response_is_polled_to_completion(client: openai.OpenAI) -> None:
    """A background create returns at once (queued or in progress); polling ends with the
    whole reply, the same as a foreground greedy run of the same request."""
    started = client.responses.create(model="x", input=STORY, max_output_tokens=48, temperature=0, background=True)
    assert started.status in ("queued", "in_progress") and started.background is True
    done = wait_done(client, started.id)
    assert done.status == "incomplete" and done.output_text
    direct = client.responses.create(model="x", input=STORY, max_output_tokens=48, temperature=0)
    assert done.output_text == direct.output_text


def test_dropped_stream_resumes_with_starting_after(client: openai.OpenAI) -> None:
    """A background stream dropped after a few deltas and resumed with starting_after
    (as the SDK's background_streaming example does) gives the text of an uninterrupted
    greedy run, with no event missing or repeated."""
    request = {"model": "x", "input": STORY, "max_output_tokens": 64, "temperature": 0}
    seen: list[str] = []
    last = -1
    response_id = None
    with client.responses.stream(background=True, **request) as s:  # type: ignore[arg-type]
        for event in s:
            if event.type == "response.created":
                response_id = event.response.id
            if event.type == "response.output_text.delta":
                seen.append(event.delta)
            last = event.sequence_number
            if len(seen) == 4:
                break
    assert response_id is not None
    numbers: list[int] = []
    with client.responses.stream(response_id=response_id, starting_after=last) as s:
        for event in s:
            numbers.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                seen.append(event.delta)
    assert numbers[0] == last + 1 and numbers == list(range(last + 1, last + 1 + len(numbers)))
    direct = client.responses.create(**request)  # type: ignore[arg-type]
    assert "".join(seen) == direct.output_text


def test_retrieve_stream_starts_exactly_after_the_given_number(client: openai.OpenAI) -> None:
    """GET ?stream=true&starting_after=N sends the stored events after N, in order, ending
    with the response's last event."""
    r = client.responses.create(
        model="x", input="Say hello in one short sentence.", max_output_tokens=32, temperature=0
    )
    whole = list(client.responses.retrieve(r.id, stream=True))
    tail = list(client.responses.retrieve(r.id, stream=True, starting_after=3))
    assert [e.sequence_number for e in whole] == list(range(len(whole)))
    assert [e.model_dump() for e in tail] == [e.model_dump() for e in whole[4:]]
    assert tail[-1].type == "response.completed"


def test_function_call_round_trip(client: openai.OpenAI) -> None:
    """A forced call comes as a function_call item; its function_call_output sent with
    previous_response_id gets a text answer, and input_items lists that output."""
    r = client.responses.create(
        model="x",
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",  # type: ignore[list-item]
        max_output_tokens=128,
        temperature=0,
    )
    calls = [item for item in r.output if item.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    follow = client.responses.create(
        model="x",
        previous_response_id=r.id,
        tools=[WEATHER],
        max_output_tokens=64,
        temperature=0,  # type: ignore[list-item]
        input=[
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": json.dumps({"temp_c": 21, "sky": "clear"}),
            }
        ],
    )
    assert follow.status in ("completed", "incomplete")
    assert follow.output and follow.output[0].type in ("message", "function_call")
    items = client.responses.input_items.list(follow.id)
    assert [i.type for i in items.data] == ["function_call_output"]
    assert items.data[0].call_id == call.call_id  # type: ignore[union-attr]


def test_streamed_function_call_has_argument_events(client: openai.OpenAI) -> None:
    """A streamed call comes as output_item.added, function_call_arguments.delta/.done and output_item.done."""
    with client.responses.stream(
        model="x",
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",  # type: ignore[list-item]
        max_output_tokens=128,
        temperature=0,
    ) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    call = next(item for item in final.output if item.type == "function_call")
    assert json.loads(call.arguments)["city"]


def test_text_format_json_schema(client: openai.OpenAI) -> None:
    """text.format json_schema makes the output JSON with the schema's keys and types."""
    r = client.responses.create(
        model="x",
        input="Bob is 30 years old. Give his name and age.",
        text={"format": PERSON},  # type: ignore[typeddict-item]
        max_output_tokens=128,
        temperature=0,
    )
    data = json.loads(r.output_text)
    assert set(data) == {"name", "age"} and isinstance(data["name"], str) and isinstance(data["age"], int)


def test_a_prompt_beyond_the_context(client: openai.OpenAI, module_daemon: DaemonProcess) -> None:
    """A prompt beyond the model's context is a 400 context_too_long in the foreground (and
    nothing is stored), and a `failed` response with that error in the background, whose
    stream ends with `error` and `response.failed`."""
    huge = "word " * 9000
    sessions = module_daemon.var_dir / "sessions"
    before = sorted(p.name for p in sessions.iterdir())
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="x", input=huge, max_output_tokens=8)
    assert exc.value.body["code"] == "context_too_long"  # type: ignore[index]
    assert sorted(p.name for p in sessions.iterdir()) == before
    r = client.responses.create(model="x", input=huge, max_output_tokens=8, background=True)
    failed = wait_done(client, r.id)
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "context_too_long"
    kinds = [e.type for e in client.responses.retrieve(r.id, stream=True)]
    assert kinds[-2:] == ["error", "response.failed"]


def test_sdk_parse_with_a_pydantic_text_format(client: openai.OpenAI) -> None:
    """client.responses.parse(text_format=<a pydantic model>) gets output_parsed as that model."""

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=40)
        age: int

    r = client.responses.parse(
        model="x",
        input="Bob is 30 years old. Give his name and age.",
        text_format=Person,
        max_output_tokens=128,
        temperature=0,
    )
    assert isinstance(r.output_parsed, Person) and isinstance(r.output_parsed.age, int)


def test_cancel_stops_a_background_response(client: openai.OpenAI) -> None:
    """Cancelling a running background response makes it `cancelled`, keeping what it had."""
    r = client.responses.create(model="x", input=STORY, max_output_tokens=2000, background=True)
    with client.responses.retrieve(r.id, stream=True) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                break
    cancelled = client.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    again = client.responses.retrieve(r.id)
    assert again.status == "cancelled" and again.usage is not None and again.usage.output_tokens < 2000
    assert client.responses.cancel(r.id).status == "cancelled"  # an ended response stays as it is


def test_delete_and_input_items(client: openai.OpenAI) -> None:
    """input_items lists the input messages; after DELETE the response is gone (404)."""
    r = client.responses.create(
        model="x",
        max_output_tokens=8,
        temperature=0,
        input=[
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye."},
        ],
    )
    items = client.responses.input_items.list(r.id, order="asc")
    assert [(i.role, i.content[0].text) for i in items.data] == [
        ("user", "Hi."),
        ("assistant", "Hello."),
        ("user", "Bye."),
    ]  # type: ignore[union-attr]
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_store_false_is_not_kept(client: openai.OpenAI) -> None:
    """A response created with store: false answers normally and cannot be retrieved afterwards."""
    r = client.responses.create(model="x", input="Say hi.", max_output_tokens=8, temperature=0, store=False)
    assert r.output_text and r.store is False
    deadline = time.monotonic() + scaled(10)
    while time.monotonic() < deadline:
        try:
            client.responses.retrieve(r.id)
        except openai.NotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError("a store: false response was still retrievable")


def test_without_keys_any_dummy_key_reads_any_response(module_daemon: DaemonProcess) -> None:
    """With no API keys configured, the key an SDK sends means nothing: a response made with
    one dummy key is read with another."""
    with sdk(module_daemon, "sk-one") as one, sdk(module_daemon, "sk-two") as two:
        r = one.responses.create(model="x", input="Say hi.", max_output_tokens=4, temperature=0)
        assert two.responses.retrieve(r.id).output_text == r.output_text


def test_bad_requests_get_openai_errors(client: openai.OpenAI, http: httpx.Client) -> None:
    """Built-in tools, unknown ids, an unknown previous response and background without
    store answer OpenAI error objects; the daemon keeps serving."""
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="x", input="hi", tools=[{"type": "web_search"}])  # type: ignore[list-item]
    assert exc.value.body["code"] == "unsupported"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_" + "0" * 32)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("not-an-id")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="x", input="hi", previous_response_id="resp_" + "1" * 32)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="x", input="hi", background=True, store=False)
    bad = http.post("/v1/responses", json={"input": 5})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert client.responses.create(model="x", input="hi", max_output_tokens=4).status == "incomplete"


def test_langchain_chat_openai_with_the_responses_api(module_daemon: DaemonProcess) -> None:
    """LangChain's ChatOpenAI(use_responses_api=True) chats, streams, calls a bound tool and
    continues through previous_response_id against the daemon."""
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        return "sunny"

    common = {"base_url": module_daemon.http_url + "/v1", "api_key": "unused", "model": "local", "temperature": 0}
    llm = ChatOpenAI(use_responses_api=True, max_tokens=32, **common)
    reply = llm.invoke("Say hello in one short sentence.")
    assert reply.text and str(reply.response_metadata["id"]).startswith("resp_")
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] > 0
    assert "".join(chunk.text for chunk in llm.stream("Say hello in one short sentence.")) == reply.text
    call = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert [c["name"] for c in call.tool_calls] == ["get_weather"] and isinstance(
        call.tool_calls[0]["args"]["city"], str
    )
    chained = ChatOpenAI(use_responses_api=True, use_previous_response_id=True, max_tokens=16, **common)
    first = chained.invoke([HumanMessage("My name is Ada.")])
    second = chained.invoke([HumanMessage("My name is Ada."), first, HumanMessage("What is my name?")])
    assert second.text
    with sdk(module_daemon) as client:
        stored = client.responses.retrieve(second.response_metadata["id"])
        assert stored.previous_response_id == first.response_metadata["id"]
        assert [i.type for i in client.responses.input_items.list(stored.id).data] == ["message"]  # only the new turn


# ---------------------------------------------------------------------- own daemons


def test_another_key_cannot_read_a_response(tmp_path: Path) -> None:
    """With API keys configured, a response is visible only to the key that created it."""
    d = DaemonProcess(
        tmp_path,
        [],
        None,
        {"security": {"api_keys": ["key-one-0123456789", "key-two-0123456789"], "require_api_key": True}},
    )
    d.start()
    try:
        with sdk(d, "key-one-0123456789") as one, sdk(d, "key-two-0123456789") as two:
            r = one.responses.create(model="x", input="Say hi.", max_output_tokens=8, temperature=0)
            assert one.responses.retrieve(r.id).id == r.id
            for call in (
                lambda: two.responses.retrieve(r.id),
                lambda: two.responses.input_items.list(r.id),
                lambda: two.responses.cancel(r.id),
                lambda: two.responses.delete(r.id),
                lambda: list(two.responses.retrieve(r.id, stream=True)),
            ):
                with pytest.raises(openai.NotFoundError):
                    call()
            with pytest.raises(openai.BadRequestError):
                two.responses.create(model="x", input="hi", previous_response_id=r.id)
            assert one.responses.retrieve(r.id).status == "incomplete"  # k2's delete did nothing
    finally:
        d.kill()


def test_sigkill_mid_generation_then_restart(tmp_path: Path) -> None:
    """After a SIGKILL in the middle of a background response and a restart, the response
    is `incomplete` (reason interrupted) with every delta a client saw; a completed one
    comes back whole; nothing of either is in plaintext on disk."""
    d = DaemonProcess(tmp_path, [], None, None)
    d.start()
    try:
        with sdk(d) as client:
            done = client.responses.create(
                model="x", input="Say hello in one short sentence.", max_output_tokens=32, temperature=0
            )
            r = client.responses.create(model="x", input=STORY, max_output_tokens=4000, background=True)
            seen: list[str] = []
            with client.responses.retrieve(r.id, stream=True) as stream:
                for event in stream:
                    if event.type == "response.output_text.delta":
                        seen.append(event.delta)
                    if len(seen) == 6:
                        break
            d.kill()
        d.start()  # new ports
        with sdk(d) as client:
            after = client.responses.retrieve(r.id)
            assert after.status == "incomplete"
            assert after.incomplete_details is not None and after.incomplete_details.reason == "interrupted"
            assert after.output_text.startswith("".join(seen))
            events = list(client.responses.retrieve(r.id, stream=True))
            assert events[-1].type == "response.incomplete"
            assert [e.sequence_number for e in events] == list(range(len(events)))
            whole = client.responses.retrieve(done.id)
            assert whole.status == "completed" and whole.output_text == done.output_text
            follow = client.responses.create(model="x", input="Go on.", previous_response_id=r.id, max_output_tokens=8)
            assert follow.output_text
        texts = ["".join(seen).strip(), done.output_text.strip()]
        for path in (d.var_dir / "sessions").rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                for text in texts:
                    assert text.encode() not in data, path
    finally:
        d.kill()


async def test_websocket_cannot_resume_a_response(module_daemon: DaemonProcess) -> None:
    """The session behind a stored response is not a conversation: a WebSocket handshake
    naming its id gets a new session, never the response's events."""
    with sdk(module_daemon) as client:
        r = client.responses.create(model="x", input="Say hi.", max_output_tokens=4, temperature=0)
    session_id = str(uuid.UUID(hex=r.id[len("resp_") :]))
    peer = await Peer.open(module_daemon.ws_url, {"session_id": session_id, "last_seq": 0})
    try:
        assert peer.welcome["resumed"] is False
        assert peer.welcome["session_id"] != session_id
    finally:
        await peer.close()
