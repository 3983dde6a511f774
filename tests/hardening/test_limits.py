"""Bounded resources: frame size, connections per daemon and per address, requests
queued per session, message rate. Each refusal is a typed error (or an HTTP status
at the handshake) and the daemon stays up and keeps serving.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ..conftest import DaemonProcess, scaled
from ..wire import Peer

MAX_FRAME = 65536
PER_IP = 6
RATE = 20.0
QUEUED = 2


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon with small limits."""
    config = {
        "limits": {
            "max_frame_bytes": MAX_FRAME,
            "max_connections": 100,
            "max_connections_per_ip": PER_IP,
            "messages_per_second": RATE,
            "max_queued_per_session": QUEUED,
        },
        "model": {"max_context_cap": 2048},
    }
    d = DaemonProcess(tmp_path_factory.mktemp("limits"), [], None, config)
    d.start()
    yield d
    assert d.proc is not None and d.proc.poll() is None, "the daemon died"
    d.kill()


async def _pong(peer: Peer, rid: str) -> None:
    await peer.send({"type": "ping", "request_id": rid})
    assert (await peer.until("pong", 30, request_id=rid))[-1]["type"] == "pong"


async def test_oversized_frame_is_refused_and_connection_serves(limited: DaemonProcess) -> None:
    """A frame over limits.max_frame_bytes (text or binary, counted in bytes) gets frame_too_large; the connection goes on."""
    peer = await Peer.open(limited.ws_url)
    over = json.dumps({"type": "inference", "prompt": "x" * (MAX_FRAME + 10)})
    multibyte = json.dumps({"type": "inference", "prompt": "\u4e2d" * (MAX_FRAME // 3 + 10)}, ensure_ascii=False)
    assert len(multibyte) < MAX_FRAME < len(multibyte.encode())
    for frame in (over, over.encode(), multibyte):
        await peer.ws.send(frame)
        err = await peer.recv()
        assert err["type"] == "error" and err["code"] == "frame_too_large", err
        await _pong(peer, "after-big")
    await peer.close()


async def test_connections_per_address_over_the_limit_are_refused(limited: DaemonProcess) -> None:
    """Past limits.max_connections_per_ip the handshake is refused (HTTP 429); closing one frees a place."""
    peers = [await Peer.open(limited.ws_url) for _ in range(PER_IP)]
    with pytest.raises(InvalidStatus) as refused:
        await connect(limited.ws_url, open_timeout=scaled(10))
    assert refused.value.response.status_code == 429
    await peers.pop().close()
    await asyncio.sleep(0.3)
    again = await Peer.open(limited.ws_url)
    await _pong(again, "freed")
    await again.close()
    for p in peers:
        await p.close()
    await asyncio.sleep(0.3)


async def test_requests_queued_per_session_over_the_limit_are_busy(limited: DaemonProcess) -> None:
    """More inferences in flight than limits.max_queued_per_session: the extra one gets `busy`; the others finish."""
    peer = await Peer.open(limited.ws_url)
    cfg = {"temperature": 0, "max_new_tokens": 2}
    for i in range(QUEUED + 1):
        await peer.send({"type": "inference", "prompt": "Hi", "request_id": f"q{i}", "config": cfg})
    err = (await peer.until("error", 60, request_id=f"q{QUEUED}"))[-1]
    assert err["code"] == "busy"
    for i in range(QUEUED):
        if not any(e.get("type") == "done" and e.get("request_id") == f"q{i}" for e in peer.events):
            await peer.until("done", 120, request_id=f"q{i}")
    await _pong(peer, "after-busy")
    await peer.close()


async def test_message_rate_over_the_limit_is_rate_limited(limited: DaemonProcess) -> None:
    """A burst beyond limits.messages_per_second gets rate_limited errors; after a pause the connection serves."""
    peer = await Peer.open(limited.ws_url)
    burst = int(RATE * 2) + 30
    for i in range(burst):
        await peer.send({"type": "ping", "request_id": f"b{i}"})
    kinds: dict[str, int] = {}
    for _ in range(burst):
        ev = await peer.recv(30)
        key = ev["type"] if ev["type"] != "error" else ev["code"]
        kinds[key] = kinds.get(key, 0) + 1
    assert kinds.get("rate_limited", 0) >= 20 and kinds.get("pong", 0) >= RATE, kinds
    await asyncio.sleep(2.5)
    await _pong(peer, "calm")
    await peer.close()


async def test_connections_per_daemon_over_the_limit_are_refused(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Past limits.max_connections the handshake is refused (HTTP 503) and the daemon keeps serving."""
    d = DaemonProcess(tmp_path_factory.mktemp("maxconn"), [], None, {"limits": {"max_connections": 3}})
    d.start()
    try:
        peers = [await Peer.open(d.ws_url) for _ in range(3)]
        with pytest.raises(InvalidStatus) as refused:
            await connect(d.ws_url, open_timeout=scaled(10))
        assert refused.value.response.status_code == 503
        await _pong(peers[0], "still")
        for p in peers:
            await p.close()
    finally:
        d.kill()


async def test_handshake_deadline_is_total_not_per_frame(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A peer that keeps sending bad handshake frames is still cut off at the handshake deadline (1008), cleanly."""
    d = DaemonProcess(tmp_path_factory.mktemp("hs"), [], None, {"limits": {"handshake_timeout": 1.5}})
    d.start()
    try:
        async with connect(d.ws_url) as ws:
            loop = asyncio.get_running_loop()
            begin = loop.time()
            for _ in range(60):
                try:
                    await ws.send("not a handshake")
                except ConnectionClosed:
                    break
                await asyncio.sleep(0.2)
            else:
                pytest.fail("the daemon never closed a lingering handshake")
            assert loop.time() - begin < scaled(5)
            assert ws.close_code == 1008
        assert "connection handler crashed" not in d.log_path.read_text(errors="replace")
    finally:
        d.kill()


async def test_long_unacknowledged_session_can_still_be_resumed_from_zero(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A session with more buffered events than the outbox limit replays in full on resume instead of being cut off."""
    from llmws_core.sessions.crypto import Sealer, load_or_create_master_key
    from llmws_core.sessions.store import SessionStore
    from llmws_core.ws import MAX_OUTBOX

    root = tmp_path_factory.mktemp("long")
    d = DaemonProcess(root, [], None, {"model": {"max_context_cap": 1024}})
    (d.var_dir / "keys").mkdir(parents=True)
    store = SessionStore(d.var_dir / "sessions", Sealer(load_or_create_master_key(d.var_dir / "keys")))
    session = store.create()
    session.state.update({"history": [], "config": {}})
    total = MAX_OUTBOX + 500
    for i in range(total):
        session.append({"type": "token", "request_id": "old", "data": f"t{i}"})
    session.save_state()
    store.close_all()
    d.start()
    try:
        async with connect(d.ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"session_id": session.id, "last_seq": 0, "protocol": 1}))
            welcome = json.loads(await ws.recv())
            assert welcome["resumed"] is True and welcome["last_seq"] == total
            seqs = []
            while len(seqs) < total:
                seqs.append(json.loads(await asyncio.wait_for(ws.recv(), scaled(30)))["seq"])
            assert seqs == list(range(1, total + 1))
            await ws.send(json.dumps({"type": "ping", "request_id": "p"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), scaled(30)))["type"] == "pong"
    finally:
        d.kill()
