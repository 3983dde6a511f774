"""`/v1/embeddings` and `/v1/models/{id}` through the official `openai` SDK and raw httpx,
on a real daemon serving the embedded all-MiniLM-L6-v2 beside the embedded chat model."""

from __future__ import annotations

import base64
import math
import struct
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import DaemonProcess, scaled
from tests.wire import Peer

EMBEDDER = "all-MiniLM-L6-v2"

#: A remote model (never reached: its address is closed) to check it is not taken for an embedder.
DAEMON_CONFIG = {"remote_models": [{"name": "cloud", "model": "openai/x", "api_base": "http://127.0.0.1:9/v1"}]}


@pytest.fixture
def client(module_daemon: DaemonProcess) -> Iterator[openai.OpenAI]:
    """The official SDK pointed at the daemon."""
    with openai.OpenAI(
        base_url=module_daemon.http_url + "/v1", api_key="unused", timeout=scaled(120), max_retries=0
    ) as c:
        yield c


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (
        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    )


def listed(http: httpx.Client) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in http.get("/v1/models").json()["data"]}


def test_embedding_model_is_listed_beside_the_chat_model(http: httpx.Client) -> None:
    """/v1/models lists the embedded embedding model with its kind, next to the loaded chat model."""
    models = listed(http)
    assert models[EMBEDDER]["kind"] == "embedding"
    assert models[EMBEDDER]["capabilities"] == ["embeddings"]
    chat = [m for m in models.values() if m["kind"] == "chat" and m["loaded"]]
    assert len(chat) == 1 and "chat" in chat[0]["capabilities"]


def test_sdk_single_input_gives_a_unit_vector_and_usage(client: openai.OpenAI) -> None:
    """One string gives one 384-dimension unit vector; usage counts its tokens with [CLS] and [SEP]."""
    r = client.embeddings.create(model="text-embedding-3-small", input="I believe the meaning of life is")
    assert len(r.data) == 1 and r.data[0].index == 0
    vec = r.data[0].embedding
    assert len(vec) == 384
    assert abs(sum(x * x for x in vec) - 1) < 1e-3
    assert r.model == EMBEDDER
    assert r.usage.prompt_tokens == r.usage.total_tokens == 9


def test_similar_sentences_score_higher_than_unrelated_ones(client: openai.OpenAI) -> None:
    """Real vectors: a paraphrase is nearer than an unrelated sentence."""
    r = client.embeddings.create(
        model="x",
        input=[
            "The cat sits on the mat.",
            "A cat is sitting on a rug.",
            "Quarterly revenue grew by eight percent.",
        ],
    )
    a, b, c = (d.embedding for d in r.data)
    assert cosine(a, b) > cosine(a, c) + 0.3


def test_batch_equals_one_by_one(client: openai.OpenAI) -> None:
    """A batch of inputs of different lengths gives the same vectors as each input alone."""
    texts = ["short", "a somewhat longer sentence about the weather in spring", "This is a test"]
    batch = [d.embedding for d in client.embeddings.create(model="x", input=texts).data]
    for text, vec in zip(texts, batch, strict=True):
        alone = client.embeddings.create(model="x", input=text).data[0].embedding
        assert max(abs(x - y) for x, y in zip(vec, alone, strict=True)) < 1e-4


def test_base64_equals_float(http: httpx.Client) -> None:
    """encoding_format base64 packs the same vector as little-endian float32."""
    body = {"input": "Test base64 embedding output", "model": EMBEDDER}
    floats = http.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    packed = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()["data"][0]["embedding"]
    assert isinstance(packed, str)
    raw = base64.b64decode(packed)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == len(floats) == 384
    assert max(abs(x - y) for x, y in zip(decoded, floats, strict=True)) < 1e-6


def test_token_arrays_embed_like_their_text(http: httpx.Client) -> None:
    """A token array (BERT ids of "[CLS] hello world [SEP]") embeds like the text, alone or in a list."""
    text = http.post("/v1/embeddings", json={"input": "hello world"}).json()
    tokens = http.post("/v1/embeddings", json={"input": [101, 7592, 2088, 102]}).json()
    mixed = http.post("/v1/embeddings", json={"input": ["hello world", [101, 7592, 2088, 102]]}).json()
    t = text["data"][0]["embedding"]
    for other in (tokens["data"][0]["embedding"], mixed["data"][1]["embedding"]):
        assert max(abs(x - y) for x, y in zip(t, other, strict=True)) < 1e-4
    assert tokens["usage"]["prompt_tokens"] == 4


