"""The async client library: routing, dedup by seq, reconnect/resume, errors.

Unit tests run against `FakeDaemon`, a tiny scripted websockets server started on
port 0 in the test, which can drop a connection mid-stream and replay with
overlap. Integration tests at the end run against the real daemon and model.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from llmws_core.client.client import (
    ClientState,
    ConnectFailedError,
    ConnectionLostError,
    ContextTooLongError,
    LLMWSClientError,
    LLMWSEnhancedClient,
    SessionLostError,
    UnauthorizedError,
    error_from_event,
)
from llmws_core.errors import LLMWSError

REPO = Path(__file__).resolve().parents[2]
# Scales every wait in these tests on slow machines.
TIMEOUT = float(os.environ.get("LLMWS_TEST_TIMEOUT_SCALE", "1")) * 10


class FakeDaemon:
    """A scripted LLMWS server: one session, a seq'd event buffer, tokens from a list.

    Args:
        tokens: what every inference streams.
        token_delay: seconds between tokens.
        drop_after: abort the first connection after sending this many token events.
        replay_overlap: on resume, replay this many events *before* last_seq as well
            (duplicates the client must drop).
        forget_session: refuse to resume (welcome resumed: false, a notice).
        api_key: require this key in the handshake.
        error: answer every inference with this error event body instead.
    """

    def __init__(
        self,
        *,
        tokens: list[str] | None = None,
        token_delay: float = 0.0,
        drop_after: int | None = None,
        replay_overlap: int = 0,
        forget_session: bool = False,
        api_key: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        self.tokens = tokens if tokens is not None else [f"tok{i} " for i in range(10)]
        self.token_delay = token_delay
        self.drop_after = drop_after
        self.replay_overlap = replay_overlap
        self.forget_session = forget_session
        self.api_key = api_key
        self.error = error
        self.session_id = "sess-1"
        self.seq = 0
        self.buffer: list[dict[str, Any]] = []
        self.handshakes: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.received: list[dict[str, Any]] = []
        self.connections = 0
        self.cancelled: set[str | None] = set()
        self.jobs: list[asyncio.Task[None]] = []
        self.url = ""

    async def __aenter__(self) -> FakeDaemon:
        self.server = await serve(self.handler, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]  # type: ignore[index]
        self.url = f"ws://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for job in self.jobs:
            job.cancel()
        self.server.close()
        await self.server.wait_closed()

    def emit(self, event: dict[str, Any]) -> None:
        self.seq += 1
        self.buffer.append({**event, "seq": self.seq})

    def sent_types(self) -> list[str]:
        return [m.get("type", "<handshake>") for m in self.received]

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        number = self.connections
        assert ws.request is not None
        self.headers.append(dict(ws.request.headers))
        hs = json.loads(await ws.recv())
        self.handshakes.append(hs)
        if self.api_key is not None and hs.get("api_key") != self.api_key:
            await ws.send(json.dumps({"type": "error", "code": "unauthorized", "message": "Key."}))
            await ws.close(1008)
            return
        resumed = hs.get("session_id") == self.session_id and not self.forget_session
        if not resumed and hs.get("session_id"):
            self.session_id = f"sess-{number}"
        await ws.send(
            json.dumps(
                {
                    "type": "welcome",
                    "session_id": self.session_id,
                    "resumed": resumed,
                    "model": {"name": "fake-model"},
                    "max_context": 2048,
                    "last_seq": self.seq,
                }
            )
        )
        if hs.get("session_id") and not resumed:
            await ws.send(json.dumps({"type": "notice", "message": "Unknown session; new one."}))
            start = self.seq
        elif resumed:
            start = max(0, (hs.get("last_seq") or 0) - self.replay_overlap)
        else:
            start = self.seq
        tail = asyncio.create_task(self._tail(ws, start, number))
        try:
            async for raw in ws:
                msg = json.loads(raw)
                self.received.append(msg)
                await self._handle(ws, msg)
        except ConnectionClosed:
            pass
        finally:
            tail.cancel()

    async def _tail(self, ws: ServerConnection, after: int, number: int) -> None:
        """Send buffered events with seq > after, then follow the buffer like a live tail."""
        pos = next((i for i, e in enumerate(self.buffer) if e["seq"] > after), len(self.buffer))
        tokens_sent = 0
        try:
            while True:
                while pos < len(self.buffer):
                    event = self.buffer[pos]
                    pos += 1
                    await ws.send(json.dumps(event))
                    if event["type"] == "token":
                        tokens_sent += 1
                        if number == 1 and self.drop_after and tokens_sent >= self.drop_after:
                            ws.transport.abort()  # a network drop, no close handshake
                            return
                await asyncio.sleep(0.002)
        except ConnectionClosed:
            pass

    async def _generate(self, rid: str) -> None:
        if self.error is not None:
            self.emit({**self.error, "type": "error", "request_id": rid})
            return
        self.emit({"type": "start", "request_id": rid, "tokens_in": 5, "max_tokens": 64})
        count = 0
        for token in self.tokens:
            if rid in self.cancelled or None in self.cancelled:
                self.emit(
                    {
                        "type": "done",
                        "request_id": rid,
                        "total_tokens": count,
                        "finish_reason": "cancelled",
                    }
                )
                return
            await asyncio.sleep(self.token_delay)
            self.emit({"type": "token", "request_id": rid, "data": token})
            count += 1
        self.emit({"type": "done", "request_id": rid, "total_tokens": count, "finish_reason": "stop"})

    async def _handle(self, ws: ServerConnection, msg: dict[str, Any]) -> None:
        kind, rid = msg.get("type"), msg.get("request_id")
        echo = {"request_id": rid} if rid else {}
        if kind == "inference":
            self.jobs.append(asyncio.create_task(self._generate(rid)))
        elif kind == "cancel":
            self.cancelled.add(rid)
        elif kind == "ack":
            await ws.send(json.dumps({"type": "ack_received", "seq": msg.get("seq")}))
        elif kind == "ping":
            await ws.send(json.dumps({"type": "pong", **echo}))
        elif kind == "list_models":
            models = [{"name": "fake-model", "path": "models/fake.gguf", "loaded": True}]
            await ws.send(json.dumps({"type": "models_list", "models": models, **echo}))
        elif kind == "get_resources":
            await ws.send(json.dumps({"type": "resources", "gpus": [], "cpu": {}, **echo}))
        elif kind == "config":
            self.emit({"type": "config_ack", "config": {"temperature": 0.7, **msg["data"]}, **echo})
        elif kind == "download_model":
            self.emit({"type": "download_started", "job_id": "job-1", **echo})
            for done in (50, 100):
                # Progress carries only the job id: the client must route it by job_id.
                self.emit(
                    {
                        "type": "download_progress",
                        "job_id": "job-1",
                        "file": "m.gguf",
                        "done": done,
                        "total": 100,
                        "rate": 10.0,
                        "eta": 1,
                    }
                )
            self.emit({"type": "download_done", "job_id": "job-1", "path": "models/x"})


def token_texts(daemon: FakeDaemon) -> str:
    return "".join(daemon.tokens)


# --------------------------------------------------------------------------- unit tests


async def test_inference_returns_full_text_and_streams_tokens_to_callback() -> None:
    """inference() returns the whole reply and hands each token to on_token in order."""
    async with FakeDaemon() as daemon:
        client = LLMWSEnhancedClient(daemon.url)
        await client.connect()
        seen: list[str] = []
        text = await asyncio.wait_for(client.inference("Hi", on_token=seen.append), TIMEOUT)
        await client.disconnect()
    assert text == token_texts(daemon)
    assert seen == daemon.tokens
    assert client.session_id == "sess-1"
    inference = next(m for m in daemon.received if m["type"] == "inference")
    assert inference["prompt"] == {"user": "Hi"}
    assert inference["on_disconnect"] == "continue"


async def test_system_prompt_and_config_are_sent() -> None:
    """A system prompt and per-request settings reach the daemon in the inference message."""
    async with FakeDaemon() as daemon:
        async with LLMWSEnhancedClient(daemon.url) as client:
            await client.inference("Hi", "Be brief.", temperature=0, max_new_tokens=5, seed=None)
    inference = next(m for m in daemon.received if m["type"] == "inference")
    assert inference["prompt"] == {"system": "Be brief.", "user": "Hi"}
    assert inference["config"] == {"temperature": 0, "max_new_tokens": 5}


async def test_drop_mid_stream_resumes_without_gap_or_duplicate() -> None:
    """A connection dropped mid-reply is resumed by itself; each token arrives exactly once."""
    daemon = FakeDaemon(token_delay=0.01, drop_after=3, replay_overlap=2)
    async with daemon:
        states: list[str] = []
        client = LLMWSEnhancedClient(daemon.url, reconnect_delay=0.05, on_connection=lambda s, i: states.append(s))
        await client.connect()
        seen: list[str] = []
        async with client.stream("Hi") as stream:
            async for token in stream:
                seen.append(token)
        await client.disconnect()
    assert seen == daemon.tokens
    assert stream.text == token_texts(daemon)
    assert stream.finish_reason == "stop"
    assert client.reconnects == 1
    assert "resumed" in states
    resume = daemon.handshakes[1]
    assert resume["session_id"] == "sess-1"
    # start (seq 1) + 3 tokens had been seen when the connection dropped.
    assert resume["last_seq"] == 4


async def test_client_acks_at_done_and_every_n_events() -> None:
    """The client acks what it has processed, so the daemon can trim its replay buffer."""
    async with FakeDaemon() as daemon:
        client = LLMWSEnhancedClient(daemon.url, ack_every=4)
        await client.connect()
        await asyncio.wait_for(client.inference("Hi"), TIMEOUT)
        await asyncio.sleep(0.05)
        acks = [m["seq"] for m in daemon.received if m["type"] == "ack"]
        await client.disconnect()
    assert acks[-1] == daemon.seq  # the done event's seq
    assert 4 in acks and 8 in acks
    assert acks == sorted(acks)


async def test_error_event_raises_the_matching_exception() -> None:
    """A context_too_long error becomes ContextTooLongError with its limits."""
    err = {
        "code": "context_too_long",
        "message": "Context too long (9000 tokens). Max: 2048.",
        "max_context": 2048,
        "input_length": 9000,
    }
    async with FakeDaemon(error=err) as daemon:
        async with LLMWSEnhancedClient(daemon.url) as client:
            with pytest.raises(ContextTooLongError) as info:
                await asyncio.wait_for(client.inference("x" * 100), TIMEOUT)
            # The connection keeps serving after an error.
            assert await client.ping() >= 0
    assert info.value.max_context == 2048
    assert info.value.input_length == 9000
    assert info.value.code == "context_too_long"
    assert isinstance(info.value, LLMWSError)


def test_error_from_event_maps_codes_and_keeps_unknown_ones() -> None:
    """Unknown error codes still become an LLMWSClientError carrying code and message."""
    exc = error_from_event({"type": "error", "code": "weird", "message": "odd", "request_id": "r"})
    assert type(exc) is LLMWSClientError
    assert (exc.code, exc.message, exc.request_id) == ("weird", "odd", "r")
    assert isinstance(error_from_event({"code": "session_expired"}), SessionLostError)


async def test_leaving_stream_early_cancels_on_the_daemon() -> None:
    """Breaking out of a stream sends cancel for that request and the daemon stops."""
    tokens = [f"t{i} " for i in range(200)]
    async with FakeDaemon(tokens=tokens, token_delay=0.01) as daemon:
        async with LLMWSEnhancedClient(daemon.url) as client:
            async with client.stream("Long story") as stream:
                async for _ in stream:
                    if len(stream.tokens) == 3:
                        break
            rid = stream.request_id
            assert stream.finish_reason == "cancelled"
            # The next request works and is not polluted by the cancelled one's events.
            daemon.tokens = ["fresh"]
            assert await asyncio.wait_for(client.inference("Next"), TIMEOUT) == "fresh"
    assert {"type": "cancel", "request_id": rid} in daemon.received
    assert len(stream.tokens) < 200


async def test_queries_are_answered_by_request_id() -> None:
    """list_models, get_resources, set_config and ping return their answers."""
    async with FakeDaemon() as daemon:
        async with LLMWSEnhancedClient(daemon.url) as client:
            models, resources, config = await asyncio.gather(
                client.list_models(), client.get_resources(), client.set_config(top_k=5)
            )
            latency = await client.ping()
    assert models[0]["name"] == "fake-model"
    assert resources["type"] == "resources"
    assert config == {"temperature": 0.7, "top_k": 5}
    assert latency >= 0


async def test_download_progress_is_routed_by_job_id() -> None:
    """Download progress events that carry only a job id reach the download's callback."""
    async with FakeDaemon() as daemon:
        async with LLMWSEnhancedClient(daemon.url) as client:
            progress: list[dict[str, Any]] = []
            done = await asyncio.wait_for(client.download_model("org/model", "x", on_progress=progress.append), TIMEOUT)
    assert done["path"] == "models/x"
    assert [p["done"] for p in progress if p["type"] == "download_progress"] == [50, 100]


