"""Inputs that used to get the wrong error: lone surrogates, a string `tool_calls`,
booleans where numbers belong, token counts past any context. Each gets a typed
client error in its door's shape; the connection and the daemon keep serving.
"""

from __future__ import annotations

import json

import httpx
import pytest

from ..conftest import DaemonProcess, scaled
from ..wire import Peer

#: Every client message type, each with a lone surrogate as its request_id.
TYPES = [
    "inference",
    "ack",
    "cancel",
    "config",
    "list_models",
    "switch_model",
    "download_model",
    "cancel_download",
    "delete_model",
    "estimate_model",
    "get_resources",
    "reset",
    "get_status",
    "ping",
]
LONE = '"\\ud800"'  # JSON text for a lone high surrogate


async def _pong(peer: Peer, rid: str) -> None:
    await peer.send({"type": "ping", "request_id": rid})
    await peer.until("pong", 30, request_id=rid)


async def test_lone_surrogates_in_frames_are_bad_requests(shared_daemon: DaemonProcess) -> None:
    """A lone surrogate in any message's request_id, in a prompt or in a system prompt is a bad_request; the connection keeps serving."""
    peer = await Peer.open(shared_daemon.ws_url)
    for kind in TYPES:
        await peer.send(f'{{"type": "{kind}", "request_id": {LONE}}}')
        err = await peer.recv(30)
        assert err["type"] == "error" and err["code"] == "bad_request", (kind, err)
        assert "surrogate" in err["message"]
    await peer.send('{"type": "inference", "prompt": "hi \\udc00 there", "request_id": "p"}')
    err = await peer.recv(30)
    assert err["code"] == "bad_request", err
    await peer.send(f'{{"type": "config", "data": {{"system": {LONE}}}}}')
    assert (await peer.recv(30))["code"] == "bad_request"
    # A proper pair is one character, and fine.
    text, _ = await peer.infer("Say \ud83d\ude00.", "pair", temperature=0, max_new_tokens=3)
    await _pong(peer, "still-here")
    await peer.close()


async def test_a_lone_surrogate_in_the_handshake_is_refused_not_crashing(shared_daemon: DaemonProcess) -> None:
    """The first frame with a lone surrogate gets a bad_request; a proper handshake after it still opens a session."""
    from websockets.asyncio.client import connect

    async with connect(shared_daemon.ws_url) as ws:
        await ws.send(f'{{"protocol": 1, "session_id": {LONE}}}')
        err = json.loads(await ws.recv())
        assert err["type"] == "error" and err["code"] == "bad_request", err
        await ws.send('{"protocol": 1}')
        assert json.loads(await ws.recv())["type"] == "welcome"


@pytest.mark.parametrize("field,value", [("max_new_tokens", True), ("temperature", False), ("top_k", True)])
async def test_booleans_are_not_numbers_in_config(shared_daemon: DaemonProcess, field: str, value: bool) -> None:
    """`"max_new_tokens": true` and the like are bad requests, not config_ack."""
    peer = await Peer.open(shared_daemon.ws_url)
    await peer.send({"type": "config", "data": {field: value}, "request_id": "c"})
    event = await peer.recv(30)
    assert event["type"] == "error" and event["code"] == "bad_request", event
    await peer.send({"type": "inference", "prompt": "hi", "config": {field: value}, "request_id": "i"})
    assert (await peer.recv(30))["code"] == "bad_request"
    await peer.close()


CHAT_ROUTES = ["/v1/chat/completions", "/chat/completions", "/v1/chat/completions/stream"]


def _chat_body(**extra: object) -> dict[str, object]:
    return {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


async def test_http_bad_inputs_are_client_errors_on_every_chat_route(shared_daemon: DaemonProcess) -> None:
    """A string tool_calls, a lone surrogate, booleans for numbers and max_tokens/top_k past any bound are 4xx answers on the three chat routes, never 500."""
    string_calls = {
        "model": "x",
        "max_tokens": 2,
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": "call everything"},
            {"role": "user", "content": "and?"},
        ],
    }
    surrogate = '{"model": "x", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    bodies: list[object] = [
        string_calls,
        surrogate,
        _chat_body(max_tokens=10**23),
        _chat_body(max_tokens=True),
        _chat_body(temperature=True),
    ]
    async with httpx.AsyncClient(base_url=shared_daemon.http_url, timeout=scaled(60)) as http:
        for route in CHAT_ROUTES:
            for body in bodies:
                if isinstance(body, str):
                    got = await http.post(route, content=body, headers={"Content-Type": "application/json"})
                else:
                    got = await http.post(route, json=body)
                assert 400 <= got.status_code < 500, (route, body, got.status_code, got.text[:300])
                assert "Traceback" not in got.text
        got = await http.post("/v1/chat/completions", json=_chat_body(top_k=10**9))
        assert got.status_code == 400 and got.json()["error"]["param"] == "top_k", got.text
        got = await http.get("/chat/blocking", params={"prompt": "hi", "max_tokens": 10**23})
        assert 400 <= got.status_code < 500
        assert (await http.post("/v1/chat/completions", json=_chat_body())).status_code == 200
