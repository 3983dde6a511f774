"""The OpenAI surface beyond chat: `/v1/models/{id}`, OpenAI-shaped errors for every 4xx under
`/v1`, through the official `openai` SDK and raw httpx on a real daemon."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import DaemonProcess, scaled

EMBEDDER = "all-MiniLM-L6-v2"


@pytest.fixture
def client(module_daemon: DaemonProcess) -> Iterator[openai.OpenAI]:
    """The official SDK pointed at the daemon."""
    with openai.OpenAI(
        base_url=module_daemon.http_url + "/v1", api_key="unused", timeout=scaled(120), max_retries=0
    ) as c:
        yield c


def chat_model(client: openai.OpenAI) -> str:
    return next(
        m.id for m in client.models.list() if getattr(m, "kind", None) == "chat" and getattr(m, "loaded", False)
    )


def test_sdk_retrieves_one_model(client: openai.OpenAI) -> None:
    """models.retrieve returns the chat model and the embedding model by id."""
    emb = client.models.retrieve(EMBEDDER)
    assert emb.id == EMBEDDER and emb.object == "model"
    chat_id = next(m.id for m in client.models.list() if getattr(m, "kind", None) == "chat")
    assert client.models.retrieve(chat_id).id == chat_id


def test_unknown_model_is_an_openai_404(client: openai.OpenAI, http: httpx.Client) -> None:
    """An unknown model id is a 404 in OpenAI's error shape, as the SDK expects."""
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    body = http.get("/v1/models/no-such-model").json()
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert info.value.status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/no-such-route", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/embeddings", 405),
    ],
)
def test_unknown_routes_and_methods_answer_in_openai_shape(
    http: httpx.Client, method: str, path: str, status: int
) -> None:
    """A wrong URL or method under /v1 is an OpenAI error object, not FastAPI's {"detail": ...}."""
    r = http.request(method, path, json={})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and "detail" not in r.json()


def test_sdk_sees_a_missing_route_as_not_found(module_daemon: DaemonProcess) -> None:
    """The SDK raises NotFoundError with the server's message for a route the server lacks."""
    with (
        openai.OpenAI(base_url=module_daemon.http_url + "/v1/nowhere", api_key="x", max_retries=0) as c,
        pytest.raises(openai.NotFoundError) as info,
    ):
        c.models.list()
    assert "Unknown request URL" in info.value.message


def test_invalid_json_names_no_parameter(http: httpx.Client) -> None:
    """A body that is not JSON is a 400 saying so, with param null (not a character offset)."""
    r = http.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] is None and "not valid JSON" in err["message"]


def test_empty_messages_is_an_openai_400(http: httpx.Client) -> None:
    """An empty messages list is a 400 naming `messages`."""
    r = http.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages"


HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


def test_fingerprint_on_responses_and_every_chunk(client: openai.OpenAI) -> None:
    """system_fingerprint is a string on a reply and on every stream chunk (clients call .startswith)."""
    r = client.chat.completions.create(model="x", messages=HELLO, max_tokens=4, temperature=0)
    assert r.system_fingerprint and r.system_fingerprint.startswith("fp_")
    stream = client.chat.completions.create(
        model="x",
        messages=HELLO,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    prints = {chunk.system_fingerprint for chunk in stream}
    assert prints == {r.system_fingerprint}


def test_n_choices_differ_with_a_seed_and_count_usage(client: openai.OpenAI) -> None:
    """n=3 gives three indexed choices; sampled with a seed they are not all the same; usage sums them."""
    r = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Name a colour."}],
        n=3,
        max_tokens=12,
        temperature=1.5,
        seed=7,
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage is not None and r.usage.completion_tokens <= 36
    single = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12, temperature=0
    )
    assert r.usage.prompt_tokens == single.usage.prompt_tokens


def test_n_choices_greedy_are_identical(client: openai.OpenAI) -> None:
    """At temperature 0 every choice is the same greedy reply as n=1 gives."""
    one = client.chat.completions.create(model="x", messages=HELLO, max_tokens=10, temperature=0)
    two = client.chat.completions.create(model="x", messages=HELLO, max_tokens=10, temperature=0, n=2)
    assert [c.message.content for c in two.choices] == [one.choices[0].message.content] * 2


