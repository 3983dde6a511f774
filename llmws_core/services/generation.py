"""The generation service: one typed request in, typed events out, for every door.

    gen = await service.start(GenerationRequest(messages=[...], sampling=Sampling(max_tokens=64)))
    gen.started                    # StartEvent: tokens_in, max_tokens, model, ...
    async for event in gen: ...    # TokenEvent, WarningEvent, ToolCallEvent, then DoneEvent or ErrorEvent
    done = await gen.collect()     # or the whole reply at once (raises what ErrorEvent would carry)

Errors before the start (a bad request, `context_too_long`, a tool_choice naming no
tool, no model loaded) raise from `start` as `LLMWSError`, so a door can still answer
with a status code; errors after it come as one `ErrorEvent` that ends the events.

Features written here once for all doors: the role and tool-traffic rendering that
every chat template accepts, tool calls (described in the prompt, forced with a
grammar, parsed back, streamed text held back while it may still become a call),
JSON mode (a grammar where the backend has one, an instruction and extraction where
it has not), the length warnings, summaries and token counts.

The model runs in a task of its own: when a door's task is cancelled (its client
went away) it leaves `async with gen` (or calls `gen.close()`), which stops the model
within a token if the request said `on_disconnect="cancel"` (the default); the
generation then ends through its normal path (metrics recorded, the model released)
in the background.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from .. import errors, images
from ..engine import grammar
from ..engine.backends.base import GenerationParams, GenerationResult, Message, TokenLogprob
from ..improve import ImproveEvent, improve_stream
from . import tools as toolcalls
from .tools import Tool, ToolCall, ToolChoice

if TYPE_CHECKING:
    from ..chat import ChatService
    from .models import ModelService

__all__ = ["GenerationParams", "GenerationResult", "Message"]  # for doors, which never import the engine

logger = logging.getLogger("llmws.services.generation")

#: Warn when a conversation grows past this many messages (summarizing helps).
MAX_MESSAGES_WARN = 50
#: Warn when the prompt uses more than this share of the model's context.
NEAR_LIMIT_SHARE = 0.75
SUMMARY_SYSTEM = (
    "You summarize conversations. Keep names, facts, numbers, decisions and open questions. Write a short paragraph."
)
JSON_INSTRUCTION = "Reply with a single valid JSON object and nothing else."

#: A chat message as doors hand it over: {"role", "content"}, where role is system,
#: user, assistant or tool; an assistant message may carry "tool_calls", a list of
#: {"name", "arguments"} (arguments an object or its JSON text); a user message may
#: carry "images", a list of image references (see `images.py`: {"data",
#: "media_type"}, {"url"} with a data: or http(s) URL, or a base64 string), which
#: the generation checks when it starts.
ChatMessage = dict[str, Any]


# ---------------------------------------------------------------------- request


@dataclass
class Sampling:
    """Generation parameters a request sets; None leaves the server's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    repeat_penalty: float | None = None

    def overrides(self) -> dict[str, Any]:
        """The generation config keys these set (None values are left to the defaults)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_tokens,
            "stop": self.stop,
            "seed": self.seed,
            "repeat_penalty": self.repeat_penalty,
        }


@dataclass
class ResponseFormat:
    """JSON mode: the reply is one JSON object, matching `schema` when given."""

    schema: dict[str, Any] | None = None
    #: The format object as the client sent it (OpenAI's shape), passed on to remote models.
    original: dict[str, Any] | None = None

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI `response_format` object backends take (`GenerationParams.response_format`)."""
        if self.original is not None:
            return self.original
        if self.schema is None:
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": self.schema}}


def parse_response_format(response_format: dict[str, Any] | None) -> ResponseFormat | None:
    """An OpenAI `response_format` object as a ResponseFormat (None: plain text).

    Raises:
        BadRequest: an unknown type or a json_schema without a schema object.
    """
    fmt = grammar.parse_format(response_format)
    if fmt is None:
        return None
    return ResponseFormat(schema=fmt.get("schema"), original=response_format)


