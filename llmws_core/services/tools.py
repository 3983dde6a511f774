"""Tool calls over any chat template: describe the tools, parse the calls back.

Tools are given in one neutral shape, whatever door they came through: a function
spec `{"name", "description"?, "parameters"?}` (OpenAI's `function` object;
Anthropic's `input_schema` and Ollama's `function` map onto it). `tool_choice` is
"auto", "none", "required" or the name of the one tool that must be called.

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
from dataclasses import dataclass
from typing import Any

from .. import errors

TOOL_CALL_OPEN = "<tool_call>"
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

#: A tool: {"name": str, "description"?: str, "parameters"?: JSON Schema object}.
Tool = dict[str, Any]
#: "auto", "none", "required", or the name of the tool that must be called.
ToolChoice = str


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: its id, the tool's name, the arguments object."""

    id: str
    name: str
    arguments: dict[str, Any]
    #: The arguments text as the model wrote it, when it is not a whole JSON object (a
    #: call cut by max_tokens); None: `arguments` is the whole object.
    partial_arguments: str | None = None

    @property
    def arguments_json(self) -> str:
        if self.partial_arguments is not None:
            return self.partial_arguments
        return json.dumps(self.arguments, ensure_ascii=False)


def tool_names(tools: list[Tool]) -> list[str]:
    """The tools' names, checking each tool has one.

    Raises:
        BadRequest: a tool without a string name.
    """
    names = []
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise errors.BadRequest("Each tool needs a function with a name.")
        names.append(tool["name"])
    return names


def forced_tool(tool_choice: ToolChoice | None) -> str | None:
    """The tool name a `tool_choice` forces, if any."""
    return tool_choice if tool_choice not in (None, "auto", "none", "required") else None


def call_schema(tool: Tool) -> dict[str, Any]:
    """The JSON Schema of one call of `tool`: {"name": <its name>, "arguments": <its parameters>}."""
    params = tool.get("parameters")
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool["name"]},
            "arguments": params if isinstance(params, dict) and params else {"type": "object"},
        },
        "required": ["name", "arguments"],
    }


def forced_call_format(tools: list[Tool] | None, tool_choice: ToolChoice | None) -> dict[str, Any] | None:
    """The `response_format` that makes the reply a call, when `tool_choice` forces one.

    A named tool gets its own call schema, `"required"` any offered tool's (anyOf);
    `"auto"`, `"none"` and no tools give None (the model may answer in prose). The reply
    is then a bare JSON call, which `parse_tool_calls` reads.

    Raises:
        BadRequest: `tool_choice` names a tool the request does not offer.
    """
    if not tools or tool_choice in (None, "none", "auto"):
        return None
    names = tool_names(tools)
    name = forced_tool(tool_choice)
    if name is not None:
        if name not in names:
            raise errors.BadRequest("tool_choice names a function that is not in tools.")
        schema = call_schema(tools[names.index(name)])
    else:  # "required"
        schemas = [call_schema(t) for t in tools]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}


def tools_prompt(tools: list[Tool], tool_choice: ToolChoice | None) -> str:
    """The system text that offers `tools` to the model."""
    specs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
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


def with_system_text(messages: list[dict[str, Any]], extra: str) -> list[dict[str, Any]]:
    """`messages` with `extra` appended to (or added as) the system message."""
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = (out[0]["content"] + "\n\n" + extra).strip()
    else:
        out.insert(0, {"role": "system", "content": extra})
    return out


def with_tools(
    messages: list[dict[str, Any]], tools: list[Tool] | None, tool_choice: ToolChoice | None
) -> list[dict[str, Any]]:
    """`messages` with the tool description merged into (or added as) the system message."""
    if not tools or tool_choice == "none":
        return messages
    tool_names(tools)  # validates
    return with_system_text(messages, tools_prompt(tools, tool_choice))


def call_text(name: str, arguments: Any) -> str:
    """A call the assistant made, as the text the model reads back (Hermes convention)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def result_text(content: str) -> str:
    """A tool's result, as the user turn the model reads (Hermes convention)."""
    return f"<tool_response>\n{content}\n</tool_response>"


def _as_call(obj: Any, names: set[str]) -> ToolCall | None:
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
    return ToolCall(id="call_" + uuid.uuid4().hex[:24], name=name, arguments=args)


def _loads(text: str) -> Any:
    text = text.strip()
    if text.startswith("```"):
        text = re.sub(r"^```[a-zA-Z]*\s*|\s*```$", "", text)
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_tool_calls(text: str, tools: list[Tool]) -> tuple[str, list[ToolCall]]:
    """Split a reply into (remaining content, the calls of offered tools)."""
    names = set(tool_names(tools))
    calls: list[ToolCall] = []
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


_PARTIAL_CALL = re.compile(
    r'^\s*\{\s*"name"\s*:\s*"(?P<name>[^"\\]+)"\s*(?:,\s*"arguments"\s*:\s*(?P<args>.*))?$', re.DOTALL
)


def partial_call(text: str, tools: list[Tool]) -> ToolCall | None:
    """The call a forced-call reply cut short was making (`{"name": ..., "arguments": {...`),
    with its arguments text as far as it got; None if not even the tool's name is there."""
    match = _PARTIAL_CALL.match(text)
    if match is None or match["name"] not in set(tool_names(tools)):
        return None
    args = (match["args"] or "").rstrip()
    return ToolCall(id="call_" + uuid.uuid4().hex[:24], name=match["name"], arguments={}, partial_arguments=args)


def may_be_tool_call(text: str) -> bool:
    """Whether a reply that starts with `text` could still turn into a tool call
    (a streaming reply is held back until this turns false)."""
    head = text.lstrip()
    if not head:
        return True
    if head.startswith(("{", "[", "```")):
        return True
    return TOOL_CALL_OPEN.startswith(head[: len(TOOL_CALL_OPEN)]) or head.startswith(TOOL_CALL_OPEN)