def test_n_choices_stream_with_their_indexes(client: openai.OpenAI) -> None:
    """A streamed n=2 reply interleaves chunks of both choices; each ends with a finish_reason."""
    stream = client.chat.completions.create(model="x", messages=HELLO, max_tokens=10, temperature=0, n=2, stream=True)
    texts: dict[int, str] = {0: "", 1: ""}
    finished: set[int] = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and texts[0] and texts[0] == texts[1]


def test_logprobs_non_stream(client: openai.OpenAI) -> None:
    """logprobs + top_logprobs give one entry per generated token, alternatives sorted, the greedy token first."""
    r = client.chat.completions.create(
        model="x", messages=HELLO, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert r.usage is not None and len(entries) == r.usage.completion_tokens
    assert "".join(e.token for e in entries).startswith(choice.message.content or "\0")
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert bytes(e.bytes or []).decode("utf-8", "replace") == e.token


def test_logprobs_stream_match_non_stream(client: openai.OpenAI) -> None:
    """Streamed chunks carry the logprobs of their own tokens; together they equal the non-streamed list."""
    full = client.chat.completions.create(
        model="x", messages=HELLO, max_tokens=8, temperature=0, logprobs=True, top_logprobs=1
    )
    stream = client.chat.completions.create(
        model="x", messages=HELLO, max_tokens=8, temperature=0, logprobs=True, top_logprobs=1, stream=True
    )
    streamed = []
    for chunk in stream:
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert [e.token for e in streamed] == [e.token for e in full.choices[0].logprobs.content]  # type: ignore[union-attr]
    assert all(
        abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, full.choices[0].logprobs.content, strict=True)
    )  # type: ignore[union-attr]


def test_top_logprobs_without_logprobs_is_a_400(http: httpx.Client) -> None:
    """top_logprobs without logprobs: true is refused, naming top_logprobs."""
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_invalid_tool_call_arguments_are_a_400(http: httpx.Client) -> None:
    """An assistant tool call whose arguments are not JSON is a 400 naming the field."""
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{not json"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "arguments" in err["param"]


def test_json_object_with_a_schema_follows_it(client: openai.OpenAI) -> None:
    """response_format json_object with a schema (llama.cpp's extension) constrains the reply to that schema."""
    import json

    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    r = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Bob is 30. Give his age."}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_object", "schema": schema},  # type: ignore[typeddict-unknown-key]
    )
    value = json.loads(r.choices[0].message.content or "")
    assert set(value) == {"age"} and isinstance(value["age"], int)


def test_completions_continue_raw_text(client: openai.OpenAI) -> None:
    """/v1/completions continues a raw prompt (no chat template), with usage and a fingerprint."""
    r = client.completions.create(model="x", prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert "5" in r.choices[0].text
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage is not None and r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 3
    assert r.system_fingerprint and r.system_fingerprint.startswith("fp_")


def test_completions_default_to_16_tokens_and_stop(client: openai.OpenAI) -> None:
    """Without max_tokens a completion stops at OpenAI's 16 tokens; a stop string ends it before the string."""
    r = client.completions.create(model="x", prompt="Once upon a time", temperature=0)
    assert r.usage is not None and r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
    text = r.choices[0].text
    word = text.split()[len(text.split()) // 2]
    cut = client.completions.create(model="x", prompt="Once upon a time", temperature=0, stop=[word])
    assert cut.choices[0].finish_reason == "stop" and word not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)


def test_completions_prompt_list_echo_and_n(client: openai.OpenAI) -> None:
    """A list of prompts with n=2 gives choices numbered prompt by prompt; echo prepends each prompt."""
    prompts = ["The sky is", "Water is"]
    r = client.completions.create(model="x", prompt=prompts, max_tokens=4, temperature=0, n=2, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        assert c.text.startswith(prompts[c.index // 2]) and len(c.text) > len(prompts[c.index // 2])
    assert r.choices[0].text == r.choices[1].text


def test_completions_logprobs_in_the_legacy_shape(client: openai.OpenAI) -> None:
    """Completion logprobs come as tokens, token_logprobs, top_logprobs and text_offset that spell the text."""
    text = client.completions.create(
        model="x", prompt="Paris is the capital of", max_tokens=4, temperature=0, logprobs=2
    )
    lp = text.choices[0].logprobs
    assert lp is not None and lp.tokens and len(lp.tokens) == len(lp.token_logprobs or []) == len(lp.top_logprobs or [])
    assert "".join(lp.tokens) == text.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) == 2 for top in lp.top_logprobs or [])


def test_completions_stream_matches_non_stream(client: openai.OpenAI) -> None:
    """The streamed text equals the non-streamed text; a usage chunk comes last when asked."""
    full = client.completions.create(model="x", prompt="The rain in Spain", max_tokens=10, temperature=0)
    stream = client.completions.create(
        model="x",
        prompt="The rain in Spain",
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(parts) == full.choices[0].text and finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": []},
        {"prompt": [1.5]},
        {"prompt": {"x": 1}},
        {"prompt": "a", "suffix": "b"},
        {"prompt": [1, 2], "echo": True},
        {"prompt": [10**9]},
        {"prompt": "word " * 20000, "max_tokens": 2},
    ],
)
def test_completions_bad_requests_are_openai_400s(http: httpx.Client, body: dict) -> None:
    """Bad prompts, unsupported suffix/echo combinations, unknown token ids and too-long prompts are OpenAI 400s."""
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


import json  # noqa: E402

PERSON = [
    {
        "type": "function",
        "function": {
            "name": "Person",
            "parameters": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"],
            },
        },
    }
]


