"""OpenAI's legacy text completions, `POST /v1/completions`, over the generation service.

The prompt is continued as raw text, without the chat template (the backend's
`complete`). `prompt` is a string, a list of strings, a token array or a list of token
arrays; each prompt gets `n` choices, numbered prompt by prompt (OpenAI's order).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import errors
from ..services.generation import (
    DoneEvent,
    ErrorEvent,
    Generation,
    Sampling,
    TokenEvent,
    TokenLogprob,
    parse_response_format,
)
from . import choices
from .auth import user_key
from .common import SSE_HEADERS, sampling_request, sse
from .openai import StreamOptions, finish_reason, openai_error, usage

router = APIRouter(tags=["OpenAI-compatible"], dependencies=[Depends(user_key)])

#: Prompts one request may carry.
MAX_PROMPTS = 64


class CompletionRequest(BaseModel):
    """An OpenAI text completion request. Unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: Any = Field(..., description="A string, a list of strings, a token array or a list of token arrays.")
    model: str | None = Field(None, max_length=1024)
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default is 16 tokens; null: the server's default.")
    temperature: float | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=choices.MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=choices.MAX_TOP_LOGPROBS)
    echo: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    repeat_penalty: float | None = Field(None, gt=0, le=5)
    best_of: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    user: str | None = None


def _is_tokens(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def parse_prompts(raw: Any) -> list[str | list[int]]:
    """The prompts of a request body's `prompt`."""
    if isinstance(raw, str):
        return [raw]
    if _is_tokens(raw):
        return [list(raw)]
    if isinstance(raw, list) and raw and all(isinstance(p, str) or _is_tokens(p) for p in raw):
        if len(raw) > MAX_PROMPTS:
            raise errors.BadRequest(f"At most {MAX_PROMPTS} prompts per request.", param="prompt")
        return [p if isinstance(p, str) else list(p) for p in raw]
    raise errors.BadRequest(
        "prompt must be a string, a list of strings, a token array or a list of token arrays.", param="prompt"
    )


def legacy_logprobs(entries: tuple[TokenLogprob, ...], offset: int) -> dict[str, Any]:
    """OpenAI's completion `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for t, lp, _ in e.top} for e in entries],
        "text_offset": offsets,
    }


class Plan:
    """The generations of one request: `n` per prompt, in choice order."""

    def __init__(self, request: Request, body: CompletionRequest) -> None:
        if body.suffix:
            raise errors.Unsupported("suffix (fill-in-the-middle) is not supported by this server.", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise errors.Unsupported("best_of other than n is not supported by this server.", param="best_of")
        self.prompts = parse_prompts(body.prompt)
        if body.echo and any(not isinstance(p, str) for p in self.prompts):
            raise errors.Unsupported("echo needs text prompts (token-array prompts cannot be echoed).", param="echo")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        sampling = Sampling(
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            max_tokens=body.max_tokens,
            stop=stop,
            seed=body.seed,
            repeat_penalty=body.repeat_penalty,
        )
        fmt = parse_response_format(body.response_format)
        self.gens: list[Generation] = []
        for prompt in self.prompts:
            req = sampling_request(
                request,
                [],
                sampling=sampling,
                model=body.model,
                prompt=prompt,
                logprobs=body.logprobs,
                response_format=fmt,
            )
            self.gens.extend(choices.prepare(request, req, body.n))
        self.n = body.n
        self.body = body
        self.id = "cmpl-" + self.gens[0].id
        self.created = int(time.time())

    def echo(self, index: int) -> str:
        """The text a choice starts with: its prompt when `echo` is set."""
        prompt = self.prompts[index // self.n]
        return prompt if self.body.echo and isinstance(prompt, str) else ""

    def head(self) -> dict[str, Any]:
        started = self.gens[0].started
        assert started is not None
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": started.model,
            "system_fingerprint": choices.fingerprint(started.model),
        }

    def prompt_tokens(self, dones: list[DoneEvent]) -> int:
        return sum(dones[i].tokens_in for i in range(0, len(dones), self.n))


@router.post("/v1/completions", summary="Text completion (OpenAI-compatible; stream or not)")
async def completions(body: CompletionRequest, request: Request) -> Response:
    """Continue `prompt` as raw text (no chat template). With `stream: true` the text comes
    as `text_completion` server-sent events ending with `data: [DONE]`."""
    plan = Plan(request, body)
    if not await choices.start_all(request, plan.gens):
        return Response(status_code=499)
    if body.stream:
        return StreamingResponse(stream(request, plan), media_type="text/event-stream", headers=SSE_HEADERS)
    dones = await choices.collect_all(request, plan.gens)
    out = []
    for i, done in enumerate(dones):
        echo = plan.echo(i)
        lp = legacy_logprobs(done.logprobs or (), len(echo)) if body.logprobs is not None else None
        out.append(
            {
                "text": echo + (done.content or ""),
                "index": i,
                "logprobs": lp,
                "finish_reason": finish_reason(done.finish_reason),
            }
        )
    completion = sum(d.tokens_out for d in dones)
    return JSONResponse({**plan.head(), "choices": out, "usage": usage(plan.prompt_tokens(dones), completion)})


async def stream(request: Request, plan: Plan) -> AsyncIterator[str]:
    """text_completion chunks of every choice as they come, then `[DONE]`."""
    head = plan.head()
    n = 0
    offsets = [len(plan.echo(i)) for i in range(len(plan.gens))]

    def chunk(index: int, text: str, finish: str | None = None, lps: tuple[TokenLogprob, ...] | None = None) -> str:
        nonlocal n
        n += 1
        lp = legacy_logprobs(lps or (), offsets[index]) if plan.body.logprobs is not None and finish is None else None
        offsets[index] += len(text)
        return sse(
            {**head, "choices": [{"text": text, "index": index, "logprobs": lp, "finish_reason": finish}]}, event_id=n
        )

    for i in range(len(plan.gens)):
        if plan.echo(i):
            offsets[i] = 0
            yield chunk(i, plan.echo(i))
    tokens_in: dict[int, int] = {}
    tokens_out = 0
    async for i, ev in choices.merged(request, plan.gens):
        if isinstance(ev, TokenEvent):
            yield chunk(i, ev.text, lps=ev.logprobs)
        elif isinstance(ev, ErrorEvent):
            n += 1
            yield sse(openai_error(ev), event_id=n)
            yield sse("[DONE]")
            return
        elif isinstance(ev, DoneEvent):
            yield chunk(i, "", finish_reason(ev.finish_reason))
            tokens_in[i // plan.n] = ev.tokens_in
            tokens_out += ev.tokens_out
    if plan.body.stream_options and plan.body.stream_options.include_usage:
        n += 1
        yield sse({**head, "choices": [], "usage": usage(sum(tokens_in.values()), tokens_out)}, event_id=n)
    yield sse("[DONE]")
