"""`POST /v1/mcp/{method}`: nash-llm-server's generic MCP endpoint, on an explicit allowlist.

    POST /v1/mcp/list_tools        {}                              -> {"result": [tool, ...], "tools": [...]}
    POST /v1/mcp/get_tool_schema   {"tool_name"}                   -> {"result": tool}
    POST /v1/mcp/execute_tool      {"tool_name", "args"}           -> {"result": CallToolResult}
    POST /v1/mcp/call_tool         {"name" | "tool_name", "arguments"} -> {"result": CallToolResult}
    POST /v1/mcp/list_prompts      {}                              -> {"result": [prompt, ...]}
    POST /v1/mcp/get_prompt        {"name", "arguments"?}          -> {"result": GetPromptResult}
    POST /v1/mcp/list_resources    {}                              -> {"result": [resource, ...]}
    POST /v1/mcp/read_resource     {"uri"}                         -> {"result": ReadResourceResult}

Every method takes an optional `"server"` (a name from config `mcp_servers`).
A method off the list -> 404 {"detail"}; bad arguments -> 400 {"detail"}; a
failure at the MCP server (or a tool that reports an error) -> 502 {"error"}.
The method name picks a function from the table below, never `getattr`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .. import errors
from ..mcp_client import MCPFailure, MCPManager
from .auth import user_key

if TYPE_CHECKING:
    from ..services import Services

logger = logging.getLogger("llmws.http.mcp")

router = APIRouter(tags=["MCP"], dependencies=[Depends(user_key)])


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server: str | None = Field(None, max_length=256)


class NoArgs(_Args):
    pass


class ToolName(_Args):
    tool_name: str = Field(..., min_length=1, max_length=256)


class ExecuteTool(ToolName):
    args: dict[str, Any] = Field(default_factory=dict)


class CallTool(_Args):
    """`{"name", "arguments"}`, or nash's later client's `{"tool_name", "arguments"}`
    (`args` is taken too, as `execute_tool` names it)."""

    name: str | None = Field(None, min_length=1, max_length=256)
    tool_name: str | None = Field(None, min_length=1, max_length=256)
    arguments: dict[str, Any] | None = None
    args: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_name(self) -> CallTool:
        if not (self.name or self.tool_name):
            raise ValueError("name (or tool_name) is required")
        if self.name and self.tool_name and self.name != self.tool_name:
            raise ValueError("name and tool_name disagree")
        return self

    @property
    def tool(self) -> str:
        return self.name or self.tool_name or ""

    @property
    def tool_arguments(self) -> dict[str, Any]:
        return self.arguments if self.arguments is not None else (self.args or {})


class GetPrompt(_Args):
    name: str = Field(..., min_length=1, max_length=256)
    arguments: dict[str, str] = Field(default_factory=dict)


class ReadResource(_Args):
    uri: str = Field(..., min_length=1, max_length=4096)


def _tool_error(result: dict[str, Any]) -> str | None:
    """The text of a tool result that reports an error (isError), else None."""
    if not result.get("isError"):
        return None
    texts = [c.get("text", "") for c in result.get("content", []) if isinstance(c, dict)]
    return "\n".join(t for t in texts if t)[:1000] or "The tool reported an error."


async def _execute_tool(m: MCPManager, a: ExecuteTool) -> Any:
    result = await m.call_tool(a.tool_name, a.args, a.server)
    failed = _tool_error(result)
    if failed is not None:
        raise MCPFailure(failed)
    return result


Method = tuple[type[_Args], Callable[[MCPManager, Any], Awaitable[Any]]]

#: The allowlist: method name -> (argument model, call).
METHODS: dict[str, Method] = {
    "list_tools": (NoArgs, lambda m, a: m.list_tools(a.server)),
    "get_tool_schema": (ToolName, lambda m, a: m.get_tool_schema(a.tool_name, a.server)),
    "execute_tool": (ExecuteTool, _execute_tool),
    "call_tool": (CallTool, lambda m, a: m.call_tool(a.tool, a.tool_arguments, a.server)),
    "list_prompts": (NoArgs, lambda m, a: m.list_prompts(a.server)),
    "get_prompt": (GetPrompt, lambda m, a: m.get_prompt(a.name, a.arguments, a.server)),
    "list_resources": (NoArgs, lambda m, a: m.list_resources(a.server)),
    "read_resource": (ReadResource, lambda m, a: m.read_resource(a.uri, a.server)),
}


def attach(api: FastAPI, app: Services) -> MCPManager:
    """Create the MCP manager for `app` (servers start on first use) and add the route."""
    manager = MCPManager(app.settings.mcp_servers, app.settings.var_dir / "logs")
    api.state.mcp = manager
    api.include_router(router)
    return manager


@router.post(
    "/v1/mcp/{method}",
    summary="Call an MCP client method (allowlisted)",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "description": 'The method\'s arguments, e.g. {"tool_name": "add", "args": {"a": 1}}; each method also takes an optional "server".',
                    }
                }
            }
        }
    },
    responses={
        400: {"description": "Bad arguments"},
        404: {"description": "Unknown method, tool, prompt or resource"},
        502: {"description": "The MCP server failed"},
    },
)
async def mcp_method(
    request: Request,
    method: str = Path(..., description="One of: " + ", ".join(METHODS)),
) -> JSONResponse:
    """Call `method` with the JSON body as its arguments; `{"result": ...}` on success."""
    entry = METHODS.get(method)
    if entry is None:
        return JSONResponse(
            {"detail": f"Unknown MCP method {method[:64]!r}. Allowed: {', '.join(METHODS)}."}, status_code=404
        )
    model, call = entry
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return JSONResponse({"detail": "The body must be a JSON object."}, status_code=400)
    if not isinstance(data, dict):
        return JSONResponse({"detail": "The body must be a JSON object."}, status_code=400)
    try:
        args = model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": f"Bad arguments for {method}: {problems}"}, status_code=400)
    manager: MCPManager = request.app.state.mcp
    try:
        result = await call(manager, args)
    except (errors.NotFound, errors.BadRequest) as exc:
        return JSONResponse({"detail": exc.message}, status_code=exc.http_status)
    except errors.LLMWSError as exc:
        return JSONResponse({"error": exc.message}, status_code=exc.http_status)
    if method == "list_tools":
        # nash's later client reads `tools`; the earlier one and ours read `result`.
        return JSONResponse({"result": result, "tools": result})
    return JSONResponse({"result": result})
