"""Every tool, resource and prompt through an in-memory `Client(server)` (no sockets), plus error mapping,
argument validation, cancellation and the lifespan's ownership of the service."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from _mcp_testlib import Gate, apoll, make_service, watching_cancellations
from mcp import Client
from mcp.server.mcpserver.exceptions import ToolError

from blip_tools.errors import Overloaded, PathNotAllowed
from blip_tools.results import AnswerResult, CaptionResult, EmbeddingResult, ModelInfo, ScoreResult, ServiceStats
from mcp_server import create_server
from mcp_server._common import error_message, to_tool_error, tool_errors
from mcp_server.server import REGISTRARS, BlipMCPServer
from mcp_server.tools import CaptionImagesResult

pytestmark = pytest.mark.anyio

TOOLS = {"caption_image", "caption_images", "answer_question", "score_image_text", "embed_image", "embed_text"}
TOOLS |= {"index_images", "search_images", "locate_in_image"}  # mcp_server/collection_tools.py


@pytest.fixture(scope="module")
def server(service: Any) -> BlipMCPServer:
    """The MCP server over the session's shared tiny-checkpoint service (borrowed, not closed)."""
    return create_server(service)


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if getattr(block, "type", "") == "text")


async def test_lists_six_read_only_tools_with_schemas_and_instructions(server: BlipMCPServer) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            tools = (await client.list_tools()).tools
            instructions = client.instructions
    assert {t.name for t in tools} == TOOLS
    for tool in tools:
        # index_images writes its index database (never the images): not read-only, still not destructive.
        assert tool.annotations is not None and (tool.annotations.read_only_hint or tool.name == "index_images")
        assert tool.annotations.destructive_hint is False
        assert tool.output_schema is not None, f"{tool.name} has no output schema"
        assert tool.description
    caption = next(t for t in tools if t.name == "caption_image")
    props = caption.input_schema["properties"]
    assert "absolute file path" in props["image"]["description"]
    assert props["num_beams"]["anyOf"][0]["maximum"] == 16
    assert caption.input_schema["required"] == ["image"]
    assert instructions is not None and "ABSOLUTE FILE PATH" in instructions
    assert "dropped or pasted" in instructions


async def test_caption_image_structured_and_text(server: BlipMCPServer, service: Any, mcp_images: list[str]) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            r = await client.call_tool("caption_image", {"image": mcp_images[0], "max_new_tokens": 8})
    assert not r.is_error, text_of(r)
    result = CaptionResult.model_validate(r.structured_content)
    assert result.caption == service.caption(mcp_images[0], max_new_tokens=8).caption
    assert result.image.width == 48 and result.image.height == 40
    assert text_of(r).startswith("Caption: ")
    assert "Confidence:" in text_of(r)


