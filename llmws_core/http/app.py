"""The HTTP/SSE adapter's FastAPI application (routes live in sibling modules).

One module per surface (a door), each a thin translator over the services:

- openai.py            `/v1/models`, `/v1/models/{id}`, `/v1/chat/completions` (the official SDK,
                       LiteLLM, curl)
- responses.py         `/v1/responses` (OpenAI's Responses API: stored, resumable responses)
- completions.py       `/v1/completions` (raw-text continuation)
- embeddings.py        `/v1/embeddings` over the embedding service
- choices.py           what chat and text completions share: `n`, logprobs, system_fingerprint
- tokenize.py          llama.cpp server's `/tokenize`, `/detokenize`
- anthropic.py         `/v1/messages`, `/v1/messages/count_tokens` (the official `anthropic` SDK)
- ollama.py            Ollama's `/api/chat`, `/api/generate`, `/api/tags`, ... (the `ollama` client)
- llamacpp_server.py   the llama-cpp FastAPI server's `/`, `/models`, `/setModel`,
                       `/chat/completions`, `/restore_cache`
- nash.py              nash-llm-server's SSE `/v1/chat/completions/stream`, `/v1/chat/summarize`,
                       and session-backed streams that resume with `Last-Event-ID`
- hf_server.py         the HF "LLM Server"'s `/chat/blocking`, `/chat/stream`, `/ping`
- sessions.py          `/v1/sessions/{id}/history` and `DELETE /v1/sessions/{id}`
- mcp.py               `/v1/mcp/{method}` over the configured MCP servers
- metrics.py           Prometheus `/metrics`
- auth.py              API keys and the Host (DNS rebinding) check (rules: ../security.py)
- common.py            what the doors share (the services of a request, SSE, disconnects)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, errors
from ..config import REPO_ROOT
from ..services.generation import ErrorEvent
from . import (
    anthropic,
    completions,
    embeddings,
    hf_server,
    llamacpp_server,
    mcp,
    metrics,
    nash,
    ollama,
    openai,
    responses,
    sessions,
    tokenize,
)
from .auth import ClientTag, HostCheck
from .sitecheck import CrossSiteGuard, ui_headers

if TYPE_CHECKING:
    from ..services import Services

logger = logging.getLogger("llmws.http")

WEB_CLIENT = REPO_ROOT / "web_client_enhanced.html"
#: The browser libraries the web client loads by relative path (`vendor/...`).
WEB_VENDOR = REPO_ROOT / "vendor"

#: Surfaces with an error shape of their own: each has `owns_path(path) -> bool` and
#: `error_body(event: ErrorEvent, param: str | None) -> dict`. Every other route
#: answers {"detail": ..., "code": ...}.
ERROR_SHAPES: tuple[Any, ...] = (openai, responses, tokenize, anthropic, ollama)


def _error_shape(request: Request) -> Any:
    return next((door for door in ERROR_SHAPES if door.owns_path(request.url.path)), None)


def create_app(app: Services) -> FastAPI:
    """Build the HTTP adapter over the daemon's services."""

    @contextlib.asynccontextmanager
    async def lifespan(_api: FastAPI) -> AsyncIterator[None]:
        yield
        if app_mcp is not None:
            await app_mcp.close()

    api = FastAPI(
        title="LLMWS",
        version=__version__,
        description=(
            "Local LLM server: OpenAI-compatible chat, the earlier REST servers' routes, "
            "SSE streams that resume with Last-Event-ID, MCP tools, answer improvement."
        ),
        lifespan=lifespan,
        # Swagger UI and ReDoc pages load their scripts from a CDN: a local server whose
        # promise is that nothing leaves the machine serves only /openapi.json.
        docs_url=None,
        redoc_url=None,
    )
    api.state.services = app
    app_mcp = mcp.attach(api, app)
    metrics.attach(api, app)

    @api.exception_handler(errors.LLMWSError)
    async def llmws_error(request: Request, exc: errors.LLMWSError) -> JSONResponse:
        return _error_response(request, exc)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        door = _error_shape(request)
        if door is not None:
            first = exc.errors()[0] if exc.errors() else {}
            if first.get("type") == "json_invalid":
                # loc is ("body", <character offset>): no parameter to name.
                event = ErrorEvent.of(errors.BadRequest("The request body is not valid JSON."))
                return JSONResponse(door.error_body(event, None), status_code=400)
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            msg = f"Invalid request: {where}: {first.get('msg', 'invalid value')}" if where else "Invalid request body."
            return JSONResponse(door.error_body(ErrorEvent.of(errors.BadRequest(msg)), where or None), status_code=400)
        # FastAPI's own shape ({"detail": [...]}, 422), minus the echoed input.
        detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Unknown routes and wrong methods under /v1 answer as OpenAI does, so an SDK
        # reports "not found" instead of failing to parse {"detail": ...}.
        door = _error_shape(request)
        if door in (anthropic, ollama):  # those doors' paths: their own shape
            body = _route_error(exc.status_code, request)["error"]
            event = ErrorEvent(body["code"], body["message"], exc.status_code)
            return JSONResponse(door.error_body(event, None), status_code=exc.status_code, headers=exc.headers)
        # /v1/mcp/* keeps the MCP routes' own {"detail"} shape (nash's clients read it).
        path = request.url.path
        if (path.startswith("/v1/") and not path.startswith("/v1/mcp/")) or door is openai:
            return JSONResponse(
                _route_error(exc.status_code, request), status_code=exc.status_code, headers=exc.headers
            )
        return await http_exception_handler(request, exc)

    @api.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(request, exc)  # logged by errors.to_wire, text never sent

    @api.get("/health", tags=["Status"], summary="Liveness and basics (no key needed)")
    async def health() -> dict[str, Any]:
        """Liveness and the basics a client needs (the WebSocket port)."""
        return {
            "status": "ok",
            "model": app.models.info(),
            "max_context": app.models.max_context,
            "ws_port": app.runtime.ws_port,
            "http_port": app.runtime.http_port,
            "queue_depth": app.models.queue_depth,
            "version": __version__,
        }

    @api.get("/ui", tags=["Status"], summary="The browser client (web_client_enhanced.html)")
    async def ui() -> Any:
        """The single-file browser client."""
        try:
            page = await asyncio.to_thread(Path(WEB_CLIENT).read_bytes)
        except FileNotFoundError:
            return JSONResponse({"detail": "The web client is not installed."}, status_code=404)
        return Response(page, media_type="text/html", headers=ui_headers(page))

    if WEB_VENDOR.is_dir():
        # StaticFiles refuses paths that leave the folder; only these files are served.
        api.mount("/vendor", StaticFiles(directory=WEB_VENDOR), name="vendor")

    for module in (
        openai,
        responses,
        completions,
        embeddings,
        tokenize,
        anthropic,
        ollama,
        llamacpp_server,
        nash,
        hf_server,
        sessions,
    ):
        api.include_router(module.router)

    sec = app.settings.security
    if sec.cors_origins:
        api.add_middleware(
            CORSMiddleware,
            allow_origins=sec.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "Last-Event-ID"],
        )
    api.add_middleware(CrossSiteGuard, app=app, respond=_error_response)
    api.add_middleware(ClientTag, app=app)
    # Added last so it runs first: a rebinding attack is refused before anything else.
    api.add_middleware(HostCheck, app=app)
    return api


def _route_error(status: int, request: Request) -> dict[str, Any]:
    """The OpenAI error body of a 404 (no such route) or 405 (wrong method)."""
    if status == 405:
        message, code = f"Method {request.method} is not allowed on {request.url.path[:200]}.", "method_not_allowed"
    elif status == 404:
        message, code = f"Unknown request URL: {request.method} {request.url.path[:200]}.", "unknown_url"
    else:
        message, code = "The request could not be served.", "http_error"
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


def _error_response(request: Request, exc: BaseException) -> JSONResponse:
    event = ErrorEvent.of(exc)  # logs an unexpected error; its text is never sent
    headers = {"WWW-Authenticate": "Bearer"} if event.status == 401 else None
    door = _error_shape(request)
    if door is not None:
        param = event.details.get("param")
        return JSONResponse(
            door.error_body(event, param if isinstance(param, str) else None), status_code=event.status, headers=headers
        )
    body = {"detail": event.message, "code": event.code, **event.details}
    return JSONResponse(body, status_code=event.status, headers=headers)
