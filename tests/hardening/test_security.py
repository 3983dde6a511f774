"""Who may talk to the daemon: Origin allowlist, API keys, admin actions, binding
beyond loopback, keys kept out of logs, and the HTTP adapter's Host and CORS checks.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ..conftest import REPO, DaemonProcess, scaled
from ..wire import Peer

USER_KEY = "user-key-7f3a9c1e5b2d4680"
ADMIN_KEY = "admin-key-0e8d6b4a2c1f3957"
OTHER_KEY = "other-user-key-3c5e7a9b1d2f"
WRONG_KEY = "wrong-key-55aa55aa55aa55aa"
ALLOWED = "https://allowed.example"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon that requires keys on loopback, with one extra allowed Origin, logging at DEBUG."""
    config = {
        "security": {
            "require_api_key": True,
            "api_keys": [USER_KEY, OTHER_KEY],
            "admin_keys": [ADMIN_KEY],
            "allowed_origins": [ALLOWED],
            "allow_file_origin": False,
        },
    }
    env = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    d = DaemonProcess(tmp_path_factory.mktemp("keyed"), ["--log-level", "DEBUG"], env, config)
    d.start()
    yield d
    d.kill()


@pytest.fixture(scope="module")
def open_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A default loopback daemon (no keys) that allows pages opened from disk."""
    d = DaemonProcess(tmp_path_factory.mktemp("open"), [], None, {"security": {"allow_file_origin": True}})
    d.start()
    yield d
    d.kill()


async def _status_of_handshake(url: str, headers: list[tuple[str, str]]) -> int:
    """101 if the WebSocket handshake succeeded, else the HTTP status of the refusal."""
    try:
        ws = await connect(url, additional_headers=headers, open_timeout=scaled(10))
    except InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


def _key_headers() -> list[tuple[str, str]]:
    return [("X-API-Key", USER_KEY)]


# ------------------------------------------------------------------ Origin


async def test_foreign_browser_origin_is_refused_at_handshake(keyed: DaemonProcess) -> None:
    """A web page from another site cannot open the daemon's WebSocket (HTTP 403), even with a key."""
    for origin in (
        "https://evil.example",
        "http://localhost.evil.example",
        "http://127.0.0.1:1",
        "null",
        f"{ALLOWED}.evil",
        ALLOWED.upper(),
    ):
        status = await _status_of_handshake(keyed.ws_url, [("Origin", origin), *_key_headers()])
        assert status == 403, (origin, status)


async def test_duplicate_origin_headers_are_refused_not_crashing(keyed: DaemonProcess) -> None:
    """Two Origin headers (one allowed, one not) are refused with 403, not a server error."""
    status = await _status_of_handshake(
        keyed.ws_url, [("Origin", ALLOWED), ("Origin", "https://evil.example"), *_key_headers()]
    )
    assert status == 403


async def test_allowed_origins_and_no_origin_connect(keyed: DaemonProcess) -> None:
    """Non-browser clients (no Origin), the configured origin and the HTTP adapter's own origin connect."""
    own = f"http://127.0.0.1:{keyed.http_port}"
    assert await _status_of_handshake(keyed.ws_url, _key_headers()) == 101
    assert await _status_of_handshake(keyed.ws_url, [("Origin", ALLOWED), *_key_headers()]) == 101
    assert await _status_of_handshake(keyed.ws_url, [("Origin", own), *_key_headers()]) == 101


async def test_file_origin_only_when_configured(open_daemon: DaemonProcess) -> None:
    """`Origin: null` (a page opened from disk) connects only with security.allow_file_origin."""
    peer = await Peer.open(open_daemon.ws_url, additional_headers=[("Origin", "null")])
    assert peer.welcome["type"] == "welcome"
    await peer.close()
    assert await _status_of_handshake(open_daemon.ws_url, [("Origin", "https://evil.example")]) == 403


# ------------------------------------------------------------------ keys


