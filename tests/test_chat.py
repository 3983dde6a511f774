"""The chat service's hand-off of tokens from worker threads to the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from llmws_core.chat import RESPONSE_STATE, ChatService, Handoff
from llmws_core.config import Settings
from llmws_core.engine.backends.base import token_burst
from llmws_core.sessions.crypto import Sealer
from llmws_core.sessions.store import SessionStore


def _counted_handoff() -> tuple[Handoff, list[asyncio.Queue[int]], list[int]]:
    """A hand-off on the running loop, four queues, and a one-item list counting its loop wake-ups."""
    handoff = Handoff(asyncio.get_running_loop())
    queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(4)]
    wakeups = [0]
    deliver = handoff._deliver

    def counted() -> None:
        wakeups[0] += 1
        deliver()

    handoff._deliver = counted  # type: ignore[method-assign]
    return handoff, queues, wakeups


async def test_handoff_delivers_everything_in_order_with_few_wakeups() -> None:
    """Items put from worker threads arrive complete and in order, one loop wake-up per burst."""
    handoff, queues, wakeups = _counted_handoff()

    def producer() -> None:
        for step in range(200):  # a decode step emits one token per running stream
            for q in queues:
                handoff.put(q, step)

    t = threading.Thread(target=producer)
    t.start()
    await asyncio.to_thread(t.join)
    await asyncio.sleep(0.05)
    for q in queues:
        got = [q.get_nowait() for _ in range(q.qsize())]
        assert got == list(range(200))
    assert wakeups[0] < 200 * len(queues)


async def test_handoff_wakes_the_loop_once_per_token_burst() -> None:
    """A decode step that marks its callbacks as one burst wakes the loop once, even
    when the loop could run between two of them."""
    handoff, queues, wakeups = _counted_handoff()

    def producer() -> None:
        for step in range(50):
            with token_burst():
                for q in queues:
                    handoff.put(q, step)
                    time.sleep(0.001)  # native calls between two slots' tokens

    await asyncio.to_thread(producer)
    await asyncio.sleep(0.05)
    for q in queues:
        assert [q.get_nowait() for _ in range(q.qsize())] == list(range(50))
    assert wakeups[0] <= 50


def _chat(tmp_path: Path) -> tuple[ChatService, SessionStore]:
    store = SessionStore(tmp_path / "sessions", Sealer(b"k" * 32))
    return ChatService(Settings(), store, None), store  # type: ignore[arg-type]


def test_restart_after_a_finished_reply_whose_state_was_not_saved_adds_no_second_done(tmp_path: Path) -> None:
    """Killed after `done` was written but before the state saying so reached the disk:
    the resumed session shows that reply once, with its one `done`, and has it in its
    history."""
    chat, store = _chat(tmp_path)
    session = chat._new_session()
    session.state["inflight"] = {"request_id": "r1", "user": "hi"}
    session.save_state()
    session.append({"type": "start", "request_id": "r1", "prompt": "hi"})
    session.append({"type": "token", "request_id": "r1", "data": "Hello"})
    session.append({"type": "done", "request_id": "r1", "total_tokens": 1, "finish_reason": "stop"})
    # no save_state: the kill came first
    chat2 = ChatService(Settings(), SessionStore(tmp_path / "sessions", Sealer(b"k" * 32)), None)  # type: ignore[arg-type]
    resumed, ok, _ = chat2.open_session(session.id)
    assert ok
    events = resumed.replay(0)
    assert [e["type"] for e in events] == ["start", "token", "done"]
    assert resumed.state["history"][-2:] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert "inflight" not in resumed.state


def test_restart_mid_reply_closes_it_out_once(tmp_path: Path) -> None:
    """Killed mid-reply: the resumed session gets one `interrupted` done."""
    chat, store = _chat(tmp_path)
    session = chat._new_session()
    session.state["inflight"] = {"request_id": "r1", "user": "hi"}
    session.save_state()
    session.append({"type": "start", "request_id": "r1", "prompt": "hi"})
    session.append({"type": "token", "request_id": "r1", "data": "Hel"})
    chat2 = ChatService(Settings(), SessionStore(tmp_path / "sessions", Sealer(b"k" * 32)), None)  # type: ignore[arg-type]
    resumed, _, _ = chat2.open_session(session.id)
    done = [e for e in resumed.replay(0) if e["type"] == "done"]
    assert len(done) == 1 and done[0]["finish_reason"] == "interrupted"
    assert resumed.state["history"][-1] == {"role": "assistant", "content": "Hel"}


def test_restart_with_two_replies_running_closes_out_both(tmp_path: Path) -> None:
    """Killed while two replies of one session ran: each gets its one `interrupted` done, and both turns are in the history in the order they started."""
    chat, store = _chat(tmp_path)
    session = chat._new_session()
    chat.mark_inflight(session, "a", "first")
    chat.mark_inflight(session, "b", "second")
    session.save_state()
    session.append({"type": "start", "request_id": "a", "prompt": "first"})
    session.append({"type": "start", "request_id": "b", "prompt": "second"})
    session.append({"type": "token", "request_id": "b", "data": "B1"})
    session.append({"type": "token", "request_id": "a", "data": "A1"})
    chat2 = ChatService(Settings(), SessionStore(tmp_path / "sessions", Sealer(b"k" * 32)), None)  # type: ignore[arg-type]
    resumed, _, _ = chat2.open_session(session.id)
    done = {e["request_id"]: e["finish_reason"] for e in resumed.replay(0) if e["type"] == "done"}
    assert done == {"a": "interrupted", "b": "interrupted"}
    assert resumed.state["history"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "B1"},
    ]
    assert "inflight" not in resumed.state


def test_a_finished_reply_leaves_the_other_running_reply_marked(tmp_path: Path) -> None:
    """When one of two replies ends, the other is still marked as running, so a crash after that still closes it out."""
    chat, _ = _chat(tmp_path)
    session = chat._new_session()
    chat.mark_inflight(session, "a", "first")
    chat.mark_inflight(session, "b", "second")
    chat.clear_inflight(session, "a")
    session.save_state()
    session.append({"type": "start", "request_id": "b", "prompt": "second"})
    chat2 = ChatService(Settings(), SessionStore(tmp_path / "sessions", Sealer(b"k" * 32)), None)  # type: ignore[arg-type]
    resumed, _, _ = chat2.open_session(session.id)
    assert [e["request_id"] for e in resumed.replay(0) if e["type"] == "done"] == ["b"]


def test_a_marker_saved_by_an_earlier_version_is_still_closed_out(tmp_path: Path) -> None:
    """A state from before several replies could be marked (one {request_id, user} marker) is recovered too."""
    chat, _ = _chat(tmp_path)
    session = chat._new_session()
    session.state["inflight"] = {"request_id": "r1", "user": "hi"}
    session.save_state()
    session.append({"type": "start", "request_id": "r1", "prompt": "hi"})
    chat2 = ChatService(Settings(), SessionStore(tmp_path / "sessions", Sealer(b"k" * 32)), None)  # type: ignore[arg-type]
    resumed, _, _ = chat2.open_session(session.id)
    assert [e["finish_reason"] for e in resumed.replay(0) if e["type"] == "done"] == ["interrupted"]


def test_broadcasts_skip_a_stored_response_being_read(tmp_path: Path) -> None:
    """A broadcast (a model switch) reaches a conversation's readers but never lands in a
    stored response's stream, whose events are the response's own."""
    chat, store = _chat(tmp_path)
    conversation = chat._new_session()
    response = store.create()
    response.state[RESPONSE_STATE] = {"id": "resp_x"}
    got: list[dict[str, object]] = []
    chat.subscribe(conversation, 0, got.append)
    chat.subscribe(response, 0, got.append)
    chat.broadcast({"type": "model_switched", "model": {"name": "m"}})
    assert [e["type"] for e in got] == ["model_switched"]
    assert response.replay(0) == [] and len(conversation.replay(0)) == 1
