"""What the server publishes, checked the way picky hosts read it (Claude Desktop/Code, Cursor, VS Code, OpenAI
function calling with strict schemas, Gemini), for every tool, so a tool added later is held to the same rules.

Each tool: a function-calling-safe name, a `title`, full annotations and a clean description; input schemas that
are JSON Schema 2020-12, closed, described, free of `$ref`s and of keywords that hosts reject (Gemini refuses
`exclusiveMinimum`), with optional arguments that survive a strict-mode conversion (all required, null or the
default sent); output schemas that the TypeScript SDK's draft-07 Ajv reads too; and real results, partial failures
included, that pass the published output schema. The `--connect` proxy republishes the same list.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from _mcp_testlib import HttpServer, make_service, write_image
from jsonschema import Draft7Validator, Draft202012Validator
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, Tool

from blip_tools import BlipSettings
from mcp_server import create_server
from mcp_server.proxy import create_proxy
from mcp_server.server import BlipMCPServer

pytestmark = pytest.mark.anyio

#: OpenAI, Anthropic and Gemini function names and argument names.
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

#: Keywords that break at least one common host in a tool's input schema: Gemini's function declarations reject
#: exclusive bounds and `$ref`s (the whole request fails); composition and conditionals are outside the OpenAI
#: strict subset and Gemini's; hosts that do not resolve references drop the tool.
INPUT_DENYLIST = frozenset(
    {
        "$ref",
        "$defs",
        "definitions",
        "$dynamicRef",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "oneOf",
        "allOf",
        "not",
        "if",
        "then",
        "else",
        "patternProperties",
        "prefixItems",
        "unevaluatedProperties",
        "dependentRequired",
        "dependentSchemas",
    }
)

#: Draft 2020-12 keywords that the TypeScript SDK's default Ajv (draft-07) instance does not know: a client
#: validating structured content would skip or misread them.
OUTPUT_DENYLIST = frozenset(
    {
        "prefixItems",
        "$dynamicRef",
        "$dynamicAnchor",
        "unevaluatedProperties",
        "unevaluatedItems",
        "dependentRequired",
        "dependentSchemas",
        "minContains",
        "maxContains",
    }
)
_NULL = {"type": "null"}


def _keywords(schema: Any) -> set[str]:
    """Every keyword used anywhere in `schema` (property names under `properties` are not keywords)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                found.add(key)
                if key == "properties" and isinstance(value, dict):
                    for sub in value.values():
                        walk(sub)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    return found


def _nullable(prop: dict[str, Any]) -> bool:
    return _NULL in prop.get("anyOf", []) or prop.get("type") == "null"


def _schema_problems(tool: Tool) -> list[str]:
    """Everything about one tool's listing that a host could choke on."""
    name, problems = tool.name, []
    if not NAME.match(name):
        problems.append(f"{name}: not a valid function name")
    annotations = tool.annotations
    if annotations is None or not annotations.title:
        problems.append(f"{name}: no annotations/title")
    else:
        if tool.title != annotations.title:
            problems.append(f"{name}: title {tool.title!r} differs from annotations.title {annotations.title!r}")
        hints = (
            annotations.read_only_hint,
            annotations.destructive_hint,
            annotations.idempotent_hint,
            annotations.open_world_hint,
        )
        if any(hint is None for hint in hints):
            problems.append(f"{name}: every hint should be explicit (the spec's defaults assume the worst)")
    description = tool.description or ""
    if len(description) < 40:
        problems.append(f"{name}: description too short for a model to choose the tool: {description!r}")
    if description != inspect.cleandoc(description):
        problems.append(f"{name}: description carries docstring indentation or stray whitespace: {description!r}")

    schema = tool.input_schema
    Draft202012Validator.check_schema(schema)
    if schema.get("type") != "object" or schema.get("additionalProperties") is not False:
        problems.append(f"{name}: input schema must be a closed object")
    if bad := sorted(_keywords(schema) & INPUT_DENYLIST):
        problems.append(f"{name}: input schema uses {bad}")
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    if not required <= set(properties):
        problems.append(f"{name}: required names unknown properties {sorted(required - set(properties))}")
    for arg, prop in properties.items():
        if not NAME.match(arg):
            problems.append(f"{name}.{arg}: not a valid argument name")
        if len(prop.get("description", "")) < 10:
            problems.append(f"{name}.{arg}: no useful description")
        if isinstance(prop.get("type"), list):
            problems.append(f"{name}.{arg}: type lists are not function-calling schema (use anyOf with null)")
        for branch in prop.get("anyOf", []):
            if branch != _NULL and "anyOf" in branch:
                problems.append(f"{name}.{arg}: nested anyOf")
        if "anyOf" in prop and (len(prop["anyOf"]) != 2 or _NULL not in prop["anyOf"]):
            problems.append(f"{name}.{arg}: anyOf other than `X | null`")
        # A host that converts to OpenAI strict mode makes every argument required: an optional one must then
        # take null (meaning "the default") or carry a default the model can send back.
        if arg not in required and not _nullable(prop):
            if "default" not in prop or not Draft202012Validator(prop).is_valid(prop["default"]):
                problems.append(f"{name}.{arg}: optional, not nullable and without a valid default")
            elif "default" not in prop.get("description", ""):
                problems.append(f"{name}.{arg}: strict-mode hosts send every argument: say the default")

    output = tool.output_schema
    if output is None:
        problems.append(f"{name}: no output schema")
    else:
        Draft202012Validator.check_schema(output)
        Draft7Validator.check_schema(output)
        if output.get("type") != "object":
            problems.append(f"{name}: output schema is not an object")
        if bad := sorted(_keywords(output) & OUTPUT_DENYLIST):
            problems.append(f"{name}: output schema uses {bad}")
        if "$ref" in _keywords(output):
            problems.append(f"{name}: output schema keeps a $ref")
    return problems


