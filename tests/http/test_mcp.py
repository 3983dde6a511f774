"""POST /v1/mcp/{method} against a small real MCP server (tests/http/mcp_echo_server.py)
that the daemon starts from its config `mcp_servers`."""

from __future__ import annotations

import httpx
import pytest

from tests.http.conftest import echo_mcp_config

DAEMON_CONFIG = echo_mcp_config()


def test_list_tools_and_schema(http: httpx.Client) -> None:
    """list_tools lists the server's tools with their server name; get_tool_schema returns one."""
    r = http.post("/v1/mcp/list_tools", json={})
    assert r.status_code == 200, r.text
    tools = {t["name"]: t for t in r.json()["result"]}
    assert {"echo", "add", "fail"} <= set(tools)
    assert tools["add"]["server"] == "echo"
    schema = http.post("/v1/mcp/get_tool_schema", json={"tool_name": "add"}).json()["result"]
    assert set(schema["inputSchema"]["properties"]) == {"a", "b"}


def test_execute_tool_and_call_tool(http: httpx.Client) -> None:
    """execute_tool {tool_name, args} and call_tool {name, arguments} run the tool."""
    r = http.post("/v1/mcp/execute_tool", json={"tool_name": "add", "args": {"a": 2, "b": 40}})
    assert r.status_code == 200, r.text
    content = r.json()["result"]["content"]
    assert content[0]["text"] == "42"
    r = http.post("/v1/mcp/call_tool", json={"name": "echo", "arguments": {"text": "hi there"}})
    assert r.json()["result"]["content"][0]["text"] == "hi there"


def test_nash_later_client_names(http: httpx.Client) -> None:
    """nash's later MCP client reads `tools` from list_tools and calls call_tool with tool_name."""
    tools = http.post("/v1/mcp/list_tools", json={}).json()["tools"]
    assert "echo" in {t["name"] for t in tools}
    r = http.post("/v1/mcp/call_tool", json={"tool_name": "echo", "arguments": {"text": "nash"}})
    assert r.status_code == 200, r.text
    assert r.json()["result"]["content"][0]["text"] == "nash"
    r = http.post("/v1/mcp/call_tool", json={"arguments": {"text": "nameless"}})
    assert r.status_code == 400 and "tool_name" in r.json()["detail"]


def test_prompts_and_resources(http: httpx.Client) -> None:
    """list_prompts/get_prompt and list_resources/read_resource reach the server."""
    prompts = http.post("/v1/mcp/list_prompts", json={}).json()["result"]
    assert [p["name"] for p in prompts] == ["greet"]
    prompt = http.post("/v1/mcp/get_prompt", json={"name": "greet", "arguments": {"name": "Bo"}}).json()["result"]
    assert "Bo" in prompt["messages"][0]["content"]["text"]
    resources = http.post("/v1/mcp/list_resources", json={}).json()["result"]
    assert resources[0]["uri"] == "echo://hello"
    read = http.post("/v1/mcp/read_resource", json={"uri": "echo://hello"}).json()["result"]
    assert read["contents"][0]["text"] == "hello from the echo server"


@pytest.mark.parametrize("method", ["shutdown", "__init__", "session", "list_tools/x"])
def test_unknown_methods_are_404_with_detail(http: httpx.Client, method: str) -> None:
    """A method off the allowlist is a 404 with {"detail"}."""
    r = http.post(f"/v1/mcp/{method}", json={})
    assert r.status_code == 404
    assert "detail" in r.json()


def test_bad_arguments_are_400_with_detail(http: httpx.Client) -> None:
    """Missing or unknown arguments are a 400 with {"detail"}; an unknown tool is a 404."""
    r = http.post("/v1/mcp/execute_tool", json={"args": {}})
    assert r.status_code == 400 and "tool_name" in r.json()["detail"]
    r = http.post("/v1/mcp/list_tools", json={"surprise": 1})
    assert r.status_code == 400 and "detail" in r.json()
    r = http.post("/v1/mcp/list_tools", content=b"[1, 2]")
    assert r.status_code == 400
    r = http.post("/v1/mcp/execute_tool", json={"tool_name": "nope", "args": {}})
    assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_a_failing_tool_is_an_error_body(http: httpx.Client) -> None:
    """A tool that raises comes back as {"error"} with a 502."""
    r = http.post("/v1/mcp/execute_tool", json={"tool_name": "fail", "args": {}})
    assert r.status_code == 502
    assert r.json()["error"]


def test_a_dead_server_is_restarted(http: httpx.Client) -> None:
    """When the MCP server process dies, the next call starts a new one and succeeds."""
    first = http.post("/v1/mcp/execute_tool", json={"tool_name": "pid", "args": {}}).json()["result"]
    http.post("/v1/mcp/execute_tool", json={"tool_name": "die", "args": {}})
    second = http.post("/v1/mcp/execute_tool", json={"tool_name": "pid", "args": {}})
    assert second.status_code == 200, second.text
    assert second.json()["result"]["content"][0]["text"] != first["content"][0]["text"]
