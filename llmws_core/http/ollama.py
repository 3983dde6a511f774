"""Ollama's API on the HTTP port, under `/api`: chat, generate, the model list and more.

Apps and libraries written for Ollama (the official `ollama` Python client, chat UIs,
editor plugins, RAG frameworks) work by pointing them at this port. Requests are
translated into the chat service's request (`options` into generation parameters,
`format` into JSON mode, `tools` into the service's tool calls) and its events are
rendered as Ollama's objects: one JSON object, or newline-delimited JSON when
streamed (the default, as in Ollama). Errors are `{"error": "..."}` with Ollama's
status codes.

Model names: Ollama clients name models `name:tag`. A local model is listed as its
name without a `.gguf` extension plus `:latest`, and a requested name is matched
against the local models as given, without `:latest`, and with `.gguf` added (see
`find_local`). Any other name is served by the loaded model, as on the OpenAI door.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import errors
from ..services.embeddings import EmbedRequest, EmbedResult
from ..services.generation import (
    ChatMessage,
    DoneEvent,
    ErrorEvent,
    Generation,
    ResponseFormat,
    Sampling,
    TokenEvent,
    ToolCallEvent,
)
from ..services.models import ModelService
from ..services.tools import Tool, ToolCall
from .auth import admin_key, is_admin, llmws, user_key
from .common import cancel_when_gone, generation, sampling_request, start_or_gone

logger = logging.getLogger("llmws.http.ollama")

router = APIRouter(tags=["Ollama"], dependencies=[Depends(user_key)])

#: Paths whose errors are Ollama error objects.
PATH_PREFIX = "/api/"

#: The Ollama API release whose routes and fields this door follows (`/api/version`).
OLLAMA_API_VERSION = "0.9.0"

NDJSON = "application/x-ndjson"


# ---------------------------------------------------------------------- wire models


class Options(BaseModel):
    """Ollama's `options`. The generation ones are honoured; load-time ones
    (`num_gpu`, `num_thread`, ...) and other samplers are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    num_predict: int | None = Field(
        None, ge=-2, description="Most tokens to generate; -1 and -2: until the reply ends or the context is full."
    )
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    repeat_penalty: float | None = Field(None, gt=0, le=5)
    num_ctx: int | None = Field(
        None, ge=1, description="Accepted; the context size is the server's (from the model and free memory)."
    )


class WireFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class WireToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    function: WireFunction


class WireMessage(BaseModel):
    """One message of `/api/chat`."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[WireToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class GenerationBody(BaseModel):
    """What `/api/chat` and `/api/generate` share."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(..., min_length=1, max_length=1024)
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool = True
    keep_alive: float | str | None = Field(
        None, description="Accepted; the model stays loaded until another is chosen."
    )
    think: bool | str | None = Field(None, description="Accepted; the models served here do not think aloud.")


class ChatRequest(GenerationBody):
    messages: list[WireMessage] = Field(default_factory=list, max_length=10_000)
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)


class GenerateRequest(GenerationBody):
    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list[str] | None = None


