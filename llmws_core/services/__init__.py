"""The services every door calls: generation (chat replies), and the features written
once for all doors (tool calls, JSON mode, length warnings, summaries).

A door parses its wire format into the typed requests defined here and renders the
typed events it gets back; it never imports engine code or the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass

from .embeddings import EmbeddingService
from .generation import GenerationService
from .models import ModelService


@dataclass
class Services:
    """The services one daemon offers its doors."""

    generation: GenerationService
    models: ModelService
    embeddings: EmbeddingService
