"""OpenAI response formats as GBNF grammars, for backends that constrain sampling (llama.cpp).

The one place a `response_format` becomes a grammar: JSON Schema goes through
llama-cpp-python's own converter (`json_schema_to_gbnf`, the port of llama.cpp's
json-schema-to-grammar), `json_object` uses its JSON grammar. Both keep whitespace
bounded (the converter allows one optional space between tokens, the JSON grammar
one newline and at most 20 indentation characters), so a small model cannot loop on
spaces. `llama_cpp` is imported only when a grammar is built.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from typing import Any

from .. import errors

logger = logging.getLogger("llmws.engine.grammar")

#: A JSON string character: the converter's own rule also lets raw control characters
#: (a newline) into strings, which JSON forbids and `json.loads` rejects.
STRICT_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'


def parse_format(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The OpenAI `response_format` object, checked and normalized: None for text,
    {"type": "json_object"} or {"type": "json_schema", "schema": {...}} (also for a
    json_object that carries a `schema`, as llama.cpp's server accepts).

    Raises:
        BadRequest: an unknown type or a json_schema without a schema object.
    """
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        # llama.cpp's server takes a schema here too ({"type": "json_object", "schema": {...}}).
        schema = response_format.get("schema")
        if schema is None:
            return {"type": "json_object"}
        if not isinstance(schema, dict):
            raise errors.BadRequest("response_format.schema must be a JSON Schema object.")
        return {"type": "json_schema", "schema": schema}
    if kind != "json_schema":
        raise errors.BadRequest("response_format.type must be text, json_object or json_schema.")
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise errors.BadRequest("response_format json_schema needs json_schema.schema (a JSON Schema object).")
    return {"type": "json_schema", "schema": schema}


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The GBNF grammar (start rule `root`) a reply in `response_format` must follow.

    Args:
        response_format: the OpenAI object: None or {"type": "text"} (no grammar),
            {"type": "json_object"} (any JSON object) or
            {"type": "json_schema", "json_schema": {"schema": {...}}}.

    Returns:
        The grammar text, or None when the format does not constrain the reply.

    Raises:
        BadRequest: an unknown type, a missing schema, or a schema that cannot be
            turned into a grammar (the converter's own message is logged, not sent).
    """
    fmt = parse_format(response_format)
    if fmt is None:
        return None
    if fmt["type"] == "json_object":
        return _object_grammar()
    schema = fmt["schema"]
    if not _local_refs_only(schema):
        # Checked here, not left to the converter: its refusal to fetch is an `assert`.
        raise errors.BadRequest("The JSON schema in response_format may only use local $refs (#/...).")
    try:
        # Keys keep the client's order: it is the order the reply's properties take.
        return _schema_grammar(json.dumps(schema))
    except Exception as exc:  # the converter asserts, or fails with KeyError/TypeError on odd input
        logger.info("JSON schema rejected by the grammar converter: %s: %s", type(exc).__name__, exc)
        raise errors.BadRequest(
            "The JSON schema in response_format is not one this server can follow: check its "
            "types and $refs (only local #/ references are resolved)."
        ) from None


def _local_refs_only(node: Any) -> bool:
    """Whether every `$ref` in a schema points inside it (remote schemas are never fetched)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
            return False
        return all(_local_refs_only(v) for v in node.values())
    if isinstance(node, list):
        return all(_local_refs_only(v) for v in node)
    return True


@functools.lru_cache(maxsize=64)
def _schema_grammar(schema_json: str) -> str:
    """The converter's grammar for a schema (cached: a request is checked, then served)."""
    from llama_cpp.llama_grammar import PRIMITIVE_RULES, json_schema_to_gbnf

    gbnf = json_schema_to_gbnf(schema_json)
    loose = "char ::= " + PRIMITIVE_RULES["char"].content
    return gbnf.replace(loose, "char ::= " + STRICT_CHAR)


@functools.lru_cache(maxsize=1)
def _object_grammar() -> str:
    """llama.cpp's JSON grammar with an object (not any value) at the root."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return re.sub(r"^root\s*::=.*$", "root ::= object", JSON_GBNF, count=1, flags=re.MULTILINE)