class ModelRequest(BaseModel):
    """`/api/show`, `/api/delete`: a model by name (`name` is the older spelling)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, max_length=1024)
    name: str | None = Field(None, max_length=1024)

    @property
    def requested(self) -> str:
        value = self.model or self.name
        if not value:
            raise errors.BadRequest("model is required")
        return value


# ---------------------------------------------------------------------- translation


def sampling(options: Options | None, max_context: int | None) -> Sampling:
    """`options` as the service's generation parameters (None: the server's default)."""
    if options is None:
        return Sampling()
    predict = options.num_predict
    if predict is not None and predict <= 0:
        if predict == 0:
            raise errors.BadRequest("options.num_predict must be positive, or -1 (until the reply ends).")
        predict = max_context  # -1, -2: as long as the context allows
    stop = [options.stop] if isinstance(options.stop, str) else options.stop
    return Sampling(
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        max_tokens=predict,
        stop=stop,
        seed=options.seed,
        repeat_penalty=options.repeat_penalty,
    )


def response_format(fmt: str | dict[str, Any] | None) -> ResponseFormat | None:
    """Ollama's `format` ("json" or a JSON schema) as the service's JSON mode."""
    if fmt is None or fmt == "":
        return None
    return ResponseFormat(schema=fmt if isinstance(fmt, dict) else None)


def chat_messages(messages: list[WireMessage]) -> list[ChatMessage]:
    """Ollama chat messages as the service's chat messages.

    A message's `images` (base64 strings) go with it; the generation service checks
    them (a text-only model refuses them with `unsupported`)."""
    out: list[ChatMessage] = []
    for m in messages:
        entry: ChatMessage = {"role": m.role, "content": m.content or ""}
        if m.images:
            entry["images"] = list(m.images)
        if m.role == "assistant" and m.tool_calls:
            entry["tool_calls"] = [{"name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls]
        out.append(entry)
    return out


def chat_tools(tools: list[dict[str, Any]] | None) -> list[Tool] | None:
    """Ollama's tools (`{"type": "function", "function": {...}}`) as the service's."""
    if not tools:
        return None
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise errors.BadRequest(f"tools.{i}: each tool needs {{'type': 'function', 'function': {{'name': ...}}}}.")
        out.append(fn)
    return out


def generate_messages(body: GenerateRequest) -> list[dict[str, Any]]:
    """`/api/generate`'s prompt (and system) as chat messages, through the model's template.

    Raises:
        Unsupported: `raw`, `template`, `suffix` or `context`, which need a prompt
            outside the chat template. `images` go with the prompt (see `chat_messages`).
    """
    if body.raw:
        raise errors.Unsupported(
            "raw prompts are not supported; the prompt always goes through the model's chat template."
        )
    if body.template:
        raise errors.Unsupported("template is not supported; the model's own chat template is used.")
    if body.suffix:
        raise errors.Unsupported("suffix (fill-in-the-middle) is not supported.")
    if body.context:
        raise errors.Unsupported("context is not supported; send the conversation to /api/chat instead.")
    out: list[dict[str, Any]] = []
    if body.system:
        out.append({"role": "system", "content": body.system})
    user: dict[str, Any] = {"role": "user", "content": body.prompt or ""}
    if body.images:
        user["images"] = list(body.images)
    out.append(user)
    return out


def ollama_tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Tool calls as Ollama's (arguments as an object)."""
    return [
        {"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.arguments}} for i, c in enumerate(calls)
    ]


def done_reason(finish: str) -> str:
    """Ollama's `done_reason`: "length" when max tokens cut the reply, else "stop"."""
    return "length" if finish == "length" else "stop"


def now() -> str:
    """An RFC 3339 timestamp as Ollama writes `created_at`."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Timings:
    """Real durations of one request, in nanoseconds, as Ollama reports them.

    Load: from the request's arrival until the model took it (a model switch it
    caused, its wait in the queue, the prompt check). Prompt evaluation: from then to
    the first token. Evaluation: from the first token to the end."""

    def __init__(self) -> None:
        self.start = time.perf_counter_ns()
        self.loaded = self.start
        self.first: int | None = None

    def mark_loaded(self) -> None:
        self.loaded = time.perf_counter_ns()

    def mark_token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter_ns()

    def final(self, tokens_in: int, tokens_out: int) -> dict[str, int]:
        end = time.perf_counter_ns()
        first = self.first or end
        return {
            "total_duration": end - self.start,
            "load_duration": self.loaded - self.start,
            "prompt_eval_count": tokens_in,
            "prompt_eval_duration": max(0, first - self.loaded),
            "eval_count": tokens_out,
            "eval_duration": max(0, end - first),
        }


# ---------------------------------------------------------------------- model names


def base_name(name: str) -> str:
    return name[:-5] if name.lower().endswith(".gguf") else name


def ollama_name(name: str) -> str:
    """A local model's Ollama-style name: without `.gguf`, tagged `:latest` unless tagged."""
    base = base_name(name)
    return base if ":" in base else base + ":latest"


def find_local(models: list[dict[str, Any]], requested: str) -> dict[str, Any] | None:
    """The listed model an Ollama-style name means, or None.

    Tried in order: the name (or path) as given, without `:latest`, with `.gguf`
    added, the listed Ollama names, and what a pull of that name downloaded
    (`hf.co/org/repo:QUANT`: the model in var/models/org--repo--QUANT)."""
    bare = requested[: -len(":latest")] if requested.endswith(":latest") else requested
    for candidate in (requested, bare, bare + ".gguf"):
        for m in models:
            if candidate in (m.get("name"), m.get("path")):
                return m
    for m in models:
        if ollama_name(m["name"]) == requested:
            return m
    folder = pulled_folder(requested)
    if folder is None:
        return None
    return next((m for m in models if str(m.get("path", "")).startswith(f"var/models/{folder}/")), None)


