"""schemathesis against the HTTP adapter's own `/openapi.json`: no request, valid or
not, may get a 5xx (an internal error is a bug; a refusal must be a 4xx).

Every operation is fuzzed with valid (positive) and invalid (negative) inputs. The
cost is bounded: token limits in bodies and queries are clamped to 2, so no request
starts a long generation on the shared test machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from ..conftest import DaemonProcess, scaled

schemathesis = pytest.importorskip("schemathesis")

#: Fields that set how many tokens a request may generate.
TOKEN_FIELDS = ("max_tokens", "max_new_tokens", "max_completion_tokens", "n_predict", "max_output_tokens")
#: Operations that run the model (fewer examples: each may generate).
GENERATING = ("chat", "completions", "summarize", "restore_cache", "blocking", "stream", "responses")


@pytest.fixture(scope="module")
def http_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon whose HTTP adapter is fuzzed; no MCP servers, no internet."""
    config = {
        "model": {"max_context_cap": 1024},
        "generation_defaults": {"max_new_tokens": 2},
        "mcp_servers": {},
    }
    env = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    d = DaemonProcess(tmp_path_factory.mktemp("openapi"), [], env, config)
    d.start()
    yield d
    d.kill()


def _clamp(value: Any) -> Any:
    """Cap every token-count field in a body or query at 2 (recursively)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in TOKEN_FIELDS and isinstance(item, (int, float)) and not isinstance(item, bool) and item > 2:
                item = 2
            elif key in TOKEN_FIELDS and isinstance(item, str) and item.strip().isdigit() and int(item) > 2:
                item = "2"
            elif key == "n" and isinstance(item, int) and not isinstance(item, bool) and item > 1:
                item = 1
            out[key] = _clamp(item)
        return out
    if isinstance(value, list):
        return [_clamp(v) for v in value]
    return value


def _describe(case: Any) -> str:
    return f"body={json.dumps(case.body, default=str)[:200]} query={str(case.query)[:200]}"


def _fuzz_operation(daemon: DaemonProcess, operation: Any, mode: Any, examples: int, failures: list[str]) -> int:
    """Run `examples` cases of one operation; record any 5xx. Returns the number of calls."""
    calls = [0]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # CI must be reproducible: the same cases every run
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        if isinstance(case.body, (dict, list)):
            case.body = _clamp(case.body)
        if case.query:
            case.query = _clamp(dict(case.query))
        try:
            response = case.call(base_url=daemon.http_url, timeout=scaled(90))
        except requests.exceptions.Timeout:
            failures.append(f"{operation.label} [{mode.value}] -> no answer in time\n  case: {_describe(case)}")
            return
        except requests.exceptions.RequestException as exc:  # the server cut the response off
            failures.append(
                f"{operation.label} [{mode.value}] -> aborted response ({type(exc).__name__})\n  case: {_describe(case)}"
            )
            return
        calls[0] += 1
        if response.status_code >= 500:
            body = response.text[:300] if hasattr(response, "text") else ""
            failures.append(
                f"{operation.label} [{mode.value}] -> {response.status_code}: {body}\n  case: {_describe(case)}"
            )

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (an operation without inputs)
        pass
    return calls[0]


@pytest.mark.slow
def test_no_request_to_the_http_adapter_gets_a_5xx(http_daemon: DaemonProcess) -> None:
    """Valid and invalid requests to every documented HTTP route are answered with 2xx-4xx, never 5xx."""
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{http_daemon.http_url}/openapi.json")
    failures: list[str] = []
    timings: list[tuple[float, str, str]] = []
    total = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations), [op.label for op in operations]
    for op in operations:
        generating = any(word in op.path for word in GENERATING)
        for mode, examples in (
            (GenerationMode.NEGATIVE, 4 if generating else 8),
            (GenerationMode.POSITIVE, 2 if generating else 5),
        ):
            t0 = time.monotonic()
            total += _fuzz_operation(http_daemon, op, mode, examples, failures)
            timings.append((round(time.monotonic() - t0, 1), op.label, mode.value))
    print("slowest operations:", sorted(timings, reverse=True)[:8])
    assert total > 100, f"only {total} requests were made"
    assert not failures, "5xx answers:\n" + "\n".join(failures[:20])
    assert http_daemon.proc is not None and http_daemon.proc.poll() is None, "the daemon died"


@pytest.mark.parametrize("path", ["/chat/stream", "/v1/chat/completions/stream"])
def test_invalid_history_on_a_stream_route_is_a_4xx_not_a_cut_stream(http_daemon: DaemonProcess, path: str) -> None:
    """A streaming request with a malformed history gets a 4xx answer, not a 200 whose body breaks off (found by the fuzzer)."""
    body = (
        {"prompt": "0", "history": [{}]}
        if path == "/chat/stream"
        else {"messages": [{"content": "x"}], "max_tokens": 2}
    )
    try:
        response = requests.post(http_daemon.http_url + path, json=body, timeout=scaled(60))
        status, complete = response.status_code, True
    except requests.exceptions.ChunkedEncodingError:
        status, complete = 200, False
    assert complete and 400 <= status < 500, f"{path}: status {status}, complete body: {complete}"
