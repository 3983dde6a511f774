"""Fixtures of the HTTP adapter's tests: one real daemon per test module (startup is the
slow part), with the module's own config, plus small HTTP helpers."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import DaemonProcess, scaled

HERE = Path(__file__).resolve().parent
ECHO_SERVER = HERE / "mcp_echo_server.py"


def echo_mcp_config() -> dict[str, Any]:
    """Config naming the test MCP server (started by the daemon on first use)."""
    return {"mcp_servers": {"echo": {"command": sys.executable, "args": [str(ECHO_SERVER)], "env": {}}}}


@pytest.fixture(scope="module")
def module_daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon shared by a module's tests; the module may set DAEMON_CONFIG."""
    config = getattr(request.module, "DAEMON_CONFIG", None)
    root = tmp_path_factory.mktemp("http-daemon")
    d = DaemonProcess(root, [], None, config)
    d.start()
    try:
        yield d
    finally:
        d.kill()


@pytest.fixture
def http(module_daemon: DaemonProcess) -> Iterator[httpx.Client]:
    """An httpx client on the module's daemon."""
    with httpx.Client(base_url=module_daemon.http_url, timeout=scaled(120)) as client:
        yield client


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parse SSE lines into {"id", "data"} dicts (data JSON-decoded unless [DONE])."""
    event: dict[str, Any] = {}
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                text = "\n".join(data)
                event["data"] = text if text == "[DONE]" else json.loads(text)
                yield event
            event, data = {}, []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "id":
            event["id"] = value
        elif field == "event":
            event["event"] = value
    if data:
        text = "\n".join(data)
        event["data"] = text if text == "[DONE]" else json.loads(text)
        yield event


def pick_stop(text: str) -> str:
    """Two characters from the middle of `text`, without whitespace: a stop sequence a
    greedy rerun of the same request is sure to produce (first seen at `text.index`)."""
    for i in range(len(text) // 3, len(text) - 1):
        candidate = text[i : i + 2]
        if not any(c.isspace() for c in candidate):
            return candidate
    raise AssertionError(f"no stop sequence to pick in {text!r}")
