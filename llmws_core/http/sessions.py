"""A session's conversation over HTTP: `GET /v1/sessions/{id}/history`, `DELETE /v1/sessions/{id}`.

The HTTP twins of the WebSocket `get_history` and `delete_session` messages. A
session id is a random UUID that only the client which made the session knows;
knowing it (and holding a key where keys are required) is what owning it means.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from .. import errors
from .auth import llmws, user_key

router = APIRouter(tags=["Sessions"], dependencies=[Depends(user_key)])


@router.get("/v1/sessions/{session_id}/history", summary="A session's conversation (its turns)")
async def session_history(session_id: str, request: Request) -> dict[str, Any]:
    """The session's completed turns, its own settings, and the reply being generated."""
    sessions = llmws(request).sessions
    session = sessions.find(session_id)
    if session is None:
        raise errors.SessionNotFound("No session with that id exists.")
    return await sessions.history(session)


@router.delete("/v1/sessions/{session_id}", summary="Delete a session and its data on disk")
async def delete_session(session_id: str, request: Request) -> dict[str, Any]:
    """Stop the session's replies and delete its history and buffer from disk."""
    sessions = llmws(request).sessions
    session = sessions.find(session_id)
    if session is None:
        raise errors.SessionNotFound("No session with that id exists.")
    await sessions.delete(session)
    return {"session_id": session.id, "deleted": True}