def strict_call(tool: Tool, given: dict[str, Any]) -> dict[str, Any]:
    """The arguments a strict-mode host sends: every property, null (or the default) where the model left it out."""
    out = dict(given)
    for arg, prop in tool.input_schema["properties"].items():
        if arg not in out:
            out[arg] = None if _nullable(prop) else prop["default"]
    return out


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two images, a broken PNG, an empty JPEG and a text file."""
    root = tmp_path_factory.mktemp("compat")
    (root / "pics").mkdir()
    for i in range(2):
        write_image(root / "pics" / f"c{i}.png", 700 + i)
    (root / "pics" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 20)
    (root / "pics" / "empty.jpg").write_bytes(b"")
    (root / "pics" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, folder: Path) -> Iterator[BlipMCPServer]:
    """A server over a private service with its image index in the test folder."""
    service = make_service(tiny_checkpoint, max_wait_ms=2.0, index_path=folder / "index.sqlite")
    try:
        yield create_server(service)
    finally:
        service.close()


def calls(folder: Path) -> list[tuple[str, dict[str, Any], bool]]:
    """(tool, arguments, strict-style) for a success and, where a tool has one, a partial failure of every tool."""
    pics = folder / "pics"
    one, two = str(pics / "c0.png"), str(pics / "c1.png")
    return [
        ("caption_image", {"image": one, "max_new_tokens": 4}, False),
        ("caption_image", {"image": one, "max_new_tokens": 4, "num_beams": 2, "num_return_sequences": 2}, True),
        ("caption_images", {"images": [one, str(pics / "broken.png"), str(pics / "missing.png"), two]}, True),
        ("caption_images", {"images": [str(pics / "broken.png")]}, False),
        ("answer_question", {"image": one, "question": "what color is it?", "max_new_tokens": 3}, True),
        ("score_image_text", {"image": one, "texts": ["a dog", "a cat"]}, True),
        ("embed_image", {"image": one}, True),
        ("embed_image", {"image": one, "include_query_vectors": True}, False),
        ("embed_text", {"text": "a dog"}, True),
        ("index_images", {"directory": str(pics)}, True),  # the broken and empty files fail, the rest index
        ("index_images", {"directory": str(pics), "captions": False}, False),
        ("search_images", {"query": "a dog", "top_k": 2}, True),
        ("search_images", {"image": two, "rerank": True}, True),
        ("locate_in_image", {"image": one, "text": "a dog"}, True),
    ]


# ----------------------------------------------------------------------------------------------------- tests
async def test_every_tool_listing_is_portable(server: BlipMCPServer) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            tools = (await client.list_tools()).tools
    assert tools
    problems = [problem for tool in tools for problem in _schema_problems(tool)]
    assert problems == []


async def test_every_result_passes_its_published_output_schema(server: BlipMCPServer, folder: Path) -> None:
    called: set[str] = set()
    with anyio.fail_after(240):
        async with Client(server) as client:  # the SDK client also validates every result on its own
            tools = {t.name: t for t in (await client.list_tools()).tools}
            for name, arguments, strict in calls(folder):
                sent = strict_call(tools[name], arguments) if strict else arguments
                result = await client.call_tool(name, sent)
                assert not result.is_error, (name, sent, result.content)
                assert result.structured_content is not None, name
                schema = tools[name].output_schema
                for validator in (Draft202012Validator(schema), Draft7Validator(schema)):
                    errors = [e.message for e in validator.iter_errors(result.structured_content)]
                    assert errors == [], (name, errors)
                called.add(name)
                if name == "caption_images" and len(arguments["images"]) > 1:
                    items = result.structured_content["items"]
                    assert [i["ok"] for i in items] == [True, False, False, True]
                    assert items[1]["result"] is None and items[1]["error"].startswith("[invalid_image]")
                if name == "index_images":
                    assert result.structured_content["failed"] == 2 and result.structured_content["indexed"] == 2
    assert called == set(tools), f"add a call for {sorted(set(tools) - called)} to calls()"


@pytest.mark.parametrize(
    ("name", "arguments", "code"),
    [
        ("no_such_tool", {"x": 1}, "invalid_input"),
        ("caption_image", {}, "invalid_input"),
        ("caption_image", {"image": "/definitely/missing.png", "typo": 1}, "invalid_input"),
        ("caption_image", {"image": "/definitely/missing.png"}, "invalid_image"),
        ("caption_images", {"images": "/a/path.png"}, "invalid_input"),
        ("search_images", {"query": "x", "image": "/a/path.png"}, "invalid_input"),
        ("index_images", {"directory": "/definitely/missing"}, "invalid_input"),
    ],
)
async def test_errors_are_tool_errors_without_structured_content(
    server: BlipMCPServer, name: str, arguments: dict[str, Any], code: str
) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            result = await client.call_tool(name, arguments)
    assert isinstance(result, CallToolResult) and result.is_error
    assert result.structured_content is None  # a client would validate it against the output schema
    assert result.content[0].text.startswith(f"[{code}]"), result.content[0].text


@pytest.mark.parametrize("value", [0, 0.0, -1.0])
async def test_positive_floats_are_refused_at_zero_though_the_schema_says_minimum(
    server: BlipMCPServer, folder: Path, value: float
) -> None:
    """temperature, top_p and repetition_penalty publish `minimum: 0` (Gemini rejects `exclusiveMinimum`), and the
    server still refuses 0 and below with pydantic's usual message."""
    image = str(folder / "pics" / "c0.png")
    with anyio.fail_after(60):
        async with Client(server) as client:
            for arg in ("temperature", "top_p", "repetition_penalty"):
                result = await client.call_tool("caption_image", {"image": image, arg: value})
                assert result.is_error, arg
                assert f"{arg}: Input should be greater than 0 (got {value!r})" in result.content[0].text
            ok = await client.call_tool(
                "caption_image",
                {"image": image, "do_sample": True, "temperature": 0.5, "top_p": 1.0, "max_new_tokens": 2, "seed": 1},
            )
    assert not ok.is_error, ok.content