def test_dimensions_cut_and_renormalise(client: openai.OpenAI) -> None:
    """dimensions keeps the first values of the vector, re-normalised to unit length."""
    full = client.embeddings.create(model="x", input="dimensions").data[0].embedding
    cut = client.embeddings.create(model="x", input="dimensions", dimensions=64).data[0].embedding
    assert len(cut) == 64
    assert abs(sum(x * x for x in cut) - 1) < 1e-3
    assert cosine(cut, full[:64]) > 0.9999


def test_empty_string_is_embedded(http: httpx.Client) -> None:
    """An empty string is a valid input (it still has [CLS] and [SEP])."""
    r = http.post("/v1/embeddings", json={"input": ""})
    assert r.status_code == 200
    assert len(r.json()["data"][0]["embedding"]) == 384


@pytest.mark.parametrize("value", [[], {"content": "string"}, [[]], [1.5], [True, 2], None, 3])
def test_invalid_input_is_an_openai_400(http: httpx.Client, value: Any) -> None:
    """Inputs outside OpenAI's four shapes get a 400 in OpenAI's error shape naming `input`."""
    r = http.post("/v1/embeddings", json={"input": value})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == "input"


def test_bad_dimensions_and_token_ids_are_400s(client: openai.OpenAI) -> None:
    """dimensions wider than the model and token ids outside its vocabulary are refused."""
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="x", input="a", dimensions=1000)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="x", input=[[101, 10**9]])


def test_too_long_input_is_refused(http: httpx.Client) -> None:
    """An input past the model's 256 tokens is a 400 that says it is too large, and the daemon keeps serving."""
    r = http.post("/v1/embeddings", json={"input": "This is a test " * 512})
    assert r.status_code == 400
    err = r.json()["error"]
    assert "too large" in err["message"] and err["code"] == "context_too_long"
    assert http.post("/v1/embeddings", json={"input": "still here"}).status_code == 200


def test_chat_model_is_no_embedding_model(http: httpx.Client) -> None:
    """Naming the chat model for embeddings, or the embedding model for chat, is a clear 400."""
    chat = next(m["id"] for m in listed(http).values() if m["kind"] == "chat" and m["loaded"])
    r = http.post("/v1/embeddings", json={"input": "x", "model": chat})
    assert r.status_code == 400 and "chat model" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={"model": EMBEDDER, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]


def test_remote_model_is_no_embedding_model(http: httpx.Client) -> None:
    """Naming a remote model for embeddings is a 400 that says remote models do not embed here."""
    r = http.post("/v1/embeddings", json={"input": "x", "model": "cloud"})
    assert r.status_code == 400 and "remote model" in r.json()["error"]["message"]


def test_chat_and_embeddings_serve_concurrently(client: openai.OpenAI, http: httpx.Client) -> None:
    """A streaming chat reply and embedding requests run at once; neither model is unloaded."""
    chat_text: list[str] = []
    errors: list[BaseException] = []

    def chat() -> None:
        try:
            stream = client.chat.completions.create(
                model="x",
                messages=[{"role": "user", "content": "Count from one to twenty."}],
                max_tokens=48,
                temperature=0,
                stream=True,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    chat_text.append(chunk.choices[0].delta.content)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    worker = threading.Thread(target=chat)
    worker.start()
    vectors = [client.embeddings.create(model="x", input=f"sentence {i}").data[0].embedding for i in range(5)]
    worker.join(scaled(120))
    assert not errors and "".join(chat_text)
    assert all(len(v) == 384 for v in vectors)
    models = listed(http)
    assert models[EMBEDDER]["loaded"] is True
    assert any(m["loaded"] for m in models.values() if m["kind"] == "chat")


async def test_ws_models_list_shows_the_embedding_model(module_daemon: DaemonProcess) -> None:
    """The WebSocket models_list carries the embedding model with kind "embedding"."""
    peer = await Peer.open(module_daemon.ws_url, {"protocol": 1})
    try:
        await peer.send({"type": "list_models"})
        event = (await peer.until("models_list"))[-1]
    finally:
        await peer.ws.close()
    kinds = {m["name"]: m["kind"] for m in event["models"]}
    assert kinds[EMBEDDER] == "embedding"
    assert "chat" in kinds.values()


@pytest.mark.filterwarnings("ignore:Items? .* (is|are) using the `ReadOnly` qualifier:UserWarning")
def test_litellm_embedding_client(module_daemon: DaemonProcess) -> None:
    """LiteLLM's `embedding` (OpenAI-compatible provider) gets real vectors and usage from the daemon."""
    litellm = pytest.importorskip("litellm")
    r = litellm.embedding(
        model="openai/text-embedding-3-small",
        input=["hello world", "good morning"],
        api_base=module_daemon.http_url + "/v1",
        api_key="unused",
        timeout=scaled(120),
    )
    vectors = [d["embedding"] for d in r.data]
    assert len(vectors) == 2 and all(len(v) == 384 for v in vectors)
    assert r.usage.prompt_tokens == 8