async def test_api_key_goes_in_header_and_handshake() -> None:
    """An API key is sent as X-API-Key and in the first frame; a wrong one is refused."""
    async with FakeDaemon(api_key="s3cret") as daemon:
        async with LLMWSEnhancedClient(daemon.url, api_key="s3cret") as client:
            assert client.connected
        assert daemon.headers[0]["x-api-key"] == "s3cret"
        assert daemon.handshakes[0]["api_key"] == "s3cret"
        with pytest.raises(UnauthorizedError):
            await LLMWSEnhancedClient(daemon.url, api_key="wrong").connect()


async def test_unreachable_server_raises_connect_failed() -> None:
    """Connecting to a port where nothing listens raises ConnectFailedError, not OSError."""
    client = LLMWSEnhancedClient("ws://127.0.0.1:1", open_timeout=2)
    with pytest.raises(ConnectFailedError) as info:
        await client.connect()
    assert "127.0.0.1:1" in info.value.message
    assert client.state is ClientState.CLOSED


async def test_unknown_session_is_reported_not_swapped_silently() -> None:
    """Resuming an unknown session says resumed: false and passes the daemon's notice on."""
    async with FakeDaemon() as daemon:
        notices: list[dict[str, Any]] = []
        client = LLMWSEnhancedClient(daemon.url, on_unsolicited=notices.append)
        await client.connect(session_id="no-such-session")
        await asyncio.sleep(0.1)
        await client.disconnect()
    assert client.welcome["resumed"] is False
    assert client.session_id != "no-such-session"
    assert notices and notices[0]["type"] == "notice"


