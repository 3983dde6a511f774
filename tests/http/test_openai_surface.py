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
    with openai.OpenAI(base_url=module_daemon.http_url + "/v1", api_key="unused", timeout=scaled(120), max_retries=0) as c:
        yield c


def chat_model(client: openai.OpenAI) -> str:
    return next(m.id for m in client.models.list() if getattr(m, "kind", None) == "chat" and getattr(m, "loaded", False))


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


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/v1/no-such-route", 404),
    ("GET", "/v1/chat/completions", 405),
    ("DELETE", "/v1/embeddings", 405),
])
def test_unknown_routes_and_methods_answer_in_openai_shape(http: httpx.Client, method: str, path: str, status: int) -> None:
    """A wrong URL or method under /v1 is an OpenAI error object, not FastAPI's {"detail": ...}."""
    r = http.request(method, path, json={})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and "detail" not in r.json()


def test_sdk_sees_a_missing_route_as_not_found(module_daemon: DaemonProcess) -> None:
    """The SDK raises NotFoundError with the server's message for a route the server lacks."""
    with openai.OpenAI(base_url=module_daemon.http_url + "/v1/nowhere", api_key="x", max_retries=0) as c, pytest.raises(openai.NotFoundError) as info:
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
