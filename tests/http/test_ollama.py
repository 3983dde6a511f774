"""Ollama's API door through the official `ollama` client and raw NDJSON, on a real daemon."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import ollama
import pytest

from tests.conftest import DaemonProcess, scaled
from tests.engine.fake_hub import FakeHub, FakeRepo, tiny_gguf
from tests.http.conftest import pick_stop

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]
COUNT = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]
GREEDY = {"temperature": 0, "num_predict": 16}


@pytest.fixture
def client(module_daemon: DaemonProcess) -> Iterator[ollama.Client]:
    """The official client pointed at the daemon's HTTP port."""
    c = ollama.Client(host=module_daemon.http_url, timeout=scaled(120))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def local_name(client: ollama.Client) -> str:
    """The Ollama-style name the daemon lists for its loaded model."""
    return next(m.model for m in client.list().models if m.model and m.model.startswith("SmolLM2"))


def test_chat_answers_with_real_counts_and_durations(client: ollama.Client, local_name: str) -> None:
    """A non-streamed chat returns the reply and a final object with real counts and durations."""
    r = client.chat(model=local_name, messages=HELLO, options=GREEDY, stream=False)
    assert r.message.role == "assistant" and r.message.content
    assert r.done is True and r.done_reason in ("stop", "length")
    assert r.model == local_name
    assert r.prompt_eval_count is not None and r.prompt_eval_count > 5
    assert r.eval_count is not None and 0 < r.eval_count <= 16
    assert r.total_duration and r.eval_duration and r.prompt_eval_duration is not None
    assert r.total_duration >= r.eval_duration + r.prompt_eval_duration
    assert r.load_duration is not None and r.load_duration <= r.total_duration


def test_chat_stream_matches_the_single_answer(client: ollama.Client, local_name: str) -> None:
    """Streamed pieces join into the non-streamed reply; only the last piece is done, with counts."""
    full = client.chat(model=local_name, messages=HELLO, options=GREEDY, stream=False)
    parts = list(client.chat(model=local_name, messages=HELLO, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == full.message.content
    assert parts[-1].eval_count == full.eval_count
    assert parts[-1].prompt_eval_count == full.prompt_eval_count
    assert parts[-1].done_reason == full.done_reason


def test_stream_is_the_default_and_is_ndjson(module_daemon: DaemonProcess, local_name: str) -> None:
    """Without `stream`, /api/chat answers newline-delimited JSON objects, as Ollama does."""
    with httpx.Client(base_url=module_daemon.http_url, timeout=scaled(120)) as http:
        with http.stream("POST", "/api/chat", json={"model": local_name, "messages": HELLO, "options": GREEDY}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in r.iter_lines() if line]
    assert len(lines) >= 2
    assert lines[-1]["done"] is True and "eval_count" in lines[-1]
    assert all(line["created_at"].endswith("Z") for line in lines)


def test_num_predict_cuts_the_reply_with_done_reason_length(client: ollama.Client, local_name: str) -> None:
    """options.num_predict bounds the reply; done_reason says length."""
    r = client.chat(model=local_name, messages=COUNT, options={"temperature": 0, "num_predict": 3}, stream=False)
    assert r.done_reason == "length"
    assert r.eval_count == 3


def test_stop_option_ends_the_reply_before_the_stop_string(client: ollama.Client, local_name: str) -> None:
    """options.stop ends the reply where the stop string would begin."""
    full = client.chat(model=local_name, messages=COUNT, options={"temperature": 0, "num_predict": 40}, stream=False)
    text = full.message.content or ""
    stop = pick_stop(text)
    cut = client.chat(
        model=local_name, messages=COUNT, options={"temperature": 0, "num_predict": 40, "stop": [stop]}, stream=False
    )
    assert cut.message.content == text[: text.index(stop)]
    assert cut.done_reason == "stop"


def test_generate_answers_a_prompt_streamed_and_not(client: ollama.Client, local_name: str) -> None:
    """/api/generate returns `response`, and its stream joins to the same text."""
    r = client.generate(model=local_name, prompt="Say hello.", system="You are terse.", options=GREEDY)
    assert r.response and r.done and r.eval_count
    parts = list(
        client.generate(model=local_name, prompt="Say hello.", system="You are terse.", options=GREEDY, stream=True)
    )
    assert "".join(p.response or "" for p in parts) == r.response
    assert parts[-1].done and parts[-1].eval_count == r.eval_count


def test_an_empty_prompt_loads_the_model(client: ollama.Client, local_name: str) -> None:
    """generate with no prompt (Ollama's way to preload) answers done_reason load."""
    r = client.generate(model=local_name)
    assert r.done and r.done_reason == "load" and not r.response


def test_format_json_and_schema_constrain_the_reply(client: ollama.Client, local_name: str) -> None:
    """format "json" yields a JSON object; a schema format yields its required keys and types."""
    msgs = [{"role": "user", "content": "Bob is 30 years old. Give his name and age."}]
    r = client.chat(
        model=local_name, messages=msgs, format="json", options={"temperature": 0, "num_predict": 48}, stream=False
    )
    assert isinstance(json.loads(r.message.content or ""), dict)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    r = client.chat(
        model=local_name, messages=msgs, format=schema, options={"temperature": 0, "num_predict": 48}, stream=False
    )
    data = json.loads(r.message.content or "")
    assert isinstance(data["name"], str) and isinstance(data["age"], int)


def test_tool_history_round_trip_is_answered(client: ollama.Client, local_name: str) -> None:
    """A conversation with an assistant tool call and the tool's result gets a reply."""
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    r = client.chat(
        model=local_name,
        tools=[tool],
        options=GREEDY,
        stream=False,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "content": "Sunny, 25 C", "tool_name": "get_weather"},
        ],
    )
    assert r.done
    assert r.message.content or r.message.tool_calls
    for call in r.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)


