"""The services every door calls: generation (chat replies, and the features written
once for all doors: tool calls, JSON mode, length warnings, summaries), models and
sessions.

A door parses its wire format into the typed requests defined here and renders the
typed events it gets back; it never imports engine code or the daemon. The HTTP
app is built from a `Services`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .embeddings import EmbeddingService
from .generation import GenerationService
from .models import ModelService
from .responses import ResponseService
from .sessions import SessionService

if TYPE_CHECKING:
    from ..chat import Metrics
    from ..config import Settings
    from ..engine.download import DownloadManager


@dataclass
class Runtime:
    """What the running daemon knows about itself (set as it starts and serves)."""

    ws_port: int | None = None
    http_port: int | None = None
    #: Open WebSocket connections.
    connections: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def uptime_s(self) -> float:
        return round(time.monotonic() - self.started, 1)


@dataclass
class Services:
    """The services one daemon offers its doors."""

    settings: Settings
    generation: GenerationService
    models: ModelService
    embeddings: EmbeddingService
    sessions: SessionService
    #: Whether every request needs an API key (beyond loopback, or configured so).
    keys_required: bool
    #: Stored, resumable responses (OpenAI's Responses API).
    responses: ResponseService
    runtime: Runtime = field(default_factory=Runtime)

    @property
    def services(self) -> Services:
        """This object: routes written as `llmws(request).services.x` (when the HTTP
        side was handed the daemon) keep working."""
        return self

    @property
    def downloads(self) -> DownloadManager:
        """The download manager (see `ModelService.downloads`)."""
        return self.models.downloads

    @property
    def metrics(self) -> Metrics:
        """The generation counters (requests, tokens, TTFT, decode rates)."""
        return self.generation.chat.metrics

    def install_metrics(self, make: Callable[[Metrics], Metrics]) -> None:
        """Replace the generation counters with `make(current)` (a Prometheus-fed subclass)."""
        self.generation.chat.metrics = make(self.generation.chat.metrics)
