"""Cheap denial of service: idle or half-sent HTTP connections, many short-lived
sessions, and one client filling the shared queue. Each runs against a real daemon;
the descriptor ones under a lowered RLIMIT_NOFILE in the daemon's process.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from ..conftest import scaled
from ..wire import Peer

HEADER_TIMEOUT = 2.0


async def _hold(port: int, partial: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A TCP connection to `port` that sends nothing, or half a request's headers."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    if partial:
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    return reader, writer


async def _closed_by_server(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True once the server has closed the connection: an end of stream, or a reset
    (a connection closed at once with unread bytes, as half-sent headers are, is reset)."""
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


@pytest.mark.slow
async def test_idle_http_connections_past_the_open_file_limit_leave_both_doors_serving(daemon_factory) -> None:
    """700 idle or half-sent HTTP connections against a daemon limited to 384 open files: they are closed (at once past the bound, after the header timeout otherwise), both doors keep answering, and the log stays small."""
    d = daemon_factory(
        config={"limits": {"http_header_timeout": HEADER_TIMEOUT}, "model": {"max_context_cap": 1024}},
        start=False,
    )
    d.nofile = 384
    d.start()
    assert d.http_port
    held = [h for h in await asyncio.gather(*(_hold(d.http_port, i % 2 == 1) for i in range(700))) if h]
    assert len(held) > 300, len(held)
    async with httpx.AsyncClient(base_url=d.http_url, timeout=scaled(30)) as http:
        # While they are held, within the bound: new clients are still served.
        await asyncio.sleep(HEADER_TIMEOUT * 2 + 1)
        closed = await asyncio.gather(*(_closed_by_server(r, scaled(15)) for r, _ in held))
        assert all(closed), f"{closed.count(False)} of {len(held)} idle connections still open"
        assert (await http.get("/health")).status_code == 200
    for _, writer in held:
        writer.close()
    peer = await Peer.open(d.ws_url)
    _, events = await peer.infer("Say yes.", "after", temperature=0, max_new_tokens=3)
    assert events[-1]["type"] == "done"
    await peer.close()
    log = d.log_path.read_text(errors="replace")
    assert len(log) < 100_000, f"the log grew to {len(log)} bytes"
    assert log.count("Too many open files") <= 5 and log.count("Traceback") <= 2, log[-3000:]


@pytest.mark.slow
async def test_many_short_lived_sessions_do_not_use_up_open_files(daemon_factory) -> None:
    """400 clients that each made a session and wrote one event, under a 256-file limit: new users still get sessions that stream, and old ones resume."""
    d = daemon_factory(config={"model": {"max_context_cap": 1024}}, start=False)
    d.nofile = 256
    d.start()
    sids: list[str] = []

    async def one(i: int) -> None:
        peer = await Peer.open(d.ws_url)
        await peer.send({"type": "reset", "request_id": f"r{i}"})
        event = (await peer.until("reset_done", 30))[-1]
        assert event.get("seq"), event
        sids.append(peer.welcome["session_id"])
        await peer.close()

    for batch in range(0, 400, 20):
        await asyncio.gather(*(one(i) for i in range(batch, batch + 20)))
    fresh = await Peer.open(d.ws_url)
    _, events = await fresh.infer("Say yes.", "new", temperature=0, max_new_tokens=3)
    assert not [e for e in events if e.get("code") == "storage_error"]
    await fresh.close()
    old = await Peer.open(d.ws_url, {"session_id": sids[0], "last_seq": 0})
    assert old.welcome["resumed"] is True
    assert (await old.recv())["type"] == "reset_done"
    await old.close()
    assert "storage_error" not in d.log() and "Too many open files" not in d.log()


@pytest.mark.slow
async def test_one_client_cannot_fill_the_shared_queue(daemon_factory) -> None:
    """A keyless client with 8 requests in 2 sessions gets `busy` past its own limit, while another client (its own key) is served at once."""
    key = "client-b-key-4f1d2c3b5a69"
    d = daemon_factory(
        config={
            "limits": {"max_requests_per_client": 3, "max_queue": 4},
            "security": {"api_keys": [key]},
            # 2 running + 4 waiting: the hog alone would fill it.
            "model": {"max_context_cap": 1024, "max_batch": 2},
        }
    )
    hog = [await Peer.open(d.ws_url) for _ in range(2)]
    for s, peer in enumerate(hog):
        for i in range(4):
            await peer.send(
                {
                    "type": "inference",
                    "prompt": "Write a long poem about the sea.",
                    "request_id": f"h{s}-{i}",
                    "config": {"temperature": 0, "max_new_tokens": 60},
                }
            )
    other = await Peer.open(d.ws_url, {"api_key": key})
    text, events = await other.infer("Say yes.", "b", temperature=0, max_new_tokens=3)
    assert events[-1]["type"] == "done" and text
    ends: list[dict] = []
    for peer in hog:
        with contextlib.suppress(TimeoutError):
            while len([e for e in peer.events if e.get("type") in ("done", "error")]) < 4:
                await peer.recv(120)
        ends += [e for e in peer.events if e.get("type") in ("done", "error")]
        await peer.close()
    busy = [e for e in ends if e.get("code") == "busy"]
    assert len(busy) == 5 and "requests waiting or running" in busy[0]["message"], ends
    assert len([e for e in ends if e["type"] == "done"]) == 3
    await other.close()
