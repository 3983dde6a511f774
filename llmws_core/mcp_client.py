"""The daemon as an MCP client of the servers listed in config `mcp_servers`.

`"mcp_servers": {"name": {"command", "args", "env"}}` is the shape desktop MCP
clients use. Each server is a stdio subprocess, started on first use and restarted
when it dies (a call that finds the connection closed restarts it and retries once).
Built on the official `mcp` SDK (`stdio_client` + `ClientSession`), whose anyio
task groups must be entered and left in one task: each connection lives in its
own task, and calls from request handlers go through its session.

Errors reach clients as `MCPFailure` with a user-safe message; the server's own
stderr goes to `var/logs/mcp-<name>.log`, never to a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from . import errors
from .config import MCPServer

logger = logging.getLogger("llmws.mcp")


def _mcp_error() -> type[Exception]:
    """The SDK's error class, imported on first use: the SDK costs most of a second to
    import, which every daemon start would pay without a single MCP server configured."""
    try:  # mcp >= 2
        from mcp.shared.exceptions import MCPError
    except ImportError:  # pragma: no cover - mcp 1.x
        from mcp.shared.exceptions import McpError as MCPError  # type: ignore[attr-defined,no-redef]
    return MCPError  # type: ignore[no-any-return]


#: JSON-RPC code the SDK uses when the connection to the server is gone.
CONNECTION_CLOSED = -32000
START_TIMEOUT = 30.0
CALL_TIMEOUT = 120.0

T = TypeVar("T")


class MCPFailure(errors.LLMWSError):
    """An MCP server could not be reached, or the call failed there."""

    code = "mcp_error"
    http_status = 502


def dump(obj: Any) -> Any:
    """An SDK result as plain JSON (camelCase field names, as the MCP wire has them)."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(obj, list):
        return [dump(o) for o in obj]
    return obj