async def test_lost_session_on_reconnect_fails_the_reply() -> None:
    """If the daemon cannot resume after a drop, the waiting reply fails with SessionLostError."""
    daemon = FakeDaemon(token_delay=0.01, drop_after=2, forget_session=True)
    async with daemon:
        client = LLMWSEnhancedClient(daemon.url, reconnect_delay=0.05)
        await client.connect()
        with pytest.raises(SessionLostError):
            await asyncio.wait_for(client.inference("Hi"), TIMEOUT)
        await client.disconnect()


async def test_no_auto_reconnect_fails_pending_with_connection_lost() -> None:
    """With auto_reconnect off, a drop fails the running reply with ConnectionLostError."""
    daemon = FakeDaemon(token_delay=0.01, drop_after=2)
    async with daemon:
        client = LLMWSEnhancedClient(daemon.url, auto_reconnect=False)
        await client.connect()
        with pytest.raises(ConnectionLostError):
            await asyncio.wait_for(client.inference("Hi"), TIMEOUT)
        assert client.state is ClientState.CLOSED
        with pytest.raises(ConnectionLostError):
            await client.ping()
        await client.disconnect()


async def test_daemon_gone_for_good_gives_up_after_attempts() -> None:
    """When the daemon never comes back, the reply fails after the configured attempts."""
    daemon = FakeDaemon(token_delay=0.05, tokens=[f"t{i}" for i in range(100)])
    await daemon.__aenter__()
    client = LLMWSEnhancedClient(daemon.url, reconnect_attempts=2, reconnect_delay=0.05, open_timeout=1)
    await client.connect()
    async with client.stream("Hi") as stream:
        with pytest.raises(ConnectionLostError):
            async for _ in stream:
                if len(stream.tokens) == 1:
                    await daemon.__aexit__()
                    for conn in list(daemon.server.connections):
                        conn.transport.abort()
    assert client.state is ClientState.CLOSED
    await client.disconnect()