@dataclass
class GenerationRequest:
    """One stateless chat generation, as every door hands it to the service."""

    messages: list[ChatMessage]
    sampling: Sampling = field(default_factory=Sampling)
    #: The model the client named. A configured remote model serves this request; another
    #: local model is switched to (when `may_switch`); any other name means the loaded model.
    model: str | None = None
    #: Whether the caller holds the right to switch the loaded model (the admin key).
    may_switch: bool = False
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice = "auto"
    #: True: drop the oldest turns so the reply has room (up to 256 tokens), with a
    #: `history_truncated` warning. False: only a prompt beyond the context is refused.
    keep_reply_room: bool = False
    #: "cancel": closing the generation before its end stops the model. "continue":
    #: the model finishes the reply (nobody reads it).
    on_disconnect: Literal["cancel", "continue"] = "cancel"
    #: Who asks (a digest of the API key): prompt-prefix caches are shared only within one.
    principal: str = "local"
    #: Raw text (or token ids) to continue without the chat template (`/v1/completions`);
    #: `messages` is then ignored. None: a chat reply to `messages`.
    prompt: str | list[int] | None = None
    #: Report each token's log-probability with this many likeliest alternatives (0: the
    #: chosen token's only); None: off. A backend that cannot is a BadRequest-class error
    #: (`unsupported`) from `start`, never a silent omission.
    logprobs: int | None = None


# ---------------------------------------------------------------------- events


@dataclass(frozen=True)
class StartEvent:
    """The prompt fits and the model has begun."""

    tokens_in: int
    max_tokens: int
    #: The name of the model that serves the reply.
    model: str
    dropped_messages: int = 0
    #: Whether the backend constrains the reply with a grammar (JSON mode, forced calls).
    constrained: bool = False
    kind: Literal["start"] = "start"


@dataclass(frozen=True)
class TokenEvent:
    """Reply text (`count` tokens of it: text that arrived together comes as one event)."""

    text: str
    count: int = 1
    #: The log-probabilities of the tokens this text came from (when the request asked).
    logprobs: tuple[TokenLogprob, ...] = ()
    kind: Literal["token"] = "token"


@dataclass(frozen=True)
class WarningEvent:
    """The conversation is near or over a limit; `details` has the numbers and a suggestion."""

    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    kind: Literal["warning"] = "warning"

    def body(self) -> dict[str, Any]:
        """{code, message, **details}: the shape the WebSocket and nash doors send."""
        return {"code": self.code, "message": self.message, **self.details}


@dataclass(frozen=True)
class ToolCallEvent:
    """The reply is (or ends with) calls of the offered tools."""

    calls: tuple[ToolCall, ...]
    kind: Literal["tool_call"] = "tool_call"


@dataclass(frozen=True)
class DoneEvent:
    """The reply is complete.

    finish_reason: "stop", "length", "tool_calls", "cancelled" (or a backend's own).
    content: the whole reply text as the client should see it (JSON extracted, tool
    calls removed); None when the reply is only tool calls."""

    finish_reason: str
    tokens_in: int
    tokens_out: int
    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    #: Every generated token's log-probability, when the request asked for them.
    logprobs: tuple[TokenLogprob, ...] | None = None
    #: The stop string that ended the reply (one the request gave, or the chat
    #: template's end marker); None when it ended otherwise.
    stop_sequence: str | None = None
    kind: Literal["done"] = "done"


@dataclass(frozen=True)
class ErrorEvent:
    """The generation failed after its start. `message` is safe to show a client
    (an unexpected error's text is logged, never carried here)."""

    code: str
    message: str
    status: int
    #: Extra fields of the error (`max_context`, `input_length`, ...).
    details: dict[str, Any] = field(default_factory=dict)
    #: The exception itself, for a door that re-raises it into its own error handler.
    exc: BaseException | None = field(default=None, repr=False, compare=False)
    kind: Literal["error"] = "error"

    @classmethod
    def of(cls, exc: BaseException) -> ErrorEvent:
        wire = errors.to_wire(exc)  # logs an unexpected error with its traceback
        details = {k: v for k, v in wire.items() if k not in ("type", "code", "message")}
        status = exc.http_status if isinstance(exc, errors.LLMWSError) else 500
        return cls(wire["code"], wire["message"], status, details, exc)