def test_list_show_ps_and_version(client: ollama.Client, local_name: str) -> None:
    """tags lists the models as name:tag, show describes one, ps shows the loaded one, version answers."""
    models = client.list().models
    entry = next(m for m in models if m.model == local_name)
    assert local_name.endswith(":latest")
    assert entry.size and entry.size > 10_000_000 and entry.digest
    assert entry.details and entry.details.format == "gguf"
    shown = client.show(local_name)
    assert shown.details and shown.details.format == "gguf"
    assert shown.capabilities and "completion" in shown.capabilities
    assert shown.modelinfo and "general.architecture" in shown.modelinfo
    assert client.show(local_name.removesuffix(":latest")).details == shown.details
    running = client.ps().models
    assert [m.model for m in running] == [local_name]
    assert running[0].context_length and running[0].context_length > 0
    with httpx.Client(base_url=client._client.base_url, timeout=scaled(30)) as http:
        assert http.get("/api/version").json()["version"]


def test_unknown_models_are_404_for_show_and_served_by_the_loaded_model_for_chat(client: ollama.Client) -> None:
    """show of an unknown name is Ollama's 404; chat with one is answered by the loaded model."""
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("llama3.2:latest")
    assert missing.value.status_code == 404
    assert "not found" in missing.value.error
    r = client.chat(model="llama3.2", messages=HELLO, options=GREEDY, stream=False)
    assert r.message.content and r.model == "llama3.2"


def test_errors_are_ollama_error_objects_and_the_server_keeps_serving(
    client: ollama.Client, local_name: str, module_daemon: DaemonProcess
) -> None:
    """Bad requests get {"error": ...} with a 4xx status; the next good request is answered."""
    with pytest.raises(ollama.ResponseError) as images:
        client.chat(
            model=local_name, messages=[{"role": "user", "content": "What is this?", "images": ["iVBORw0KGgo="]}]
        )
    assert images.value.status_code == 400 and "text only" in images.value.error
    with httpx.Client(base_url=module_daemon.http_url, timeout=scaled(60)) as http:
        r = http.post("/api/chat", json={"model": local_name, "messages": HELLO, "options": {"temperature": "hot"}})
        assert r.status_code == 400 and "temperature" in r.json()["error"]
        r = http.post("/api/generate", json={"model": local_name, "prompt": "x", "raw": True, "stream": False})
        assert r.status_code == 400 and "raw" in r.json()["error"]
        r = http.post("/api/chat", content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
        r = http.post("/api/copy", json={"source": local_name, "destination": "copy"})
        assert r.status_code == 400 and "not supported" in r.json()["error"]
        r = http.get("/api/no-such-route")
        assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(ollama.ResponseError) as long:
        client.chat(model=local_name, messages=[{"role": "user", "content": "word " * 40_000}], stream=False)
    assert long.value.status_code == 400 and "too long" in long.value.error.lower()
    r = client.chat(model=local_name, messages=HELLO, options=GREEDY, stream=False)
    assert r.message.content


def test_embed_returns_unit_vectors_that_rank_by_meaning(client: ollama.Client) -> None:
    """embed gives one unit-length vector per input from the embedding model; related texts are closer."""
    r = client.embed(
        model="all-minilm", input=["The cat sat on the mat.", "A kitten rests on a rug.", "Stock markets fell sharply."]
    )
    vectors = r.embeddings
    assert len(vectors) == 3 and len(vectors[0]) == 384
    assert all(abs(sum(x * x for x in v) - 1) < 1e-3 for v in vectors)

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])
    assert r.prompt_eval_count and r.prompt_eval_count > 10
    assert r.total_duration and r.load_duration is not None
    single = client.embed(model="all-minilm", input="The cat sat on the mat.", dimensions=64)
    assert len(single.embeddings) == 1 and len(single.embeddings[0]) == 64
    old = client.embeddings(model="all-minilm", prompt="The cat sat on the mat.")
    assert [round(x, 4) for x in old.embedding] == [round(x, 4) for x in vectors[0]]


