"""A small real MCP server (stdio) for the HTTP adapter's tests.

Tools: `echo {text}`, `add {a, b}`, `fail {}` (raises), `die {}` (exits the process, to
test restarts), `pid {}`. A prompt `greet {name}` and a resource `echo://hello`.
Built on the official SDK: `MCPServer` in mcp 2.x, `FastMCP` in mcp 1.x.
"""

from __future__ import annotations

import os

try:  # mcp >= 2
    from mcp.server.mcpserver import MCPServer as _Server
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as _Server  # type: ignore[no-redef]

server = _Server("echo")


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def fail() -> str:
    """Always fails (tests the error path)."""
    raise ValueError("this tool always fails")


@server.tool()
def die() -> str:
    """Exit the server process at once (tests restarts)."""
    os._exit(3)


@server.tool()
def pid() -> int:
    """The server's process id (tests that a restart made a new process)."""
    return os.getpid()


@server.prompt()
def greet(name: str) -> str:
    """A greeting prompt."""
    return f"Say hello to {name}."


@server.resource("echo://hello")
def hello() -> str:
    """A fixed resource."""
    return "hello from the echo server"


if __name__ == "__main__":
    server.run()