Event = StartEvent | TokenEvent | WarningEvent | ToolCallEvent | DoneEvent | ErrorEvent


# ---------------------------------------------------------------------- features


def render_messages(messages: list[ChatMessage]) -> list[Message]:
    """Messages into the {role, content} shape every chat template accepts.

    Tool traffic is rendered as text in the Hermes/Qwen convention (an assistant's
    calls as `<tool_call>` blocks, a tool's result as a user turn wrapped in
    `<tool_response>`), so templates without tool support still see it.

    Raises:
        BadRequest: no messages, or a message without a known role.
    """
    out: list[Message] = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise errors.BadRequest("Each message needs a role.")
        role, text = m["role"], m.get("content") or ""
        if not isinstance(text, str):
            raise errors.BadRequest("A message's content must be text.")
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(toolcalls.call_text(c.get("name"), c.get("arguments") or {}) for c in m["tool_calls"])
            text = (text + "\n" if text else "") + calls
        elif role == "tool":
            role, text = "user", toolcalls.result_text(text)
        elif role not in ("system", "user", "assistant"):
            raise errors.BadRequest(f"Unknown message role {str(role)[:32]!r}.")
        rendered: Message = {"role": role, "content": text}
        if m.get("images"):
            if role != "user" or not isinstance(m["images"], list):
                raise errors.BadRequest("Images are accepted in user messages only.")
            rendered["images"] = list(m["images"])
        out.append(rendered)
    if not out:
        raise errors.BadRequest("messages must not be empty.")
    return out


def with_json_instruction(messages: list[Message], fmt: ResponseFormat) -> list[Message]:
    """`messages` with the JSON-mode instruction in the system message."""
    text = JSON_INSTRUCTION
    if fmt.schema:
        text += " It must match this JSON schema: " + json.dumps(fmt.schema)
    return toolcalls.with_system_text(messages, text)


def extract_json(text: str) -> str:
    """The first complete JSON value in `text` (best effort without a grammar)."""
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                value, _ = decoder.raw_decode(text[i:])
            except ValueError:
                continue
            return json.dumps(value, ensure_ascii=False)
    return text


def limits_warning(n_messages: int, tokens_in: int, dropped: int, max_context: int | None) -> WarningEvent | None:
    """The warning for a conversation near or over the limits, with a suggestion."""
    suggestion = "Summarize the conversation (POST /v1/chat/summarize) and continue with the shorter history."
    base = {"messages": n_messages, "tokens": tokens_in, "max_context": max_context, "suggestion": suggestion}
    if dropped:
        return WarningEvent(
            "history_truncated",
            f"The conversation does not fit the model's context; the oldest {dropped} messages were left out of this reply.",
            {"dropped_messages": dropped, **base},
        )
    if max_context and tokens_in >= NEAR_LIMIT_SHARE * max_context:
        share = round(100 * tokens_in / max_context)
        return WarningEvent(
            "context_near_limit",
            f"The conversation uses {share}% of the model's context ({tokens_in} of {max_context} tokens).",
            base,
        )
    if n_messages > MAX_MESSAGES_WARN:
        return WarningEvent(
            "too_many_messages", f"The conversation has {n_messages} messages (more than {MAX_MESSAGES_WARN}).", base
        )
    return None


@dataclass
class Summary:
    """A conversation summarized: the summary and the shorter history that replaces it."""

    summary: str
    messages: list[Message]
    tokens_before: int
    tokens_after: int


def transcript(messages: list[Message]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages if m["role"] != "system")


