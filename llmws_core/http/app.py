"""The HTTP/SSE adapter's FastAPI application (routes live in sibling modules)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse

from .. import __version__
from ..config import REPO_ROOT

if TYPE_CHECKING:
    from ..daemon import App

WEB_CLIENT = REPO_ROOT / "web_client_enhanced.html"


def create_app(app: App) -> FastAPI:
    """Build the HTTP adapter over the daemon's services."""
    api = FastAPI(title="LLMWS", version=__version__)
    api.state.llmws = app

    @api.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and the basics a client needs (the WebSocket port)."""
        return {
            "status": "ok",
            "model": app.models.model_info(),
            "max_context": app.models.max_context,
            "ws_port": app.ws_port,
            "version": __version__,
        }

    @api.get("/ui", include_in_schema=False)
    async def ui() -> Any:
        """The browser client."""
        if not Path(WEB_CLIENT).exists():
            return JSONResponse({"detail": "web client not installed"}, status_code=404)
        return FileResponse(WEB_CLIENT, media_type="text/html")

    return api