def pulled_folder(requested: str) -> str | None:
    """The var/models folder a pull of `requested` downloads into (None: not a pullable name)."""
    try:
        return pull_source(requested)[2]
    except errors.Unsupported:
        return None


def parameter_size(count: int | None) -> str:
    if not count:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}".rstrip("0").rstrip(".") + unit
    return str(count)


def details(m: dict[str, Any]) -> dict[str, Any]:
    family = str(m.get("architecture") or "")
    return {
        "parent_model": "",
        "format": m.get("format", ""),
        "family": family,
        "families": [family] if family else None,
        "parameter_size": parameter_size(m.get("parameters")),
        "quantization_level": m.get("quantization") or "",
    }


def digest(m: dict[str, Any]) -> str:
    """A stable identifier of the model file (its path and size; not a content hash,
    which would mean reading gigabytes)."""
    key = f"{m.get('path')}\0{m.get('size_mb')}".encode()
    return hashlib.sha256(key).hexdigest()


def model_entry(m: dict[str, Any]) -> dict[str, Any]:
    """One model of `/api/tags`."""
    name = ollama_name(m["name"])
    return {
        "name": name,
        "model": name,
        "size": int(float(m.get("size_mb") or 0) * 1024 * 1024),
        "digest": digest(m),
        "details": details(m),
    }


# ---------------------------------------------------------------------- errors


def owns_path(path: str) -> bool:
    """Whether errors of `path` take Ollama's shape."""
    return path.startswith(PATH_PREFIX)


def error_body(event: ErrorEvent, param: str | None = None) -> dict[str, Any]:
    """Ollama's error object `{"error": "..."}` (user-safe text only; the status is `event.status`)."""
    return {"error": event.message}


def not_found(requested: str) -> errors.ModelNotFound:
    return errors.ModelNotFound(f"model '{requested[:200]}' not found")


# ---------------------------------------------------------------------- routes without generation


@router.get("/api/version", summary="The Ollama API version this door follows")
async def version() -> dict[str, str]:
    """`{"version": ...}`: the Ollama release whose API this door follows, and LLMWS's own."""
    from .. import __version__

    return {"version": OLLAMA_API_VERSION, "llmws": __version__}


@router.get("/api/tags", summary="The local models (Ollama shape)")
async def tags(request: Request) -> dict[str, Any]:
    """Every local and configured remote model, named `name:tag`."""
    models = await model_service(request).list()
    return {"models": [model_entry(m) for m in models]}


@router.get("/api/ps", summary="The loaded model (Ollama shape)")
async def ps(request: Request) -> dict[str, Any]:
    """The model in memory now, with its context length and how much of it is on a GPU."""
    service = model_service(request)
    models = await service.list()
    info = service.info() or {}
    out = []
    for m in models:
        if not m.get("loaded"):
            continue
        entry = model_entry(m)
        on_gpu = str(info.get("device", "cpu")) != "cpu"
        entry.update(
            {
                "size_vram": entry["size"] if on_gpu else 0,
                "context_length": m.get("max_context") or info.get("max_context"),
            }
        )
        out.append(entry)
    return {"models": out}


@router.post("/api/show", summary="One model's details (Ollama shape)")
async def show(body: ModelRequest, request: Request) -> dict[str, Any]:
    """Details, parameters and capabilities of one model (404 for an unknown name)."""
    requested = body.requested
    service = model_service(request)
    m = find_local(await service.list(), requested)
    if m is None:
        raise not_found(requested)
    info = (service.info() or {}) if m.get("loaded") else {}
    arch = str(info.get("architecture") or m.get("architecture") or "llama")
    model_info: dict[str, Any] = {"general.architecture": arch}
    if m.get("parameters"):
        model_info["general.parameter_count"] = m["parameters"]
    ctx = info.get("n_ctx_train") or m.get("max_context")
    if ctx:
        model_info[f"{arch}.context_length"] = ctx
    return {
        "modelfile": f"# LLMWS serves this model from {m.get('path')}\nFROM {m.get('path')}\n",
        "parameters": "",
        "template": "",
        "details": details(m),
        "model_info": model_info,
        "capabilities": ["embedding"] if m.get("kind") == "embedding" else ["completion", "tools"],
    }


