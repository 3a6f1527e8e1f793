"""Compact output schemas: what `compact_schema` rewrites, that it accepts exactly what the original accepts,
and that every tool publishes one that a real result passes."""

from __future__ import annotations

import json
from typing import Any, Literal

import anyio
import pytest
from jsonschema import Draft202012Validator
from mcp import Client
from pydantic import BaseModel, Field

from blip_tools.results import CaptionResult
from mcp_server import create_server
from mcp_server.schemas import compact_schema
from mcp_server.tools import CaptionImagesResult


class Leaf(BaseModel):
    name: str = Field(min_length=1)
    score: float | None = Field(default=None, ge=0.0, le=1.0)


class Node(BaseModel):
    """A recursive model: its `$ref` to itself cannot be inlined."""

    label: str
    children: list[Node] = []
    leaf: Leaf | None = None


class Outer(BaseModel):
    leaf: Leaf = Field(description="A nested model behind a $ref with a sibling description.")
    maybe_leaf: Leaf | None = None
    leaves: list[Leaf] = []
    count: int | None = Field(default=None, ge=1)
    kind: Literal["a", "b"] | None = None
    tags: list[str] | None = None
    tree: Node | None = None


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(v) for v in node))
    return set()


VALID: list[Any] = [
    {"leaf": {"name": "x"}},
    {"leaf": {"name": "x", "score": None}, "maybe_leaf": None, "count": None, "kind": None, "tags": None},
    {"leaf": {"name": "x", "score": 0.5}, "maybe_leaf": {"name": "y"}, "leaves": [{"name": "z", "score": 1.0}]},
    {"leaf": {"name": "x"}, "count": 3, "kind": "b", "tags": ["t"], "tree": {"label": "r", "children": []}},
    {"leaf": {"name": "x"}, "tree": {"label": "r", "children": [{"label": "c", "leaf": {"name": "l"}}]}},
]
INVALID: list[Any] = [
    {},
    {"leaf": None},
    {"leaf": {"name": ""}},
    {"leaf": {"name": "x", "score": 2.0}},
    {"leaf": {"name": "x", "score": "high"}},
    {"leaf": {"name": "x"}, "maybe_leaf": {"score": 0.1}},
    {"leaf": {"name": "x"}, "leaves": [None]},
    {"leaf": {"name": "x"}, "count": 0},
    {"leaf": {"name": "x"}, "count": 1.5},
    {"leaf": {"name": "x"}, "kind": "c"},
    {"leaf": {"name": "x"}, "tags": [1]},
    {"leaf": {"name": "x"}, "tree": {"children": []}},
    {"leaf": {"name": "x"}, "tree": {"label": "r", "children": [{"label": 3}]}},
    {"leaf": {"name": "x"}, "tree": {"label": "r", "children": [{"label": "c", "leaf": {"name": ""}}]}},
]


def test_inlines_acyclic_refs_and_writes_simple_nullables_as_type_lists() -> None:
    original = Outer.model_json_schema()
    compact = compact_schema(original)
    props = compact["properties"]
    assert props["leaf"]["type"] == "object" and props["leaf"]["description"].startswith("A nested model")
    assert props["maybe_leaf"]["type"] == ["object", "null"] and "name" in props["maybe_leaf"]["properties"]
    assert props["leaves"]["items"]["type"] == "object"
    assert props["count"] == {"type": ["integer", "null"], "minimum": 1, "default": None, "title": "Count"}
    assert props["tags"]["type"] == ["array", "null"]
    assert "anyOf" in props["kind"], "an enum admits null only through the union: it must stay one"
    # The recursive model stays a $ref, with only what is still referenced kept in $defs.
    assert _refs(compact) == {"#/$defs/Node"} and set(compact["$defs"]) == {"Node"}
    node = compact["$defs"]["Node"]["properties"]
    assert node["children"]["items"] == {"$ref": "#/$defs/Node"}
    assert node["leaf"]["type"] == ["object", "null"], "acyclic refs inside a recursive definition are inlined too"
    assert original == Outer.model_json_schema(), "the input schema must not be modified"
    Draft202012Validator.check_schema(compact)


@pytest.mark.parametrize("instance", VALID)
def test_accepts_what_the_original_accepts(instance: Any) -> None:
    original = Outer.model_json_schema()
    assert Draft202012Validator(original).is_valid(instance)
    assert Draft202012Validator(compact_schema(original)).is_valid(instance)


@pytest.mark.parametrize("instance", INVALID)
def test_rejects_what_the_original_rejects(instance: Any) -> None:
    original = Outer.model_json_schema()
    assert not Draft202012Validator(original).is_valid(instance)
    assert not Draft202012Validator(compact_schema(original)).is_valid(instance)


def test_leaves_schemas_without_refs_or_unions_alone() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    assert compact_schema(schema) == schema
    union = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    assert compact_schema(union) == union
    with_const = {"anyOf": [{"type": "string", "const": "x"}, {"type": "null"}]}
    assert compact_schema(with_const) == with_const


@pytest.mark.anyio
async def test_every_tool_publishes_a_compact_schema_that_real_results_pass(
    service: Any, mcp_images: list[str]
) -> None:
    server = create_server(service)
    with anyio.fail_after(60):
        async with Client(server) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            one = await client.call_tool("caption_image", {"image": mcp_images[0], "max_new_tokens": 4})
            many = await client.call_tool("caption_images", {"images": [mcp_images[0], "/no/such.png"]})
    for tool in tools.values():
        assert tool.output_schema is not None
        assert _refs(tool.output_schema) == set(), f"{tool.name} still has $refs"
        assert "anyOf" not in json.dumps(tool.output_schema), f"{tool.name} still has a nullable anyOf"
        Draft202012Validator.check_schema(tool.output_schema)
    # The client validated both results against the published schemas; check them against pydantic's too.
    assert not one.is_error and not many.is_error
    for result, model in ((one, CaptionResult), (many, CaptionImagesResult)):
        assert Draft202012Validator(model.model_json_schema()).is_valid(result.structured_content)
    assert tools["caption_images"].output_schema["properties"]["items"]["items"]["properties"]["result"]["type"] == [
        "object",
        "null",
    ]
