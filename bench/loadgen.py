"""Load over the daemon's doors: WebSocket sessions and the HTTP adapter's SSE stream.

The daemon is a real `python llmws.py` child on free ports with its own var folder,
exactly as users start it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, TOKENS, Run, Stream, messages_for, prompt_for

GREEDY = {"temperature": 0.0, "max_new_tokens": TOKENS}


class Daemon:
    """A daemon child process for one benchmark run."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="llmws-bench-"))
        cfg = {"limits": {"max_connections": 3000, "max_connections_per_ip": 3000, "messages_per_second": 100000.0}}
        for key, value in (config or {}).items():
            cfg.setdefault(key, {}).update(value)
        (self.root / "config.json").write_text(json.dumps(cfg))
        ready = self.root / "ready.json"
        args = [
            sys.executable,
            str(REPO / "llmws.py"),
            "--port",
            "0",
            "--http-port",
            "0",
            "--var-dir",
            str(self.root / "var"),
            "--models-dir",
            str(self.root / "models"),
            "--ready-file",
            str(ready),
            "--log-level",
            "WARNING",
            "--config",
            str(self.root / "config.json"),
        ]
        (self.root / "models").mkdir()
        self.log = open(self.root / "daemon.log", "wb")
        self.proc = subprocess.Popen(
            args, cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.root / "daemon.log").read_text()[-3000:])
            time.sleep(0.05)
        time.sleep(0.1)
        info = json.loads(ready.read_text())
        self.ws = f"ws://127.0.0.1:{info['ws_port']}"
        self.http = f"http://127.0.0.1:{info['http_port']}" if info.get("http_port") else None

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def loop_cpu(self) -> float:
        """CPU seconds used so far by the daemon's main thread: the event loop, which
        seals, writes and sends every event (llama.cpp decodes in threads of its own)."""
        import psutil

        main = next(t for t in psutil.Process(self.proc.pid).threads() if t.id == self.proc.pid)
        return float(main.user_time + main.system_time)

    def stop(self) -> None:
        _stop(self.proc)
        self.log.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def _connect(url: str) -> Any:
    from websockets.asyncio.client import connect

    ws = await connect(url, max_size=None, open_timeout=60)
    await ws.send(json.dumps({"protocol": 1}))
    while json.loads(await ws.recv()).get("type") != "welcome":
        pass
    return ws


async def _inference(ws: Any, body: dict[str, Any]) -> Stream:
    s = Stream(sent=time.perf_counter())
    await ws.send(json.dumps({"type": "inference", **body}))
    while True:
        ev = json.loads(await ws.recv())
        kind = ev.get("type")
        if kind == "token":
            # A busy daemon joins tokens into one event and says how many.
            s.stamps.extend([time.perf_counter()] * int(ev.get("tokens", 1)))
        elif kind == "done":
            await ws.send(json.dumps({"type": "ack"}))
            return s
        elif kind == "error":
            raise RuntimeError(f"daemon error: {ev}")


async def ws_run(url: str, concurrency: int, tokens: int = TOKENS, first: int | None = None) -> Run:
    """N sessions, one connection each, all asking at once (stream i sends prompt
    `first + i`; None: the same prompt for all)."""
    conns = [await _connect(url) for _ in range(concurrency)]
    config = {**GREEDY, "max_new_tokens": tokens}
    try:
        start = time.perf_counter()
        streams = await asyncio.gather(
            *(
                _inference(ws, {"prompt": prompt_for(None if first is None else first + i), "config": config})
                for i, ws in enumerate(conns)
            )
        )
        wall = max(s.stamps[-1] for s in streams) - start
        return Run("LLMWS over WebSocket", concurrency, list(streams), wall)
    finally:
        for ws in conns:
            await ws.close()


async def http_run(base: str, concurrency: int, name: str = "LLMWS over HTTP (SSE)", first: int | None = None) -> Run:
    """N streaming `/v1/chat/completions` requests at once (OpenAI SSE)."""
    import httpx

    async def one(client: httpx.AsyncClient, i: int) -> Stream:
        body = {
            "model": "default",
            "messages": messages_for(None if first is None else first + i),
            "stream": True,
            "temperature": 0.0,
            "max_tokens": TOKENS,
            "stream_options": {"include_usage": True},
        }
        s = Stream(sent=time.perf_counter())
        pieces: list[tuple[float, int]] = []  # (arrival, characters) of each content delta
        tokens = 0
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                delta = (chunk.get("choices") or [{}])[0].get("delta") or {}
                if delta.get("content"):
                    pieces.append((time.perf_counter(), len(delta["content"])))
                tokens = int((chunk.get("usage") or {}).get("completion_tokens") or tokens)
        s.stamps = _spread_tokens(pieces, tokens)
        return s

    async with httpx.AsyncClient(timeout=300) as client:
        start = time.perf_counter()
        streams = await asyncio.gather(*(one(client, i) for i in range(concurrency)))
    wall = max(s.stamps[-1] for s in streams) - start
    return Run(name, concurrency, list(streams), wall)


