"""API keys on the HTTP adapter (header, Bearer, query; admin for /setModel), the Host check
against DNS rebinding, and CORS staying off by default."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import DaemonProcess, scaled

K1 = "user-key-k1-0123456789"
DAEMON_CONFIG = {"security": {"api_keys": [K1], "admin_keys": ["admin-key-a1-0123456789"], "require_api_key": True}}


def test_ping_and_health_need_no_key(http: httpx.Client) -> None:
    """Monitors reach /ping and /health without a key."""
    assert http.get("/ping").status_code == 200
    assert http.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("path", ["/v1/models", "/models", "/metrics", "/chat/blocking?prompt=hi"])
def test_routes_refuse_requests_without_a_key(http: httpx.Client, path: str) -> None:
    """Without a key, routes answer 401 and never run the model."""
    r = http.get(path)
    assert r.status_code == 401
    assert r.headers.get("www-authenticate") == "Bearer"


def test_wrong_key_is_401_with_an_openai_error_object(http: httpx.Client) -> None:
    """A wrong key on an OpenAI route is a 401 OpenAI error object."""
    r = http.get("/v1/models", headers={"X-API-Key": "nope"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_every_way_of_sending_a_key_works(http: httpx.Client) -> None:
    """X-API-Key, Authorization: Bearer and ?x_api_key= are all accepted."""
    assert http.get("/v1/models", headers={"X-API-Key": "user-key-k1-0123456789"}).status_code == 200
    assert http.get("/v1/models", headers={"Authorization": "Bearer user-key-k1-0123456789"}).status_code == 200
    assert http.get("/models", params={"x_api_key": "user-key-k1-0123456789"}).status_code == 200
    assert http.get("/v1/models", headers={"X-API-Key": "admin-key-a1-0123456789"}).status_code == 200


def test_the_openai_sdk_sends_its_key_as_bearer(module_daemon: DaemonProcess) -> None:
    """The official SDK works with the configured key and fails cleanly without it."""
    with openai.OpenAI(
        base_url=module_daemon.http_url + "/v1", api_key="user-key-k1-0123456789", timeout=scaled(60), max_retries=0
    ) as ok:
        r = ok.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert r.choices[0].message.content is not None
    with openai.OpenAI(
        base_url=module_daemon.http_url + "/v1", api_key="wrong", timeout=scaled(60), max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_set_model_needs_the_admin_key(http: httpx.Client) -> None:
    """/setModel refuses a user key (403) and accepts the admin key."""
    name = http.get("/models", headers={"X-API-Key": "user-key-k1-0123456789"}).json()["current"]
    r = http.post("/setModel", json={"modelName": name}, headers={"X-API-Key": "user-key-k1-0123456789"})
    assert r.status_code == 403 and "admin" in r.json()["detail"]
    r = http.post("/setModel", json={"modelName": name}, headers={"X-API-Key": "admin-key-a1-0123456789"})
    assert r.status_code == 200, r.text


def test_a_user_key_cannot_switch_models_through_the_model_field(
    http: httpx.Client, module_daemon: DaemonProcess
) -> None:
    """Naming another local model in a completion needs the admin key too."""
    (module_daemon.models_dir / "other.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    r = http.post(
        "/v1/chat/completions",
        headers={"X-API-Key": "user-key-k1-0123456789"},
        json={"model": "other.gguf", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    )
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8001", "192.168.1.10"])
def test_foreign_host_headers_are_refused(http: httpx.Client, host: str) -> None:
    """A request whose Host names another server (DNS rebinding) is refused, even on /health."""
    r = http.get("/health", headers={"Host": host})
    assert r.status_code == 400
    assert "Host" in r.json()["detail"]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:1234", "[::1]:80"])
def test_loopback_host_headers_are_accepted(http: httpx.Client, host: str) -> None:
    """Loopback names with any port pass the Host check."""
    assert http.get("/health", headers={"Host": host}).status_code == 200


def test_cors_is_off_by_default(http: httpx.Client) -> None:
    """Without security.cors_origins no CORS header is sent, so other sites' pages cannot read replies."""
    r = http.options("/v1/models", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers
    r = http.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


async def test_websocket_and_http_read_a_key_from_the_query_alike(module_daemon: DaemonProcess) -> None:
    """A URL with both `x_api_key` and `api_key` is judged by `x_api_key` on both doors."""
    import websockets

    from tests.wire import Peer

    good_first, bad_first = f"?x_api_key={K1}&api_key=wrong", f"?x_api_key=wrong&api_key={K1}"
    with httpx.Client(base_url=module_daemon.http_url, timeout=scaled(60)) as http:
        assert http.get("/v1/models" + good_first).status_code == 200
        assert http.get("/v1/models" + bad_first).status_code == 401
    peer = await Peer.open(module_daemon.ws_url + "/" + good_first)
    assert peer.welcome["session_id"]
    await peer.close()
    with pytest.raises((AssertionError, websockets.ConnectionClosed)):
        refused = await Peer.open(module_daemon.ws_url + "/" + bad_first)
        await refused.recv()
