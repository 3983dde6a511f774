"""The session service for doors other than the WebSocket: find a session, submit a
turn as its job, follow its events, read and replace its history.

A session-backed reply is a job of the session (chat.py): its events are sealed in
the session's buffer and every door that follows the session sees the same ones,
each with its `seq`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import errors, protocol

if TYPE_CHECKING:
    from ..chat import ChatService
    from ..sessions.store import Session

Sink = Callable[[dict[str, Any]], None]


class SessionService:
    """Sessions as the HTTP doors see them."""

    def __init__(self, chat: ChatService) -> None:
        self._chat = chat
        self._store = chat.store

    def find(self, session_id: str | None, owner: str | None = None) -> Session | None:
        """The existing session `session_id` names, or None (never a new one).

        `owner` is who asks (`security.key_owner`): a session created with a key is
        found only with that key."""
        if not session_id or not self._store.exists(session_id):
            return None
        if not self._chat.may_resume(session_id, owner):
            return None
        try:
            session, resumed, _ = self._chat.open_session(session_id, owner)
        except errors.LLMWSError:
            return None
        return session if resumed else None

    def submit(self, session: Session, msg: protocol.Inference) -> str:
        """Start `msg` as a job of `session`; its request id."""
        return self._chat.submit(session, msg).request_id

    def subscribe(self, session: Session, after_seq: int, sink: Sink) -> list[dict[str, Any]]:
        """Register `sink` for live events; the backlog after `after_seq` (no gap, no repeat)."""
        return self._chat.subscribe(session, after_seq, sink)

    def unsubscribe(self, session: Session, sink: Sink) -> None:
        self._chat.unsubscribe(session, sink)

    def running(self, session: Session) -> list[str]:
        """Request ids of the session's jobs that are still running."""
        return list(self._chat.jobs.get(session.id, {}))

    def conversation(self, session: Session) -> list[dict[str, Any]]:
        """The session's system prompt (if any) and its history."""
        system = self._chat.effective_config(session).get("system")
        return ([{"role": "system", "content": system}] if system else []) + list(session.state.get("history", []))

    async def replace_history(self, session: Session, messages: list[dict[str, Any]]) -> None:
        """Make `messages` (without system messages) the session's history, saved."""
        session.state["history"] = [m for m in messages if m["role"] != "system"]
        await session.save_state_async()

    async def history(self, session: Session) -> dict[str, Any]:
        """The session's turns, settings and reply in flight (the WebSocket `history` body)."""
        return await self._chat.history(session)

    async def delete(self, session: Session) -> None:
        """Stop the session's replies and delete it from memory and disk."""
        await self._chat.delete_session(session)

    # ------------------------------------------------------------------ numbers

    @property
    def connected(self) -> int:
        """Sessions with a connected client."""
        return self._chat.connected_sessions

    @property
    def jobs(self) -> int:
        """Session jobs waiting or running."""
        return sum(len(j) for j in self._chat.jobs.values())

    async def count(self) -> int:
        """Sessions on disk or in memory (the folder is listed in a worker thread)."""
        try:
            return len(await asyncio.to_thread(self._store.ids))
        except OSError:
            return 0