async def _refused(
    url: str, handshake: dict[str, Any], headers: list[tuple[str, str]] | None = None
) -> tuple[dict[str, Any], int | None]:
    """Connect, send `handshake`, return (first event, close code)."""
    async with connect(url, additional_headers=headers or []) as ws:
        await ws.send(json.dumps(handshake))
        first = json.loads(await asyncio.wait_for(ws.recv(), scaled(10)))
        try:
            while True:
                await asyncio.wait_for(ws.recv(), scaled(10))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
    return first, code


async def test_missing_or_wrong_key_is_unauthorized_and_closed(keyed: DaemonProcess) -> None:
    """Without a valid key the client gets `unauthorized` and the socket closes with 1008."""
    for handshake, headers in (
        ({}, None),
        ({"api_key": WRONG_KEY}, None),
        ({}, [("X-API-Key", WRONG_KEY)]),
        ({"type": "ping"}, None),
        ({}, [("X-API-Key", USER_KEY), ("X-API-Key", WRONG_KEY)]),
    ):
        first, code = await _refused(keyed.ws_url, handshake, headers)
        assert first["type"] == "error" and first["code"] == "unauthorized", first
        assert code == 1008


async def test_user_key_works_every_way_it_can_be_sent(keyed: DaemonProcess) -> None:
    """The user key works in the handshake, X-API-Key, a Bearer token and the query string."""
    ways: list[tuple[str, dict[str, Any], list[tuple[str, str]]]] = [
        (keyed.ws_url, {"api_key": USER_KEY}, []),
        (keyed.ws_url, {}, [("X-API-Key", USER_KEY)]),
        (keyed.ws_url, {}, [("Authorization", f"Bearer {USER_KEY}")]),
        (keyed.ws_url + f"/?api_key={USER_KEY}", {}, []),
    ]
    for url, handshake, headers in ways:
        peer = await Peer.open(url, handshake, additional_headers=headers)
        await peer.send({"type": "ping", "request_id": "k"})
        assert (await peer.until("pong"))[-1]["request_id"] == "k"
        await peer.close()


async def test_admin_actions_need_the_admin_key(keyed: DaemonProcess) -> None:
    """switch_model, delete_model and download_model with the user key are forbidden; the admin key passes the check."""
    admin_only = [
        {"type": "switch_model", "model_path": "nonexistent.gguf", "request_id": "a1"},
        {"type": "delete_model", "model_name": "nonexistent.gguf", "request_id": "a2"},
        {
            "type": "download_model",
            "repo": "someone/some-model",
            "target_dir": "x",
            "request_id": "a3",
        },
        {"type": "cancel_download", "job_id": "nope", "request_id": "a4"},
    ]
    user = await Peer.open(keyed.ws_url, {"api_key": USER_KEY})
    for msg in admin_only:
        await user.send(msg)
        err = (await user.until("error", request_id=msg["request_id"]))[-1]
        assert err["code"] == "forbidden", err
    await user.close()
    admin = await Peer.open(keyed.ws_url, {"api_key": ADMIN_KEY})
    await admin.send(admin_only[0])
    err = (await admin.until("error", request_id="a1"))[-1]
    assert err["code"] != "forbidden" and err["code"] in ("model_not_found", "not_found"), err
    await admin.close()


