"""The LiteLLM backend and the router, against local upstreams only (no internet).

Unit-level tests drive `LiteLLMBackend` in this process against a tiny recording
OpenAI-compatible server started here; the daemon tests use two real LLMWS daemons
(their HTTP adapters' `/v1`) as upstreams of a third, the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

# Before anything imports LiteLLM: its cost map comes from the package, not GitHub.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

pytest.importorskip("litellm")

from llmws_core import errors  # noqa: E402
from llmws_core.config import RemoteModel, Settings  # noqa: E402
from llmws_core.engine.backends.base import GenerationParams  # noqa: E402
from llmws_core.engine.backends.litellm import (  # noqa: E402
    HELICONE_OPENAI_BASE,
    LiteLLMBackend,
    helicone_call_settings,
)
from llmws_core.engine.manager import ModelManager  # noqa: E402

from ..conftest import DaemonProcess, scaled  # noqa: E402
from ..wire import Peer, text_of  # noqa: E402

PROMPT = "Name one colour."

# LiteLLM's own typing trips a pydantic warning the first time a stream is built;
# it is not ours to fix, and the suite turns warnings into errors.
pytestmark = pytest.mark.filterwarnings("ignore:Items? .* (is|are) using the `ReadOnly` qualifier:UserWarning")


# --------------------------------------------------------------------------- a recording upstream


class Upstream:
    """A small OpenAI-compatible server that records every request's headers and body.

    `reply` chunks are streamed `delay` seconds apart; `status` (with `error_body`)
    makes every request fail instead. `disconnected` is set when a client closes a
    stream before it ended.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.reply = ["Blue", " is", " a", " colour", "."]
        self.delay = 0.0
        self.status = 200
        self.error_body: dict[str, Any] = {}
        self.disconnected = threading.Event()
        self.chunks_sent = 0
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with upstream.lock:
                    upstream.requests.append(
                        {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                    )
                if upstream.status != 200:
                    data = json.dumps(
                        upstream.error_body or {"error": {"message": "nope", "type": "server_error"}}
                    ).encode()
                    self.send_response(upstream.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    for piece in upstream.reply:
                        self._event({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                        upstream.chunks_sent += 1
                        if upstream.delay:
                            time.sleep(upstream.delay)
                    self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                    self._event(
                        {
                            "choices": [],
                            "usage": {
                                "prompt_tokens": 7,
                                "completion_tokens": len(upstream.reply),
                                "total_tokens": 7 + len(upstream.reply),
                            },
                        }
                    )
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    upstream.disconnected.set()

            def _event(self, payload: dict[str, Any]) -> None:
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "rec", **payload}
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """A recording OpenAI-compatible upstream on a free port."""
    up = Upstream()
    up.thread.start()
    yield up
    up.server.shutdown()
    up.server.server_close()


def make_backend(
    up: Upstream, *, name: str = "rec", key_env: str | None = None, env: dict[str, str] | None = None
) -> LiteLLMBackend:
    backend = LiteLLMBackend(
        RemoteModel(name=name, model="openai/rec", api_base=up.base, api_key_env=key_env, max_context=4096),
        env=env if env is not None else {},
    )
    backend.load()
    return backend


def run(backend: LiteLLMBackend, cancelled: Callable[[], bool] = lambda: False, **params: Any) -> tuple[str, Any]:
    pieces: list[str] = []
    result = backend.generate(
        [{"role": "user", "content": PROMPT}],
        GenerationParams(max_new_tokens=16, temperature=0, **params),
        pieces.append,
        cancelled,
    )
    return "".join(pieces), result


# --------------------------------------------------------------------------- backend, in process


def test_streams_tokens_and_usage(upstream: Upstream) -> None:
    """A remote model's reply arrives piece by piece, with the upstream's token counts."""
    text, result = run(make_backend(upstream))
    assert text == "Blue is a colour."
    assert result.finish_reason == "stop"
    assert (result.tokens_in, result.tokens_out) == (7, 5)
    body = upstream.requests[0]["body"]
    assert body["stream"] is True and body["max_tokens"] == 16 and body["temperature"] == 0


def test_response_format_is_passed_on(upstream: Upstream) -> None:
    """A remote model gets the request's response_format as sent, and none when there is none."""
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}
    run(make_backend(upstream), response_format=fmt)
    run(make_backend(upstream))
    assert upstream.requests[0]["body"]["response_format"] == fmt
    assert "response_format" not in upstream.requests[1]["body"]


def test_concurrent_requests_carry_their_own_keys(upstream: Upstream) -> None:
    """Two concurrent requests for models with different API keys each send their own key."""
    upstream.delay = 0.05
    env = {"KEY_A": "sk-aaa", "KEY_B": "sk-bbb"}
    a = make_backend(upstream, name="a", key_env="KEY_A", env=env)
    b = make_backend(upstream, name="b", key_env="KEY_B", env=env)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(run, backend, seed=i) for i, backend in enumerate([a, b] * 4)]
        for f in futures:
            assert f.result()[0] == "Blue is a colour."
    seen = {(r["body"]["seed"] % 2, r["headers"]["authorization"]) for r in upstream.requests}
    assert seen == {(0, "Bearer sk-aaa"), (1, "Bearer sk-bbb")}


def test_cancel_closes_the_upstream_stream(upstream: Upstream) -> None:
    """Cancelling a remote generation stops it and hangs up on the upstream."""
    upstream.reply = [f" w{i}" for i in range(200)]
    upstream.delay = 0.02
    backend = make_backend(upstream)
    got: list[str] = []
    result = backend.generate(
        [{"role": "user", "content": PROMPT}],
        GenerationParams(max_new_tokens=16, temperature=0),
        got.append,
        lambda: len(got) >= 2,
    )
    assert result.finish_reason == "cancelled"
    assert len(got) == 2
    assert upstream.disconnected.wait(scaled(10)), "the upstream kept streaming to nobody"
    assert upstream.chunks_sent < 200


@pytest.mark.parametrize(
    ("status", "body", "expected", "code"),
    [
        (
            401,
            {"error": {"message": "Incorrect API key sk-secret", "type": "invalid_request_error"}},
            errors.GenerationError,
            "generation_failed",
        ),
        (429, {"error": {"message": "slow down", "type": "rate_limit"}}, errors.Busy, "busy"),
        (
            404,
            {"error": {"message": "model rec does not exist", "type": "invalid_request_error"}},
            errors.ModelNotFound,
            "model_not_found",
        ),
        (
            400,
            {
                "error": {
                    "message": "This model's maximum context length is 4096 tokens",
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                }
            },
            errors.ContextTooLong,
            "context_too_long",
        ),
        (
            500,
            {"error": {"message": "boom at /srv/secret", "type": "server_error"}},
            errors.GenerationError,
            "generation_failed",
        ),
    ],
)
def test_upstream_errors_become_safe_project_errors(
    upstream: Upstream, status: int, body: dict[str, Any], expected: type, code: str
) -> None:
    """An upstream failure reaches the client as the project's error, without the provider's text."""
    upstream.status, upstream.error_body = status, body
    backend = make_backend(upstream)
    with pytest.raises(expected) as info:
        run(backend)
    wire = errors.to_wire(info.value)
    assert wire["code"] == code
    assert "secret" not in json.dumps(wire) and "boom" not in json.dumps(wire)


def test_unreachable_upstream_is_a_generation_error() -> None:
    """A remote model whose server is down fails with a clear error, not a traceback."""
    backend = LiteLLMBackend(
        RemoteModel(name="down", model="openai/x", api_base="http://127.0.0.1:9/v1", max_context=2048), env={}
    )
    backend.load()
    with pytest.raises(errors.GenerationError) as info:
        run(backend)
    assert "could not be reached" in info.value.message


def test_helicone_headers_and_session_id(upstream: Upstream) -> None:
    """With HELICONE_API_KEY, requests carry Helicone's auth and the LLMWS session id."""
    env = {"HELICONE_API_KEY": "hk-123"}
    backend = make_backend(upstream, env=env)
    run(backend, cache_key="session-42")
    run(backend)  # a stateless request has no session
    first, second = (r["headers"] for r in upstream.requests)
    assert first["helicone-auth"] == "Bearer hk-123"
    assert first["helicone-session-id"] == "session-42"
    assert second["helicone-auth"] == "Bearer hk-123" and "helicone-session-id" not in second
    run(make_backend(upstream))  # without the key: no Helicone headers at all
    assert "helicone-auth" not in upstream.requests[-1]["headers"]


def test_helicone_gateway_for_openai_models(upstream: Upstream) -> None:
    """OpenAI-type models without their own base URL go through Helicone's gateway."""
    assert helicone_call_settings("openai/gpt-4o-mini", None, "s", {"HELICONE_API_KEY": "k"})[0] == HELICONE_OPENAI_BASE
    assert helicone_call_settings("openai/gpt-4o-mini", None, "s", {})[0] is None
    assert (
        helicone_call_settings("hosted_vllm/m", "http://vllm:8000/v1", "s", {"HELICONE_API_KEY": "k"})[0]
        == "http://vllm:8000/v1"
    )
    # HELICONE_BASE_URL (a self-hosted Helicone) replaces the public gateway: here, the recorder.
    env = {"HELICONE_API_KEY": "hk", "HELICONE_BASE_URL": upstream.base, "OPENAI_KEY": "sk-o"}
    backend = LiteLLMBackend(RemoteModel(name="oai", model="openai/gpt-4o-mini", api_key_env="OPENAI_KEY"), env=env)
    backend.load()
    assert backend.info.max_context == 128000  # from LiteLLM's bundled model data
    text, _ = run(backend, cache_key="s1")
    assert text == "Blue is a colour."
    headers = upstream.requests[-1]["headers"]
    assert headers["helicone-auth"] == "Bearer hk" and headers["authorization"] == "Bearer sk-o"


def test_missing_key_variable_fails_the_load_by_name() -> None:
    """A remote model whose key variable is unset refuses to load and names the variable."""
    backend = LiteLLMBackend(RemoteModel(name="m", model="openai/x", api_key_env="NOT_SET_ANYWHERE"), env={})
    with pytest.raises(errors.ModelLoadError, match="NOT_SET_ANYWHERE"):
        backend.load()


def test_context_limit_falls_back_to_8192(upstream: Upstream) -> None:
    """A self-hosted model LiteLLM does not know gets 8192 tokens of context unless configured."""
    backend = LiteLLMBackend(RemoteModel(name="m", model="hosted_vllm/my-finetune", api_base=upstream.base), env={})
    backend.load()
    assert backend.info.max_context == 8192
    assert backend.count_tokens([{"role": "user", "content": "hello world"}]) > 2


async def test_manager_lists_and_serves_remote_models_per_request(upstream: Upstream, tmp_path: Any) -> None:
    """Remote models are listed with backend litellm and can serve one request without a switch."""
    settings = Settings.model_validate(
        {
            "paths": {"var_dir": str(tmp_path / "var"), "models_dir": str(tmp_path / "models")},
            "remote_models": [{"name": "rec", "model": "openai/rec", "api_base": upstream.base, "max_context": 4096}],
        }
    )
    manager = ModelManager(settings)
    listed = {m["name"]: m for m in manager.list_models()}
    assert listed["rec"]["backend"] == "litellm" and listed["rec"]["format"] == "remote"
    assert listed["rec"]["loaded"] is False and "api_base" not in listed["rec"]
    assert manager.resolve("rec").backend == "litellm"
    backend = await manager.backend_for("remote/rec")
    assert backend is await manager.backend_for("rec")  # cached
    async with manager.use(model="rec") as held:
        text, _ = await asyncio.to_thread(run, held)  # type: ignore[arg-type]
    assert text == "Blue is a colour."
    with pytest.raises(errors.ModelNotFound):
        await manager.backend_for("no-such-model")
    await manager.close()


async def test_router_skips_a_dead_upstream_and_forwards_helicone_headers(
    upstream: Upstream, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A router model retries on a live upstream when another is down, with Helicone's headers."""
    monkeypatch.setenv("HELICONE_API_KEY", "hk-r")
    router = {
        "model_list": [
            {
                "model_name": "g",
                "litellm_params": {
                    "model": "openai/dead",
                    "api_base": "http://127.0.0.1:9/v1",
                    "api_key": "x",
                    "weight": 100,
                },
            },
            {
                "model_name": "g",
                "litellm_params": {"model": "openai/live", "api_base": upstream.base, "api_key": "x", "weight": 1},
            },
        ],
        "num_retries": 3,
        "allowed_fails": 0,
        "cooldown_time": 300,
        "retry_after": 0,
    }
    settings = Settings.model_validate(
        {
            "paths": {"var_dir": str(tmp_path / "var"), "models_dir": str(tmp_path / "models")},
            "remote_models": [{"name": "g", "model": "router/g"}],
            "router": router,
        }
    )
    manager = ModelManager(settings)
    backend = await manager.backend_for("g")
    assert backend.info.max_context == 8192  # no max_context and unknown to LiteLLM
    for _ in range(2):
        text, result = await asyncio.to_thread(run, backend, cache_key="sess-9")  # type: ignore[arg-type]
        assert text == "Blue is a colour." and result.finish_reason == "stop"
    assert upstream.requests[-1]["headers"]["helicone-session-id"] == "sess-9"
    assert settings.router is not None and settings.router["model_list"][0]["model_name"] == "g", "config left intact"
    await manager.close()


def test_unknown_router_setting_is_refused() -> None:
    """A typo in the router section stops the load with a message naming it."""
    from llmws_core.engine.remote import build_router

    with pytest.raises(errors.ModelLoadError, match="num_retry"):
        build_router({"model_list": [{"model_name": "g", "litellm_params": {"model": "openai/x"}}], "num_retry": 2})


# --------------------------------------------------------------------------- daemons


def upstream_daemons(factory: Callable[..., DaemonProcess], n: int = 2) -> list[DaemonProcess]:
    return [factory() for _ in range(n)]


def gateway_config(upstreams: list[DaemonProcess]) -> dict[str, Any]:
    """A gateway whose current model is a router group over the upstreams' /v1.

    The first upstream weighs 100 times more, so the router nearly always tries it
    first: stopping it makes the next request fail over rather than luck out."""
    return {
        "model": {"path": "pool"},
        "remote_models": [{"name": "pool", "model": "router/pool", "max_context": 2048}],
        "router": {
            "model_list": [
                {
                    "model_name": "pool",
                    "litellm_params": {
                        "model": "openai/smollm2",
                        "api_base": u.http_url + "/v1",
                        "api_key": "unused",
                        "weight": 100 if i == 0 else 1,
                    },
                }
                for i, u in enumerate(upstreams)
            ],
            "num_retries": 3,
            "allowed_fails": 0,
            "cooldown_time": 300,
            "retry_after": 0,
        },
    }


async def infer(peer: Peer, rid: str) -> tuple[str, list[dict[str, Any]]]:
    return await peer.infer(PROMPT, request_id=rid, timeout=180, max_new_tokens=16, temperature=0)


@pytest.mark.slow
async def test_gateway_streams_fails_over_and_resumes(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """Through a gateway daemon, replies stream from upstream daemons, survive one upstream
    stopping with no error shown, and a client that drops mid-reply resumes without loss."""
    ups = upstream_daemons(daemon_factory)
    gw = daemon_factory(config=gateway_config(ups))
    peer = await Peer.open(gw.ws_url)
    sid = peer.welcome["session_id"]
    try:
        assert peer.welcome["model"]["backend"] == "litellm"
        await peer.send({"type": "list_models", "request_id": "lm"})
        models = (await peer.until("models_list"))[-1]["models"]
        assert any(m["name"] == "pool" and m["loaded"] and m["backend"] == "litellm" for m in models)
        first, events = await infer(peer, "r0")
        assert len([e for e in events if e["type"] == "token"]) > 1 and first.strip()
        ups[0].stop()
        for i in range(1, 4):
            await peer.send({"type": "reset"})
            await peer.until("reset_done")
            text, events = await infer(peer, f"r{i}")
            assert text == first, "every upstream serves the same greedy reply"
            assert not [e for e in events if e["type"] in ("error", "warning")]

        await peer.send(
            {
                "type": "inference",
                "prompt": "Tell me about the sea.",
                "request_id": "sea",
                "config": {"max_new_tokens": 16, "temperature": 0},
            }
        )
        before = await peer.until("token", 180, request_id="sea")
        last_seq = before[-1]["seq"]
    finally:
        await peer.close()  # gone mid-reply; the job goes on in the gateway

    again = await Peer.open(gw.ws_url, {"session_id": sid, "last_seq": last_seq})
    try:
        assert again.welcome["resumed"] is True
        after = await again.until("done", 180, request_id="sea")
        assert not [e for e in after if e.get("type") == "error"]
        assert after[0]["seq"] == last_seq + 1, "nothing missing at the seam"
        seqs = [e["seq"] for e in before + after if "seq" in e]
        assert seqs == sorted(set(seqs)), "no event twice, none out of order"
        got = text_of(before + after, "sea")
    finally:
        await again.close()
    full = await Peer.open(gw.ws_url, {"session_id": sid, "last_seq": 0})
    try:
        replay = await full.until("done", 60, request_id="sea")
        assert text_of(replay, "sea") == got and got
    finally:
        await full.close()


@pytest.mark.slow
async def test_per_request_remote_model_on_a_local_daemon(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """A daemon serving its local model lists a remote model and can be switched to it."""
    up = daemon_factory()
    gw = daemon_factory(
        config={
            "remote_models": [
                {"name": "up", "model": "openai/smollm2", "api_base": up.http_url + "/v1", "max_context": 2048}
            ]
        }
    )
    peer = await Peer.open(gw.ws_url)
    try:
        assert peer.welcome["model"]["backend"] == "llamacpp"
        local, _ = await infer(peer, "local")
        await peer.send({"type": "switch_model", "model_path": "up", "request_id": "sw"})
        switched = (await peer.until("model_switched", 120))[-1]
        assert switched["model"]["backend"] == "litellm" and switched["max_context"] == 2048
        await peer.send({"type": "reset"})
        await peer.until("reset_done")
        remote, _ = await infer(peer, "remote")
        assert remote == local, "the upstream runs the same model greedily"
    finally:
        await peer.close()


def _per_request_model_wired() -> bool:
    """Whether the chat service routes a request's `model` (the diff in issue 6's report)."""
    import inspect

    from llmws_core.chat import ChatService

    return "model" in inspect.signature(ChatService.generate).parameters


@pytest.mark.slow
@pytest.mark.skipif(not _per_request_model_wired(), reason="chat.py does not pass a request's model yet")
async def test_request_model_selects_a_remote_model_for_one_request(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    """A WebSocket or OpenAI request naming a remote model is served by it, and the local model stays loaded."""
    import httpx

    up = daemon_factory()
    gw = daemon_factory(
        config={
            "remote_models": [
                {"name": "up", "model": "openai/smollm2", "api_base": up.http_url + "/v1", "max_context": 2048}
            ]
        }
    )
    peer = await Peer.open(gw.ws_url)
    try:
        await peer.send(
            {
                "type": "inference",
                "prompt": PROMPT,
                "request_id": "r",
                "model": "up",
                "config": {"max_new_tokens": 16, "temperature": 0},
            }
        )
        events = await peer.until("done", 180, request_id="r")
        assert not [e for e in events if e["type"] == "error"] and text_of(events, "r")
        await peer.send({"type": "inference", "prompt": PROMPT, "request_id": "bad", "model": "nope"})
        bad = (await peer.until("error", 60, request_id="bad"))[-1]
        assert bad["code"] == "model_not_found"
        await peer.send({"type": "get_status"})
        status = (await peer.until("status"))[-1]
        assert status["model"]["backend"] == "llamacpp", "a per-request model does not switch the daemon"
    finally:
        await peer.close()
    async with httpx.AsyncClient(timeout=scaled(180)) as http:
        r = await http.post(
            gw.http_url + "/v1/chat/completions",
            json={"model": "up", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "up" and r.json()["choices"][0]["message"]["content"]
        # The nash streaming route too: the upstream daemon serves it.
        served = await _generations(http, up)
        r = await http.post(
            gw.http_url + "/v1/chat/completions/stream",
            json={"model": "up", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        data = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
        assert data[-1] == "[DONE]" and any("content" in json.loads(d) for d in data[:-1])
        assert await _generations(http, up) == served + 1


async def _generations(http: Any, daemon: DaemonProcess) -> float:
    text = (await http.get(daemon.http_url + "/metrics")).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("llmws_generations_total ")))
