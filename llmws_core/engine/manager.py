"""The model manager: which model is loaded, switching it safely, and fair access to it.

Generations hold a *use* of the current backend; a switch loads the new model in
a worker thread while the old one keeps serving, then waits for in-flight uses to
finish, swaps, and releases the old one. Access is FIFO across sessions: a
request that must wait learns its queue position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from .. import errors
from ..config import Settings
from .backends.base import Backend
from .embedding import EmbeddingModels
from .embedding import embedded_entry as embedded_embedder
from .prefixes import PrefixStore
from .remote import RemoteEntry, RemoteModels
from .scan import ModelDirs, ModelEntry, auto_select, embedded_entry

logger = logging.getLogger("llmws.engine.manager")

BackendFactory = Callable[[ModelEntry, Settings], Backend]


def _llamacpp(entry: ModelEntry, settings: Settings) -> Backend:
    from .backends.llamacpp import LlamaCppBackend

    m = settings.model
    options = {
        "n_ctx": m.n_ctx,
        "max_context_cap": m.max_context_cap,
        "n_threads": m.n_threads,
        "n_gpu_layers": m.n_gpu_layers,
        "n_batch": m.n_batch,
        "display_name": entry.name,
    }
    if entry.mmproj is not None:  # a vision model: served with its projector
        from .backends.llamacpp_vision import LlamaCppVisionBackend

        return LlamaCppVisionBackend(entry.path, entry.mmproj, **options)
    return LlamaCppBackend(entry.path, parallel=m.max_batch, **options)


def _transformers(entry: ModelEntry, settings: Settings) -> Backend:
    from .backends.transformers import TransformersBackend

    m = settings.model
    return TransformersBackend(
        entry.path,
        quantization=m.quantization,
        attention=m.attention,
        dtype=m.dtype,
        compile=m.compile,
        trust_remote_code=m.trust_remote_code,
        max_batch=m.max_batch,
        max_context=m.n_ctx,  # None: the memory estimate, capped by the trained context
    )


def _litellm(entry: ModelEntry, settings: Settings) -> Backend:
    from .backends.litellm import LiteLLMBackend

    if not isinstance(entry, RemoteEntry) or entry.remote is None or entry.registry is None:
        raise errors.Unsupported("Only models from remote_models are served by LiteLLM.")
    registry, remote = entry.registry, entry.remote
    group = remote.model.partition("/")[2] if remote.model.startswith("router/") else None
    return LiteLLMBackend(
        remote,
        router=registry.router if settings.router else None,
        group_models=registry.group_models(group) if group else (),
        group_max_context=registry.group_max_context(group) if group else None,
    )


#: Backend factories by name; new backends register here, not in an if/elif chain.
BACKENDS: dict[str, BackendFactory] = {
    "llamacpp": _llamacpp,
    "transformers": _transformers,
    "litellm": _litellm,
}


class FairQueue:
    """FIFO admission to `slots` concurrent users, reporting positions to waiters."""

    def __init__(self, slots: int = 1, max_waiting: int = 256) -> None:
        self.slots = slots
        self.max_waiting = max_waiting
        self._running = 0
        self._waiters: deque[tuple[asyncio.Future[None], Callable[[int], None] | None]] = deque()

    @property
    def depth(self) -> int:
        return len(self._waiters)

    @property
    def running(self) -> int:
        return self._running

    async def acquire(self, on_position: Callable[[int], None] | None = None) -> None:
        if self._running < self.slots and not self._waiters:
            self._running += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise errors.Busy("The server's request queue is full; try again shortly.")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (fut, on_position)
        self._waiters.append(entry)
        if on_position:
            on_position(len(self._waiters))
        try:
            await fut
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
                self._announce()
            elif fut.done() and not fut.cancelled():
                self.release()  # we were granted the slot as we were cancelled
            raise

    def release(self) -> None:
        self._running -= 1
        while self._waiters and self._running < self.slots:
            fut, _ = self._waiters.popleft()
            if not fut.done():
                self._running += 1
                fut.set_result(None)
        self._announce()

    def _announce(self) -> None:
        for pos, (_, cb) in enumerate(self._waiters, start=1):
            if cb:
                cb(pos)


class ModelManager:
    """Owns the loaded backend and the model folders."""

    def __init__(
        self,
        settings: Settings,
        *,
        factories: dict[str, BackendFactory] | None = None,
        prefixes: PrefixStore | None = None,
    ) -> None:
        """Args:
        factories: backend name -> factory; None: the built-in backends.
        prefixes: where backends with a prefix cache store KV prefixes; None: RAM only.
        """
        self.settings = settings
        self.prefixes = prefixes
        var_models = settings.var_dir / "models"
        var_models.mkdir(parents=True, exist_ok=True)
        settings.models_dir.mkdir(parents=True, exist_ok=True)
        self.dirs = ModelDirs(
            settings.models_dir,
            var_models,
            allow_delete_from_models=settings.model.allow_delete_from_models,
        )
        self.factories = dict(BACKENDS if factories is None else factories)
        self.backend: Backend | None = None
        self.entry: ModelEntry | None = None
        self.queue = FairQueue(1, settings.limits.max_queue)
        self._users = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._switch_lock = asyncio.Lock()
        self._no_swap = asyncio.Event()
        self._no_swap.set()
        self.loading: str | None = None
        self.remote = RemoteModels(settings)
        # Remote models used per request (`model` in a request) while another model
        # is current: each has its own backend and its own FairQueue.
        self._remote_backends: dict[str, tuple[Backend, FairQueue]] = {}
        self._remote_lock = asyncio.Lock()
        # Embedding models, resident beside the chat model (see engine/embedding.py).
        self.embedders = EmbeddingModels(n_threads=settings.model.n_threads, n_gpu_layers=settings.model.n_gpu_layers)

    # ------------------------------------------------------------------ info

    @property
    def max_context(self) -> int | None:
        return self.backend.info.max_context if self.backend else None

    def model_info(self) -> dict[str, Any] | None:
        if not self.backend:
            return None
        info = self.backend.info.public()
        if self.entry is not None:
            info["source"] = self.entry.source
            info["path"] = self.entry.rel_path
        return info

    def list_models(self) -> list[dict[str, Any]]:
        """Local models (both folders, the loaded one), then the configured remote models."""
        current_remote = self.entry.name if isinstance(self.entry, RemoteEntry) else None
        entries = self.dirs.scan()
        loaded_path = self.entry.path if self.entry and current_remote is None else None
        out = []
        seen = set()
        for e in entries:
            if e.kind == "embedding":
                out.append(e.public(self.embedders.is_loaded(e.path)))
                continue
            loaded = loaded_path is not None and Path(e.path) == Path(loaded_path)
            out.append(e.public(loaded, self.max_context if loaded else None))
            seen.add(Path(e.path))
        if self.entry is not None and current_remote is None and Path(self.entry.path) not in seen:
            out.append(self.entry.public(True, self.max_context))
        embedder = embedded_embedder(self.settings.var_dir)
        if embedder is not None:
            out.append(embedder.public(self.embedders.is_loaded(embedder.path)))
        for r in self.remote.entries():
            loaded = r.name == current_remote
            if loaded:
                ctx = self.max_context
            else:
                cached = self._remote_backends.get(r.name)
                ctx = cached[0].info.max_context if cached else None
            out.append(r.public(loaded, ctx))
        return out

    def is_remote(self, name: str | None) -> bool:
        """Whether `name` is a configured remote model (by name or `remote/<name>`)."""
        return self.remote.find(name) is not None

    # ------------------------------------------------------------------ loading

    def resolve(self, name_or_path: str) -> ModelEntry:
        """A local model (see `ModelDirs.resolve`) or a configured remote model."""
        remote = self.remote.find(name_or_path)
        if remote is not None:
            return remote
        embedder = embedded_embedder(self.settings.var_dir)
        if embedder is not None and name_or_path in (embedder.name, embedder.rel_path):
            return embedder
        embedded = self._embedded(name_or_path)
        if embedded is not None and name_or_path == embedded.rel_path:
            return embedded  # "embedded/<file>": never a file of the folders
        try:
            return self.dirs.resolve(name_or_path)
        except errors.ModelNotFound:
            if embedded is None:  # the embedded model by its bare name, once another is loaded
                raise
            return embedded

    @staticmethod
    def _embedded(name_or_path: str | None) -> ModelEntry | None:
        """The embedded default if `name_or_path` names it (its name or `embedded/<name>`)."""
        entry = embedded_entry()
        if entry is None or name_or_path not in (entry.name, entry.rel_path):
            return None
        return entry

    def initial_entry(self) -> ModelEntry | None:
        """The config's `model.path` (a local or remote model, or the embedded default
        by name), else the auto-selected local one."""
        configured = self.settings.model.path
        remote = self.remote.find(configured)
        if remote is not None:
            return remote
        if self._embedded(configured) is not None:
            return self.resolve(configured)  # type: ignore[arg-type]
        return auto_select(configured, self.dirs)

    def _build(self, entry: ModelEntry) -> Backend:
        factory = self.factories.get(entry.backend)
        if factory is None:
            raise errors.Unsupported(f"No backend can serve {entry.format} models here.")
        backend = factory(entry, self.settings)
        backend.prefixes = self.prefixes
        return backend

    async def load(self, entry: ModelEntry, on_progress: Callable[[dict[str, Any]], None] | None = None) -> Backend:
        """Load `entry` and make it current. The old model serves until the swap."""
        if entry.kind == "embedding":
            raise errors.Unsupported(f"'{entry.name}' is an embedding model: it serves /v1/embeddings and cannot chat.")
        async with self._switch_lock:
            self.loading = entry.name
            try:
                if on_progress:
                    on_progress({"stage": "loading", "model": entry.name})
                backend = self._build(entry)
                try:
                    await asyncio.to_thread(backend.load)
                except errors.LLMWSError:
                    raise
                except Exception as exc:
                    logger.error("loading %s failed", entry.path, exc_info=exc)
                    raise errors.ModelLoadError(f"Could not load {entry.name}.") from None
                if on_progress:
                    on_progress({"stage": "waiting_for_generations", "model": entry.name})
                self._no_swap.clear()
                try:
                    await self._idle.wait()  # in-flight generations finish on the old model
                    old, self.backend, self.entry = self.backend, backend, entry
                finally:
                    self._no_swap.set()
                self.queue.slots = max(1, backend.max_concurrency)
                if old is not None:
                    await asyncio.to_thread(old.unload)
                logger.info("model %s is now serving (%s)", entry.name, backend.name)
                return backend
            finally:
                self.loading = None

    # ------------------------------------------------------------------ per-request models

    def _is_current(self, name: str | None) -> bool:
        if not name:
            return True
        e = self.entry
        if e is None:
            return False
        if name in (e.name, e.rel_path):
            return True
        remote = self.remote.find(name)  # "remote/<name>" names the loaded remote model too
        return isinstance(e, RemoteEntry) and remote is not None and remote.name == e.name

    async def _remote_backend(self, name: str) -> tuple[Backend, FairQueue]:
        """The cached backend (and its queue) of a remote model used per request; built on first use."""
        entry = self.remote.find(name)
        if entry is None:
            raise errors.ModelNotFound(f"No model named '{name[:120]}' is loaded or configured as a remote model.")
        async with self._remote_lock:
            cached = self._remote_backends.get(entry.name)
            if cached is not None:
                return cached
            backend = self._build(entry)
            try:
                await asyncio.to_thread(backend.load)
            except errors.LLMWSError:
                raise
            except Exception as exc:
                logger.error("loading remote model %s failed", entry.name, exc_info=exc)
                raise errors.ModelLoadError(f"Could not load {entry.name}.") from None
            cached = (backend, FairQueue(max(1, backend.max_concurrency), self.settings.limits.max_queue))
            self._remote_backends[entry.name] = cached
            return cached

    async def backend_for(self, name: str | None) -> Backend:
        """The backend that serves a request naming `name` (the request's `model`).

        None or the loaded model's name: the current backend. A configured remote
        model: its LiteLLM backend (built once, then cached), whatever model is
        current. Anything else raises ModelNotFound: a request never switches the
        model as a side effect (that needs `switch_model` and the admin key).
        """
        if self._is_current(name):
            if self.backend is None:
                raise errors.ModelNotLoaded("No model is loaded yet.")
            return self.backend
        assert name is not None
        backend, _ = await self._remote_backend(name)
        return backend

    @contextlib.asynccontextmanager
    async def use(
        self, on_position: Callable[[int], None] | None = None, *, model: str | None = None
    ) -> AsyncIterator[Backend]:
        """Hold a backend for one generation, in FIFO order.

        `model` None (or the loaded model's name) holds the current backend; a
        remote model's name holds that model's backend in its own queue (see
        `backend_for`), so a slow local model never delays remote requests.
        """
        if not self._is_current(model):
            assert model is not None
            backend, queue = await self._remote_backend(model)
            await queue.acquire(on_position)
            try:
                yield backend
            finally:
                queue.release()
            return
        await self.queue.acquire(on_position)
        try:
            # A swap waiting for in-flight generations must not starve: newcomers wait for it.
            await self._no_swap.wait()
            backend = self.backend
            if backend is None:
                raise errors.ModelNotLoaded("No model is loaded yet.")
            self._users += 1
            self._idle.clear()
            try:
                yield backend
            finally:
                self._users -= 1
                if self._users == 0:
                    self._idle.set()
        finally:
            self.queue.release()

    async def close(self) -> None:
        await self.embedders.close()
        for backend, _ in self._remote_backends.values():
            await asyncio.to_thread(backend.unload)
        self._remote_backends.clear()
        if self.backend is not None:
            await asyncio.to_thread(self.backend.unload)
            self.backend = None
        if self.prefixes is not None:
            await asyncio.to_thread(self.prefixes.close)