class Connection:
    """One configured MCP server: its subprocess and client session."""

    def __init__(self, name: str, spec: MCPServer, log_dir: Path | None = None) -> None:
        self.name = name
        self.spec = spec
        self.log_dir = log_dir
        self.session: Any = None
        self.starts = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return self.session is not None and self._task is not None and not self._task.done()

    async def get(self) -> Any:
        """The live session, starting (or restarting) the server if needed."""
        async with self._lock:
            if self.alive:
                return self.session
            await self._shutdown()
            self._stop = asyncio.Event()
            ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run(ready), name=f"mcp:{self.name}")
            try:
                self.session = await asyncio.wait_for(asyncio.shield(ready), START_TIMEOUT)
            except Exception as exc:
                await self._shutdown()
                logger.error("MCP server %s did not start: %r", self.name, exc)
                raise MCPFailure(f"The MCP server {self.name!r} could not be started.") from None
            self.starts += 1
            if self.starts > 1:
                logger.warning("MCP server %s restarted (start %d)", self.name, self.starts)
            return self.session

    async def _run(self, ready: asyncio.Future[Any]) -> None:
        """Hold the connection open until asked to stop or the server goes away."""
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        params = StdioServerParameters(
            command=self.spec.command, args=list(self.spec.args), env=dict(self.spec.env) or None
        )
        with contextlib.ExitStack() as files:
            errlog = files.enter_context(self._errlog())
            try:
                async with stdio_client(params, errlog=errlog) as (read, write):
                    async with ClientSession(read, write) as session:
                        await session.initialize()
                        ready.set_result(session)
                        await self._stop.wait()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # the SDK raises ExceptionGroups from its task groups
                if not ready.done():
                    ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError("mcp start failed"))
                else:
                    logger.warning("MCP server %s connection ended: %r", self.name, exc)
            finally:
                self.session = None
                if not ready.done():
                    ready.set_exception(RuntimeError("the MCP server exited during start"))

    @contextlib.contextmanager
    def _errlog(self) -> Any:
        if self.log_dir is None:
            with open("/dev/null", "w") as fh:
                yield fh
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"mcp-{self.name}.log", "a", encoding="utf-8") as fh:
            yield fh

    async def _shutdown(self) -> None:
        self.session = None
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 5)
        except Exception:
            task.cancel()
            # Wait for it to end without taking on its outcome: a suppress around
            # `await task` would also swallow this task's own cancellation.
            await asyncio.wait({task})

    async def call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run `fn(session)`; a closed connection restarts the server and retries once."""
        mcp_error = _mcp_error()
        for attempt in (1, 2):
            session = await self.get()
            try:
                return await asyncio.wait_for(fn(session), CALL_TIMEOUT)
            except mcp_error as exc:
                if getattr(exc, "code", None) == CONNECTION_CLOSED or "closed" in str(exc).lower():
                    logger.warning("MCP server %s: connection closed (attempt %d)", self.name, attempt)
                    await self._shutdown()
                    continue
                raise MCPFailure(f"The MCP server {self.name!r} refused the request: {_short(str(exc))}") from None
            except TimeoutError:
                raise MCPFailure(f"The MCP server {self.name!r} did not answer in time.") from None
            except (OSError, EOFError) as exc:
                logger.warning("MCP server %s: %r (attempt %d)", self.name, exc, attempt)
                await self._shutdown()
        raise MCPFailure(f"The MCP server {self.name!r} keeps exiting.")

    async def close(self) -> None:
        async with self._lock:
            await self._shutdown()


def _short(text: str) -> str:
    """An MCP server's error message, bounded (it is the server's, not ours)."""
    return text.splitlines()[0][:300] if text else "error"


class MCPManager:
    """All configured MCP servers; tools, prompts and resources across them."""

    def __init__(self, servers: dict[str, MCPServer], log_dir: Path | None = None) -> None:
        self.connections = {name: Connection(name, spec, log_dir) for name, spec in servers.items()}
        self._tool_owner: dict[str, str] = {}

    def _pick(self, server: str | None) -> list[Connection]:
        if server is None:
            return list(self.connections.values())
        if server not in self.connections:
            raise errors.NotFound(f"No MCP server named {server!r} is configured.")
        return [self.connections[server]]

    async def list_tools(self, server: str | None = None) -> list[dict[str, Any]]:
        out = []
        for conn in self._pick(server):
            result = await conn.call(lambda s: s.list_tools())
            for tool in result.tools:
                self._tool_owner[tool.name] = conn.name
                out.append({**dump(tool), "server": conn.name})
        return out

    async def _owner(self, tool_name: str, server: str | None) -> Connection:
        if server is not None:
            return self._pick(server)[0]
        if tool_name not in self._tool_owner:
            await self.list_tools()
        owner = self._tool_owner.get(tool_name)
        if owner is None:
            raise errors.NotFound(f"No MCP tool named {tool_name!r}.")
        return self.connections[owner]

    async def get_tool_schema(self, tool_name: str, server: str | None = None) -> dict[str, Any]:
        tools = await self.list_tools(server)
        for tool in tools:
            if tool["name"] == tool_name:
                return tool
        raise errors.NotFound(f"No MCP tool named {tool_name!r}.")

    async def call_tool(self, tool_name: str, arguments: dict[str, Any], server: str | None = None) -> dict[str, Any]:
        conn = await self._owner(tool_name, server)
        result = await conn.call(lambda s: s.call_tool(tool_name, arguments))
        return dump(result)  # type: ignore[no-any-return]

    async def list_prompts(self, server: str | None = None) -> list[dict[str, Any]]:
        out = []
        for conn in self._pick(server):
            result = await conn.call(lambda s: s.list_prompts())
            out += [{**dump(p), "server": conn.name} for p in result.prompts]
        return out

    async def get_prompt(self, name: str, arguments: dict[str, str], server: str | None = None) -> dict[str, Any]:
        conns = self._pick(server)
        if server is None:
            owners = {p["name"]: p["server"] for p in await self.list_prompts()}
            if name not in owners:
                raise errors.NotFound(f"No MCP prompt named {name!r}.")
            conns = [self.connections[owners[name]]]
        result = await conns[0].call(lambda s: s.get_prompt(name, arguments))
        return dump(result)  # type: ignore[no-any-return]

    async def list_resources(self, server: str | None = None) -> list[dict[str, Any]]:
        out = []
        for conn in self._pick(server):
            result = await conn.call(lambda s: s.list_resources())
            out += [{**dump(r), "server": conn.name} for r in result.resources]
        return out

    async def read_resource(self, uri: str, server: str | None = None) -> dict[str, Any]:
        conns = self._pick(server)
        if server is None:
            owners = {r["uri"]: r["server"] for r in await self.list_resources()}
            if uri in owners:
                conns = [self.connections[owners[uri]]]
            elif len(conns) != 1:
                raise errors.NotFound(f"No MCP resource with uri {uri!r}.")
        if not conns:
            raise errors.NotFound(f"No MCP resource with uri {uri!r}.")
        result = await conns[0].call(lambda s: s.read_resource(uri))
        return dump(result)  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        return {name: {"running": c.alive, "starts": c.starts} for name, c in self.connections.items()}

    async def close(self) -> None:
        for conn in self.connections.values():
            await conn.close()
