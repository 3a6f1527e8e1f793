"""The tools over the real service: batching of concurrent calls, readable errors, artifacts, the toolkit."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anyio
import pytest
from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool

from blip_tools import Blip2Service
from blip_tools.langchain import TOOL_CLASSES, Blip2BaseTool, Blip2Toolkit, ImageError
from blip_tools.langchain.collection_tools import SearchImagesInput
from blip_tools.results import CaptionResult, EmbeddingResult, ScoreResult

CONTRACT_NAMES = ["caption_image", "caption_images", "answer_question", "score_image_text", "embed_image", "embed_text"]


def _items_batched(service: Any) -> int:
    return sum(size * count for size, count in service.stats().batch_size_histogram.items())


def _call(name: str, call_id: str = "1", **args: Any) -> dict[str, Any]:
    return {"name": name, "args": args, "id": call_id, "type": "tool_call"}


def test_toolkit_tools_share_one_service(service: Any, toolkit: Blip2Toolkit) -> None:
    tools = toolkit.get_tools()
    assert [t.name for t in tools][: len(CONTRACT_NAMES)] == CONTRACT_NAMES
    assert len(tools) == len(TOOL_CLASSES)
    for tool in tools:
        assert isinstance(tool, Blip2BaseTool)
        assert tool.service is service
        assert tool.response_format == "content_and_artifact"
        schema = tool.tool_call_schema.model_json_schema()
        # Every model-facing argument is described for the LLM.
        assert all(prop.get("description") for prop in schema["properties"].values()), tool.name


async def test_concurrent_ainvokes_coalesce_into_batches(
    service: Any, settings: Any, tmp_path: Path, make_image: Any
) -> None:
    paths = []
    for i in range(16):
        path = tmp_path / f"c{i}.png"
        make_image(300 + i).save(path)
        paths.append(str(path))
    expected = [service.caption(p).caption for p in paths]

    # A private service on the same checkpoint, so its counters hold only these 16 calls.
    with Blip2Service(settings).start() as private:
        tool = Blip2Toolkit(service=private).get_tools()[0]
        assert tool.name == "caption_image"
        with anyio.fail_after(60):
            messages = await asyncio.gather(
                *(tool.ainvoke(_call("caption_image", f"id{i}", image=p)) for i, p in enumerate(paths))
            )
        stats = private.stats()

    assert stats.requests == 16
    assert _items_batched(private) == 16
    assert 1 <= stats.batches < 16
    assert [m.artifact.caption for m in messages] == expected
    assert all(m.status == "success" and m.tool_call_id == f"id{i}" for i, m in enumerate(messages))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"num_beams": 99}, "num_beams: Input should be less than or equal to 16 (got 99)"),
        ({"temperature": 0}, "temperature: Input should be greater than 0"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_out_of_range_argument_is_a_readable_error_message(
    tools: dict[str, BaseTool], lc_image: str, args: dict[str, Any], expected: str
) -> None:
    message = tools["caption_image"].invoke(_call("caption_image", image=lc_image, **args))
    assert isinstance(message, ToolMessage)
    assert message.status == "error"
    assert expected in message.content
    assert "errors.pydantic.dev" not in message.content  # not pydantic's default dump
    assert message.content.startswith("Invalid arguments:")


async def test_service_error_is_an_error_tool_message_sync_and_async(
    tools: dict[str, BaseTool], tmp_path: Path
) -> None:
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"plain text, not a picture")
    call = _call("answer_question", image=str(bad), question="What is it?")
    for message in (tools["answer_question"].invoke(call), await tools["answer_question"].ainvoke(call)):
        assert message.status == "error"
        assert str(bad) in message.content
        assert message.artifact is None


def test_generation_params_reach_the_service(service: Any, tools: dict[str, BaseTool], lc_image: str) -> None:
    message = tools["caption_image"].invoke(_call("caption_image", image=lc_image, num_captions=3, max_new_tokens=6))
    result = message.artifact
    assert isinstance(result, CaptionResult)
    assert len(result.captions) == 3
    assert result == service.caption(lc_image, num_beams=3, num_return_sequences=3, max_new_tokens=6).model_copy(
        update={"timing": result.timing}
    )
    assert "1. " in message.content and "3. " in message.content


def test_caption_images_reports_a_bad_image_in_place(service: Any, tools: dict[str, BaseTool], image_dir: Path) -> None:
    good = [str(image_dir / "img0.png"), str(image_dir / "img1.png")]
    message = tools["caption_images"].invoke(_call("caption_images", images=[good[0], "/missing.png", good[1]]))
    assert message.status == "success"
    first, missing, second = message.artifact
    assert isinstance(first, CaptionResult) and isinstance(second, CaptionResult)
    assert [first.caption, second.caption] == [service.caption(p).caption for p in good]
    assert isinstance(missing, ImageError) and missing.code == "invalid_image" and missing.image == "/missing.png"
    lines = message.content.splitlines()
    assert len(lines) == 3 and lines[1].startswith("2. error for /missing.png")

    all_bad = tools["caption_images"].invoke(_call("caption_images", images=["/missing.png", "/gone.png"]))
    assert all_bad.status == "error" and "/gone.png" in all_bad.content


def test_score_and_embedding_artifacts(service: Any, tools: dict[str, BaseTool], lc_image: str) -> None:
    texts = ["a red car", "a dog on grass", "a bowl of soup"]
    scored = tools["score_image_text"].invoke(_call("score_image_text", image=lc_image, texts=texts))
    assert isinstance(scored.artifact, ScoreResult)
    assert [s.text for s in scored.artifact.scores] == texts
    assert scored.content.splitlines()[0] == f"Best match for {lc_image}: {scored.artifact.best!r}"

    image_vec = tools["embed_image"].invoke(_call("embed_image", image=lc_image))
    text_vecs = tools["embed_text"].invoke(_call("embed_text", texts=texts))
    assert isinstance(image_vec.artifact, EmbeddingResult) and image_vec.artifact.kind == "image"
    assert [r.text for r in text_vecs.artifact] == texts
    assert image_vec.artifact.vector == pytest.approx(service.embed_images([lc_image])[0].vector, abs=1e-5)
    # Vectors stay out of the model's text.
    assert str(image_vec.artifact.vector[0]) not in image_vec.content
    assert len(image_vec.content) < 200 and len(text_vecs.content) < 200


def test_null_for_an_optional_argument_means_its_default(tools: dict[str, BaseTool], lc_image: str) -> None:
    """Models send `null` for arguments they leave unset; a default that does not take null is then used."""
    caption = tools["caption_image"].invoke(_call("caption_image", image=lc_image, num_captions=None, prompt=None))
    assert caption.status == "success", caption.content
    assert len(caption.artifact.captions) == 1
    search = SearchImagesInput.model_validate({"query": "a dog", "top_k": None, "rerank": None})
    assert (search.top_k, search.rerank) == (5, SearchImagesInput.model_fields["rerank"].default)

    required = tools["caption_image"].invoke(_call("caption_image", image=None))
    assert required.status == "error" and required.content.startswith("Invalid arguments:")
