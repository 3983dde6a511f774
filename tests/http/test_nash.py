"""nash-llm-server's SSE protocol, summarize, and session-backed streams that resume, on a real daemon."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import DaemonProcess, scaled
from tests.http.conftest import sse_events

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


def _stream(http: httpx.Client, body: dict, headers: dict | None = None) -> list[dict]:
    with http.stream("POST", "/v1/chat/completions/stream", json=body, headers=headers or {}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r.iter_lines()))


def test_stream_frames_session_id_content_and_done(http: httpx.Client) -> None:
    """The stream opens and closes with the session id, carries content chunks and ends with [DONE]."""
    events = _stream(http, {"messages": HELLO, "max_tokens": 12, "temperature": 0})
    data = [e["data"] for e in events]
    assert data[-1] == "[DONE]"
    sid = data[0]["session_id"]
    uuid.UUID(sid)
    assert data[-2] == {"session_id": sid}
    content = [d["content"] for d in data[1:-2] if "content" in d]
    assert "".join(content).strip()
    assert all("id" in e for e in events[:-1]), "every event but [DONE] has an id: line"


def test_stream_returns_the_given_session_id(http: httpx.Client) -> None:
    """A session id the client passes comes back in the first and last chunks."""
    sid = str(uuid.uuid4())
    data = [e["data"] for e in _stream(http, {"messages": HELLO, "session_id": sid, "max_tokens": 4})]
    assert data[0] == {"session_id": sid} and data[-2] == {"session_id": sid}


@pytest.mark.slow
def test_stream_warns_about_long_conversations(http: httpx.Client) -> None:
    """A conversation with very many messages gets a warning suggesting to summarize."""
    history = []
    for i in range(26):
        history += [{"role": "user", "content": f"Note {i}."}, {"role": "assistant", "content": "Noted."}]
    history.append({"role": "user", "content": "Thanks."})
    data = [e["data"] for e in _stream(http, {"messages": history, "max_tokens": 4})]
    warnings = [d["warning"] for d in data if isinstance(d, dict) and "warning" in d]
    assert warnings and warnings[0]["code"] == "too_many_messages"
    assert "summariz" in warnings[0]["suggestion"].lower()
    assert warnings[0]["messages"] == len(history)


def _read_like_nash(lines) -> tuple[str, dict | None]:
    """nash-llm-server's client loop: content accumulates; at a warning it indexes
    warning/suggestions/details.limits as its client does, and stops reading."""
    reply = ""
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        parsed = json.loads(data)
        if "warning" in parsed:
            warning = parsed["warning"]
            f"{warning['warning']} {warning['suggestions'][0]}"
            details = warning["details"]
            limits = details["limits"]
            f"{details['message_count']}/{limits['max_messages']} {details['estimated_tokens']}/{limits['max_tokens']}"
            return reply, warning
        if "content" in parsed:
            reply += parsed["content"]
    return reply, None


@pytest.mark.slow
def test_nash_client_reads_the_warning_and_keeps_the_reply(http: httpx.Client) -> None:
    """nash's client reads the warning in its own shape, and has the whole reply when it stops there."""
    history = []
    for i in range(26):
        history += [{"role": "user", "content": f"Note {i}."}, {"role": "assistant", "content": "Noted."}]
    history.append({"role": "user", "content": "Say thanks."})
    body = {"messages": history, "max_tokens": 8, "temperature": 0}
    with http.stream("POST", "/v1/chat/completions/stream", json=body) as r:
        reply, warning = _read_like_nash(r.iter_lines())
    assert warning is not None and warning["details"]["message_count"] == len(history)
    assert reply.strip(), "the reply came before the warning"


def test_stream_errors_are_chunks_and_the_stream_still_ends(http: httpx.Client) -> None:
    """A failing request yields an {"error"} chunk, then the session id and [DONE]."""
    data = [
        e["data"] for e in _stream(http, {"messages": [{"role": "user", "content": "x " * 30000}], "max_tokens": 4})
    ]
    errors = [d["error"] for d in data if isinstance(d, dict) and "error" in d]
    assert errors and "Context too long" in errors[0]
    assert "session_id" in data[-2] and data[-1] == "[DONE]"


