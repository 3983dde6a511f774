"""The model service: list, resolve, switch (with its broadcast), delete, download,
estimate, status, and the initial load.

Every door that lists or switches models calls this, so a switch from HTTP tells
the WebSocket clients (`model_switched`, with the new `max_context`) exactly as a
switch from the WebSocket does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import errors

if TYPE_CHECKING:
    from ..chat import ChatService
    from ..config import Settings
    from ..engine.download import DownloadManager
    from ..engine.manager import ModelManager
    from ..engine.scan import ModelEntry
    from ..sessions.store import Session

logger = logging.getLogger("llmws.services.models")


class ModelService:
    """Which models there are, which one serves, and switching between them."""

    def __init__(self, models: ModelManager, chat: ChatService, settings: Settings) -> None:
        self._models = models
        self._chat = chat
        self._settings = settings
        self._downloads: DownloadManager | None = None

    @property
    def downloads(self) -> DownloadManager:
        """The download manager, built on first use (it imports huggingface_hub)."""
        if self._downloads is None:
            from ..engine.download import DownloadManager

            limits = self._settings.limits
            self._downloads = DownloadManager(
                self._models.dirs,
                max_concurrent=limits.max_downloads,
                min_free_bytes=limits.min_free_disk_mb * 2**20,
                max_bytes=limits.max_download_mb * 2**20 if limits.max_download_mb else None,
            )
        return self._downloads

    async def close(self) -> None:
        """Stop running downloads (at shutdown)."""
        if self._downloads is not None:
            try:
                await self._downloads.close()
            except Exception:
                logger.exception("closing the download manager failed")

    # ------------------------------------------------------------------ queries

    def info(self) -> dict[str, Any] | None:
        """The loaded model's public description (None before one is loaded)."""
        return self._models.model_info()

    @property
    def name(self) -> str | None:
        """The loaded model's name (as its backend reports it)."""
        info = self.info()
        return info.get("name") if info else None

    @property
    def current(self) -> str | None:
        """The loaded model's entry name (as listed), None before one is loaded."""
        entry = self._models.entry
        return entry.name if entry is not None else None

    @property
    def max_context(self) -> int | None:
        return self._models.max_context

    @property
    def loading(self) -> str | None:
        """The model being loaded now, if any."""
        return self._models.loading

    @property
    def queue_depth(self) -> int:
        return self._models.queue.depth

    @property
    def running(self) -> int:
        return self._models.queue.running

    def cache_stats(self) -> dict[str, int]:
        """The loaded model's prompt-prefix cache counters ({} for a backend without one)."""
        return dict(getattr(self._models.backend, "cache_stats", None) or {})

    async def list(self) -> list[dict[str, Any]]:
        """Every local model (both folders, the embedded one) and the remote ones (scanned in a worker thread)."""
        return await asyncio.to_thread(self._models.list_models)

    def is_remote(self, name: str | None) -> bool:
        return self._models.is_remote(name)

    async def resolve(self, name: str) -> ModelEntry:
        """The model `name` names (a scan of the model folders, in a worker thread).

        Raises:
            ModelNotFound, Forbidden: no such model, or a path outside the model folders.
        """
        return await asyncio.to_thread(self._models.resolve, name)

    # ------------------------------------------------------------------ changes

    async def switch(
        self,
        entry: ModelEntry,
        *,
        origin: Session | None = None,
        extra: dict[str, Any] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Load `entry`, make it current and tell every connected WebSocket client.

        Returns the `model_switched` event body (model, max_context). `origin` (the
        asking session) also gets it when no client is connected to it, with `extra`
        (its request_id) merged in."""
        await self._models.load(entry, on_progress)
        event = {"type": "model_switched", "model": self.info(), "max_context": self.max_context}
        self._chat.broadcast(event, origin=origin, extra=extra)
        return event

    async def delete(self, name: str) -> ModelEntry:
        """Delete a model's files (never the loaded model's; see `ModelDirs.delete`)."""
        loaded = self._models.entry.path if self._models.entry else None
        return await asyncio.to_thread(self._models.dirs.delete, name, loaded)

    async def estimate(self, name: str) -> tuple[ModelEntry, dict[str, Any]]:
        """The memory estimate of a local model (KV bytes per token, the context it can hold).

        Raises:
            Unsupported: a remote model (it has no local memory).
        """
        from ..engine.memory import estimate_for_entry

        entry = await self.resolve(name)
        if entry.backend == "litellm":
            raise errors.Unsupported("Remote models have no local memory estimate.")
        est = await asyncio.to_thread(estimate_for_entry, entry)
        return entry, est.public()

    async def load_initial(self) -> None:
        """Load the auto-selected model; if it fails, try the other models found and
        finally the embedded default, so the daemon always starts serving something."""
        from ..engine.scan import embedded_entry

        try:
            first = self._models.initial_entry()
        except errors.LLMWSError as exc:
            logger.error("configured model unusable: %s", exc.message)
            first = None
        candidates = [first] if first is not None else []
        try:
            found = await asyncio.to_thread(self._models.dirs.scan)
        except Exception:
            logger.exception("scanning the model folders failed")
            found = []
        chat_models = [e for e in found if e.kind == "chat"]
        candidates += sorted(chat_models, key=lambda e: (e.source != "models", e.name.lower()))
        embedded = embedded_entry()
        if embedded is not None:
            candidates.append(embedded)
        tried: set[str] = set()
        for entry in candidates:
            if str(entry.path) in tried:
                continue
            tried.add(str(entry.path))
            try:
                await self._models.load(entry)
                return
            except errors.LLMWSError as exc:
                logger.error("could not load %s: %s; trying the next model", entry.name, exc.message)
        logger.warning("no model could be loaded: waiting for a download or switch_model")

    async def serve_request_model(self, name: str | None, *, may_switch: bool) -> str | None:
        """Make the model a request names serve it; the name to pass per request, if remote.

        Names that are no local model (an SDK's default "gpt-4o", say) are served by
        the loaded model, as llama.cpp's server and LM Studio do. A configured remote
        model is served per request by its own backend (returned). Switching to
        another local model needs `may_switch` (the admin right).

        Raises:
            Forbidden: the name is another local model and the caller may not switch.
        """
        if not name:
            return None
        if self._models.is_remote(name):
            return name
        current = self._models.entry
        if current is not None and name in (current.name, current.rel_path):
            return None
        try:
            entry = await self.resolve(name)
        except (errors.ModelNotFound, errors.Forbidden):
            return None
        if current is not None and entry.path == current.path:
            return None
        if not may_switch:
            raise errors.Forbidden("Switching the model needs the admin key.")
        logger.info("request names %s: switching the model", entry.name)
        await self.switch(entry)
        return None