@router.delete("/api/delete", summary="Delete a model (admin)", dependencies=[Depends(admin_key)])
async def delete(body: ModelRequest, request: Request) -> Response:
    """Remove a model from var/models/ (models/ only when allowed); 404 for an unknown
    name, 403 for the loaded or embedded model. Needs the admin key when admin keys exist."""
    requested = body.requested
    service = model_service(request)
    m = find_local(await service.list(), requested)
    if m is None:
        raise not_found(requested)
    if m.get("source") in ("embedded", "config"):
        raise errors.Forbidden(f"'{m['name']}' is not a file in the model folders; it cannot be deleted.")
    folder = pulled_folder(requested)
    await service.delete(
        folder if folder is not None and str(m.get("path", "")).startswith(f"var/models/{folder}/") else m["name"]
    )
    return Response(status_code=200)


@router.post("/api/copy", summary="Not supported (models are files in the model folders)")
async def copy() -> None:
    """Answered with a clear error: copy the model file inside models/ instead."""
    raise errors.Unsupported("Copying models is not supported; models are files in models/ and var/models/.")


@router.post("/api/create", summary="Not supported (no Modelfiles)")
async def create() -> None:
    """Answered with a clear error: put a GGUF file or a model folder into models/ instead."""
    raise errors.Unsupported(
        "Creating models from a Modelfile is not supported; put a GGUF file or a model folder into models/."
    )


@router.post("/api/push", summary="Not supported (no registry)")
async def push() -> None:
    """Answered with a clear error: there is no registry to push to."""
    raise errors.Unsupported("Pushing models is not supported; this server has no registry.")


# ---------------------------------------------------------------------- generation


