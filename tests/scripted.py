"""A scripted backend for tests that need exact tokens and timing: it "generates" the
pieces it is given, one callback each, and can wait at a gate before each piece.

Tests of what users see use the real embedded model; this one is for the service
and protocol logic in between (what is held back, when a cancel lands, ...).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from llmws_core import errors
from llmws_core.engine.backends.base import (
    Backend,
    CancelCheck,
    GenerationParams,
    GenerationResult,
    Message,
    ModelInfo,
    TokenCallback,
)
from llmws_core.engine.manager import ModelManager
from llmws_core.engine.scan import ModelEntry


class ScriptedBackend(Backend):
    """Replies with `pieces`; a prompt costs one token per word. `gate`, when given, must
    be set before each piece from index `gate_from` on goes out; `fail_after` raises
    after that many pieces."""

    name = "scripted"

    def __init__(
        self,
        pieces: Sequence[str],
        *,
        max_context: int = 4096,
        grammar: bool = False,
        gate: threading.Event | None = None,
        gate_from: int = 0,
        fail_after: int | None = None,
    ) -> None:
        self.pieces = list(pieces)
        self.gate = gate
        self.gate_from = gate_from
        self.fail_after = fail_after
        self.supports_grammar = grammar
        self.info = ModelInfo(
            name="scripted", path="scripted", format="gguf", backend="scripted", max_context=max_context
        )
        self.seen: list[GenerationParams] = []

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return sum(len(str(m.get("content") or "").split()) + 2 for m in messages)

    def generate(
        self, messages: Sequence[Message], params: GenerationParams, on_token: TokenCallback, cancelled: CancelCheck
    ) -> GenerationResult:
        self.seen.append(params)
        n_in = self.count_tokens(messages)
        out = 0
        for i, piece in enumerate(self.pieces[: params.max_new_tokens]):
            while self.gate is not None and i >= self.gate_from and not self.gate.wait(0.01):
                if cancelled():
                    return GenerationResult("cancelled", n_in, out)
            if cancelled():
                return GenerationResult("cancelled", n_in, out)
            if self.fail_after is not None and out >= self.fail_after:
                raise RuntimeError("scripted failure with a secret path /etc/shadow")
            on_token(piece)
            out += 1
        reason = "length" if len(self.pieces) > params.max_new_tokens else "stop"
        return GenerationResult(reason, n_in, out)


async def scripted_manager(settings, backend: ScriptedBackend, models_dir: Path) -> ModelManager:  # type: ignore[no-untyped-def]
    """A model manager whose one model is `backend`, loaded."""
    manager = ModelManager(settings, factories={"scripted": lambda entry, s: backend})
    path = models_dir / "scripted.gguf"
    path.write_bytes(b"GGUF")
    entry = ModelEntry("scripted", path, "models/scripted.gguf", "gguf", "scripted", 0.0, "models")
    await manager.load(entry)
    return manager


__all__ = ["ScriptedBackend", "errors", "scripted_manager"]
