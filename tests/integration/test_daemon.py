"""The WebSocket daemon end to end, against the real embedded model."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from ..wire import Peer, text_of

GREEDY = {"temperature": 0, "max_new_tokens": 24}


async def test_seed_request_streams_start_tokens_done(shared_daemon) -> None:
    """The original client's inference request gets start, tokens and done with counts."""
    peer = await Peer.open(shared_daemon.ws_url)
    assert peer.welcome["resumed"] is False and peer.welcome["max_context"] > 0
    await peer.send({"type": "inference", "prompt": {"system": "You are helpful", "user": "Hello"}, "config": GREEDY})
    events = await peer.until("done")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "token" in kinds
    start, done = events[0], events[-1]
    assert start["tokens_in"] > 0 and start["max_tokens"] == 24
    assert done["total_tokens"] >= 1 and done["finish_reason"] in ("stop", "length")
    assert text_of(events).strip()
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq must be contiguous and increasing"
    assert all(e["request_id"] == start["request_id"] for e in events)
    await peer.close()


async def test_legacy_and_plain_prompts_equal_structured(shared_daemon) -> None:
    """The legacy <|system|>…<|end|> string and the structured prompt give the same greedy reply."""
    peer = await Peer.open(shared_daemon.ws_url)
    a, _ = await peer.infer({"system": "Answer briefly.", "user": "Name a color."}, "a", **GREEDY)
    await peer.send({"type": "reset"})
    await peer.until("reset_done")
    b, _ = await peer.infer("<|system|>Answer briefly.<|end|><|user|>Name a color.<|end|>", "b", **GREEDY)
    assert a == b and a.strip()
    await peer.send({"type": "reset"})
    await peer.until("reset_done")
    c, _ = await peer.infer("Name a color.", "c", **GREEDY)
    assert c.strip()
    await peer.close()


async def test_greedy_is_deterministic_across_sessions(shared_daemon) -> None:
    """temperature 0 gives the same text in two fresh sessions."""
    p1 = await Peer.open(shared_daemon.ws_url)
    p2 = await Peer.open(shared_daemon.ws_url)
    t1, _ = await p1.infer("Write one sentence about the sea.", "x", **GREEDY)
    t2, _ = await p2.infer("Write one sentence about the sea.", "x", **GREEDY)
    assert t1 == t2 and t1
    await p1.close()
    await p2.close()


async def _memory_check(peer: Peer, rid: str) -> str:
    text, _ = await peer.infer("What is my name? Answer with the name only.", rid, temperature=0, max_new_tokens=16)
    return text


async def test_second_turn_sees_first_across_reconnect(shared_daemon) -> None:
    """A session remembers the first turn after the client reconnects with its id."""
    peer = await Peer.open(shared_daemon.ws_url)
    sid = peer.welcome["session_id"]
    await peer.infer("My name is Zorblax. Remember it.", "t1", temperature=0, max_new_tokens=16)
    await peer.close()
    again = await Peer.open(shared_daemon.ws_url, {"session_id": sid, "last_seq": 10**6})
    assert again.welcome["resumed"] is True and again.welcome["history_messages"] == 2
    answer = await _memory_check(again, "t2")
    assert "zorblax" in answer.lower()
    await again.close()


async def test_history_survives_daemon_restart(daemon) -> None:
    """After a SIGKILL and restart, the session's history is still there."""
    peer = await Peer.open(daemon.ws_url)
    sid = peer.welcome["session_id"]
    await peer.infer("My name is Zorblax. Remember it.", "t1", temperature=0, max_new_tokens=16)
    last = peer.events[-1]["seq"]
    await peer.close()
    daemon.restart()
    again = await Peer.open(daemon.ws_url, {"session_id": sid, "last_seq": last})
    assert again.welcome["resumed"] is True and again.welcome["last_seq"] == last
    assert "zorblax" in (await _memory_check(again, "t2")).lower()
    await again.close()


async def test_drop_mid_stream_then_resume_equals_uninterrupted(shared_daemon) -> None:
    """A client that drops mid-reply and resumes gets exactly the missing events: the
    text equals an uninterrupted greedy run, with no gap and no duplicate."""
    cfg = {"temperature": 0, "max_new_tokens": 120}
    prompt = "Tell me a long story about a dragon and a knight."
    ref_peer = await Peer.open(shared_daemon.ws_url)
    reference, _ = await ref_peer.infer(prompt, "ref", **cfg)
    await ref_peer.close()

    peer = await Peer.open(shared_daemon.ws_url)
    sid = peer.welcome["session_id"]
    await peer.send({"type": "inference", "prompt": prompt, "request_id": "q", "config": cfg})
    seen: list[dict] = []
    while len([e for e in seen if e["type"] == "token"]) < 5:
        seen.append(await peer.recv())
    peer.ws.transport.abort()  # a dropped network: no close handshake
    last_seq = seen[-1]["seq"]
    await asyncio.sleep(0.3)
    again = await Peer.open(shared_daemon.ws_url, {"session_id": sid, "last_seq": last_seq})
    rest = await again.until("done", request_id="q")
    seqs = [e["seq"] for e in seen + rest]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "gap or duplicate in seq"
    assert text_of(seen + rest, "q") == reference
    await again.close()


