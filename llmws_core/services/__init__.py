"""The services every door calls: generation (chat replies), and the features written
once for all doors (tool calls, JSON mode, length warnings, summaries).

A door parses its wire format into the typed requests defined here and renders the
typed events it gets back; it never imports engine code or the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass

from .generation import GenerationService
from .models import ModelService
from .responses import ResponseService


@dataclass
class Services:
    """The services one daemon offers its doors."""

    generation: GenerationService
    models: ModelService
    #: Stored, resumable responses (OpenAI's Responses API).
    responses: ResponseService