def test_embed_with_a_chat_model_name_is_an_ollama_error(client: ollama.Client, local_name: str) -> None:
    """Naming the chat model on /api/embed is a 400 saying it is not an embedding model."""
    with pytest.raises(ollama.ResponseError) as wrong:
        client.embed(model=local_name, input="hello")
    assert wrong.value.status_code == 400 and "embedding" in wrong.value.error


def test_ollama_port_serves_the_same_api_on_a_second_port(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """With server.ollama_port set, a client with a hard-coded Ollama address reaches the same daemon."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = daemon_factory(config={"server": {"ollama_port": port}})
    c = ollama.Client(host=f"127.0.0.1:{port}", timeout=scaled(60))
    try:
        names = [m.model for m in c.list().models]
        assert names == [m["name"] for m in httpx.get(d.http_url + "/api/tags", timeout=scaled(30)).json()["models"]]
    finally:
        c.close()


def test_pull_downloads_a_hugging_face_repo_with_ollama_progress(daemon_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """pull of hf.co/org/repo:QUANT streams status/digest/total/completed objects, ends in success and
    lists the model; delete removes it again (and refuses the loaded model)."""
    repo = FakeRepo(
        "acme/tiny-GGUF",
        {
            "tiny.Q4_K_M.gguf": tiny_gguf(padding=2_000_000),
            "tiny.Q8_0.gguf": tiny_gguf(padding=3_000_000),
            "README.md": b"hi",
        },
    )
    with FakeHub([repo]) as hub:
        d = daemon_factory(env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"})
        c = ollama.Client(host=d.http_url, timeout=scaled(180))
        try:
            parts = list(c.pull("hf.co/acme/tiny-GGUF:Q8_0", stream=True))
            assert parts[0].status == "pulling manifest"
            assert parts[-1].status == "success"
            sized = [p for p in parts if p.total]
            assert sized and sized[-1].completed == sized[-1].total > 3_000_000
            assert all(p.digest and p.digest.startswith("sha256:") for p in sized)
            names = [m.model for m in c.list().models]
            assert "acme--tiny-GGUF--Q8_0/tiny.Q8_0:latest" in names
            assert not any("Q4_K_M" in n for n in names)
            assert c.show("hf.co/acme/tiny-GGUF:Q8_0").details.format == "gguf"  # the pulled name finds it
            assert c.pull("hf.co/acme/tiny-GGUF:Q8_0").status == "success"  # already there
            with pytest.raises(ollama.ResponseError) as registry:
                c.pull("llama3.2")
            assert registry.value.status_code == 400 and "registry" in registry.value.error
            with pytest.raises(ollama.ResponseError) as missing:
                c.pull("hf.co/acme/tiny-GGUF:Q5_K_M")
            assert "Q5_K_M" in missing.value.error
            assert c.delete("hf.co/acme/tiny-GGUF:Q8_0").status == "success"
            assert not any("tiny" in (m.model or "") for m in c.list().models)
            with pytest.raises(ollama.ResponseError) as gone:
                c.delete("hf.co/acme/tiny-GGUF:Q8_0")
            assert gone.value.status_code == 404
            loaded = c.ps().models[0].model
            with pytest.raises(ollama.ResponseError) as busy:
                c.delete(loaded or "")
            assert busy.value.status_code == 403
        finally:
            c.close()