async def test_caption_image_several_sequences(server: BlipMCPServer, mcp_images: list[str]) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            r = await client.call_tool(
                "caption_image",
                {"image": mcp_images[1], "num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 6},
            )
    assert not r.is_error, text_of(r)
    assert len(CaptionResult.model_validate(r.structured_content).captions) == 2
    assert text_of(r).startswith("Captions:\n1. ")


async def test_bad_path_is_a_readable_tool_error(server: BlipMCPServer, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-image.png"
    with anyio.fail_after(60):
        async with Client(server) as client:
            r = await client.call_tool("caption_image", {"image": str(missing)})
            ok = await client.call_tool("embed_text", {"text": "still serving"})
    assert r.is_error
    assert "[invalid_image]" in text_of(r)
    assert str(missing) in text_of(r)
    assert r.structured_content is None
    assert not ok.is_error


@pytest.mark.parametrize(
    ("tool", "arguments", "field"),
    [
        ("caption_image", {"num_beams": 99}, "num_beams"),
        ("caption_image", {"max_new_tokens": 0}, "max_new_tokens"),
        ("caption_image", {"temperature": -1.0}, "temperature"),
        ("answer_question", {"question": ""}, "question"),
        ("score_image_text", {"texts": []}, "texts"),
        ("caption_images", {"images": []}, "images"),
    ],
)
async def test_out_of_range_arguments_are_validation_errors(
    server: BlipMCPServer, mcp_images: list[str], tool: str, arguments: dict[str, Any], field: str
) -> None:
    base: dict[str, Any] = {"image": mcp_images[0]} if tool != "caption_images" else {}
    if tool == "answer_question":
        base["question"] = "what?"
    if tool == "score_image_text":
        base["texts"] = ["a"]
    with anyio.fail_after(60):
        async with Client(server) as client:
            r = await client.call_tool(tool, {**base, **arguments})
    assert r.is_error
    assert field in text_of(r)
    # One readable line per field, not pydantic's multi-line dump.
    assert text_of(r).startswith("[invalid_input] Invalid arguments: ") and "validation error for" not in text_of(r)


async def test_service_level_param_errors_are_tool_errors(server: BlipMCPServer, mcp_images: list[str]) -> None:
    # Valid per schema, invalid together: num_return_sequences > num_beams without sampling.
    with anyio.fail_after(60):
        async with Client(server) as client:
            r = await client.call_tool("caption_image", {"image": mcp_images[0], "num_return_sequences": 3})
    assert r.is_error
    assert "[invalid_input]" in text_of(r)
    assert "num_return_sequences" in text_of(r)


async def test_caption_images_reports_progress_and_isolates_a_bad_image(
    server: BlipMCPServer, mcp_images: list[str], tmp_path: Path
) -> None:
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    images = [mcp_images[0], str(tmp_path / "missing.png"), mcp_images[2]]
    with anyio.fail_after(60):
        async with Client(server) as client:
            r = await client.call_tool("caption_images", {"images": images}, progress_callback=on_progress)
    assert not r.is_error, text_of(r)
    summary = CaptionImagesResult.model_validate(r.structured_content)
    assert [item.ok for item in summary.items] == [True, False, True]
    assert summary.succeeded == 2 and summary.failed == 1
    assert summary.items[1].error is not None and "missing.png" in summary.items[1].error
    assert sorted(p[0] for p in progress) == [1, 2, 3]
    assert all(p[1] == 3 for p in progress)
    assert "Captioned 2 of 3 images (1 failed)" in text_of(r)


async def test_answer_question(server: BlipMCPServer, service: Any, mcp_images: list[str]) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            r = await client.call_tool("answer_question", {"image": mcp_images[1], "question": "what color is it?"})
    assert not r.is_error, text_of(r)
    result = AnswerResult.model_validate(r.structured_content)
    assert result.question == "what color is it?"
    assert result.answer == service.answer(mcp_images[1], "what color is it?").answer
    assert text_of(r).startswith("Answer: ")


async def test_score_image_text(server: BlipMCPServer, mcp_images: list[str]) -> None:
    texts = ["a red car", "a dog on the grass"]
    with anyio.fail_after(60):
        async with Client(server) as client:
            r = await client.call_tool("score_image_text", {"image": mcp_images[0], "texts": texts})
    assert not r.is_error, text_of(r)
    result = ScoreResult.model_validate(r.structured_content)
    assert [s.text for s in result.scores] == texts
    assert result.best in texts
    assert all(0.0 <= s.itm_probability <= 1.0 for s in result.scores)
    assert text_of(r).startswith(f"Best match: {result.best}")


async def test_embeddings_share_one_normalised_space(server: BlipMCPServer, mcp_images: list[str]) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            ri = await client.call_tool("embed_image", {"image": mcp_images[0]})
            rq = await client.call_tool("embed_image", {"image": mcp_images[0], "include_query_vectors": True})
            rt = await client.call_tool("embed_text", {"text": "a photo of a cat"})
    for r in (ri, rq, rt):
        assert not r.is_error, text_of(r)
    image = EmbeddingResult.model_validate(ri.structured_content)
    text = EmbeddingResult.model_validate(rt.structured_content)
    assert image.kind == "image" and text.kind == "text"
    assert image.dim == text.dim == len(image.vector)
    assert math.isclose(sum(v * v for v in image.vector), 1.0, rel_tol=1e-4)
    assert image.query_vectors is None
    assert EmbeddingResult.model_validate(rq.structured_content).query_vectors
    assert f"{image.dim}-d vector" in text_of(ri)


async def test_resources_model_and_stats(server: BlipMCPServer, service: Any, mcp_images: list[str]) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            await client.call_tool("caption_image", {"image": mcp_images[0], "max_new_tokens": 4})
            listed = {str(r.uri) for r in (await client.list_resources()).resources}
            model = await client.read_resource("blip://model")
            stats = await client.read_resource("blip://stats")
    assert {"blip://model", "blip://stats"} <= listed
    info = ModelInfo.model_validate_json(model.contents[0].text)  # type: ignore[union-attr]
    assert info.model == service.settings.model
    assert info.device == "cpu" and info.dtype == "float32"
    assert "caption" in info.capabilities and info.limits["max_image_bytes"] == service.settings.max_image_bytes
    counters = ServiceStats.model_validate_json(stats.contents[0].text)  # type: ignore[union-attr]
    assert counters.requests > 0 and counters.batches > 0
    assert stats.ttl_ms == 0 and model.ttl_ms == 0, "live resources must never be served from a client cache"


async def test_prompts(server: BlipMCPServer) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            names = {p.name for p in (await client.list_prompts()).prompts}
            brief = await client.get_prompt("describe_image", {"image": "/photos/cat.jpg"})
            detailed = await client.get_prompt("describe_image", {"image": "/photos/cat.jpg", "style": "detailed"})
            inspect = await client.get_prompt("inspect_image", {"image": "/photos/cat.jpg", "focus": "text on signs"})
    assert names == {"describe_image", "inspect_image"}

    def text(result: Any) -> str:
        return result.messages[0].content.text

    assert "caption_image" in text(brief) and "'/photos/cat.jpg'" in text(brief)
    assert "answer_question" not in text(brief)
    assert "answer_question" in text(detailed)
    steps = text(inspect)
    assert steps.index("caption_image") < steps.index("answer_question")
    assert "text on signs" in steps and "score_image_text" in steps


# ------------------------------------------------------------------------------------------ error mapping
def test_error_mapping_keeps_the_message_and_adds_the_retry_hint() -> None:
    assert error_message(Overloaded("The request queue is full (256 waiting).", retry_after_s=2.5)) == (
        "[overloaded] The request queue is full (256 waiting). Retry after 2.5 s."
    )
    error = to_tool_error(PathNotAllowed("/etc/passwd is outside the allowed directories."))
    assert isinstance(error, ToolError)
    assert str(error) == "[path_not_allowed] /etc/passwd is outside the allowed directories."
    with pytest.raises(ToolError) as info, tool_errors():
        raise Overloaded("busy, retry in 1 s")
    assert str(info.value) == "[overloaded] busy, retry in 1 s"
    assert isinstance(info.value.__cause__, Overloaded)


# ------------------------------------------------------------------------------------------ a gated private service
@pytest.fixture(scope="module")
def small_queue(tiny_checkpoint: Path) -> Iterator[tuple[BlipMCPServer, Any, Gate]]:
    """A private service with a one-slot queue and a gate on the model worker."""
    service = make_service(tiny_checkpoint, max_queue=1, max_wait_ms=0.0)
    gate = Gate(service)
    try:
        yield create_server(service), service, gate
    finally:
        service.close()


async def test_overloaded_reaches_the_model_with_a_retry_hint(
    small_queue: tuple[BlipMCPServer, Any, Gate], mcp_images: list[str]
) -> None:
    server, service, gate = small_queue
    with anyio.fail_after(60):
        async with Client(server) as client:
            with gate.holding(mcp_images[0]):
                async with anyio.create_task_group() as tg:
                    # One request fills the queue while the worker is held...
                    tg.start_soon(client.call_tool, "caption_image", {"image": mcp_images[1]})
                    await apoll(lambda: service.stats().queue_depth >= 1)
                    # ...so the next is refused at once.
                    r = await client.call_tool("caption_image", {"image": mcp_images[2]})
                    gate.release()
    assert r.is_error
    assert "[overloaded]" in text_of(r)
    assert "retry after" in text_of(r).lower()


async def test_client_cancel_cancels_the_queued_request(
    small_queue: tuple[BlipMCPServer, Any, Gate], mcp_images: list[str]
) -> None:
    server, service, gate = small_queue
    before = service.stats()
    with anyio.fail_after(60), watching_cancellations(service) as handler_cancelled:
        async with Client(server) as client:
            with gate.holding(mcp_images[0]):
                with anyio.CancelScope() as scope:

                    async def cancel_when_queued() -> None:
                        await apoll(lambda: service.stats().queue_depth >= 1)
                        scope.cancel()

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(cancel_when_queued)
                        await client.call_tool("caption_image", {"image": mcp_images[3]})
                assert scope.cancelled_caught
                await apoll(handler_cancelled.is_set)
            await apoll(lambda: service.stats().cancelled > before.cancelled)
            assert service.stats().completed == before.completed + 1  # only the blocker ran
            r = await client.call_tool("caption_image", {"image": mcp_images[3]})
    assert not r.is_error


# ------------------------------------------------------------------------------------------ lifespan and registrars
async def test_lifespan_creates_one_shared_service_and_closes_it(settings: Any, mcp_images: list[str]) -> None:
    server = create_server(settings)
    assert server.current_context is None
    with anyio.fail_after(120):
        async with Client(server) as first, Client(server) as second:
            context = server.app_context
            assert context.service.settings is settings
            r1 = await first.call_tool("caption_image", {"image": mcp_images[0]})
            r2 = await second.call_tool("caption_image", {"image": mcp_images[0]})
            assert server.app_context is context, "a second session created another service"
            await anyio.to_thread.run_sync(context.ready.wait, 60)
            assert context.status == "ok"
        assert not r1.is_error and not r2.is_error
        assert server.current_context is None
        assert context.service.closed, "the lifespan did not close the service it created"


async def test_borrowed_service_is_not_closed(server: BlipMCPServer, service: Any) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            await client.list_tools()
    assert not service.closed


def test_registrars_are_pluggable(service: Any) -> None:
    calls: list[BlipMCPServer] = []
    server = create_server(service, registrars=[*REGISTRARS, calls.append])
    assert calls == [server]
    bare = create_server(service, registrars=[])
    assert bare.blip_settings is service.settings


async def test_a_missing_model_is_a_readable_tool_error(tmp_path: Path, mcp_images: list[str]) -> None:
    from blip_tools import BlipSettings

    missing = tmp_path / "no-such-checkpoint"
    server = create_server(BlipSettings(model=str(missing), retrieval_model=str(missing), device="cpu"))
    with anyio.fail_after(60):
        async with Client(server) as client:
            context = server.app_context
            await anyio.to_thread.run_sync(context.ready.wait, 30)
            assert context.status == "error"
            r = await client.call_tool("caption_image", {"image": mcp_images[0]})
            tools = await client.list_tools()
    assert r.is_error
    assert "[model_not_available]" in text_of(r)
    assert str(missing) in text_of(r)
    assert tools.tools, "the server stopped answering after the failed load"


def test_an_overloaded_error_gets_a_numeric_retry_hint_unless_it_has_one() -> None:
    """Only a hint with seconds counts: 'Retry shortly.' or 'retry later' used to suppress the number."""
    from blip_tools.errors import Overloaded
    from mcp_server._common import error_message

    assert error_message(Overloaded("busy, retry in 1 s")) == "[overloaded] busy, retry in 1 s"
    assert error_message(Overloaded("full; retry after 0.20 s (or raise it)")).count("etry after") == 1
    hinted = error_message(Overloaded("at capacity. Retry shortly.", retry_after_s=3.0))
    assert hinted == "[overloaded] at capacity. Retry shortly. Retry after 3.0 s."
