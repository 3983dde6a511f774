"""OpenAI tool calls over any chat template: describe the tools, parse the calls back.

Most small GGUF templates (SmolLM2's among them) have no tool syntax, so the tools
are described in the system message in the Hermes/Qwen convention, which many
instruction-tuned models were trained on:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

The parser accepts that, and also a bare JSON object {"name", "arguments"} (or a
list of them, or {"tool_calls": [...]}) as the whole reply. Only names of tools the
request offered are accepted; anything else stays plain text. No I/O here.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from .. import errors
from ..engine.backends.base import Message

TOOL_CALL_OPEN = "<tool_call>"
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def tool_names(tools: list[dict[str, Any]]) -> list[str]:
    names = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise errors.BadRequest("Each tool needs {'type': 'function', 'function': {'name': ...}}.")
        names.append(fn["name"])
    return names


def forced_tool(tool_choice: Any) -> str | None:
    """The tool name a `tool_choice` forces, if any."""
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") or {}
        return fn.get("name") if isinstance(fn.get("name"), str) else None
    return None


def call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of one call of `tool`: {"name": <its name>, "arguments": <its parameters>}."""
    fn = tool["function"]
    params = fn.get("parameters")
    return {
        "type": "object",
        "properties": {
            "name": {"const": fn["name"]},
            "arguments": params if isinstance(params, dict) and params else {"type": "object"},
        },
        "required": ["name", "arguments"],
    }


def forced_call_format(tools: list[dict[str, Any]] | None, tool_choice: Any) -> dict[str, Any] | None:
    """The `response_format` that makes the reply a call, when `tool_choice` forces one.

    A named function gets its own call schema, `"required"` any offered tool's (anyOf);
    `"auto"`, `"none"` and no tools give None (the model may answer in prose). The reply
    is then a bare JSON call, which `parse_tool_calls` reads.

    Raises:
        BadRequest: `tool_choice` names a function the request does not offer.
    """
    if not tools or tool_choice in (None, "none", "auto"):
        return None
    names = tool_names(tools)
    name = forced_tool(tool_choice)
    if name is not None:
        if name not in names:
            raise errors.BadRequest("tool_choice names a function that is not in tools.")
        schema = call_schema(tools[names.index(name)])
    elif tool_choice == "required":
        schemas = [call_schema(t) for t in tools]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    else:
        return None
    return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}


def tools_prompt(tools: list[dict[str, Any]], tool_choice: Any) -> str:
    """The system text that offers `tools` to the model."""
    specs = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    text = (
        "You may call functions to help answer. The available functions are:\n"
        f"<tools>\n{specs}\n</tools>\n"
        "To call a function, reply with only this, one line per call:\n"
        '<tool_call>{"name": "<function name>", "arguments": {<arguments as JSON>}}</tool_call>\n'
    )
    name = forced_tool(tool_choice)
    if name:
        text += f"You must call the function {name} now."
    elif tool_choice == "required":
        text += "You must call one of the functions now."
    else:
        text += "If no function is needed, answer normally."
    return text


def with_tools(messages: list[Message], tools: list[dict[str, Any]] | None, tool_choice: Any) -> list[Message]:
    """`messages` with the tool description merged into (or added as) the system message."""
    if not tools or tool_choice == "none":
        return messages
    tool_names(tools)  # validates
    extra = tools_prompt(tools, tool_choice)
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = (out[0]["content"] + "\n\n" + extra).strip()
    else:
        out.insert(0, {"role": "system", "content": extra})
    return out


def _as_call(obj: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # OpenAI-shaped
        obj = obj["function"]
    name = obj.get("name")
    if name not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
    }


def _loads(text: str) -> Any:
    text = text.strip()
    if text.startswith("```"):
        text = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", text)
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_tool_calls(text: str, tools: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Split a reply into (remaining content, OpenAI tool_calls)."""
    names = set(tool_names(tools))
    calls: list[dict[str, Any]] = []
    if TOOL_CALL_OPEN in text:
        for block in _TAGGED.findall(text):
            call = _as_call(_loads(block), names)
            if call:
                calls.append(call)
        if calls:
            content = text[: text.index(TOOL_CALL_OPEN)].strip()
            return content, calls
        return text, []
    obj = _loads(text)
    if isinstance(obj, dict) and isinstance(obj.get("tool_calls"), list):
        obj = obj["tool_calls"]
    for item in obj if isinstance(obj, list) else [obj]:
        call = _as_call(item, names)
        if call is None:
            return text, []
        calls.append(call)
    return ("", calls) if calls else (text, [])


def may_be_tool_call(text: str) -> bool:
    """Whether a reply that starts with `text` could still turn into a tool call
    (a streaming reply is held back until this turns false)."""
    head = text.lstrip()
    if not head:
        return True
    if head.startswith(("{", "[", "```")):
        return True
    return TOOL_CALL_OPEN.startswith(head[: len(TOOL_CALL_OPEN)]) or head.startswith(TOOL_CALL_OPEN)