def _spread_tokens(pieces: list[tuple[float, int]], tokens: int) -> list[float]:
    """One stamp per token. A busy LLMWS joins the text of several tokens into one SSE
    delta (the WebSocket says how many; SSE has no field for it), so when the usage
    counts more tokens than deltas arrived, each delta stands for a share of them by
    its length in characters (at least one each)."""
    if tokens <= len(pieces):
        return [t for t, _ in pieces]
    chars = sum(c for _, c in pieces) or 1
    extra = tokens - len(pieces)
    shares = [extra * c / chars for _, c in pieces]
    counts = [1 + int(x) for x in shares]
    by_remainder = sorted(range(len(pieces)), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    for i in by_remainder[: tokens - sum(counts)]:
        counts[i] += 1
    return [t for (t, _), k in zip(pieces, counts, strict=True) for _ in range(k)]


class LlamaServer:
    """llama.cpp's own C++ `llama-server` on the same model, when a binary is given
    (`LLAMA_SERVER=/path/to/llama-server`): the issue's reference, measured in the same run."""

    def __init__(self, binary: str, threads: int, parallel: int = 4, ctx_per_slot: int = 8192) -> None:
        import httpx

        from bench.common import MODEL

        self.root = Path(tempfile.mkdtemp(prefix="llama-server-"))
        port = _free_port()
        self.log = open(self.root / "server.log", "wb")
        self.proc = subprocess.Popen(
            [
                binary,
                "-m",
                str(MODEL),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "-t",
                str(threads),
                "-tb",
                str(threads),
                "-np",
                str(parallel),
                "-c",
                str(ctx_per_slot * parallel),
                "--jinja",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.root / "server.log").read_text()[-3000:])
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def stop(self) -> None:
        _stop(self.proc)
        self.log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def long_history(words: int = 760) -> str:
    """About 1,000 tokens of varied text (numbers defeat any accidental repetition)."""
    return " ".join(
        f"Note {i}: the {['red', 'blue', 'green', 'old'][i % 4]} lamp was checked." for i in range(words // 7)
    )


async def prefix_reuse(url: str) -> dict[str, float]:
    """TTFT of turn 2 after a ~1,000-token turn 1, against a cold prefill of the same prompt."""
    short = {"temperature": 0.0, "max_new_tokens": 8}
    ws = await _connect(url)
    try:
        first = await _inference(ws, {"prompt": long_history() + "\nSummarize the notes.", "config": short})
        warm = await _inference(ws, {"prompt": "Which lamp was checked last?", "config": short})
    finally:
        await ws.close()
    # The same two-turn conversation, sent whole to a fresh session: every token is prefilled.
    cold_ws = await _connect(url)
    try:
        history = [
            {"role": "user", "content": long_history() + "\nSummarize the notes."},
            {"role": "assistant", "content": "(reply)"},
        ]
        cold = await _inference(
            cold_ws, {"messages": history, "prompt": "Which lamp was checked last?", "config": short}
        )
    finally:
        await cold_ws.close()
    return {"turn1_ttft": first.ttft, "turn2_ttft": warm.ttft, "cold_ttft": cold.ttft}


async def idle_sessions(daemon: Daemon, n: int = 1000) -> dict[str, float]:
    """RSS added by `n` connected, idle sessions."""
    await asyncio.sleep(0.5)
    before = daemon.rss()
    conns: list[Any] = []
    for i in range(0, n, 100):
        conns += await asyncio.gather(*(_connect(daemon.ws) for _ in range(min(100, n - i))))
    await asyncio.sleep(1.0)
    after = daemon.rss()
    await asyncio.gather(*(ws.close() for ws in conns))
    return {
        "sessions": n,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "added_mb": (after - before) / 2**20,
    }


async def control_rate(url: str, clients: int = 100, seconds: float = 3.0) -> dict[str, float]:
    """`ping` / `get_status` round trips per second from `clients` connections."""
    conns = await asyncio.gather(*(_connect(url) for _ in range(clients)))
    count = 0
    deadline = time.perf_counter() + seconds

    async def loop(ws: Any, i: int) -> None:
        nonlocal count
        kinds = ("ping", "get_status")
        k = i
        while time.perf_counter() < deadline:
            want = kinds[k % 2]
            await ws.send(json.dumps({"type": want}))
            reply = "pong" if want == "ping" else "status"
            while json.loads(await ws.recv()).get("type") != reply:
                pass
            count += 1
            k += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(ws, i) for i, ws in enumerate(conns)))
    elapsed = time.perf_counter() - start
    await asyncio.gather(*(ws.close() for ws in conns))
    return {"clients": clients, "messages": count, "per_second": count / elapsed}