async def test_resources_prompts_and_cursors(server: BlipMCPServer) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            tools = await client.list_tools()
            again = await client.list_tools(cursor="a-cursor-we-never-issued")
            resources = {str(r.uri): r for r in (await client.list_resources()).resources}
            read = {uri: await client.read_resource(uri) for uri in resources}
            prompts = (await client.list_prompts()).prompts
            got = await client.get_prompt("describe_image", {"image": "/x.png", "style": "detailed"})
            with pytest.raises(MCPError) as unknown:
                await client.read_resource("blip://nope")
    # One page: nothing to follow, and a cursor we never issued lists the same tools.
    assert tools.next_cursor is None and again.next_cursor is None
    assert [t.name for t in again.tools] == [t.name for t in tools.tools]
    assert set(resources) == {"blip://model", "blip://stats"}
    for uri, resource in resources.items():
        assert resource.mime_type == "application/json" and resource.title and resource.description
        assert NAME.match(resource.name)
        assert isinstance(json.loads(read[uri].contents[0].text), dict)
    assert unknown.value.error.code == -32602
    assert {p.name for p in prompts} == {"describe_image", "inspect_image"}
    for prompt in prompts:
        assert prompt.title and prompt.description and NAME.match(prompt.name)
        assert prompt.arguments and all(a.description for a in prompt.arguments)
        assert [a.name for a in prompt.arguments if a.required] == ["image"]
    assert got.messages and "caption_image" in got.messages[0].content.text


async def test_the_connect_proxy_republishes_the_same_listing(http_server: HttpServer) -> None:
    """What a host sees through `blip-mcp --connect` is what the daemon lists, field for field."""

    def dump(tools: list[Tool]) -> list[dict[str, Any]]:
        return [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in tools]

    proxy = create_proxy(http_server.url, token=http_server.token, settings=BlipSettings())
    with anyio.fail_after(60):
        async with Client(create_server(http_server.service)) as direct:
            expected = dump((await direct.list_tools()).tools)
            expected_prompts = (await direct.list_prompts()).prompts
        async with Client(proxy) as client:
            listed = dump((await client.list_tools()).tools)
            prompts = (await client.list_prompts()).prompts
    assert listed == expected
    assert prompts == expected_prompts
