"""The HF server's /chat/blocking, /chat/stream and /ping, and the answer-improvement pipeline
on both doors (HTTP and WebSocket `"mode": "improve"`), on a real daemon."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from websockets.sync.client import connect

from llmws_core.improve import STAGES
from tests.conftest import DaemonProcess, scaled

LABELS = [label for _, label in STAGES]


def test_ping_answers(http: httpx.Client) -> None:
    """GET /ping answers pong."""
    r = http.get("/ping")
    assert r.status_code == 200 and r.json()["message"] == "pong"


def test_blocking_post_and_get(http: httpx.Client) -> None:
    """POST and GET /chat/blocking return the reply as JSON, with history taken into account."""
    r = http.post(
        "/chat/blocking",
        json={
            "prompt": "What is my name?",
            "max_tokens": 12,
            "temperature": 0,
            "history": [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada!"}],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["reply"] and body["improvement"] is False
    assert body["usage"]["prompt_tokens"] > 20
    g = http.get("/chat/blocking", params={"prompt": "Hi", "max_tokens": 6, "temperature": 0})
    assert g.status_code == 200 and g.json()["reply"]


def test_stream_is_text_ending_with_end_mark(http: httpx.Client) -> None:
    """POST /chat/stream sends plain text chunks ending with [[END]]."""
    with http.stream("POST", "/chat/stream", json={"prompt": "Hi", "max_tokens": 8, "temperature": 0}) as r:
        assert r.headers["content-type"].startswith("text/plain")
        text = "".join(r.iter_text())
    assert text.endswith("[[END]]") and len(text) > len("[[END]]")
    g = http.get("/chat/stream", params={"prompt": "Hi", "max_tokens": 4})
    assert g.text.endswith("[[END]]")


@pytest.mark.slow
def test_improvement_streams_every_stage_labelled(http: httpx.Client) -> None:
    """With improvement and intermediate_steps, the stream shows draft, review, revision, second review and final, in order."""
    body = {
        "prompt": "Name a fruit.",
        "improvement": True,
        "intermediate_steps": True,
        "max_tokens": 12,
        "temperature": 0,
    }
    with http.stream("POST", "/chat/stream", json=body) as r:
        text = "".join(r.iter_text())
    assert text.endswith("[[END]]")
    positions = [text.find(f"### {label}\n") for label in LABELS]
    assert all(p >= 0 for p in positions), text
    assert positions == sorted(positions)


@pytest.mark.slow
def test_improvement_blocking_returns_every_pass(http: httpx.Client) -> None:
    """Blocking improvement returns the draft, both reviews, both revisions and the final reply."""
    body = {
        "prompt": "Name a colour.",
        "improvement": True,
        "intermediate_steps": True,
        "max_tokens": 10,
        "temperature": 0,
    }
    out = http.post("/chat/blocking", json=body).json()
    for key in ("draft_answer", "suggestions1", "revision1", "suggestions2", "revision2"):
        assert isinstance(out[key], str) and out[key], key
    assert out["reply"] == out["revision2"]
    assert [s["label"] for s in out["steps"]] == LABELS


@pytest.mark.slow
def test_websocket_improve_mode_emits_stages_and_records_history(module_daemon: DaemonProcess) -> None:
    """A WebSocket inference with mode "improve" emits start, labelled stage events, tokens and done, and keeps the final answer in history."""
    with connect(module_daemon.ws_url, open_timeout=scaled(10)) as ws:
        ws.send(json.dumps({"protocol": 1}))
        welcome = json.loads(ws.recv(timeout=scaled(10)))
        sid = welcome["session_id"]
        ws.send(
            json.dumps(
                {
                    "type": "inference",
                    "prompt": "Name an animal.",
                    "mode": "improve",
                    "request_id": "imp1",
                    "config": {"max_new_tokens": 10, "temperature": 0},
                }
            )
        )
        events = []
        deadline = time.monotonic() + scaled(240)
        while time.monotonic() < deadline:
            ev = json.loads(ws.recv(timeout=scaled(120)))
            if ev.get("request_id") == "imp1":
                events.append(ev)
                if ev["type"] in ("done", "error"):
                    break
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "done", types
    stages = [e for e in events if e["type"] == "stage"]
    assert [s["label"] for s in stages] == LABELS
    assert [s["index"] for s in stages] == [1, 2, 3, 4, 5]
    final_tokens = "".join(e["data"] for e in events if e["type"] == "token" and e["stage"] == "final")
    assert events[-1]["reply"] == final_tokens.strip()
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    with connect(module_daemon.ws_url, open_timeout=scaled(10)) as ws:
        ws.send(json.dumps({"session_id": sid, "protocol": 1}))
        again = json.loads(ws.recv(timeout=scaled(10)))
        assert again["resumed"] is True and again["history_messages"] == 2
