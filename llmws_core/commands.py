"""Handlers of the WebSocket messages, one small function each.

Answers to pure queries (`pong`, `status`, `resources`, `models_list`, ...) go
to the asking socket only. Anything that changes state or reports on a job is
emitted into the session, so a client that reconnects sees how it went.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from . import errors, images, legacy, protocol
from .sessions.store import Session

if TYPE_CHECKING:
    from .ws import Connection

logger = logging.getLogger("llmws.commands")


def _rid(msg: Any) -> dict[str, Any]:
    return {"request_id": msg.request_id} if getattr(msg, "request_id", None) else {}


def _require_admin(conn: Connection) -> None:
    if not conn.is_admin:
        raise errors.Forbidden("This action needs the admin key.")


async def inference(conn: Connection, session: Session, msg: protocol.Inference) -> None:
    checked = None
    if isinstance(msg.prompt, protocol.PromptParts) and msg.prompt.images:
        chat = conn.app.chat
        chat.require_vision(msg.request_id)  # a text-only model refuses before any decoding
        # Paths name files on this machine: only its own programs may use them (never a
        # page opened from disk, whose `Origin: null` any web site's sandboxed frame sends).
        checked = await images.resolve(
            msg.prompt.images, images.ImageLimits.of(chat.settings), allow_path=conn.may_read_paths
        )
    conn.app.chat.submit(session, msg, origin=conn, images=checked)


async def ack(conn: Connection, session: Session, msg: protocol.Ack) -> None:
    seq = await conn.app.chat.ack(session, msg.seq)
    conn.send({"type": "ack_received", "seq": seq})


async def cancel(conn: Connection, session: Session, msg: protocol.Cancel) -> None:
    conn.app.chat.cancel(session, msg.request_id)


async def config(conn: Connection, session: Session, msg: protocol.Config) -> None:
    cfg = await conn.app.chat.set_config(session, msg.data)
    conn.app.chat.emit(session, {"type": "config_ack", "config": cfg, **_rid(msg)})


async def list_models(conn: Connection, session: Session, msg: protocol.ListModels) -> None:
    models = await conn.app.services.models.list()
    conn.send({"type": "models_list", "models": models, **_rid(msg)})


async def switch_model(conn: Connection, session: Session, msg: protocol.SwitchModel) -> None:
    _require_admin(conn)
    app = conn.app
    entry = await app.services.models.resolve(msg.model_path)
    rid = _rid(msg)

    async def run() -> None:
        def progress(info: dict[str, Any]) -> None:
            app.chat.emit(session, {"type": "model_loading", **info, **rid})

        try:
            await app.services.models.switch(entry, origin=session, extra=rid, on_progress=progress)
        except Exception as exc:
            app.chat.emit(session, errors.to_wire(exc, msg.request_id))

    app.spawn(run())


async def download_model(conn: Connection, session: Session, msg: protocol.DownloadModel) -> None:
    _require_admin(conn)
    app = conn.app
    rid = _rid(msg)

    def on_event(event: dict[str, Any]) -> None:
        app.chat.emit(session, {**event, **rid})

    await app.downloads.start(msg.repo, msg.target_dir, on_event, filename=msg.filename)


async def cancel_download(conn: Connection, session: Session, msg: protocol.CancelDownload) -> None:
    _require_admin(conn)
    if not conn.app.downloads.cancel(msg.job_id):
        raise errors.NotFound("No running download with that job_id.")


async def delete_model(conn: Connection, session: Session, msg: protocol.DeleteModel) -> None:
    _require_admin(conn)
    app = conn.app
    entry = await app.services.models.delete(msg.model_name)
    app.chat.emit(session, {"type": "model_deleted", "model_name": entry.name, "path": entry.rel_path, **_rid(msg)})


async def estimate_model(conn: Connection, session: Session, msg: protocol.EstimateModel) -> None:
    entry, est = await conn.app.services.models.estimate(msg.model_path)
    conn.send({"type": "model_estimate", "model": entry.name, **est, **_rid(msg)})


async def get_resources(conn: Connection, session: Session, msg: protocol.GetResources) -> None:
    from .engine.resources import snapshot

    model = conn.app.models.model_info()
    snap = await asyncio.to_thread(snapshot, model)
    snap["max_context"] = conn.app.models.max_context
    event = {"type": "resources", **snap, **_rid(msg)}
    if conn.legacy is not None:  # the original clients read `cuda` and `available_models`
        models = await asyncio.to_thread(conn.app.models.list_models)
        event = legacy.resources_event(event, snap, models)
    conn.send(event)


async def reset(conn: Connection, session: Session, msg: protocol.Reset) -> None:
    await conn.app.chat.reset(session)
    conn.app.chat.emit(session, {"type": "reset_done", **_rid(msg)})


async def get_status(conn: Connection, session: Session, msg: protocol.GetStatus) -> None:
    app = conn.app
    conn.send(
        {
            "type": "status",
            "session_id": session.id,
            "model": app.models.model_info(),
            "loading": app.models.loading,
            "max_context": app.models.max_context,
            "queue_depth": app.models.queue.depth,
            "running": app.models.queue.running,
            "requests": sorted(app.chat.jobs.get(session.id, {})),
            "last_seq": session.last_seq,
            "acked_seq": session.acked_seq,
            "history_messages": len(session.state.get("history", [])),
            "connections": app.connection_count,
            "uptime_s": round(time.monotonic() - app.started, 1),
            **_rid(msg),
        }
    )


async def ping(conn: Connection, session: Session, msg: protocol.Ping) -> None:
    conn.send({"type": "pong", **_rid(msg)})


async def get_history(conn: Connection, session: Session, msg: protocol.GetHistory) -> None:
    body = await conn.app.chat.history(session)
    conn.send({"type": "history", **body, **_rid(msg)})


async def rewind(conn: Connection, session: Session, msg: protocol.Rewind) -> None:
    removed = await conn.app.chat.rewind(session, msg.turns)
    conn.app.chat.emit(session, {"type": "rewound", "turns": msg.turns, "removed_messages": removed, **_rid(msg)})


async def delete_session(conn: Connection, session: Session, msg: protocol.DeleteSession) -> None:
    # Every tail of the session (this socket included) hears `session_deleted`; this
    # socket is then closed, as it has no session left to speak in.
    await conn.app.chat.delete_session(session)
    await conn.close_soon(1000, "session deleted")


HANDLERS = {
    "inference": inference,
    "ack": ack,
    "cancel": cancel,
    "config": config,
    "list_models": list_models,
    "switch_model": switch_model,
    "download_model": download_model,
    "cancel_download": cancel_download,
    "delete_model": delete_model,
    "estimate_model": estimate_model,
    "get_resources": get_resources,
    "reset": reset,
    "get_status": get_status,
    "ping": ping,
    "get_history": get_history,
    "rewind": rewind,
    "delete_session": delete_session,
}