def test_refuses_to_bind_beyond_loopback_without_keys(tmp_path: Path) -> None:
    """`--host 0.0.0.0` without any API key: the daemon exits non-zero with a message saying why."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLMWS_API_KEYS", "LLMWS_ADMIN_KEYS")}
    for host in ("0.0.0.0", "::"):
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "llmws.py"),
                "--host",
                host,
                "--port",
                "0",
                "--http-port",
                "0",
                "--var-dir",
                str(tmp_path / "var"),
                "--models-dir",
                str(tmp_path / "models"),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=scaled(120),
        )
        assert proc.returncode != 0
        assert "API key" in proc.stderr and "loopback" in proc.stderr, proc.stderr[-2000:]


async def test_keys_never_appear_in_the_log(keyed: DaemonProcess) -> None:
    """After keys were sent every possible way (good and bad, WS and HTTP), none is in the daemon's log."""
    for key in (USER_KEY, WRONG_KEY):
        try:
            peer = await Peer.open(
                keyed.ws_url + f"/?api_key={key}&x_api_key={key}",
                {"api_key": key},
                additional_headers=[("X-API-Key", key), ("Authorization", f"Bearer {key}")],
            )
            await peer.close()
        except AssertionError:
            pass  # the wrong key is refused
    async with httpx.AsyncClient(base_url=keyed.http_url, timeout=scaled(30)) as http:
        for key in (USER_KEY, ADMIN_KEY, WRONG_KEY):
            await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            await http.get(f"/v1/models?x_api_key={key}")
            await http.post("/setModel", headers={"X-API-Key": key}, json={"model": "nope.gguf"})
    await asyncio.sleep(0.5)
    log = keyed.log_path.read_text(errors="replace")
    assert "connection open" in log or "session" in log, "the log is empty: nothing was checked"
    for key in (USER_KEY, ADMIN_KEY, WRONG_KEY):
        assert key not in log, f"a key leaked into the log: {key[:8]}..."
        assert key[:12] not in log


# ------------------------------------------------------------------ HTTP adapter


async def test_http_requires_key_and_checks_host(keyed: DaemonProcess) -> None:
    """The HTTP adapter refuses a foreign Host (DNS rebinding) and requests without a key."""
    async with httpx.AsyncClient(base_url=keyed.http_url, timeout=scaled(30)) as http:
        ok = await http.get("/v1/models", headers={"X-API-Key": USER_KEY})
        assert ok.status_code == 200
        rebinding = await http.get(
            "/v1/models", headers={"X-API-Key": USER_KEY, "Host": f"evil.example:{keyed.http_port}"}
        )
        assert rebinding.status_code in (400, 403, 421)
        assert (await http.get("/v1/models")).status_code == 401
        assert (await http.get("/v1/models", headers={"X-API-Key": WRONG_KEY})).status_code == 401
        forbidden = await http.post("/setModel", headers={"X-API-Key": USER_KEY}, json={"model": "nope.gguf"})
        assert forbidden.status_code == 403


async def test_http_cors_is_off_by_default(open_daemon: DaemonProcess) -> None:
    """Without security.cors_origins, no CORS header lets another site read responses."""
    async with httpx.AsyncClient(base_url=open_daemon.http_url, timeout=scaled(30)) as http:
        pre = await http.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://evil.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert "access-control-allow-origin" not in {k.lower() for k in pre.headers}
        got = await http.get("/health", headers={"Origin": "https://evil.example"})
        assert got.status_code == 200 and "access-control-allow-origin" not in {k.lower() for k in got.headers}


# ------------------------------------------------------------------ local users


def _modes_under(var: Path) -> dict[str, str]:
    """Every folder under `var` (itself included) with its permission bits, in octal."""
    folders = [var, *(p for p in var.rglob("*") if p.is_dir())]
    return {str(p.relative_to(var.parent)): oct(p.stat().st_mode & 0o777) for p in folders}


def test_var_folders_are_private_even_when_they_existed_looser(daemon_factory) -> None:
    """Folders under var/ that a previous run left 0755 are 0700 once the daemon runs, so another local user cannot list session ids."""
    d = daemon_factory(start=False)
    for sub in ("", "sessions", "keys", "models", "logs"):
        (d.var_dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d.var_dir / sub, 0o755)
    d.start()
    modes = _modes_under(d.var_dir)
    assert modes and all(mode == "0o700" for mode in modes.values()), modes
    assert "tightening permissions" in d.log()


