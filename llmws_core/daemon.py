"""Process lifecycle: build the services, start both servers on one event loop,
handle signals, and shut down gracefully.

Shutdown order: stop accepting, let running generations reach a safe point
(up to `server.drain_seconds`), flush and fsync every session, then close the
sockets with 1001 (going away) so clients know to resume elsewhere or later.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection, serve

from . import __version__, commands, logs
from .chat import ChatService
from .config import Settings, describe_settings, load_settings
from .engine.manager import ModelManager
from .engine.prefixes import PrefixStore
from .legacy import capabilities
from .security import is_loopback, keys_required, origin_allowed
from .services import Services
from .services.embeddings import EmbeddingService
from .services.generation import GenerationService
from .services.models import ModelService
from .services.responses import ResponseService
from .services.sessions import SessionService
from .sessions.crypto import Sealer, load_or_create_master_key, private_dir
from .sessions.journal import SeqJournal
from .sessions.store import Session, SessionStore
from .ws import Connection, make_origin_check

logger = logging.getLogger("llmws.daemon")


class FdBudget:
    """How many descriptors each kind of user may hold, within RLIMIT_NOFILE.

    Idle sockets and open buffers past the process's open-file limit make every
    accept and every session write fail. The configured bounds are kept when they
    fit; with a low limit (1,024 is a common desktop default) they are scaled down
    so that WebSocket connections, HTTP connections and open buffers together
    leave `RESERVE` descriptors for models, logs, state files and the loop."""

    RESERVE = 128

    def __init__(self, ws_connections: int, http_connections: int, buffers: int, limit: int | None) -> None:
        self.ws_connections = ws_connections
        self.http_connections = http_connections
        self.buffers = buffers
        self.limit = limit

    @classmethod
    def for_process(cls, settings: Settings) -> FdBudget:
        lim, ses = settings.limits, settings.sessions
        want_ws, want_http = lim.max_connections, lim.max_http_connections
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            unlimited = soft == resource.RLIM_INFINITY
        except (ImportError, OSError, ValueError):  # no such limit here
            soft, unlimited = -1, True
        if unlimited or soft <= 0:
            return cls(want_ws, want_http, ses.max_open_buffers, None)
        buffers = max(8, min(ses.max_open_buffers, soft // 8))
        room = max(16, soft - cls.RESERVE - buffers)
        ws, http = want_ws, want_http
        if ws + http > room:
            ws = max(8, room * want_ws // (want_ws + want_http))
            http = max(8, room - ws)
            logger.warning(
                "open-file limit %d: serving at most %d WebSocket and %d HTTP connections "
                "and %d open session buffers (raise `ulimit -n` for more)",
                soft,
                ws,
                http,
                buffers,
            )
        return cls(ws, http, buffers, soft)


class App:
    """Everything one daemon process owns."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        var = settings.var_dir
        # Every folder under var/ holds what only this user may read (session ids,
        # the master key, downloaded models, logs): 0700, tightened if looser.
        private_dir(var)
        for sub in ("sessions", "keys", "models", "logs", "prefixes"):
            private_dir(var / sub)
        sealer = Sealer(load_or_create_master_key(var / "keys"))
        self.fd_budget = FdBudget.for_process(settings)
        self.store = SessionStore(
            var / "sessions",
            sealer,
            ttl_seconds=settings.sessions.ttl_seconds,
            max_open_buffers=self.fd_budget.buffers,
            journal=SeqJournal(var / "journal.bin", sealer),
        )
        if not settings.sessions.persist:
            logger.warning("sessions.persist is false: events are not written (benchmark mode)")
            Session.persist_events = False
        prefixes = None
        if settings.model.prefix_cache_disk_mb > 0:
            prefixes = PrefixStore(
                var / "prefixes",
                sealer,
                max_bytes=settings.model.prefix_cache_disk_mb * 2**20,
                ttl_seconds=settings.sessions.ttl_seconds,
            )
        self.models = ModelManager(settings, prefixes=prefixes)
        self.chat = ChatService(settings, self.store, self.models)
        self.handlers = dict(commands.HANDLERS)
        self.per_ip: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        sec = settings.security
        self.keys_required = keys_required(settings)
        if self.keys_required and not (sec.api_keys or sec.admin_keys):
            if sec.require_api_key and is_loopback(settings.server.host):
                raise SystemExit(
                    "LLMWS cannot require an API key without one: security.require_api_key is on but "
                    "no key is set; set security.api_keys (or LLMWS_API_KEYS) or turn require_api_key off."
                )
            raise SystemExit(
                "LLMWS refuses to listen beyond loopback without an API key: set security.api_keys "
                "(or LLMWS_API_KEYS) or bind 127.0.0.1."
            )
        model_service = ModelService(self.models, self.chat, settings)
        generation = GenerationService(self.chat, model_service)
        self.services = Services(
            settings=settings,
            generation=generation,
            models=model_service,
            sessions=SessionService(self.chat),
            embeddings=EmbeddingService(settings, self.models),
            keys_required=self.keys_required,
            responses=ResponseService(generation, self.chat),
        )
        self.runtime = self.services.runtime

    # The daemon's live numbers live in `runtime`, which the HTTP door reads too.

    @property
    def started(self) -> float:
        return self.runtime.started

    @property
    def connection_count(self) -> int:
        return self.runtime.connections

    @connection_count.setter
    def connection_count(self, value: int) -> None:
        self.runtime.connections = value

    @property
    def ws_port(self) -> int | None:
        return self.runtime.ws_port

    @ws_port.setter
    def ws_port(self, value: int | None) -> None:
        self.runtime.ws_port = value

    @property
    def http_port(self) -> int | None:
        return self.runtime.http_port

    @http_port.setter
    def http_port(self, value: int | None) -> None:
        self.runtime.http_port = value

    @property
    def downloads(self) -> Any:
        """The download manager (see `ModelService.downloads`)."""
        return self.services.models.downloads

    # ------------------------------------------------------------------ helpers for handlers

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def broadcast(
        self, event: dict[str, Any], origin: Session | None = None, extra: dict[str, Any] | None = None
    ) -> None:
        """Emit `event` into every session with a connected client (see `ChatService.broadcast`)."""
        self.chat.broadcast(event, origin, extra)

    def welcome(self, session: Session, resumed: bool) -> dict[str, Any]:
        return {
            "type": "welcome",
            "protocol": 1,
            "server": f"llmws/{__version__}",
            "session_id": session.id,
            "resumed": resumed,
            "model": self.models.model_info(),
            "max_context": self.models.max_context,
            "capabilities": capabilities(self.models.model_info(), self.models.max_context),
            "last_seq": session.last_seq,
            "acked_seq": session.acked_seq,
            "config": self.chat.effective_config(session),
            "history_messages": len(session.state.get("history", [])),
            "http_port": self.http_port,
            # Records withheld at load (damaged, missing, duplicated, reordered, rolled
            # back): the missing ones are replayed as corrupt_record; this counts them all.
            **({"integrity_problems": session.integrity_problems} if session.integrity_problems else {}),
        }

    def origin_allowed(self, origin: str) -> bool:
        return origin_allowed(origin, self.settings, self.http_port)

    # ------------------------------------------------------------------ connections

    async def handle(self, ws: ServerConnection) -> None:
        peer = ws.remote_address[0] if ws.remote_address else "?"
        self.connection_count += 1
        self.per_ip[peer] = self.per_ip.get(peer, 0) + 1
        try:
            await Connection(self, ws).run()
        except Exception:
            logger.exception("connection handler crashed")
            await ws.close(1011, "internal error")
        finally:
            self.connection_count -= 1
            self.per_ip[peer] -= 1
            if not self.per_ip[peer]:
                del self.per_ip[peer]

    # ------------------------------------------------------------------ background work

    async def fsync_loop(self) -> None:
        interval = self.settings.sessions.fsync_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.store.sync_dirty)
            except Exception:
                logger.exception("batched fsync failed")

    async def expiry_loop(self) -> None:
        interval = min(60.0, self.settings.sessions.ttl_seconds / 10)
        while True:
            await asyncio.sleep(interval)
            busy = set(self.chat.jobs) | set(self.chat._subscribers)
            try:
                expired = self.store.expire_idle(busy)
                if expired:
                    logger.info("expired %d idle sessions", len(expired))
                if self.models.prefixes is not None:
                    await asyncio.to_thread(self.models.prefixes.prune_expired)
            except Exception:
                logger.exception("session expiry failed")

    # ------------------------------------------------------------------ run

    async def load_initial_model(self) -> None:
        """Load the first model to serve (see `ModelService.load_initial`)."""
        await self.services.models.load_initial()

    async def serve(self, stop: asyncio.Event) -> None:
        s = self.settings
        await self.load_initial_model()
        ws_server = await serve(
            self.handle,
            s.server.host,
            s.server.port,
            process_request=make_origin_check(self),
            # The soft limit (an error event) is max_frame_bytes; this hard cap
            # closes the socket only for frames far beyond it.
            max_size=s.limits.max_frame_bytes * 4,
            max_queue=64,
            # Token events are tiny and mostly local: permessage-deflate would spend
            # CPU the model's threads need, for next to no saved bytes.
            compression=None,
            ping_interval=20,
            ping_timeout=60,
            server_header=f"llmws/{__version__}",
        )
        self.ws_port = ws_server.sockets[0].getsockname()[1]
        http_server, http_task = await self._start_http()
        self._write_ready_file()
        try:
            found = await asyncio.to_thread(self.models.dirs.scan)
        except Exception:
            logger.exception("scanning the model folders failed")
            found = []
        logger.info("%s", self.banner(found))
        background = [self.spawn(self.fsync_loop()), self.spawn(self.expiry_loop())]
        try:
            await stop.wait()
        finally:
            logger.info("shutting down: draining generations")
            ws_server.close(close_connections=False)
            await self.chat.drain(s.server.drain_seconds)
            await self.services.models.close()
            await asyncio.to_thread(self.store.close_all)
            # Server.close() is idempotent: the first call (close_connections=False)
            # already ran, so a second one would not close anything. Close the open
            # sockets here, with 1001 (going away), so clients know to resume later.
            closing = [
                asyncio.create_task(conn.close(1001, "server shutting down")) for conn in list(ws_server.connections)
            ]
            if closing:
                await asyncio.wait(closing, timeout=5)
            try:
                await asyncio.wait_for(ws_server.wait_closed(), 5)
            except Exception:
                logger.exception("the WebSocket server did not close in time")
            if http_server is not None:
                http_server.should_exit = True
                try:
                    await asyncio.wait_for(http_task, 5)
                except Exception:
                    logger.exception("the HTTP adapter did not stop cleanly")
            for task in background:
                task.cancel()
            await self.models.close()
            self.chat.close()
            logger.info("stopped")

    async def _start_http(self) -> tuple[Any, Any]:
        port = self.settings.server.http_port
        if port is None:
            return None, None
        import uvicorn

        from .http.app import create_app
        from .http.guard import Guard, guarded_protocol

        class _Server(uvicorn.Server):
            # The daemon owns signals; uvicorn must not install its own.
            def install_signal_handlers(self) -> None:
                pass

            @contextlib.contextmanager
            def capture_signals(self):  # type: ignore[no-untyped-def]
                yield

        lim = self.settings.limits
        guard = Guard(header_timeout=lim.http_header_timeout, max_connections=self.fd_budget.http_connections)
        config = uvicorn.Config(
            create_app(self.services),
            host=self.settings.server.host,
            port=port,
            log_level="warning",
            lifespan="on",
            access_log=False,
            http=guarded_protocol(guard),
            timeout_keep_alive=lim.http_keepalive_timeout,  # type: ignore[arg-type]
        )
        server = _Server(config)
        sockets = None
        if self.settings.server.ollama_port:
            # One server, two listening sockets: the second is Ollama's address.
            ollama = uvicorn.Config(config.app, host=self.settings.server.host, port=self.settings.server.ollama_port)
            sockets = [config.bind_socket(), ollama.bind_socket()]
        task = asyncio.create_task(server.serve(sockets=sockets))
        while not server.started:
            if task.done():
                task.result()
                raise SystemExit("the HTTP adapter failed to start")
            await asyncio.sleep(0.02)
        self.http_port = server.servers[0].sockets[0].getsockname()[1]
        return server, task

    def _write_ready_file(self) -> None:
        path = self.settings.server.ready_file
        if not path:
            return
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps({"ws_port": self.ws_port, "http_port": self.http_port, "pid": os.getpid()}))
        os.replace(tmp, path)

    def banner(self, found: list[Any]) -> str:
        """The start-up banner; `found` is the model folders' scan."""
        line = "=" * 60
        host = self.settings.server.host
        lines = ["", line, f"LLMWS {__version__}", line, "", f"Available models: {len(found)}"]
        for m in found:
            lines.append(f"  - {m.name} ({m.size_mb:.0f} MB) [{m.source}]")
        info = self.models.model_info()
        if info:
            lines.append(f"Model loaded: {info['name']} ({info['backend']}, context {info['max_context']})")
        else:
            lines.append("No model loaded.")
        lines += ["", line, f"WebSocket:  ws://{host}:{self.ws_port}"]
        if self.http_port:
            lines.append(f"HTTP:       http://{host}:{self.http_port}   (web client: /ui)")
        if self.http_port and self.settings.server.ollama_port:
            lines.append(f"Ollama API: http://{host}:{self.settings.server.ollama_port}/api")
        lines += [f"Sessions:   {self.settings.var_dir / 'sessions'}", line]
        return "\n".join(lines)


