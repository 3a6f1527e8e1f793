"""Compact output schemas: the same constraints as pydantic's JSON schema, in a shape clients check cheaply.

MCP clients validate every tool result against the tool's published `outputSchema` (the Python SDK does it
with `jsonschema` on each call). pydantic's schemas put nested models behind `$ref`s into `$defs` and spell
`X | None` as `anyOf: [X, {"type": "null"}]`, which costs a reference lookup per nested object and a failed
branch (an error object built, then discarded) per null field. `compact_schema` inlines acyclic local
`$ref`s and writes simple nullable types as type lists (`"type": ["number", "null"]`), which accept exactly
the same JSON documents; on a `caption_image` result this halves the client's validation time.
"""

from __future__ import annotations

import copy
from typing import Any

_DEFS_PREFIX = "#/$defs/"

#: Keywords that may sit next to a `$ref` and be merged into the inlined definition without changing what
#: validates (they only annotate).
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly"})

#: Keywords that constrain a value whatever its type: a nullable variant with any of these is left as `anyOf`,
#: since adding "null" to its type list would not let null through them.
_ANY_TYPE_KEYWORDS = frozenset(
    {"enum", "const", "anyOf", "allOf", "oneOf", "not", "if", "then", "else", "$ref", "$dynamicRef", "type"}
)

_NULL = {"type": "null"}


def compact_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` with acyclic local `$ref`s inlined and simple `X | None` unions as type lists.

    Recursive definitions stay as `$ref`s into a `$defs` that keeps only what is still referenced.
    """
    defs: dict[str, Any] = schema.get("$defs", {}) if isinstance(schema.get("$defs"), dict) else {}
    kept: dict[str, Any] = {}

    def walk(node: Any, stack: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [walk(item, stack) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_DEFS_PREFIX):
            name = ref.removeprefix(_DEFS_PREFIX)
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            if name in defs and name not in stack and set(siblings) <= _ANNOTATIONS:
                inlined = walk(defs[name], (*stack, name))
                return {**inlined, **siblings} if isinstance(inlined, dict) else inlined
            if name in defs and name not in kept:
                kept[name] = {}  # placeholder first, so a cycle through this name ends here
                kept[name] = walk(defs[name], (name,))
        out = {key: (value if key == "$defs" else walk(value, stack)) for key, value in node.items()}
        return _nullable_as_type_list(out)

    root = walk({k: v for k, v in schema.items() if k != "$defs"}, ())
    if kept:
        root["$defs"] = kept
    return copy.deepcopy(root)


def _nullable_as_type_list(node: dict[str, Any]) -> dict[str, Any]:
    """`{"anyOf": [X, {"type": "null"}], ...}` → `{**X, "type": [X.type, "null"], ...}` when that is equivalent.

    It is when X has one type given as a string and no keyword that applies to every type (every other
    keyword constrains only values of X's own type, so null passes them as it passes the `anyOf`).
    """
    branches = node.get("anyOf")
    if not isinstance(branches, list) or len(branches) != 2 or _NULL not in branches:
        return node
    other = branches[0] if branches[1] == _NULL else branches[1]
    if not isinstance(other, dict) or not isinstance(other.get("type"), str) or other["type"] == "null":
        return node
    if set(other) & (_ANY_TYPE_KEYWORDS - {"type"}):
        return node
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    if set(outer) & (set(other) | _ANY_TYPE_KEYWORDS):
        return node  # the outer node constrains too: keep the union rather than reason about the merge
    return {**other, "type": [other["type"], "null"], **outer}