async def test_sigkill_mid_generation_replays_everything_seen(daemon) -> None:
    """Every event a client saw before a SIGKILL is replayed after restart, byte for byte,
    and the interrupted reply is closed out with finish_reason 'interrupted'."""
    peer = await Peer.open(daemon.ws_url)
    sid = peer.welcome["session_id"]
    await peer.send(
        {
            "type": "inference",
            "prompt": "Tell me a long story about a dragon and a knight.",
            "request_id": "k",
            "config": {"temperature": 0, "max_new_tokens": 400},
        }
    )
    seen: list[dict] = []
    while len([e for e in seen if e["type"] == "token"]) < 10:
        seen.append(await peer.recv())
        assert seen[-1]["type"] != "done", "the reply ended before the kill"
    daemon.kill()
    await peer.close()
    daemon.start()
    again = await Peer.open(daemon.ws_url, {"session_id": sid, "last_seq": 0})
    replay = await again.until("done", request_id="k")
    by_seq = {e["seq"]: e for e in replay}
    for event in seen:
        assert by_seq.get(event["seq"]) == event, f"event {event['seq']} not replayed as seen"
    assert replay[-1]["finish_reason"] == "interrupted"
    # The conversation goes on afterwards.
    text, _ = await again.infer("Say hello.", "after", **GREEDY)
    assert text.strip()
    await again.close()


async def test_on_disconnect_cancel_stops_generation(shared_daemon) -> None:
    """With on_disconnect 'cancel', dropping the socket ends the reply as cancelled."""
    peer = await Peer.open(shared_daemon.ws_url)
    sid = peer.welcome["session_id"]
    await peer.send(
        {
            "type": "inference",
            "prompt": "Write a very long essay about rivers.",
            "request_id": "c",
            "on_disconnect": "cancel",
            "config": {"temperature": 0, "max_new_tokens": 1500},
        }
    )
    await peer.until("token")
    await peer.close()
    await asyncio.sleep(1.0)
    again = await Peer.open(shared_daemon.ws_url, {"session_id": sid, "last_seq": 0})
    events = await again.until("done", request_id="c")
    assert events[-1]["finish_reason"] == "cancelled"
    assert events[-1]["total_tokens"] < 1500
    await again.close()


async def test_cancel_message_and_pings_during_generation(shared_daemon) -> None:
    """Pings are answered during a long generation, and cancel ends it as cancelled."""
    peer = await Peer.open(shared_daemon.ws_url)
    await peer.send(
        {
            "type": "inference",
            "prompt": "Write a very long essay about mountains.",
            "request_id": "g",
            "config": {"temperature": 0, "max_new_tokens": 1500},
        }
    )
    await peer.until("token")
    await peer.send({"type": "ping", "request_id": "p"})
    await peer.until("pong", request_id="p")
    await peer.send({"type": "cancel", "request_id": "g"})
    done = (await peer.until("done", request_id="g"))[-1]
    assert done["finish_reason"] == "cancelled"
    await peer.close()


async def test_unknown_session_id_is_not_silently_replaced(shared_daemon) -> None:
    """An unknown or malformed id gets resumed false and a notice saying why."""
    for sid in (str(uuid.uuid4()), "../../etc/passwd", "not-a-uuid"):
        peer = await Peer.open(shared_daemon.ws_url, {"session_id": sid})
        assert peer.welcome["resumed"] is False and peer.welcome["session_id"] != sid
        notice = await peer.recv()
        assert notice["type"] == "notice" and "session" in notice["message"].lower()
        await peer.close()