@pytest.mark.slow
def test_summarize_shortens_with_real_token_counts(http: httpx.Client) -> None:
    """Summarize returns a shorter history that keeps the system message, with before > after tokens."""
    messages = [{"role": "system", "content": "You are a travel assistant."}]
    for city in ("Oslo", "Bergen", "Tromso", "Stavanger"):
        messages += [
            {
                "role": "user",
                "content": f"Tell me about visiting {city} in winter, with details about museums and food.",
            },
            {
                "role": "assistant",
                "content": f"{city} in winter is cold but lovely. Visit the museums in the old town, try the fish soup and warm waffles, and walk by the harbour when the light is low.",
            },
        ]
    r = http.post("/v1/chat/summarize", json={"messages": messages, "max_tokens": 48})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["summary"]
    uuid.UUID(body["session_id"])
    before, after = body["token_reduction"]["before"], body["token_reduction"]["after"]
    assert before > after > 0
    assert body["messages"][0] == messages[0]
    assert len(body["messages"]) < len(messages)
    # The counts are the real tokenizer's: the count of the returned history is `after`.
    again = http.post(
        "/v1/chat/summarize",
        json={"messages": body["messages"] + [{"role": "user", "content": "ok"}], "max_tokens": 16},
    )
    assert again.json()["token_reduction"]["before"] > after


def _ws_session(daemon: DaemonProcess) -> str:
    with connect(daemon.ws_url, open_timeout=scaled(10)) as ws:
        ws.send(json.dumps({"protocol": 1}))
        welcome = json.loads(ws.recv(timeout=scaled(10)))
        assert welcome["type"] == "welcome"
        return welcome["session_id"]


@pytest.mark.slow
def test_session_backed_stream_resumes_with_last_event_id(module_daemon: DaemonProcess, http: httpx.Client) -> None:
    """On an LLMWS session, a dropped stream re-sent with Last-Event-ID continues without loss or repeats."""
    sid = _ws_session(module_daemon)
    body = {
        "messages": [{"role": "user", "content": "Count from 1 to 30, separated by commas."}],
        "session_id": sid,
        "max_tokens": 48,
        "temperature": 0,
    }
    first_part: list[str] = []
    last_id = None
    with http.stream("POST", "/v1/chat/completions/stream", json=body) as r:
        assert r.status_code == 200
        for event in sse_events(r.iter_lines()):
            data = event["data"]
            if isinstance(data, dict) and "content" in data:
                first_part.append(data["content"])
                last_id = event["id"]
                if len(first_part) == 3:
                    break
    assert last_id is not None
    resumed = _stream(http, body, headers={"Last-Event-ID": last_id})
    rest = [e["data"]["content"] for e in resumed if isinstance(e["data"], dict) and "content" in e["data"]]
    ids = [int(e["id"]) for e in resumed if "id" in e]
    assert ids == sorted(ids) and all(i > int(last_id) for i in ids)
    assert resumed[-1]["data"] == "[DONE]" and resumed[-2]["data"] == {"session_id": sid}
    # The whole reply, replayed from the session's sealed buffer, is the two parts joined.
    with http.stream("GET", f"/v1/sessions/{sid}/events", params={"after": 0}) as r:
        whole = [
            e["data"]["content"]
            for e in sse_events(r.iter_lines())
            if isinstance(e["data"], dict) and "content" in e["data"]
        ]
    assert "".join(first_part) + "".join(rest) == "".join(whole)
    assert len(whole) > 3


def test_unknown_session_events_is_404(http: httpx.Client) -> None:
    """Resuming a session that does not exist is a 404 with a detail."""
    r = http.get(f"/v1/sessions/{uuid.uuid4()}/events")
    assert r.status_code == 404 and "detail" in r.json()
