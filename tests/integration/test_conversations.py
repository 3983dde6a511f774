"""Rebuilding, rewinding and deleting a conversation: `get_history`, `rewind`,
`delete_session` on the WebSocket and their HTTP routes, against the real model."""

from __future__ import annotations

import asyncio

import httpx

from ..wire import Peer

GREEDY = {"temperature": 0, "max_new_tokens": 12}


async def test_history_rebuilds_a_conversation_on_a_new_connection(shared_daemon) -> None:
    """A second connection to the session gets its turns and settings from `get_history`."""
    peer = await Peer.open(shared_daemon.ws_url)
    sid = peer.welcome["session_id"]
    await peer.send({"type": "config", "data": {"system": "You are terse."}})
    await peer.until("config_ack")
    reply, _ = await peer.infer("Name a fruit.", "a", **GREEDY)
    await peer.close()

    other = await Peer.open(shared_daemon.ws_url, {"session_id": sid, "last_seq": 2**53})
    assert other.welcome["resumed"] is True
    await other.send({"type": "get_history", "request_id": "h"})
    (history,) = [e for e in await other.until("history") if e["type"] == "history"]
    assert history["request_id"] == "h" and history["session_id"] == sid
    assert history["messages"] == [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": reply},
    ]
    assert history["config"]["system"] == "You are terse."
    assert "seq" not in history, "an answer to a query is not buffered"
    assert "inflight" not in history

    async with httpx.AsyncClient(base_url=shared_daemon.http_url) as http:
        r = await http.get(f"/v1/sessions/{sid}/history")
        assert r.status_code == 200
        assert r.json()["messages"] == history["messages"]
        missing = await http.get("/v1/sessions/00000000-0000-4000-8000-000000000000/history")
        assert missing.status_code == 404 and missing.json()["code"] == "session_not_found"
    await other.close()


async def test_history_carries_the_reply_being_generated(shared_daemon) -> None:
    """While a reply streams, the history holds its prompt and the text so far."""
    peer = await Peer.open(shared_daemon.ws_url)
    await peer.send(
        {
            "type": "inference",
            "prompt": "Count from 1 to 200.",
            "request_id": "long",
            "config": {"temperature": 0, "max_new_tokens": 400},
        }
    )
    await peer.until("token", request_id="long")
    await peer.send({"type": "get_history"})
    events = await peer.until("history")
    history = events[-1]
    seen = "".join(e["data"] for e in peer.events if e.get("type") == "token")
    assert history["inflight"]["request_id"] == "long"
    assert history["inflight"]["user"] == "Count from 1 to 200."
    assert history["inflight"]["text"] == seen, "the text so far is what was streamed before the answer"
    await peer.send({"type": "cancel", "request_id": "long"})
    await peer.until("done", request_id="long")
    await peer.close()


async def test_rewind_takes_back_turns_for_regenerate_and_edit(shared_daemon) -> None:
    """`rewind` removes the last user turns from the history; it is refused while a reply runs."""
    peer = await Peer.open(shared_daemon.ws_url)
    await peer.infer("Name a color.", "a", **GREEDY)
    await peer.infer("Name an animal.", "b", **GREEDY)

    await peer.send({"type": "rewind", "turns": 1, "request_id": "rw"})
    rewound = (await peer.until("rewound"))[-1]
    assert rewound["request_id"] == "rw" and rewound["removed_messages"] == 2
    assert isinstance(rewound["seq"], int), "other tabs and replays see the rewind"
    await peer.infer("Name a bird.", "c", **GREEDY)
    await peer.send({"type": "get_history"})
    messages = (await peer.until("history"))[-1]["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Name a color.", "Name a bird."]

    await peer.send({"type": "rewind", "turns": 5, "request_id": "too-far"})
    error = (await peer.until("error"))[-1]
    assert error["code"] == "not_found" and error["request_id"] == "too-far"

    await peer.send(
        {
            "type": "inference",
            "prompt": "Count to 100.",
            "request_id": "busy",
            "config": {"temperature": 0, "max_new_tokens": 300},
        }
    )
    await peer.until("token", request_id="busy")
    await peer.send({"type": "rewind", "request_id": "while-busy"})
    error = (await peer.until("error", request_id="while-busy"))[-1]
    assert error["code"] == "busy"
    await peer.send({"type": "cancel", "request_id": "busy"})
    await peer.until("done", request_id="busy")
    await peer.close()


async def test_delete_session_removes_it_from_disk_and_tells_every_tab(shared_daemon) -> None:
    """`delete_session` deletes the session folder; every connection to it hears so."""
    peer = await Peer.open(shared_daemon.ws_url)
    sid = peer.welcome["session_id"]
    await peer.infer("Hello.", "a", **GREEDY)
    folder = shared_daemon.var_dir / "sessions" / sid
    assert folder.is_dir()
    other = await Peer.open(shared_daemon.ws_url, {"session_id": sid})
    await peer.send({"type": "delete_session", "request_id": "del"})
    assert (await peer.until("session_deleted"))[-1]["session_id"] == sid
    assert (await other.until("session_deleted"))[-1]["session_id"] == sid
    await asyncio.wait_for(peer.ws.wait_closed(), 10)
    assert peer.ws.close_code == 1000
    assert not folder.exists()
    await other.send({"type": "inference", "prompt": "Still there?", "request_id": "late"})
    late = (await other.until("error", request_id="late"))[-1]
    assert late["code"] == "session_not_found", "a deleted session takes no new replies"

    again = await Peer.open(shared_daemon.ws_url, {"session_id": sid})
    assert again.welcome["resumed"] is False, "a deleted session is not resumed"
    new_sid = again.welcome["session_id"]
    await again.close()
    async with httpx.AsyncClient(base_url=shared_daemon.http_url) as http:
        r = await http.delete(f"/v1/sessions/{new_sid}")
        assert r.status_code == 200 and r.json() == {"session_id": new_sid, "deleted": True}
        assert not (shared_daemon.var_dir / "sessions" / new_sid).exists()
        assert (await http.delete(f"/v1/sessions/{new_sid}")).status_code == 404
    await other.close()
