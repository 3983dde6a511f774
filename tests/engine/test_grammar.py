"""Response formats as GBNF grammars (no model: the grammar text and the errors)."""

from __future__ import annotations

import pytest

from llmws_core import errors
from llmws_core.engine.grammar import STRICT_CHAR, grammar_for

pytest.importorskip("llama_cpp")

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def rules(gbnf: str) -> dict[str, str]:
    """The grammar's rules by name (every converter rule is one `name ::= body` line)."""
    out = {}
    for line in gbnf.splitlines():
        name, sep, body = line.partition(" ::= ")
        if sep and name.strip() and not name.startswith(" "):
            out[name.strip()] = body.strip()
    return out


def schema_format(schema: object) -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}


def test_text_formats_need_no_grammar() -> None:
    """No response_format, or type text, leaves the reply unconstrained."""
    assert grammar_for(None) is None
    assert grammar_for({}) is None
    assert grammar_for({"type": "text"}) is None


def test_json_object_grammar_starts_with_an_object() -> None:
    """json_object gives llama.cpp's JSON grammar with an object, not any value, at the root."""
    gbnf = grammar_for({"type": "json_object"})
    assert gbnf is not None
    assert rules(gbnf)["root"] == "object"
    assert "object ::=" in gbnf and "string ::=" in gbnf


def test_schema_grammar_spells_out_required_keys_in_order() -> None:
    """A json_schema grammar writes the required keys as literals, in the schema's order."""
    gbnf = grammar_for(schema_format(PERSON))
    assert gbnf is not None
    r = rules(gbnf)
    assert r["root"].startswith('"{" space name-kv "," space age-kv')
    assert r["name-kv"].startswith(r'"\"name\"" space ":" space')
    assert r["age-kv"].endswith("integer")
    # maxLength bounds the string, so a small model cannot ramble inside it.
    assert r["name"].count("char") == 20


def test_schema_grammar_keeps_whitespace_and_strings_strict() -> None:
    """Whitespace is at most one space between tokens, and strings cannot hold raw control characters."""
    r = rules(grammar_for(schema_format(PERSON)) or "")
    assert r["space"] == '" "?'
    assert r["char"] == STRICT_CHAR


def test_const_and_any_of_become_alternatives_of_literals() -> None:
    """`const` is a literal and `anyOf` an alternative (how forced tool calls are built)."""
    call = {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": {"type": "object"}},
        "required": ["name", "arguments"],
    }
    other = {**call, "properties": {**call["properties"], "name": {"const": "add"}}}
    gbnf = grammar_for(schema_format({"anyOf": [call, other]})) or ""
    assert r'"\"get_weather\""' in gbnf and r'"\"add\""' in gbnf
    assert "|" in rules(gbnf)["root"]


def test_same_schema_gives_the_same_grammar() -> None:
    """Converting a schema twice (the HTTP check, then the backend) gives the same grammar."""
    assert grammar_for(schema_format(PERSON)) == grammar_for(schema_format(dict(PERSON)))


@pytest.mark.parametrize(
    "schema",
    [
        {"type": 5},
        {"type": "object", "properties": {"a": 5}},
        {"type": "strin"},
        {"$ref": "https://example.com/schema.json"},
        {"type": "object", "properties": {"a": {"$ref": "other.json#/a"}}},
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    ],
)
def test_bad_schemas_are_bad_requests_with_a_safe_message(schema: object) -> None:
    """A schema no grammar can be made of is a BadRequest whose message names the problem, not the converter's internals."""
    with pytest.raises(errors.BadRequest) as bad:
        grammar_for(schema_format(schema))
    message = bad.value.message
    assert "JSON schema" in message and "response_format" in message
    assert "Unrecognized" not in message and "Traceback" not in message and "KeyError" not in message


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"schema": "not an object"}},
        {"type": "yaml"},
    ],
)
def test_malformed_response_formats_are_bad_requests(fmt: dict[str, object]) -> None:
    """A response_format without a usable schema, or of an unknown type, is a BadRequest."""
    with pytest.raises(errors.BadRequest):
        grammar_for(fmt)
