"""What OpenAI's chat and text completions share: `n` choices, `logprobs`, `system_fingerprint`.

`n` choices are `n` generations of one request started together; a batching backend
(llama.cpp's slots) decodes them as sequences of one batch. With a `seed`, choice i
samples with seed + i, so the choices differ and each is reproducible.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Request

from .. import __version__, errors
from ..services.generation import (
    DoneEvent,
    ErrorEvent,
    Event,
    Generation,
    GenerationRequest,
    TokenLogprob,
)
from .common import cancel_when_gone, generation

#: Most choices one request may ask for.
MAX_N = 16
#: Most alternatives per token (OpenAI's limit for top_logprobs).
MAX_TOP_LOGPROBS = 20


def fingerprint(model: str) -> str:
    """`system_fingerprint`: names this server build and the model that answered."""
    return "fp_" + hashlib.sha256(f"llmws {__version__} {model}".encode()).hexdigest()[:10]


def logprob_entries(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI's `logprobs.content` items: token, logprob, bytes, top_logprobs."""
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": e.bytes,
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in e.top],
        }
        for e in entries
    ]


def prepare(request: Request, req: GenerationRequest, n: int) -> list[Generation]:
    """`n` generations of `req` (raises BadRequest for a bad request before anything runs)."""
    if not 1 <= n <= MAX_N:
        raise errors.BadRequest(f"n must lie in 1..{MAX_N}.", param="n")
    service = generation(request)
    gens = []
    for i in range(n):
        sampling = req.sampling
        if i and sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + i) & 0xFFFFFFFF)
        gens.append(service.prepare(dataclasses.replace(req, sampling=sampling)))
    return gens


def _cancel_all(gens: Sequence[Generation]) -> Callable[[], None]:
    def cancel() -> None:
        for g in gens:
            g.cancel()

    return cancel


async def start_all(request: Request, gens: Sequence[Generation]) -> bool:
    """Start every generation; False if the client left while they waited (all cancelled).

    A start error (context_too_long, ...) cancels the others and raises."""
    try:
        async with cancel_when_gone(request, _cancel_all(gens)):
            results = await asyncio.gather(*(g.start() for g in gens), return_exceptions=True)
    except BaseException:
        _cancel_all(gens)()
        raise
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        _cancel_all(gens)()
        for g in gens:
            await g.close()
        if all(isinstance(f, errors.Cancelled) for f in failures):
            return False
        raise next(f for f in failures if not isinstance(f, errors.Cancelled))
    return True


async def collect_all(request: Request, gens: Sequence[Generation]) -> list[DoneEvent]:
    """Every generation's whole reply, in choice order."""
    async with contextlib.AsyncExitStack() as stack:
        for g in gens:
            await stack.enter_async_context(g)
        await stack.enter_async_context(cancel_when_gone(request, _cancel_all(gens)))
        return list(await asyncio.gather(*(g.collect() for g in gens)))


async def merged(request: Request, gens: Sequence[Generation]) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) of all generations as they come; each one's events end with
    its DoneEvent or ErrorEvent."""
    if len(gens) == 1:
        async with gens[0], cancel_when_gone(request, gens[0].cancel):
            async for ev in gens[0]:
                yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()

    async def pump(i: int, g: Generation) -> None:
        try:
            async for ev in g:
                queue.put_nowait((i, ev))
        except Exception as exc:
            queue.put_nowait((i, ErrorEvent.of(exc)))
        finally:
            queue.put_nowait(None)

    async with contextlib.AsyncExitStack() as stack:
        for g in gens:
            await stack.enter_async_context(g)
        await stack.enter_async_context(cancel_when_gone(request, _cancel_all(gens)))
        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                    continue
                yield item
        finally:
            for t in tasks:
                t.cancel()