@pytest.mark.parametrize(
    "frame, code",
    [
        ("not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        (json.dumps({"type": "launch_missiles"}), "unknown_type"),
        (json.dumps({"no_type": 1}), "bad_request"),
        (json.dumps({"type": "inference"}), "bad_request"),
        (json.dumps({"type": "inference", "prompt": 42}), "bad_request"),
        (json.dumps({"type": "config", "data": {"temperature": "hot"}}), "bad_request"),
        (json.dumps({"type": "config", "data": {"bogus": 1}}), "bad_request"),
        (json.dumps({"type": "ack", "seq": -1}), "bad_request"),
        (json.dumps({"type": "cancel", "request_id": "nope"}), "not_found"),
        (json.dumps({"type": "switch_model", "model_path": "../../etc/passwd"}), "forbidden"),
        ("x" * (5 * 1024 * 1024), "frame_too_large"),
    ],
)
async def test_bad_input_gets_typed_error_and_connection_keeps_serving(shared_daemon, frame, code) -> None:
    """Every kind of bad input is answered with a typed error; the connection still serves."""
    peer = await Peer.open(shared_daemon.ws_url)
    await peer.send(frame)
    err = await peer.recv()
    assert err["type"] == "error" and err["code"] == code, err
    assert "Traceback" not in err["message"] and 'File "' not in err["message"]
    await peer.send({"type": "ping", "request_id": "still"})
    assert (await peer.until("pong"))[-1]["request_id"] == "still"
    await peer.close()


async def test_context_too_long_reports_limits(daemon_factory) -> None:
    """A prompt longer than the context gets context_too_long with max_context and input_length."""
    d = daemon_factory(config={"model": {"n_ctx": 512}})
    peer = await Peer.open(d.ws_url)
    await peer.send({"type": "inference", "prompt": "word " * 2000, "request_id": "big"})
    err = (await peer.until("error"))[-1]
    assert err["code"] == "context_too_long" and err["max_context"] == 512
    assert err["input_length"] > 512 and err["request_id"] == "big"
    text, _ = await peer.infer("Hi", "small", **GREEDY)
    assert text
    await peer.close()


async def test_old_turns_dropped_with_warning_when_history_overflows(daemon_factory) -> None:
    """When the history no longer fits, the oldest turns are dropped and a warning says so."""
    d = daemon_factory(config={"model": {"n_ctx": 512}})
    peer = await Peer.open(d.ws_url)
    warned = False
    for i in range(6):
        _, events = await peer.infer(
            "Please repeat this sentence back to me: " + "blue sky " * 60, f"t{i}", temperature=0, max_new_tokens=40
        )
        warned |= any(e["type"] == "warning" and e.get("code") == "history_truncated" for e in events)
    assert warned
    await peer.close()


async def test_config_ack_and_session_config_applies(shared_daemon) -> None:
    """config changes the session's defaults and is echoed in config_ack."""
    peer = await Peer.open(shared_daemon.ws_url)
    await peer.send({"type": "config", "data": {"temperature": 0, "max_new_tokens": 5}})
    ack = (await peer.until("config_ack"))[-1]
    assert ack["config"]["temperature"] == 0 and ack["config"]["max_new_tokens"] == 5
    await peer.send({"type": "inference", "prompt": "Write a long poem.", "request_id": "cfg"})
    events = await peer.until("done", request_id="cfg")
    assert events[0]["max_tokens"] == 5 and events[-1]["total_tokens"] <= 5
    await peer.close()


async def test_ack_trims_buffer_but_keeps_session(shared_daemon) -> None:
    """After ack, a resume replays nothing before the acked seq, and history stays."""
    peer = await Peer.open(shared_daemon.ws_url)
    sid = peer.welcome["session_id"]
    await peer.infer("Hello there", "a1", **GREEDY)
    last = peer.events[-1]["seq"]
    await peer.send({"type": "ack", "seq": last})
    assert (await peer.until("ack_received"))[-1]["seq"] == last
    await peer.close()
    again = await Peer.open(shared_daemon.ws_url, {"session_id": sid, "last_seq": 0})
    assert again.welcome["resumed"] and again.welcome["history_messages"] == 2
    await again.send({"type": "ping"})
    assert (await again.recv())["type"] == "pong", "nothing acked may be replayed"
    await again.close()


async def test_fifo_queue_reports_position(daemon_factory) -> None:
    """When every decoding slot is busy, a request from another session waits its FIFO turn
    and gets queued {position}."""
    daemon = daemon_factory(config={"model": {"max_batch": 1}})
    a = await Peer.open(daemon.ws_url)
    b = await Peer.open(daemon.ws_url)
    await a.send(
        {
            "type": "inference",
            "prompt": "Write a long essay about the ocean.",
            "request_id": "long",
            "config": {"temperature": 0, "max_new_tokens": 200},
        }
    )
    await a.until("token")
    await b.send({"type": "inference", "prompt": "Hi", "request_id": "wait", "config": GREEDY})
    events = await b.until("done", request_id="wait")
    assert events[0]["type"] == "queued" and events[0]["position"] == 1
    await a.until("done", request_id="long")
    await a.close()
    await b.close()


async def test_status_resources_models(shared_daemon) -> None:
    """get_status, get_resources and list_models describe the loaded embedded model."""
    peer = await Peer.open(shared_daemon.ws_url)
    await peer.send({"type": "get_status", "request_id": "s"})
    status = await peer.recv()
    assert status["type"] == "status" and status["model"]["backend"] == "llamacpp"
    await peer.send({"type": "get_resources"})
    res = await peer.recv()
    assert res["type"] == "resources" and res["gpus"] == [] and res["ram"]["total_mb"] > 0
    assert res["process"]["rss_mb"] > 0 and res["model"]["name"]
    await peer.send({"type": "list_models"})
    models = (await peer.recv())["models"]
    assert any(m["loaded"] and m["source"] == "embedded" and m["format"] == "gguf" for m in models)
    await peer.close()


async def test_sigterm_drains_and_flushes(daemon) -> None:
    """SIGTERM lets a running generation finish (within the drain time) and exits cleanly."""
    peer = await Peer.open(daemon.ws_url)
    sid = peer.welcome["session_id"]
    await peer.send(
        {
            "type": "inference",
            "prompt": "Say something.",
            "request_id": "d",
            "config": {"temperature": 0, "max_new_tokens": 40},
        }
    )
    await peer.until("start")
    code = daemon.stop()
    assert code == 0, daemon.log()
    daemon.start()
    again = await Peer.open(daemon.ws_url, {"session_id": sid, "last_seq": 0})
    events = await again.until("done", request_id="d")
    assert events[-1]["finish_reason"] in ("stop", "length")
    await again.close()


async def test_persist_false_is_a_memory_only_benchmark_mode(daemon_factory) -> None:
    """With sessions.persist false (benchmark-only) replies still stream but no event reaches disk."""
    d = daemon_factory(config={"sessions": {"persist": False}})
    peer = await Peer.open(d.ws_url)
    text, _ = await peer.infer("Say hi.", "p", **GREEDY)
    assert text.strip()
    buffer = d.var_dir / "sessions" / peer.welcome["session_id"] / "buffer.jsonl"
    assert not buffer.exists() or buffer.stat().st_size == 0
    await peer.close()


def _metric(daemon, name: str) -> float:
    import httpx

    text = httpx.get(f"{daemon.http_url}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_session_prefix_survives_a_restart(daemon) -> None:
    """After a graceful restart, a session's next turn loads its KV prefix from the
    sealed store instead of evaluating its whole history again."""
    peer = await Peer.open(daemon.ws_url)
    sid = peer.welcome["session_id"]
    first, _ = await peer.infer(
        "Tell me a short story about a lighthouse keeper.", "t1", temperature=0, max_new_tokens=48
    )
    last = peer.events[-1]["seq"]
    await peer.close()
    assert daemon.stop() == 0
    daemon.start()
    again = await Peer.open(daemon.ws_url, {"session_id": sid, "last_seq": last})
    _, events = await again.infer("Give it a title.", "t2", temperature=0, max_new_tokens=8)
    start = next(e for e in events if e["type"] == "start")
    restored = _metric(daemon, "llmws_prefix_restored_tokens_total")
    prefilled = _metric(daemon, "llmws_prefix_prefilled_tokens_total")
    assert restored >= 40, "the first turn's prompt and reply should come from disk"
    assert prefilled < start["tokens_in"] - 40
    await again.close()
    sessions_files = list((daemon.var_dir / "prefixes").iterdir())
    assert sessions_files and all(sid not in p.name for p in sessions_files)


def test_restore_cache_is_on_disk_before_it_answers(daemon) -> None:
    """A prefix cached by /restore_cache survives a SIGKILL: after the restart, a request
    that starts with it loads it from disk instead of evaluating it."""
    import httpx

    doc = " ".join(f"Rule {i}: every lighthouse keeper writes the weather in a log." for i in range(30))
    prefix = [{"role": "system", "content": doc}]
    r = httpx.post(f"{daemon.http_url}/restore_cache", json={"messages": prefix}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["persistent"] is True and body["cached_tokens"] > 300
    daemon.restart()  # SIGKILL, then start
    r = httpx.post(
        f"{daemon.http_url}/v1/chat/completions",
        timeout=120,
        json={
            "messages": [*prefix, {"role": "user", "content": "What do keepers write?"}],
            "max_tokens": 4,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    assert _metric(daemon, "llmws_prefix_restored_tokens_total") >= body["cached_tokens"] - 8


async def test_daemon_without_http_serves_the_websocket(daemon_factory) -> None:
    """With `--http-port -1` the daemon starts, serves the WebSocket and opens no HTTP port."""
    d = daemon_factory(["--http-port", "-1"])
    assert d.http_port is None
    peer = await Peer.open(d.ws_url)
    assert peer.welcome["http_port"] is None
    text, _ = await peer.infer("Say hi.", "r1", temperature=0, max_new_tokens=4)
    assert isinstance(text, str)
    await peer.close()
