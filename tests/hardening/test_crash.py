"""Crashes and shutdowns during generations, in several sessions at once.

SIGKILL at random moments: after each restart every session resumes, every event a
client had received is replayed exactly, and nothing is replayed twice (tracked by
seq). SIGTERM: running generations drain and every buffer is flushed, so after a
restart each reply is there through its `done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from typing import Any

import pytest

from ..conftest import DaemonProcess
from ..wire import Peer

SESSIONS = 4
ROUNDS = 5  # SESSIONS * ROUNDS * 2 = 40 generations (two per session at once), cut at random moments
PROMPTS = [
    "Count to ten.",
    "Name three fruits.",
    "Say hello in French.",
    "What is two plus two?",
    "Describe the sky.",
]


async def _collect(peers: list[Peer], seconds: float, tokens: int | None = None) -> None:
    """Read whatever arrives on every peer (events land in peer.events) for `seconds`,
    or, with `tokens`, until that many token events have arrived in all (at most `seconds`)."""
    enough = asyncio.Event()
    stop = False
    seen = 0

    async def drain(peer: Peer) -> None:
        nonlocal seen
        with contextlib.suppress(Exception):
            while not stop:
                event = await peer.recv(3600)
                seen += event.get("type") == "token"
                if tokens is not None and seen >= tokens:
                    enough.set()

    tasks = [asyncio.create_task(drain(p)) for p in peers]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(enough.wait(), seconds)
    # Python 3.11's wait_for (inside peer.recv) swallows a cancel that lands in the
    # same loop iteration as the frame it waits for: the drain then returns the frame
    # instead of raising. Seeing `stop`, it ends rather than wait an hour for the next.
    stop = True
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _backlog(daemon: DaemonProcess, sid: str) -> tuple[Peer, list[dict[str, Any]]]:
    """Resume `sid` from the start; return the peer and the replayed buffer (up to a ping's pong)."""
    peer = await Peer.open(daemon.ws_url, {"session_id": sid, "last_seq": 0})
    assert peer.welcome["resumed"] is True, peer.welcome
    await peer.send({"type": "ping", "request_id": "end-of-backlog"})
    events = await peer.until("pong", 60, request_id="end-of-backlog")
    return peer, [e for e in events if "seq" in e]


def _check_buffer(sid: str, backlog: list[dict[str, Any]], received: dict[int, dict[str, Any]], last_seq: int) -> None:
    """The replay is 1..last_seq with no hole or repeat, holds every event the client saw, and closes every reply once."""
    seqs = [e["seq"] for e in backlog]
    assert seqs == list(range(1, last_seq + 1)), f"session {sid}: gap or duplicate in {seqs}"
    by_seq = {e["seq"]: e for e in backlog}
    for seq, event in received.items():
        assert by_seq.get(seq) == event, f"session {sid}: event {seq} not replayed as received"
    started = {e["request_id"] for e in backlog if e["type"] == "start"}
    dones = [e["request_id"] for e in backlog if e["type"] == "done"]
    assert len(dones) == len(set(dones)), f"session {sid}: a reply was closed twice: {dones}"
    assert started <= set(dones), f"session {sid}: replies never closed: {started - set(dones)}"
    assert not any(e.get("code") == "corrupt_record" for e in backlog)


@pytest.mark.slow
async def test_sigkill_at_random_moments_loses_and_repeats_nothing(daemon_factory) -> None:
    """40 generations in 4 sessions (two at once in each), SIGKILLed at random moments: every session resumes with every seen event, once, and every reply closed."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    daemon = daemon_factory(config={"model": {"max_context_cap": 2048}})
    peers = [await Peer.open(daemon.ws_url) for _ in range(SESSIONS)]
    sids = [p.welcome["session_id"] for p in peers]
    received: dict[str, dict[int, dict[str, Any]]] = {sid: {} for sid in sids}
    kills_mid_reply = 0
    for rnd in range(ROUNDS):
        for i, peer in enumerate(peers):
            # Two replies per session at once: every one running at the kill must be
            # closed out after the restart.
            for second in ("", "b"):
                await peer.send(
                    {
                        "type": "inference",
                        "prompt": PROMPTS[(rnd + i + len(second)) % len(PROMPTS)],
                        "request_id": f"g{rnd}-{i}{second}",
                        "config": {
                            "temperature": 0.8,
                            "max_new_tokens": rng.randint(4, 10),
                            "seed": rng.randint(0, 9999),
                        },
                    }
                )
        # Even rounds: a random moment up to 2.5 s on (before, inside or after the
        # replies). Odd rounds: right after a random number of tokens has streamed,
        # so that kills surely land inside replies too (they take under a second).
        delay, after_tokens = rng.uniform(0.0, 2.5), rng.randint(1, 6)
        if rnd % 2:
            moment = f"after {after_tokens} tokens"
            await _collect(peers, 60.0, after_tokens)
        else:
            moment = f"delay {delay:.2f}"
            await _collect(peers, delay)
        daemon.kill()
        for sid, peer in zip(sids, peers, strict=True):
            for e in peer.events:
                if "seq" in e:
                    assert e["seq"] not in received[sid] or received[sid][e["seq"]] == e, "a seq was reused"
                    received[sid][e["seq"]] = e
            kills_mid_reply += any(e["type"] == "token" for e in peer.events) and not any(
                e["type"] == "done" and e["request_id"] == f"g{rnd}-{sids.index(sid)}" for e in peer.events
            )
            peer.ws.transport.abort()
        daemon.start()
        peers = []
        for sid in sids:
            peer, backlog = await _backlog(daemon, sid)
            _check_buffer(
                f"{sid} (seed {seed}, round {rnd}, {moment})",
                backlog,
                received[sid],
                peer.welcome["last_seq"],
            )
            received[sid] = {e["seq"]: e for e in backlog}
            peer.events = []
            peers.append(peer)
    # The conversations go on after all that.
    for peer in peers:
        _, events = await peer.infer("Say yes.", "final", temperature=0, max_new_tokens=3)
        assert events[-1]["finish_reason"] in ("stop", "length")
        await peer.close()
    assert (
        kills_mid_reply
        + sum(1 for r in received.values() for e in r.values() if e.get("finish_reason") == "interrupted")
        > 0
    ), f"no kill landed inside a reply (seed {seed}): the test did not test crashes"


@pytest.mark.slow
async def test_sigterm_drains_generations_and_flushes_every_buffer(daemon_factory) -> None:
    """SIGTERM while 3 sessions generate: the daemon exits 0 and each reply is on disk through its done."""
    daemon = daemon_factory(config={"server": {"drain_seconds": 60}, "model": {"max_context_cap": 2048}})
    peers = [await Peer.open(daemon.ws_url) for _ in range(3)]
    for i, peer in enumerate(peers):
        await peer.send(
            {
                "type": "inference",
                "prompt": PROMPTS[i],
                "request_id": f"t{i}",
                "config": {"temperature": 0, "max_new_tokens": 8},
            }
        )
    for i, peer in enumerate(peers):
        await peer.until("start", 120, request_id=f"t{i}")
    code = await asyncio.to_thread(daemon.stop, 120)
    assert code == 0, daemon.log()
    seen = []
    for peer in peers:
        with contextlib.suppress(Exception):
            while True:
                await peer.recv(5)
        seen.append({e["seq"]: e for e in peer.events if "seq" in e})
    # The sockets were closed by the daemon with 1001 (going away), not just dropped.
    assert [p.ws.close_code for p in peers] == [1001] * len(peers)
    daemon.start()
    for i, peer in enumerate(peers):
        sid = peer.welcome["session_id"]
        again, backlog = await _backlog(daemon, sid)
        _check_buffer(sid, backlog, seen[i], again.welcome["last_seq"])
        done = [e for e in backlog if e["type"] == "done" and e["request_id"] == f"t{i}"]
        assert done and done[0]["finish_reason"] in ("stop", "length"), done
        assert any(e["type"] == "token" for e in backlog)
        await again.close()


async def _two_replies_then_kill(daemon: DaemonProcess, first_tokens: int) -> tuple[str, list[dict[str, Any]]]:
    """Start replies `a` (`first_tokens` greedy tokens) and `b` (250) on one socket, SIGKILL
    the daemon once both started (and `a` is done when it is short), restart; return the
    session id and what the client saw."""
    peer = await Peer.open(daemon.ws_url)
    sid = peer.welcome["session_id"]
    for rid, tokens in (("a", first_tokens), ("b", 250)):
        await peer.send(
            {
                "type": "inference",
                "prompt": "Tell me a long story about a lighthouse keeper.",
                "request_id": rid,
                "config": {"temperature": 0, "max_new_tokens": tokens},
            }
        )

    # Which of two concurrent replies announces its start first is not fixed (they prefill
    # in one batch): wait for what each needs, in whatever order it comes.
    def got(kind: str, rid: str) -> bool:
        return any(e.get("type") == kind and e.get("request_id") == rid for e in peer.events)

    async def until_seen(kind: str, rid: str) -> None:
        while not got(kind, rid):
            await peer.recv(120)

    await until_seen("start", "a")
    if first_tokens < 250:
        await until_seen("done", "a")
        await asyncio.sleep(0.5)  # the state saying `a` is complete reaches the disk
    else:
        await until_seen("start", "b")
    await until_seen("token", "b")
    daemon.kill()
    seen = [e for e in peer.events if "seq" in e]
    peer.ws.transport.abort()
    daemon.start()
    return sid, seen


@pytest.mark.slow
@pytest.mark.parametrize("first_tokens", [250, 3], ids=["both-running", "first-finished"])
async def test_sigkill_with_two_replies_in_one_session_closes_out_both(daemon_factory, first_tokens: int) -> None:
    """Two replies of one session cut by SIGKILL (both running, or the first already done): after the restart each has one `done` and both turns are in the history."""
    daemon = daemon_factory(config={"model": {"max_context_cap": 2048}})
    sid, seen = await _two_replies_then_kill(daemon, first_tokens)
    peer, backlog = await _backlog(daemon, sid)
    _check_buffer(sid, backlog, {e["seq"]: e for e in seen}, peer.welcome["last_seq"])
    dones = {e["request_id"]: e["finish_reason"] for e in backlog if e["type"] == "done"}
    assert set(dones) == {"a", "b"}, dones
    assert dones["b"] == "interrupted"
    if first_tokens < 250:
        assert dones["a"] == "length"
    await peer.send({"type": "get_status", "request_id": "st"})
    status = (await peer.until("status", 30, request_id="st"))[-1]
    assert status["history_messages"] == 4, status
    assert status["requests"] == []
    # The conversation goes on, with both earlier replies as context.
    _, events = await peer.infer("Say yes.", "after", temperature=0, max_new_tokens=3)
    assert events[-1]["finish_reason"] in ("stop", "length")
    await peer.close()


@pytest.mark.slow
async def test_a_session_folder_put_back_from_earlier_is_detected_after_sigkill(daemon_factory) -> None:
    """An older copy of a session's folder restored while the daemon was down (killed): the session is not resumed with old seqs but reported; a duplicated buffer line is counted in the welcome."""
    import shutil

    daemon = daemon_factory()
    peer = await Peer.open(daemon.ws_url)
    sid = peer.welcome["session_id"]
    folder = daemon.var_dir / "sessions" / sid
    await peer.infer("Say one.", "one", temperature=0, max_new_tokens=3)
    await asyncio.sleep(1.0)  # batched fsync and journal
    backup = daemon.root / "backup"
    shutil.copytree(folder, backup)
    await peer.infer("Say two.", "two", temperature=0, max_new_tokens=3)
    await asyncio.sleep(1.0)
    daemon.kill()
    peer.ws.transport.abort()
    shutil.rmtree(folder)
    shutil.copytree(backup, folder)
    daemon.start()
    again = await Peer.open(daemon.ws_url, {"session_id": sid, "last_seq": 0})
    assert again.welcome["resumed"] is False and again.welcome["session_id"] != sid
    notice = await again.recv()
    assert notice["code"] == "session_not_resumed" and "integrity" in notice["message"], notice
    # A duplicated line in another session's buffer is withheld and reported.
    other = again.welcome["session_id"]
    await again.infer("Say three.", "three", temperature=0, max_new_tokens=3)
    await asyncio.sleep(1.0)
    daemon.kill()
    again.ws.transport.abort()
    buffer = daemon.var_dir / "sessions" / other / "buffer.jsonl"
    lines = buffer.read_bytes().splitlines(keepends=True)
    buffer.write_bytes(b"".join(lines[:2] + [lines[1]] + lines[2:]))
    daemon.start()
    peer, backlog = await _backlog(daemon, other)
    assert peer.welcome["integrity_problems"] == 1, peer.welcome
    assert [e["seq"] for e in backlog] == list(range(1, len(lines) + 1))
    await peer.close()