def test_client_imports_without_server_dependencies() -> None:
    """`from llm import LLMWSEnhancedClient` works without pydantic or model libraries."""
    code = (
        "import sys\n"
        "for name in ('pydantic', 'llama_cpp', 'torch', 'fastapi', 'cryptography', 'psutil'):\n"
        "    sys.modules[name] = None\n"
        "from llm import LLMWSEnhancedClient, LLMWSClientError, ContextTooLongError\n"
        "print(LLMWSEnhancedClient.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "LLMWSEnhancedClient"


# --------------------------------------------------------------------------- real daemon

GREEDY = {"temperature": 0, "max_new_tokens": 32}


async def test_real_inference_returns_text(shared_daemon: Any) -> None:
    """Against the real daemon and model, inference() returns a non-empty reply."""
    async with LLMWSEnhancedClient(shared_daemon.ws_url) as client:
        assert client.max_context and client.model.get("name")
        tokens: list[str] = []
        text = await asyncio.wait_for(
            client.inference("Say hello.", "Answer briefly.", on_token=tokens.append, **GREEDY),
            TIMEOUT * 6,
        )
    assert text.strip()
    assert "".join(tokens) == text


async def test_real_streaming_form_reports_start_and_done(shared_daemon: Any) -> None:
    """The async-iterator form streams tokens and exposes start/done details."""
    async with LLMWSEnhancedClient(shared_daemon.ws_url) as client:
        async with client.stream("Name three colors.", **GREEDY) as stream:
            tokens = [token async for token in stream]
        status = await client.get_status()
    assert tokens and "".join(tokens) == stream.text
    assert stream.tokens_in and stream.tokens_in > 0
    assert stream.finish_reason in ("stop", "length")
    assert stream.total_tokens and stream.total_tokens >= 1
    # The client acked through the done event, so the daemon can trim its buffer.
    assert status["acked_seq"] == client.last_seq


@pytest.mark.slow
async def test_real_reconnect_mid_stream_equals_uninterrupted_greedy_run(shared_daemon: Any) -> None:
    """A connection dropped mid-reply resumes; the text equals an uninterrupted greedy run."""
    prompt = "Write a short paragraph about the ocean."
    config = {"temperature": 0, "max_new_tokens": 48, "seed": 1}
    async with LLMWSEnhancedClient(shared_daemon.ws_url) as client:
        expected = await asyncio.wait_for(client.inference(prompt, **config), TIMEOUT * 6)
    states: list[str] = []
    client = LLMWSEnhancedClient(shared_daemon.ws_url, reconnect_delay=0.2, on_connection=lambda s, _: states.append(s))
    await client.connect()  # a fresh session: the same (empty) history as the first run
    async with client.stream(prompt, **config) as stream:
        async for _ in stream:
            if len(stream.tokens) == 3:
                assert client._ws is not None
                client._ws.transport.abort()  # a network drop: no close handshake
    await client.disconnect()
    assert client.reconnects == 1 and "resumed" in states
    assert stream.text == expected
    assert stream.finish_reason in ("stop", "length")


async def test_real_session_resumes_in_a_new_client(shared_daemon: Any) -> None:
    """A second client given the session id resumes that session and its conversation."""
    async with LLMWSEnhancedClient(shared_daemon.ws_url) as first:
        await first.inference("My name is Zorblax.", temperature=0, max_new_tokens=8)
        session_id = first.session_id
    async with LLMWSEnhancedClient(shared_daemon.ws_url) as second:
        await second.disconnect()
        await second.connect(session_id=session_id)
        assert second.welcome["resumed"] is True
        assert second.session_id == session_id
        status = await second.get_status()
    assert status["history_messages"] == 2


async def test_real_context_too_long_raises_with_limits(shared_daemon: Any) -> None:
    """A prompt longer than the context raises ContextTooLongError carrying the limits."""
    async with LLMWSEnhancedClient(shared_daemon.ws_url) as client:
        max_context = client.max_context
        assert isinstance(max_context, int)
        with pytest.raises(ContextTooLongError) as info:
            await asyncio.wait_for(client.inference("hello " * (max_context + 100), **GREEDY), TIMEOUT * 6)
        # The session keeps serving afterwards.
        assert await client.ping() >= 0
    assert info.value.max_context is not None and info.value.input_length is not None
    assert info.value.input_length > info.value.max_context