@pytest.mark.parametrize("stream", [False, True])
def test_forced_call_cut_by_max_tokens_is_a_partial_tool_call(client: openai.OpenAI, stream: bool) -> None:
    """A forced call cut by max_tokens comes back as a partial tool call with finish_reason "length",
    never as the call's JSON text in the content (what LangChain's structured output reads)."""
    kw = {
        "model": "x",
        "messages": [{"role": "user", "content": "Bob is thirty years old."}],
        "tools": PERSON,
        "tool_choice": {"type": "function", "function": {"name": "Person"}},
        "max_tokens": 16,
        "temperature": 0,
    }
    if not stream:
        r = client.chat.completions.create(**kw)  # type: ignore[call-overload]
        choice = r.choices[0]
        assert choice.finish_reason == "length" and not choice.message.content
        call = choice.message.tool_calls[0]
        name, args = call.function.name, call.function.arguments
    else:
        content, name, args, finish = "", None, "", None
        for chunk in client.chat.completions.create(stream=True, **kw):  # type: ignore[call-overload]
            for c in chunk.choices:
                content += c.delta.content or ""
                for tc in c.delta.tool_calls or []:
                    name = tc.function.name or name
                    args += tc.function.arguments or ""
                finish = c.finish_reason or finish
        assert finish == "length" and not content
    assert name == "Person"
    assert args.startswith("{")
    with pytest.raises(ValueError):
        json.loads(args)  # cut short: not yet a whole object
    full = client.chat.completions.create(**{**kw, "max_tokens": 60})  # type: ignore[call-overload]
    assert full.choices[0].finish_reason == "tool_calls"
    whole = full.choices[0].message.tool_calls[0].function.arguments
    assert whole.replace(" ", "").startswith(args.replace(" ", "")[:8])  # the same call, as far as it got


@pytest.mark.filterwarnings("ignore:Items? .* (is|are) using the `ReadOnly` qualifier:UserWarning")
def test_litellm_text_completion_client(module_daemon: DaemonProcess) -> None:
    """LiteLLM's `text_completion` (OpenAI-compatible provider) continues raw text through /v1/completions."""
    litellm = pytest.importorskip("litellm")
    r = litellm.text_completion(
        model="openai/local",
        prompt="1, 2, 3, 4,",
        max_tokens=6,
        temperature=0,
        api_base=module_daemon.http_url + "/v1",
        api_key="unused",
        timeout=scaled(120),
    )
    assert "5" in r.choices[0].text
    assert r.usage.completion_tokens <= 6


def test_tokenize_and_detokenize_round_trip(http: httpx.Client) -> None:
    """/tokenize gives the chat model's ids (and pieces that spell the text); /detokenize gives the text back."""
    text = "Hello world, café ☕"
    tokens = http.post("/tokenize", json={"content": text}).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"content": text}
    pieces = http.post("/tokenize", json={"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello world" and all("id" in p for p in pieces)
    bad = http.post("/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_token_prompt_completes_like_its_text(client: openai.OpenAI, http: httpx.Client) -> None:
    """A completion of the /tokenize ids of a text equals the completion of the text itself."""
    text = "The capital of France is"
    tokens = http.post("/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
    a = client.completions.create(model="x", prompt=text, max_tokens=5, temperature=0)
    b = client.completions.create(model="x", prompt=tokens, max_tokens=5, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert a.usage is not None and b.usage is not None and a.usage.prompt_tokens == b.usage.prompt_tokens
