"""A raw protocol peer for tests: sends frames, collects events, no client logic."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from .conftest import scaled


class Peer:
    """One WebSocket connection speaking the raw LLMWS protocol."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, url: str, handshake: dict[str, Any] | None = None, *, legacy: bool = False, **kw: Any) -> Peer:
        """Connect and handshake; the current dialect unless `legacy` (no `protocol` key)."""
        ws = await connect(url, max_size=None, **kw)
        peer = cls(ws)
        frame = dict(handshake or {})
        if not legacy:
            frame.setdefault("protocol", 1)
        await ws.send(json.dumps(frame))
        peer.welcome = await peer.recv()
        assert peer.welcome["type"] == "welcome", peer.welcome
        return peer

    async def send(self, msg: dict[str, Any] | str) -> None:
        await self.ws.send(msg if isinstance(msg, str) else json.dumps(msg))

    async def recv(self, timeout: float = 60) -> dict[str, Any]:
        event = json.loads(await asyncio.wait_for(self.ws.recv(), scaled(timeout)))
        self.events.append(event)
        return event

    async def until(self, kind: str, timeout: float = 120, **match: Any) -> list[dict[str, Any]]:
        """Events up to and including the first of type `kind` matching `match`."""
        out = []
        while True:
            event = await self.recv(timeout)
            out.append(event)
            if event.get("type") == kind and all(event.get(k) == v for k, v in match.items()):
                return out

    async def infer(
        self, prompt: Any, request_id: str = "r", timeout: float = 120, **config: Any
    ) -> tuple[str, list[dict[str, Any]]]:
        """Send one inference and return (reply text, events up to its done)."""
        msg: dict[str, Any] = {"type": "inference", "prompt": prompt, "request_id": request_id}
        if config:
            msg["config"] = config
        await self.send(msg)
        events = await self.until("done", timeout, request_id=request_id)
        errors = [e for e in events if e.get("type") == "error"]
        assert not errors, errors
        return text_of(events, request_id), events

    async def close(self) -> None:
        await self.ws.close()


def text_of(events: list[dict[str, Any]], request_id: str | None = None) -> str:
    return "".join(
        e["data"]
        for e in events
        if e.get("type") == "token" and (request_id is None or e.get("request_id") == request_id)
    )
