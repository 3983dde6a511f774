"""API keys on the Anthropic and Ollama doors: each key header their clients send works, and
a missing or wrong key is refused in the door's own error shape."""

from __future__ import annotations

import anthropic
import httpx
import ollama
import pytest

from tests.conftest import DaemonProcess, scaled

DAEMON_CONFIG = {
    "security": {
        "api_keys": ["user-key-k1-0123456789"],
        "admin_keys": ["admin-key-a1-0123456789"],
        "require_api_key": True,
    }
}
HELLO = [{"role": "user", "content": "Hi"}]


def test_anthropic_sdk_key_is_accepted_and_a_wrong_one_refused(module_daemon: DaemonProcess) -> None:
    """The SDK's x-api-key header carries the key; a wrong key is an authentication_error."""
    with anthropic.Anthropic(
        base_url=module_daemon.http_url, api_key="user-key-k1-0123456789", timeout=scaled(60), max_retries=0
    ) as ok:
        assert ok.messages.create(model="x", max_tokens=4, messages=HELLO).content
    with anthropic.Anthropic(
        base_url=module_daemon.http_url, api_key="wrong", timeout=scaled(60), max_retries=0
    ) as bad:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            bad.messages.count_tokens(model="x", messages=HELLO)
    assert refused.value.body["error"]["type"] == "authentication_error"


def test_anthropic_door_takes_a_bearer_token_too(http: httpx.Client) -> None:
    """Authorization: Bearer works on /v1/messages as on every other route."""
    body = {"model": "x", "messages": HELLO}
    assert http.post("/v1/messages/count_tokens", json=body).status_code == 401
    r = http.post("/v1/messages/count_tokens", json=body, headers={"Authorization": "Bearer user-key-k1-0123456789"})
    assert r.status_code == 200 and r.json()["input_tokens"] > 0


def test_ollama_client_sends_its_key_as_bearer(module_daemon: DaemonProcess) -> None:
    """The ollama client's Authorization header is accepted; without a key the error is Ollama's 401."""
    with_key = ollama.Client(
        host=module_daemon.http_url, headers={"Authorization": "Bearer user-key-k1-0123456789"}, timeout=scaled(60)
    )
    assert with_key.list().models
    without = ollama.Client(host=module_daemon.http_url, timeout=scaled(60))
    with pytest.raises(ollama.ResponseError) as refused:
        without.list()
    assert refused.value.status_code == 401 and "key" in refused.value.error
    with_key.close()
    without.close()