# ---------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    rows = "\n".join(f"  {k:<38} {d:>10}  {desc}" for k, d, desc in describe_settings())
    parser = argparse.ArgumentParser(
        prog="llmws",
        description="LLMWS: a local LLM server (WebSocket daemon + OpenAI-compatible HTTP).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings (config.json keys; env LLMWS_<SECTION>__<KEY> overrides them):\n" + rows,
    )
    parser.add_argument(
        "--config", help="JSON config file, merged over the defaults (default: ./config.json if present)"
    )
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="WebSocket port (default 8765; 0 picks one)")
    parser.add_argument("--http-port", type=int, help="HTTP adapter port (default 8001; 0 picks one; -1 disables)")
    parser.add_argument("--var-dir", help="runtime data folder (default var)")
    parser.add_argument("--models-dir", help="models folder (default models)")
    parser.add_argument("--model", help="model to load (name or path inside the model folders)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--ready-file", help="write {ws_port, http_port, pid} here once listening")
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            out.setdefault(section, {})[key] = value

    put("server", "host", args.host)
    put("server", "port", args.port)
    if args.http_port is not None:
        # -1 disables HTTP: None is a value here, which `put` would skip.
        out.setdefault("server", {})["http_port"] = None if args.http_port < 0 else args.http_port
    put("server", "log_level", args.log_level)
    put("server", "ready_file", args.ready_file)
    put("paths", "var_dir", args.var_dir)
    put("paths", "models_dir", args.models_dir)
    put("model", "path", args.model)
    return out


async def run(settings: Settings) -> None:
    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await app.serve(stop)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config, overrides=overrides_from_args(args))
    except (OSError, ValueError) as exc:
        sys.exit(f"llmws: bad configuration: {exc}")
    logging.basicConfig(
        level=getattr(logging, settings.server.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logs.install()
    try:
        asyncio.run(run(settings))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