def test_var_folder_of_another_user_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    """A var/sessions folder owned by another user stops the start with a message naming it, instead of serving from it."""
    if os.getuid() != 0:
        pytest.skip("needs root to give a folder to another user")
    var = tmp_path / "var"
    (var / "sessions").mkdir(parents=True)
    os.chown(var / "sessions", 4242, 4242)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "llmws.py"),
            "--port",
            "0",
            "--http-port",
            "0",
            "--var-dir",
            str(var),
            "--models-dir",
            str(tmp_path / "models"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert proc.returncode != 0
    assert "belongs to another user" in proc.stderr and "sessions" in proc.stderr, proc.stderr[-2000:]


def test_a_folder_that_cannot_be_made_private_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When chmod fails the daemon does not run with a world-readable folder: it stops and says what to fix."""
    from llmws_core.sessions import crypto

    folder = tmp_path / "sessions"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)

    def refuse(path: Any, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(crypto.os, "chmod", refuse)
    with pytest.raises(SystemExit) as stopped:
        crypto.private_dir(folder)
    assert str(folder) in str(stopped.value) and "chmod 700" in str(stopped.value)


async def test_a_session_resumes_only_with_the_key_that_created_it(keyed: DaemonProcess) -> None:
    """A session made with one user key is unknown to another user key, to the admin key and to a request without key; its own key resumes it."""
    owner = await Peer.open(keyed.ws_url, {"api_key": USER_KEY})
    sid = owner.welcome["session_id"]
    await owner.infer("Say hi.", "mine", temperature=0, max_new_tokens=3)
    await owner.close()
    for key in (OTHER_KEY, ADMIN_KEY):
        other = await Peer.open(keyed.ws_url, {"session_id": sid, "last_seq": 0, "api_key": key})
        assert other.welcome["resumed"] is False and other.welcome["session_id"] != sid
        assert other.welcome["history_messages"] == 0
        notice = await other.recv()
        assert notice["code"] == "session_not_resumed" and "No session" in notice["message"]
        await other.close()
    again = await Peer.open(keyed.ws_url, {"session_id": sid, "last_seq": 0, "api_key": USER_KEY})
    assert again.welcome["resumed"] is True and again.welcome["history_messages"] == 2
    await again.close()
    # The HTTP door's session-backed stream follows the same rule: another key gets a
    # stateless reply (nash's protocol echoes the id it was given), never that
    # session's events.
    async with httpx.AsyncClient(base_url=keyed.http_url, timeout=scaled(120)) as http:
        got = await http.post(
            "/v1/chat/completions/stream",
            headers={"X-API-Key": OTHER_KEY, "Last-Event-ID": "0"},
            json={"messages": [{"role": "user", "content": "Say hi."}], "session_id": sid, "max_tokens": 3},
        )
        assert got.status_code == 200
        assert '"content"' in got.text and "mine" not in got.text  # a new reply, not the replay


# ------------------------------------------------------------------ web pages


EVIL = "https://evil.example"
CROSS_SITE = [
    {"Origin": EVIL},
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},  # an <img> or <script> tag
    {"Sec-Fetch-Site": "same-site"},  # another port of localhost
    {"Origin": "null"},  # a sandboxed frame: any site can make one
]


async def test_cross_site_requests_that_generate_or_change_state_are_refused(open_daemon: DaemonProcess) -> None:
    """A page of another site cannot make the daemon generate (GET included) or switch models; each refusal is a 403 in the route's own error shape."""
    async with httpx.AsyncClient(base_url=open_daemon.http_url, timeout=scaled(60)) as http:
        for headers in CROSS_SITE:
            got = await http.get("/chat/blocking", params={"prompt": "hi", "max_tokens": 2}, headers=headers)
            assert got.status_code == 403 and got.json()["code"] == "forbidden", (headers, got.text)
            got = await http.get("/chat/stream", params={"prompt": "hi", "max_tokens": 2}, headers=headers)
            assert got.status_code == 403, headers
            got = await http.post(
                "/v1/chat/completions",
                headers=headers,
                json={"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            assert got.status_code == 403 and got.json()["error"]["type"], (headers, got.text)
            got = await http.post("/setModel", headers=headers, json={"model": "nope.gguf"})
            assert got.status_code == 403, headers
        # Pages a link may open stay reachable.
        assert (await http.get("/ui", headers=CROSS_SITE[1])).status_code == 200
        assert (await http.get("/health", headers={"Origin": EVIL})).status_code == 200


async def test_own_origin_and_non_browser_clients_are_served(open_daemon: DaemonProcess) -> None:
    """The daemon's own pages (its Origin, same-origin fetches) and curl-like clients (no browser headers) still generate."""
    own = {"Origin": open_daemon.http_url, "Sec-Fetch-Site": "same-origin"}
    async with httpx.AsyncClient(base_url=open_daemon.http_url, timeout=scaled(120)) as http:
        for headers in (own, {}, {"Sec-Fetch-Site": "none"}):
            got = await http.get("/chat/blocking", params={"prompt": "hi", "max_tokens": 2}, headers=headers)
            assert got.status_code == 200, (headers, got.text)


async def test_ui_cannot_be_framed_and_runs_only_its_own_scripts(open_daemon: DaemonProcess) -> None:
    """/ui forbids framing (X-Frame-Options and frame-ancestors) and its CSP allows only the daemon's own scripts, the page's inline ones by hash."""
    async with httpx.AsyncClient(base_url=open_daemon.http_url, timeout=scaled(30)) as http:
        got = await http.get("/ui")
    assert got.status_code == 200 and "<script" in got.text
    assert got.headers["x-frame-options"] == "DENY"
    csp = {d.split()[0]: d.split()[1:] for d in got.headers["content-security-policy"].split("; ")}
    assert csp["frame-ancestors"] == ["'none'"] and csp["default-src"] == ["'none'"]
    scripts = csp["script-src"]
    assert "'unsafe-inline'" not in scripts and "'unsafe-eval'" not in scripts
    assert "'self'" in scripts and any(s.startswith("'sha256-") for s in scripts)


async def test_no_conversation_text_in_the_log_at_debug(keyed: DaemonProcess) -> None:
    """At --log-level DEBUG the log holds no system prompt, prompt or reply text (the transport's frame dumps are off)."""
    secret_system, secret_user = "zebra-system-8841", "quokka-prompt-5519"
    peer = await Peer.open(keyed.ws_url, {"api_key": USER_KEY})
    # Short frames: a transport that dumps frames would show them whole.
    await peer.send({"type": "config", "data": {"system": secret_system}})
    await peer.until("config_ack", 30)
    reply, events = await peer.infer(secret_user, "z", temperature=0, max_new_tokens=12)
    await peer.close()
    await asyncio.sleep(0.5)
    log = keyed.log_path.read_text(errors="replace")
    assert "DEBUG" in log, "the daemon did not log at DEBUG: nothing was checked"
    for text in (secret_system, secret_user):
        assert text not in log, f"{text!r} is in the log"
    tokens = [e["data"] for e in events if e["type"] == "token"]
    assert tokens and not any(f'"data":{json.dumps(t)}' in log for t in tokens), "reply text is in the log"
    assert "TEXT '" not in log, "frames are dumped into the log"


def _start_fails(tmp_path: Path, config: dict[str, Any], *args: str) -> str:
    """Start a daemon that must refuse to start; return its stderr."""
    (tmp_path / "c.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k not in ("LLMWS_API_KEYS", "LLMWS_ADMIN_KEYS")}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "llmws.py"),
            "--config",
            str(tmp_path / "c.json"),
            "--port",
            "0",
            "--http-port",
            "0",
            "--var-dir",
            str(tmp_path / "var"),
            "--models-dir",
            str(tmp_path / "models"),
            *args,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert proc.returncode != 0, proc.stderr[-2000:]
    return proc.stderr


def test_an_empty_or_short_key_does_not_count_as_a_key(tmp_path: Path) -> None:
    """`api_keys: [""]` with a 0.0.0.0 bind, or a one-character key, stops the start with a message about the key length."""
    for keys in ([""], ["x"]):
        err = _start_fails(tmp_path, {"security": {"api_keys": keys}}, "--host", "0.0.0.0")
        assert "at least 16 characters" in err, err[-2000:]


def test_require_api_key_on_loopback_without_keys_says_so(tmp_path: Path) -> None:
    """require_api_key without any key on loopback is refused with a message about require_api_key, not about binding beyond loopback."""
    err = _start_fails(tmp_path, {"security": {"require_api_key": True}})
    assert "require_api_key" in err and "beyond loopback" not in err, err[-2000:]
