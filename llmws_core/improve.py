"""Answer improvement: draft -> review -> revision -> second review -> final revision.

The HF LLM Server's multi-pass refinement, written once for both doors:

- `improve_stream` is a stateless async generator of labelled events, used by the
  HTTP routes (`/chat/blocking`, `/chat/stream`, improvement on the nash stream).
- `improve_job` runs it as a session job for WebSocket `inference` with
  `"mode": "improve"`: the usual `start` / `token` / `done` events, plus a `stage`
  event before each pass, and the final revision recorded in the history.

Each pass is an ordinary generation through the chat service (queue, limits,
cancellation, metrics), with the role system prompts from config `roles`
(`assistant`, `reviewer`, `reviser`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .engine.backends.base import GenerationParams, Message

if TYPE_CHECKING:
    from .chat import ChatService, Job
    from .sessions.store import Session

logger = logging.getLogger("llmws.improve")

#: (stage name, label) in order; the names are also the result keys' sources.
STAGES: tuple[tuple[str, str], ...] = (
    ("draft", "Draft"),
    ("review", "Review"),
    ("revision", "Revision"),
    ("second_review", "Second review"),
    ("final", "Final revision"),
)

#: The HF server's `last_result` keys, by stage.
RESULT_KEYS = {
    "draft": "draft_answer",
    "review": "suggestions1",
    "revision": "revision1",
    "second_review": "suggestions2",
    "final": "revision2",
}

DEFAULT_ROLES = {
    "assistant": "You are a helpful, precise assistant.",
    "reviewer": "You review an answer. List numbered, concrete suggestions to make it more correct, complete and clear. Do not rewrite it.",
    "reviser": "You revise an answer by applying the reviewer's suggestions. Reply with the improved answer only.",
}


class StageCancel(threading.Event):
    """One pass's cancel flag: set on its own, or when the whole pipeline is cancelled.

    Each pass gets its own, because the chat service may set a generation's flag
    as that generation winds down; the pipeline's flag must survive for the next pass."""

    def __init__(self, parent: threading.Event) -> None:
        super().__init__()
        self.parent = parent

    def is_set(self) -> bool:
        return super().is_set() or self.parent.is_set()


@dataclass
class ImproveEvent:
    """One event of the pipeline.

    kind: `stage` (a pass begins; tokens_in known), `token` (text of the current
    pass), `stage_done` (the pass's full text), `done` (result holds every pass).
    """

    kind: Literal["stage", "token", "stage_done", "done"]
    stage: str
    label: str
    index: int
    text: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    dropped_messages: int = 0
    finish_reason: str | None = None
    result: dict[str, Any] = field(default_factory=dict)


def _role(roles: dict[str, str], name: str) -> str:
    return roles.get(name) or DEFAULT_ROLES[name]


def question_of(messages: list[Message]) -> str:
    """The request being answered: the last user message."""
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content") or "")
    return ""


def stage_messages(stage: str, messages: list[Message], done: dict[str, str], roles: dict[str, str]) -> list[Message]:
    """The prompt of one pass."""
    if stage == "draft":
        if messages and messages[0].get("role") == "system":
            return list(messages)
        return [{"role": "system", "content": _role(roles, "assistant")}, *messages]
    question = question_of(messages)
    if stage in ("review", "second_review"):
        answer = done["draft"] if stage == "review" else done["revision"]
        user = (
            f"Question:\n{question}\n\nAnswer to review:\n{answer}\n\nList numbered suggestions to improve this answer."
        )
        return [{"role": "system", "content": _role(roles, "reviewer")}, {"role": "user", "content": user}]
    answer = done["draft"] if stage == "revision" else done["revision"]
    notes = done["review"] if stage == "revision" else done["second_review"]
    user = f"Question:\n{question}\n\nDraft answer:\n{answer}\n\nSuggestions:\n{notes}\n\nWrite the improved answer."
    return [{"role": "system", "content": _role(roles, "reviser")}, {"role": "user", "content": user}]