# ---------------------------------------------------------------------- the service


@dataclass
class _Plan:
    """A request turned into what the chat service runs."""

    messages: list[Message]
    params: GenerationParams
    tools: list[Tool] | None
    json: ResponseFormat | None
    request: GenerationRequest
    remote: str | None = None
    #: The reply is forced to be a call (tool_choice "required" or a tool's name).
    forced: bool = False


_END = object()


class Generation:
    """One running generation: its start, its events, its end. See the module docstring."""

    def __init__(self, service: GenerationService, plan: _Plan) -> None:
        self._service = service
        self._plan = plan
        self._cancel = threading.Event()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._ended = False
        #: The model has taken the request (from here on, cancelling goes through the model).
        self._running = False
        #: Set by `start`: the prompt fits and the model has begun.
        self.started: StartEvent | None = None
        #: The reply's id (doors use it as their completion id, with their own prefix).
        self.id = uuid.uuid4().hex

    @property
    def request(self) -> GenerationRequest:
        return self._plan.request

    async def start(self) -> StartEvent:
        """Wait for the model's turn and the prompt check, then return the start.

        Raises:
            LLMWSError: the request cannot be served (context_too_long, no model, ...).
            Cancelled: `cancel()` was called while the request waited for its turn.
        """
        plan = self._plan
        plan.remote = await self._service.models.serve_request_model(
            plan.request.model, may_switch=plan.request.may_switch
        )
        await self._service.check_images(plan)
        self._task = self._service._spawn(self._run())
        # The end mark comes from the task's end, so it comes even for a task
        # cancelled before its first step.
        self._task.add_done_callback(lambda _: self._queue.put_nowait(_END))
        try:
            first = await self._queue.get()
        except BaseException:  # the door's task was cancelled while waiting its turn
            self.cancel()
            raise
        if isinstance(first, BaseException) or first is _END:
            self._ended = True
            if isinstance(first, BaseException):
                raise first
            if self.cancelled:
                raise errors.Cancelled("The request was cancelled before it began.")
            raise errors.Busy("The server is shutting down.")
        assert isinstance(first, StartEvent)
        self.started = first
        return first

    def cancel(self) -> None:
        """Stop the model (within a token); the events end with `done` "cancelled".

        A request still waiting for its turn leaves the queue at once (`start`
        raises Cancelled)."""
        self._cancel.set()
        if not self._running and self._task is not None:
            self._task.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    async def close(self) -> None:
        """The door is done with this generation: cancel it unless it ended or the
        request said on_disconnect="continue"."""
        if not self._ended and self._plan.request.on_disconnect == "cancel":
            self.cancel()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def __aiter__(self) -> AsyncIterator[Event]:
        """The events after the start, ending with a DoneEvent or an ErrorEvent."""
        if self.started is None:
            raise RuntimeError("start() the generation before reading its events")
        while not self._ended:
            item = await self._queue.get()
            if item is _END:
                self._ended = True
                return
            if isinstance(item, (DoneEvent, ErrorEvent)):
                self._ended = True
            yield item

    async def collect(self) -> DoneEvent:
        """Read the rest of the reply; its DoneEvent (the full content and calls).

        Raises:
            The error an ErrorEvent carries (the exception itself).
        """
        async for event in self:
            if isinstance(event, DoneEvent):
                return event
            if isinstance(event, ErrorEvent):
                assert event.exc is not None
                raise event.exc
        raise errors.GenerationError("The generation ended without a result.")

    # ------------------------------------------------------------------ the model's side

    async def _run(self) -> None:
        plan, put = self._plan, self._queue.put_nowait
        chat = self._service.chat
        tools, fmt = plan.tools, plan.json
        started = False
        constrained = False
        hold = False
        held: list[str] = []
        parts: list[str] = []
        # Filled by the backend's thread just before each token's text is handed over,
        # so the entries of a text chunk are here when the chunk is.
        pending: list[TokenLogprob] = []
        if plan.params.logprobs is not None:
            plan.params.on_logprob = pending.append

        def take() -> tuple[TokenLogprob, ...]:
            n = len(pending)
            out = tuple(pending[:n])
            del pending[:n]
            return out

        try:
            async for chunk in chat.generate(
                plan.messages,
                plan.params,
                cancel=self._cancel,
                trim_history=plan.request.keep_reply_room,
                model=plan.remote,
                prompt=plan.request.prompt,
            ):
                self._running = True
                if chunk.result is not None:
                    result = chunk.result
                    if not started:  # cancelled before its turn came
                        put(self._start_event(0, 0, False))
                        started = True
                    text = "".join(parts)
                    cut = result.finish_reason == "length"
                    content, calls = self._finish(text, constrained, cut)
                    if held:
                        held_content, held_calls = self._finish("".join(held), constrained, cut)
                        if held_calls:
                            put(ToolCallEvent(tuple(held_calls)))
                        elif held_content:
                            put(TokenEvent(held_content, len(held)))
                    partial = any(c.partial_arguments is not None for c in calls)
                    put(
                        DoneEvent(
                            "length" if partial else "tool_calls" if calls else result.finish_reason,
                            result.tokens_in,
                            result.tokens_out,
                            content,
                            tuple(calls),
                            tuple(result.logprobs) if result.logprobs is not None else None,
                            result.stop_sequence,
                        )
                    )
                elif chunk.text:
                    parts.append(chunk.text)
                    if hold:
                        held.append(chunk.text)
                        joined = "".join(held)
                        if fmt is None and not toolcalls.may_be_tool_call(joined):
                            put(TokenEvent(joined, len(held)))
                            hold, held = False, []
                    else:
                        put(TokenEvent(chunk.text, chunk.count, take()))
                else:  # the first chunk: the prompt fits
                    constrained = chunk.constrained
                    # Held back while the reply may still become a tool call or must be JSON-extracted.
                    hold = bool(tools) or (fmt is not None and not constrained)
                    put(self._start_event(chunk.tokens_in, chunk.dropped_messages, constrained))
                    started = True
                    warning = limits_warning(
                        len(plan.messages), chunk.tokens_in, chunk.dropped_messages, self._service.models.max_context
                    )
                    if warning is not None:
                        put(warning)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            put(ErrorEvent.of(exc) if started else exc)

    def _start_event(self, tokens_in: int, dropped: int, constrained: bool) -> StartEvent:
        plan = self._plan
        name = plan.remote or self._service.models.name or plan.request.model or "llmws"
        return StartEvent(tokens_in, plan.params.max_new_tokens, name, dropped, constrained)

    def _finish(self, text: str, constrained: bool, cut: bool = False) -> tuple[str | None, list[ToolCall]]:
        """Final (content, tool calls) of a complete reply (`cut`: by the token limit).

        A forced call cut short is returned as that call with its arguments as far as
        they got (OpenAI's partial `tool_calls` with finish_reason "length"), never as
        the call's JSON text in the content."""
        calls: list[ToolCall] = []
        if self._plan.tools:
            text, calls = toolcalls.parse_tool_calls(text, self._plan.tools)
            if not calls and cut and self._plan.forced:
                partial = toolcalls.partial_call(text, self._plan.tools)
                if partial is not None:
                    return None, [partial]
        if self._plan.json is not None and not constrained and not calls:
            text = extract_json(text)
        return (text if text or not calls else None), calls


