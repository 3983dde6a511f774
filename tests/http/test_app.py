"""Status routes of the HTTP adapter: /health, /metrics, /openapi.json, /ui (keys off)."""

from __future__ import annotations

import httpx

from tests.conftest import DaemonProcess

EVERY_ROUTE = {
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/ui"),
    ("GET", "/ping"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/"),
    ("GET", "/models"),
    ("POST", "/setModel"),
    ("POST", "/chat/completions"),
    ("POST", "/restore_cache"),
    ("POST", "/v1/chat/completions/stream"),
    ("POST", "/v1/chat/summarize"),
    ("GET", "/v1/sessions/{session_id}/events"),
    ("POST", "/chat/blocking"),
    ("GET", "/chat/blocking"),
    ("POST", "/chat/stream"),
    ("GET", "/chat/stream"),
    ("POST", "/v1/mcp/{method}"),
}


def test_health_reports_model_and_ports(module_daemon: DaemonProcess, http: httpx.Client) -> None:
    """/health says ok, names the model and gives the WebSocket port."""
    body = http.get("/health").json()
    assert body["status"] == "ok"
    assert body["ws_port"] == module_daemon.ws_port
    assert body["model"]["name"].startswith("SmolLM2")
    assert body["max_context"] > 0


def test_metrics_expose_prometheus_series(http: httpx.Client) -> None:
    """/metrics is Prometheus text with requests, tokens, TTFT, decode rate, queue, sessions and memory."""
    http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0},
    )
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "llmws_http_requests_total",
        "llmws_generations_total",
        "llmws_completion_tokens_total",
        "llmws_prompt_tokens_total",
        "llmws_time_to_first_token_seconds_bucket",
        "llmws_decode_tokens_per_second_bucket",
        "llmws_queue_depth",
        "llmws_sessions",
        "llmws_model_weights_bytes",
        "llmws_process_resident_memory_bytes",
    ):
        assert name in text, name
    values = {
        line.split()[0]: float(line.split()[-1]) for line in text.splitlines() if line and not line.startswith("#")
    }
    assert values["llmws_generations_total"] >= 1
    assert values["llmws_time_to_first_token_seconds_count"] >= 1
    assert values['llmws_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}'] >= 1


def test_openapi_documents_every_route(http: httpx.Client) -> None:
    """/openapi.json lists every route of every surface."""
    spec = http.get("/openapi.json").json()
    listed = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    assert EVERY_ROUTE <= listed, EVERY_ROUTE - listed
    schemes = spec["components"]["securitySchemes"]
    assert {"APIKeyHeader", "HTTPBearer", "APIKeyQuery"} <= set(schemes)


def test_ui_serves_the_web_client(http: httpx.Client) -> None:
    """GET /ui serves the browser client's HTML."""
    r = http.get("/ui")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<html" in r.text.lower()