class Door:
    """One `/api/chat` or `/api/generate` request on its way through the generation service."""

    def __init__(
        self,
        request: Request,
        body: GenerationBody,
        messages: list[ChatMessage],
        *,
        chat: bool,
        tools: list[Tool] | None = None,
    ) -> None:
        self.request = request
        self.body = body
        self.messages = messages
        self.chat = chat
        self.tools = tools
        self.timings = Timings()

    def item(self, text: str = "", **extra: Any) -> dict[str, Any]:
        """One Ollama response object (a streamed piece, or the final one with `extra`)."""
        head: dict[str, Any] = {"model": self.body.model, "created_at": now()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if "tool_calls" in extra:
                message["tool_calls"] = extra.pop("tool_calls")
            head["message"] = message
        else:
            head["response"] = text
        return {**head, "done": False, **extra}

    async def local_name(self) -> str:
        """The model to ask the service for: the local model the name means, else the name."""
        models = await model_service(self.request).list()
        local = find_local(models, self.body.model)
        return local["name"] if local is not None else self.body.model

    async def respond(self) -> Response:
        request = self.request
        models = model_service(request)
        name = await self.local_name()
        if not self.messages:  # Ollama's way to load a model: no prompt
            await models.serve_request_model(name, may_switch=is_admin(request))
            self.timings.mark_loaded()
            return JSONResponse(self.item(done=True, done_reason="load"))
        gen = generation(request).prepare(
            sampling_request(
                request,
                self.messages,
                sampling=sampling(self.body.options, models.max_context),
                model=name,
                response_format=response_format(self.body.format),
                tools=self.tools,
            )
        )
        if not await start_or_gone(request, gen):
            return Response(status_code=499)
        self.timings.mark_loaded()
        if self.body.stream:
            return StreamingResponse(self.lines(gen), media_type=NDJSON)
        async with gen, cancel_when_gone(request, gen.cancel):
            async for event in gen:
                if isinstance(event, (TokenEvent, ToolCallEvent)):
                    self.timings.mark_token()
                elif isinstance(event, DoneEvent):
                    extra = (
                        {"tool_calls": ollama_tool_calls(event.tool_calls)} if event.tool_calls and self.chat else {}
                    )
                    final = self.item(
                        event.content or "",
                        done=True,
                        done_reason=done_reason(event.finish_reason),
                        **extra,
                        **self.timings.final(event.tokens_in, event.tokens_out),
                    )
                    return JSONResponse(final)
                elif isinstance(event, ErrorEvent):
                    return JSONResponse(error_body(event), status_code=event.status)
        raise errors.GenerationError("The generation ended without a result.")

    async def lines(self, gen: Generation) -> AsyncIterator[str]:
        """The streamed reply: one JSON object per line, the last with `done: true`."""
        async with gen, cancel_when_gone(self.request, gen.cancel):
            async for event in gen:
                if isinstance(event, TokenEvent):
                    self.timings.mark_token()
                    yield json_line(self.item(event.text))
                elif isinstance(event, ToolCallEvent):
                    self.timings.mark_token()
                    if self.chat:
                        yield json_line(self.item(tool_calls=ollama_tool_calls(event.calls)))
                elif isinstance(event, DoneEvent):
                    yield json_line(
                        self.item(
                            done=True,
                            done_reason=done_reason(event.finish_reason),
                            **self.timings.final(event.tokens_in, event.tokens_out),
                        )
                    )
                elif isinstance(event, ErrorEvent):
                    yield json_line(error_body(event))


def json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def model_service(request: Request) -> ModelService:
    return llmws(request).models


@router.post("/api/chat", summary="Chat (Ollama shape; streamed NDJSON by default)")
async def chat(body: ChatRequest, request: Request) -> Response:
    """The assistant's reply to `messages`: NDJSON pieces ending with a `done` object
    carrying real counts and durations, or one object with `stream: false`."""
    tools = chat_tools(body.tools)
    return await Door(request, body, chat_messages(body.messages), chat=True, tools=tools).respond()


@router.post("/api/generate", summary="Complete a prompt (Ollama shape; streamed NDJSON by default)")
async def generate(body: GenerateRequest, request: Request) -> Response:
    """A reply to `prompt` (and `system`), through the model's chat template. An
    empty prompt loads the model (`done_reason: "load"`)."""
    messages = generate_messages(body) if body.prompt else []
    return await Door(request, body, messages, chat=False).respond()


# ---------------------------------------------------------------------- pull


class PullBody(BaseModel):
    """`/api/pull`: a model to download (`name` is the older spelling)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, max_length=300)
    name: str | None = Field(None, max_length=300)
    insecure: bool | None = None
    stream: bool = True


#: Hosts whose names mean a Hugging Face repository in a pull.
HF_HOSTS = ("hf.co", "huggingface.co", "www.huggingface.co")


def pull_source(name: str) -> tuple[str, str | None, str]:
    """(Hub repo id, quantization or None, var/models folder) of a pulled name.

    Hugging Face references: `hf.co/org/repo[:QUANT]` (Ollama's syntax),
    `huggingface.co/...` or a plain `org/repo[:QUANT]`; the tag `latest` means the
    default file (a Q4_K_M GGUF where there is one).

    Raises:
        Unsupported: a name of Ollama's own registry (`llama3.2`, `library/...`,
            `registry.ollama.ai/...`), which this server cannot reach.
    """
    text = name.strip().removeprefix("https://").removeprefix("http://")
    host, _, rest = text.partition("/")
    if host.lower() in HF_HOSTS:
        path = rest
    elif rest and "." not in host and host != "library":
        path = text
    else:
        raise errors.Unsupported(
            "Ollama's registry is not reachable from LLMWS: pull a Hugging Face repository "
            "instead, as hf.co/<org>/<repo>[:QUANT] (e.g. hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M)."
        )
    repo, _, tag = path.partition(":")
    quant = None if tag in ("", "latest") else tag
    folder = repo.replace("/", "--") + (f"--{quant}" if quant else "")
    return repo, quant, folder


def pull_progress(event: dict[str, Any]) -> dict[str, Any] | None:
    """A download event as Ollama's pull progress object (None: nothing to show)."""
    kind = event.get("type")
    if kind == "download_started":
        return {"status": "pulling manifest"}
    if kind == "download_progress":
        file = str(event.get("file") or "")
        digest = "sha256:" + hashlib.sha256(file.encode()).hexdigest()
        out: dict[str, Any] = {
            "status": f"pulling {file or digest[7:19]}",
            "digest": digest,
            "completed": event.get("done") or 0,
        }
        if event.get("total") is not None:
            out["total"] = event["total"]
        return out
    if kind == "download_done":
        return {"status": "success"}
    if kind == "error":
        return {"error": str(event.get("message") or "The download failed.")}
    return None


@router.post(
    "/api/pull",
    summary="Download a model from Hugging Face (Ollama progress objects)",
    dependencies=[Depends(admin_key)],
)
async def pull(body: PullBody, request: Request) -> Response:
    """Download `hf.co/org/repo[:QUANT]` (or `org/repo`) into var/models/ with the download
    manager, reporting Ollama's progress objects (`status`, `digest`, `total`,
    `completed`) as NDJSON, or only the last one with `stream: false`. A model pulled
    before answers `success` at once. Needs the admin key when admin keys exist."""
    requested = body.model or body.name
    if not requested:
        raise errors.BadRequest("model is required")
    repo, quant, folder = pull_source(requested)
    models = await model_service(request).list()
    if any(str(m.get("path", "")).startswith(f"var/models/{folder}/") for m in models):
        done = {"status": "success"}
        return StreamingResponse(iter([json_line(done)]), media_type=NDJSON) if body.stream else JSONResponse(done)
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await model_service(request).downloads.start(repo, folder, events.put_nowait, quant=quant)

    async def progress() -> AsyncIterator[dict[str, Any]]:
        while True:
            item = pull_progress(await events.get())
            if item is not None:
                yield item
                if "error" in item or item.get("status") == "success":
                    return

    if body.stream:
        return StreamingResponse((json_line(item) async for item in progress()), media_type=NDJSON)
    last: dict[str, Any] = {}
    async for item in progress():
        last = item
    if "error" in last:
        return JSONResponse(last, status_code=502)
    return JSONResponse(last)


# ---------------------------------------------------------------------- embeddings


class EmbedBody(BaseModel):
    """`/api/embed`: one text or a list of texts."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(..., min_length=1, max_length=1024)
    input: str | list[str] = Field(..., description="A text or a list of texts.")
    truncate: bool = Field(True, description="Cut inputs longer than the model takes (false: a 400).")
    dimensions: int | None = Field(None, ge=1, description="Keep the first `dimensions` values, re-normalised.")
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


class EmbeddingsBody(BaseModel):
    """The older `/api/embeddings`: one `prompt`."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(..., min_length=1, max_length=1024)
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


async def embed_texts(
    request: Request, model: str, texts: list[str], *, truncate: bool = True, dimensions: int | None = None
) -> tuple[EmbedResult, dict[str, int]]:
    """Vectors of `texts` from the embedding model an Ollama name means, and Ollama's timings.

    A listed embedding model is found as chat models are (see `find_local`); any other
    name is served by the default embedding model, a chat model's name is a 400."""
    service = llmws(request).embeddings
    started = time.perf_counter_ns()
    local = find_local(await model_service(request).list(), model)
    name = local["name"] if local is not None else model
    entry = await service.resolve(name)
    was_loaded = service.models.is_loaded(entry.path)
    result = await service.embed(EmbedRequest(inputs=list(texts), model=name, dimensions=dimensions, truncate=truncate))
    total = time.perf_counter_ns() - started
    # The first request loads the model inside `embed`; its time is then all load.
    return result, {
        "total_duration": total,
        "load_duration": 0 if was_loaded else total,
        "prompt_eval_count": result.prompt_tokens,
    }


@router.post("/api/embed", summary="Embeddings (Ollama shape)")
async def embed(body: EmbedBody, request: Request) -> dict[str, Any]:
    """Unit-length vectors of `input` (one per text) from an embedding model."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise errors.BadRequest("input must not be empty")
    result, timings = await embed_texts(request, body.model, texts, truncate=body.truncate, dimensions=body.dimensions)
    return {"model": body.model, "embeddings": result.vectors, **timings}


@router.post("/api/embeddings", summary="One embedding (Ollama's older shape)")
async def embeddings(body: EmbeddingsBody, request: Request) -> dict[str, Any]:
    """`{"embedding": [...]}` of `prompt` (unit length, as `/api/embed`'s)."""
    if not body.prompt:
        return {"embedding": []}
    result, _ = await embed_texts(request, body.model, [body.prompt])
    return {"embedding": result.vectors[0]}