class GenerationService:
    """Chat generations for every door: prepare, start, stream or collect."""

    def __init__(self, chat: ChatService, models: ModelService) -> None:
        self.chat = chat
        self.models = models
        #: Generations whose door left, finishing in the background (kept from the GC).
        self._tasks: set[asyncio.Task[None]] = set()

    def prepare(self, request: GenerationRequest) -> Generation:
        """Check a request and turn it into a generation (not started yet).

        Raises:
            BadRequest: bad messages, tools, tool_choice or response_format.
        """
        if request.prompt is not None:
            return self._prepare_completion(request)
        messages = render_messages(request.messages)
        tools = request.tools if request.tools and request.tool_choice != "none" else None
        messages = toolcalls.with_tools(messages, tools, request.tool_choice)
        params = self.params(request.sampling, request.principal)
        forced = toolcalls.forced_call_format(tools, request.tool_choice)
        # A forced call is the whole reply, so the response format (which shapes content) yields.
        fmt = None if forced else request.response_format
        if fmt is not None:
            messages = with_json_instruction(messages, fmt)
        params.response_format = forced or (fmt.as_openai() if fmt is not None else None)
        params.logprobs = request.logprobs
        # A schema no grammar can be made of is the client's error on every backend, and
        # must be refused before a stream starts (the grammar is cached for the backend).
        grammar.grammar_for(params.response_format)
        return Generation(self, _Plan(messages, params, tools, fmt, request, forced=forced is not None))

    def _prepare_completion(self, request: GenerationRequest) -> Generation:
        """A raw-text continuation: no chat template, no tools; a response format is only
        a grammar (there is no system message to instruct)."""
        if request.tools:
            raise errors.BadRequest("Tools need a chat request; a raw prompt cannot offer them.")
        params = self.params(request.sampling, request.principal)
        params.logprobs = request.logprobs
        fmt = request.response_format
        params.response_format = fmt.as_openai() if fmt is not None else None
        grammar.grammar_for(params.response_format)
        return Generation(self, _Plan([], params, None, fmt, request))

    async def check_images(self, plan: _Plan) -> None:
        """Check the request's images (decoding in a worker thread) into the form backends read.

        Raises:
            Unsupported: the model serving the request takes text only, or a remote URL
                while `security.allow_image_urls` is off.
            InvalidImage: too many images, or a corrupt or oversized one.
        """
        if not images.count(plan.messages):
            return
        if not self.models.takes_images(plan.remote):
            name = plan.remote or self.models.name or "no model"
            raise errors.Unsupported(
                f"The model {name} takes text only, so this request's images cannot be read; "
                "send it without images or use a vision model."
            )
        limits = images.ImageLimits.of(self.chat.settings)
        images.check_count([i for m in plan.messages for i in m.get("images") or ()], limits)
        for m in plan.messages:
            if m.get("images"):
                m["images"] = await images.resolve(m["images"], limits)

    def params(self, sampling: Sampling, principal: str) -> GenerationParams:
        """Generation parameters: the server's defaults under `sampling`, cached for `principal`."""
        params = self.chat.params_from(self.chat.effective_config(None, sampling.overrides()))
        params.cache_key = principal
        return params

    async def start(self, request: GenerationRequest) -> Generation:
        """`prepare` and start: returns once the model has begun (see `Generation.start`)."""
        gen = self.prepare(request)
        await gen.start()
        return gen

    async def complete(self, request: GenerationRequest) -> DoneEvent:
        """The whole reply at once."""
        gen = await self.start(request)
        async with gen:
            return await gen.collect()

    async def count_tokens(
        self, messages: list[ChatMessage], *, tools: list[Tool] | None = None, tool_choice: ToolChoice = "auto"
    ) -> int:
        """Real prompt tokens of `messages` under the loaded model's chat template, with
        the description of `tools` a generation would add (none for tool_choice "none")."""
        backend = self.chat.models.backend
        if backend is None:
            raise errors.ModelNotLoaded("No model is loaded yet.")
        rendered = render_messages(messages)
        if tools and tool_choice != "none":
            rendered = toolcalls.with_tools(rendered, tools, tool_choice)
        return await asyncio.to_thread(backend.count_tokens, rendered)

    async def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        """Token ids of plain text under the loaded model (no chat template)."""
        backend = self.chat.models.backend
        if backend is None:
            raise errors.ModelNotLoaded("No model is loaded yet.")
        return await asyncio.to_thread(backend.tokenize, text, add_special=add_special)

    async def detokenize(self, tokens: list[int]) -> str:
        """The text of token ids under the loaded model."""
        backend = self.chat.models.backend
        if backend is None:
            raise errors.ModelNotLoaded("No model is loaded yet.")
        return await asyncio.to_thread(backend.detokenize, tokens)

    async def summarize(
        self, messages: list[ChatMessage], *, max_tokens: int | None = None, principal: str = "local"
    ) -> Summary:
        """Summarize a conversation into a shorter replacement history that keeps the
        system message; the token counts are real tokenizer counts.

        Raises:
            BadRequest: no conversation to summarize.
            GenerationError: the model returned an empty summary.
        """
        rendered = render_messages(messages)
        if not any(m["role"] != "system" for m in rendered):
            raise errors.BadRequest("There is no conversation to summarize.")
        before = await self.count_tokens(rendered)
        text = transcript(rendered)
        max_ctx = self.models.max_context or 2048
        budget = max_tokens or max(32, min(512, before // 3))
        room = max_ctx - budget - 128
        if before > room:  # keep the most recent part of a transcript that does not fit
            text = text[-max(256, int(len(text) * room / before)) :]
        done = await self.complete(
            GenerationRequest(
                messages=[
                    {"role": "system", "content": SUMMARY_SYSTEM},
                    {"role": "user", "content": f"Summarize this conversation:\n\n{text}"},
                ],
                sampling=Sampling(max_tokens=budget, temperature=0.0, seed=0),
                principal=principal,
            )
        )
        summary = (done.content or "").strip()
        if not summary:
            raise errors.GenerationError("The model returned an empty summary.")
        shorter: list[Message] = [m for m in rendered if m["role"] == "system"][:1]
        shorter.append({"role": "assistant", "content": f"Summary of the conversation so far: {summary}"})
        after = await self.count_tokens(shorter)
        return Summary(summary, shorter, before, after)

    async def warm(self, messages: list[ChatMessage], tools: list[Tool] | None, *, principal: str) -> tuple[int, bool]:
        """Evaluate a prompt prefix (`messages` and `tools`) into the model's cache for
        `principal`, so its next request that starts with them skips their prefill.

        Returns (cached tokens, whether the cache also lives on disk).

        Raises:
            GenerationError: the prompt could not be evaluated.
        """
        rendered = toolcalls.with_tools(render_messages(messages), tools, "auto")
        params = self.params(Sampling(max_tokens=1, temperature=0.0, seed=0), principal)
        cached, persistent, warmed = 0, False, False
        async with self.chat.models.use() as backend:
            # Asked of the backend this request holds: a switch may have changed it since.
            warm_prefix = getattr(backend, "warm_prefix", None)
            if warm_prefix is not None:
                # A backend with a real prefix cache (kept in RAM, sealed on disk).
                cached, persistent = await asyncio.to_thread(warm_prefix, rendered, params.cache_key)
                warmed = True
        if not warmed:
            # llama.cpp keeps the KV state of its last evaluation and reuses the longest
            # common prefix: evaluating the prompt (one token out) leaves it warm.
            async for chunk in self.chat.generate(rendered, params, cancel=threading.Event(), trim_history=False):
                if chunk.result is not None:
                    cached = chunk.result.tokens_in
                elif chunk.tokens_in:
                    cached = chunk.tokens_in
        if not cached:
            raise errors.GenerationError("The prompt could not be evaluated.")
        return cached, persistent

    def improve(
        self, messages: list[ChatMessage], sampling: Sampling, *, principal: str, cancel: threading.Event
    ) -> AsyncIterator[ImproveEvent]:
        """The improvement pipeline (draft, review, revision, ...; see improve.py) over
        `messages`, as its labelled events; `cancel` stops it.

        Raises:
            BadRequest: bad messages.
        """
        rendered = render_messages(messages)
        return improve_stream(self.chat, rendered, self.params(sampling, principal), cancel=cancel)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