async def improve_stream(
    chat: ChatService,
    messages: list[Message],
    params: GenerationParams,
    *,
    cancel: threading.Event,
    roles: dict[str, str] | None = None,
    on_queued: Callable[[int], None] | None = None,
) -> AsyncIterator[ImproveEvent]:
    """Run the five passes over `messages`, yielding labelled events.

    Stops early when `cancel` is set (finish_reason "cancelled"); the reply is then
    the last complete pass's text. Errors of the chat service propagate."""
    roles = dict(roles if roles is not None else chat.settings.roles)
    done: dict[str, str] = {}
    tokens_in = tokens_out = 0
    finish = "stop"
    for index, (stage, label) in enumerate(STAGES, start=1):
        if cancel.is_set():
            finish = "cancelled"
            break
        prompt = stage_messages(stage, messages, done, roles)
        parts: list[str] = []
        result = None
        stage_cancel = StageCancel(cancel)
        async for chunk in chat.generate(
            prompt, params, cancel=stage_cancel, on_queued=on_queued, trim_history=stage == "draft"
        ):
            if chunk.result is not None:
                result = chunk.result
            elif chunk.text:
                parts.append(chunk.text)
                yield ImproveEvent("token", stage, label, index, text=chunk.text)
            else:
                if index == 1:
                    tokens_in = chunk.tokens_in
                yield ImproveEvent(
                    "stage",
                    stage,
                    label,
                    index,
                    tokens_in=chunk.tokens_in,
                    dropped_messages=chunk.dropped_messages,
                )
        text = "".join(parts).strip()
        tokens_out += result.tokens_out if result else 0
        if result is not None and result.finish_reason == "cancelled":
            finish = "cancelled"
            break
        done[stage] = text
        if stage == "final":
            finish = result.finish_reason if result else "stop"
        yield ImproveEvent(
            "stage_done",
            stage,
            label,
            index,
            text=text,
            tokens_out=result.tokens_out if result else 0,
            finish_reason=result.finish_reason if result else None,
        )
    reply = done.get("final") or done.get("revision") or done.get("draft") or ""
    result_doc = {RESULT_KEYS[s]: done[s] for s, _ in STAGES if s in done}
    result_doc["reply"] = reply
    yield ImproveEvent(
        "done",
        "final",
        "Final revision",
        len(STAGES),
        text=reply,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        finish_reason=finish,
        result=result_doc,
    )


async def improve_job(
    chat: ChatService,
    session: Session,
    job: Job,
    messages: list[Message],
    turn: list[Message],
    params: GenerationParams,
) -> None:
    """A WebSocket `inference` with `"mode": "improve"`, as a session job.

    Emits what a normal job emits (`start`, `token`..., `done`) plus a `stage`
    event before each pass; each token carries its `stage`. The history gets the
    user's turn and the final revision, as `_run_job` records a normal reply."""
    rid = job.request_id
    user_text = "\n".join(str(m.get("content") or "") for m in turn if m["role"] == "user")

    def queued(pos: int) -> None:
        chat.send_transient(session, {"type": "queued", "request_id": rid, "position": pos})

    started = False
    async for ev in improve_stream(chat, messages, params, cancel=job.cancel, on_queued=queued):
        if ev.kind == "stage":
            if not started:
                started = True
                await chat.announce_start(
                    session, job, user_text, ev.tokens_in, ev.dropped_messages, params.max_new_tokens, mode="improve"
                )
            chat.emit(
                session,
                {
                    "type": "stage",
                    "request_id": rid,
                    "stage": ev.stage,
                    "label": ev.label,
                    "index": ev.index,
                    "of": len(STAGES),
                    "tokens_in": ev.tokens_in,
                },
            )
        elif ev.kind == "token":
            chat.emit(session, {"type": "token", "request_id": rid, "data": ev.text, "stage": ev.stage})
        elif ev.kind == "done":
            history = session.state.setdefault("history", [])
            history.extend(turn)
            history.append({"role": "assistant", "content": ev.text})
            chat._cap_history(session)
            chat.clear_inflight(session, rid)
            chat.emit(
                session,
                {
                    "type": "done",
                    "request_id": rid,
                    "total_tokens": ev.tokens_out,
                    "tokens_in": ev.tokens_in,
                    "finish_reason": ev.finish_reason,
                    "mode": "improve",
                    "reply": ev.text,
                },
            )
            job.start_seq = None  # complete and sealed into the next state: acks may trim it
            chat.end_job(session.id, rid)
            await session.save_state_async()
