"""Prometheus `GET /metrics`: requests, tokens, TTFT and decode-rate histograms, queue
depth, sessions, model memory.

Each app has a private `CollectorRegistry` (several daemons in one test process never
collide). Counters the generation service already keeps (`services.metrics`) and the
daemon's numbers are read at scrape time (the sessions folder is counted in a worker
thread); the histograms are fed by `PrometheusMetrics`, a `Metrics` that also
observes each finished generation, installed on the service at start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..chat import Metrics
from ..services.generation import GenerationResult

if TYPE_CHECKING:
    from ..services import Services

logger = logging.getLogger("llmws.http.metrics")

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class PrometheusMetrics(Metrics):
    """The chat service's Metrics, also observing Prometheus histograms."""

    def __init__(self, registry: CollectorRegistry, previous: Metrics | None = None) -> None:
        super().__init__()
        if previous is not None:
            self.__dict__.update({k: v for k, v in vars(previous).items() if k in vars(self)})
        self.ttft_hist = Histogram(
            "llmws_time_to_first_token_seconds",
            "Time from a generation's start (its turn at the model) to its first token.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.rate_hist = Histogram(
            "llmws_decode_tokens_per_second",
            "Decode rate of each generation after its first token.",
            buckets=RATE_BUCKETS,
            registry=registry,
        )
        self.finished = Counter(
            "llmws_generations_finished",
            "Finished generations by finish reason.",
            ["finish_reason"],
            registry=registry,
        )

    def record(self, result: GenerationResult, started: float, first_token: list[float]) -> None:
        now = time.perf_counter()
        super().record(result, started, first_token)
        self.finished.labels(result.finish_reason).inc()
        if first_token:
            self.ttft_hist.observe(max(0.0, first_token[0] - started))
            if result.tokens_out > 1 and now > first_token[0]:
                self.rate_hist.observe((result.tokens_out - 1) / (now - first_token[0]))


class StateCollector(Collector):
    """Values read from the services at scrape time (`refresh` first, on the loop)."""

    def __init__(self, app: Services) -> None:
        self.app = app
        self.sessions = 0

    async def refresh(self) -> None:
        """Read what needs the disk (the sessions folder), in a worker thread."""
        self.sessions = await self.app.sessions.count()

    def collect(self) -> Iterator[Any]:
        app = self.app
        m = app.metrics
        yield CounterMetricFamily("llmws_generations", "Generations started (both doors).", value=m.requests)
        yield CounterMetricFamily("llmws_prompt_tokens", "Prompt tokens of finished generations.", value=m.tokens_in)
        yield CounterMetricFamily(
            "llmws_completion_tokens", "Generated tokens of finished generations.", value=m.tokens_out
        )
        yield GaugeMetricFamily("llmws_queue_depth", "Requests waiting for the model.", value=app.models.queue_depth)
        yield GaugeMetricFamily("llmws_generations_running", "Generations running now.", value=app.models.running)
        yield GaugeMetricFamily("llmws_sessions", "Sessions on disk or in memory.", value=self.sessions)
        yield GaugeMetricFamily(
            "llmws_sessions_connected", "Sessions with a connected client.", value=app.sessions.connected
        )
        yield GaugeMetricFamily("llmws_session_jobs", "Session jobs waiting or running.", value=app.sessions.jobs)
        yield GaugeMetricFamily(
            "llmws_websocket_connections", "Open WebSocket connections.", value=app.runtime.connections
        )
        info = app.models.info()
        if info:
            yield InfoMetricFamily(
                "llmws_model",
                "The loaded model.",
                value={
                    "name": str(info.get("name")),
                    "backend": str(info.get("backend")),
                    "device": str(info.get("device")),
                    "quantization": str(info.get("quantization")),
                },
            )
            yield GaugeMetricFamily(
                "llmws_model_max_context_tokens",
                "Context the loaded model can hold.",
                value=info.get("max_context") or 0,
            )
            size = float(info.get("size_mb") or 0) * 2**20
            yield GaugeMetricFamily("llmws_model_weights_bytes", "Size of the loaded model's weights.", value=size)
            stats = app.models.cache_stats()
            if stats:
                # The prefix cache of the loaded model (counters restart with each load).
                yield CounterMetricFamily(
                    "llmws_prefix_prefilled_tokens",
                    "Prompt tokens the model evaluated.",
                    value=stats.get("prefilled", 0),
                )
                yield CounterMetricFamily(
                    "llmws_prefix_reused_tokens",
                    "Prompt tokens reused from a cached KV prefix instead of evaluated.",
                    value=stats.get("reused", 0),
                )
                yield CounterMetricFamily(
                    "llmws_prefix_restored_tokens",
                    "Of the reused tokens, those whose KV was loaded from the sealed prefix store on disk.",
                    value=stats.get("restored", 0),
                )
                yield CounterMetricFamily(
                    "llmws_prefix_stored",
                    "KV prefixes sealed to disk (evictions, unloads, /restore_cache).",
                    value=stats.get("stored", 0),
                )
                yield CounterMetricFamily(
                    "llmws_prefix_shared_tokens",
                    "Prompt tokens of the chat template's fixed start (no session's text) copied into new conversations instead of evaluated.",
                    value=stats.get("shared", 0),
                )
        try:
            import psutil

            rss = psutil.Process().memory_info().rss
        except Exception:  # psutil is a dependency; never fail a scrape over it
            rss = 0
        yield GaugeMetricFamily(
            "llmws_process_resident_memory_bytes",
            "Resident memory of the daemon (weights, KV cache, sessions).",
            value=rss,
        )


class RequestCounter:
    """ASGI middleware: HTTP requests by method, route template and status."""

    def __init__(self, asgi: ASGIApp, counter: Counter) -> None:
        self.asgi = asgi
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.asgi(scope, receive, send)
            return
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.asgi(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.counter.labels(scope.get("method", "?"), path, str(status[0])).inc()


def attach(api: FastAPI, app: Services) -> CollectorRegistry:
    """Give `app` a private registry, install the histogram-feeding Metrics, add /metrics."""
    registry = CollectorRegistry()
    app.install_metrics(lambda previous: PrometheusMetrics(registry, previous))
    state = StateCollector(app)
    registry.register(state)
    requests = Counter(
        "llmws_http_requests",
        "HTTP requests by method, route and status.",
        ["method", "route", "status"],
        registry=registry,
    )
    api.add_middleware(RequestCounter, counter=requests)
    api.state.metrics_registry = registry

    @api.get("/metrics", tags=["Status"], summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus text format (no key needed only when keys are off)."""
        from .auth import user_key

        await user_key(request)
        await state.refresh()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return registry
