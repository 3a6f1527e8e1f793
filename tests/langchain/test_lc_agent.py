"""A full agent loop with a scripted tool-calling chat model (no API key) over the real tools and service."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

from blip_tools.results import AnswerResult, CaptionResult


class ToolCallingFakeModel(GenericFakeChatModel):
    """`GenericFakeChatModel` plus `bind_tools`, recording the tool schemas and every input it saw."""

    bound_tools: list[dict[str, Any]] = Field(default_factory=list)
    seen: list[list[BaseMessage]] = Field(default_factory=list)

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable:  # type: ignore[override]
        self.bound_tools = [convert_to_openai_tool(t) for t in tools]
        return self.bind(tools=self.bound_tools)

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        self.seen.append(list(messages))
        return super()._generate(messages, *args, **kwargs)


def _script(image: str) -> list[AIMessage]:
    def call(name: str, call_id: str, **args: Any) -> AIMessage:
        return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": call_id, "type": "tool_call"}])

    return [
        call("caption_image", "c1", image=image),
        call("answer_question", "c2", image=image, question="What color is the sky?"),
        call("caption_image", "c3", image="/no/such/dir/missing.png"),
        AIMessage(content="The photo shows noise; the other file does not exist."),
    ]


def _run_agent(model: ToolCallingFakeModel, tools: list[BaseTool], question: str, use_async: bool) -> list[Any]:
    """Run `langchain.agents.create_agent` when installed, else the same loop by hand."""
    messages: list[Any] = [HumanMessage(question)]
    try:
        from langchain.agents import create_agent
    except ImportError:  # pragma: no cover - langchain is a dev dependency; the loop below is equivalent
        bound = model.bind_tools(tools)
        by_name = {t.name: t for t in tools}
        while True:
            ai = anyio.run(bound.ainvoke, messages) if use_async else bound.invoke(messages)
            messages.append(ai)
            if not ai.tool_calls:
                return messages
            for call in ai.tool_calls:
                tool = by_name[call["name"]]
                messages.append(anyio.run(tool.ainvoke, call) if use_async else tool.invoke(call))
    agent = create_agent(model, tools)
    state = {"messages": messages}
    config = {"recursion_limit": 20}
    out = anyio.run(agent.ainvoke, state, config) if use_async else agent.invoke(state, config)
    return list(out["messages"])


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_agent_loop_with_tool_errors(service: Any, tools: dict[str, BaseTool], lc_image: str, use_async: bool) -> None:
    model = ToolCallingFakeModel(messages=iter(_script(lc_image)))
    messages = _run_agent(model, list(tools.values()), "What is in this photo?", use_async)

    assert {t["function"]["name"] for t in model.bound_tools} >= {"caption_image", "answer_question"}
    tool_messages = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.tool_call_id for m in tool_messages] == ["c1", "c2", "c3"]
    caption, answer, failed = tool_messages

    assert caption.status == "success"
    assert isinstance(caption.artifact, CaptionResult)
    assert caption.artifact.caption == service.caption(lc_image).caption
    assert caption.artifact.caption in caption.content

    assert answer.status == "success"
    assert isinstance(answer.artifact, AnswerResult)
    assert answer.artifact.question == "What color is the sky?"
    assert answer.artifact.answer == service.answer(lc_image, "What color is the sky?").answer

    assert failed.status == "error"
    assert failed.artifact is None
    assert "not found" in failed.content and "/no/such/dir/missing.png" in failed.content
    assert "Traceback" not in failed.content

    # The loop went on: the model saw the error and gave the final answer.
    assert failed.content in [m.content for m in model.seen[-1] if isinstance(m, ToolMessage)]
    assert isinstance(messages[-1], AIMessage) and not messages[-1].tool_calls
    assert messages[-1].content.startswith("The photo shows")


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_parallel_tool_calls_run_concurrently_and_share_batches(
    settings: Any, tmp_path: Any, make_image: Any, use_async: bool
) -> None:
    """Several tool calls in one AI message run at once (threads for `invoke`, tasks for `ainvoke`) and the
    service batches them, instead of one forward pass per call; every call gets its own ToolMessage, in order."""
    from langchain.agents import create_agent

    from blip_tools import Blip2Service
    from blip_tools.langchain import Blip2Toolkit

    n = 6
    paths = []
    for i in range(n):
        make_image(500 + i).save(tmp_path / f"p{i}.png")
        paths.append(str(tmp_path / f"p{i}.png"))
    calls = [
        {"name": "caption_image", "args": {"image": p}, "id": f"p{i}", "type": "tool_call"} for i, p in enumerate(paths)
    ]
    # A private service with a wide wait window, so the batch forms however slowly the pool's threads start;
    # `disable_streaming`: GenericFakeChatModel drops tool calls when it streams (astream_events streams).
    private_settings = settings.model_copy(update={"max_wait_ms": 200.0})
    with Blip2Service(private_settings).start() as private:
        model = ToolCallingFakeModel(
            messages=iter([AIMessage(content="", tool_calls=calls), AIMessage(content="Six captions.")]),
            disable_streaming=True,
        )
        agent = create_agent(model, Blip2Toolkit(service=private).get_tools())
        state = {"messages": [HumanMessage("Caption these.")]}
        events: list[tuple[str, str]] = []
        if use_async:

            async def run() -> list[Any]:
                out: list[Any] = []
                with anyio.fail_after(120):
                    async for event in agent.astream_events(state, version="v2"):
                        if event["event"] in ("on_tool_start", "on_tool_end"):
                            events.append((event["event"], event["name"]))
                        if event["event"] == "on_chain_end" and event["name"] == agent.get_name():
                            out = list(event["data"]["output"]["messages"])
                return out

            messages = anyio.run(run)
        else:
            messages = list(agent.invoke(state)["messages"])
        stats = private.stats()

    tool_messages = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.tool_call_id for m in tool_messages] == [f"p{i}" for i in range(n)]
    assert all(m.status == "success" and isinstance(m.artifact, CaptionResult) for m in tool_messages)
    assert stats.per_task["caption"].requests == n
    assert stats.batches < n, stats.batch_size_histogram  # not one forward pass per tool call
    if use_async:
        assert events.count(("on_tool_start", "caption_image")) == n
        assert events.count(("on_tool_end", "caption_image")) == n


def test_bound_tool_schemas_carry_no_keyword_gemini_rejects(tools: dict[str, BaseTool]) -> None:
    """`gt=0` published `exclusiveMinimum`, which Gemini's function declarations refuse (the whole request fails);
    the bound schemas say `minimum: 0` and the tools still refuse 0."""
    import json

    from pydantic import ValidationError

    for name, tool in tools.items():
        text = json.dumps(convert_to_openai_tool(tool))
        assert "exclusiveMinimum" not in text and "exclusiveMaximum" not in text, name
    temperature = convert_to_openai_tool(tools["caption_image"])["function"]["parameters"]["properties"]["temperature"]
    assert {"type": "number", "minimum": 0, "maximum": 5.0} in temperature["anyOf"], temperature
    schema = tools["caption_image"].args_schema
    assert isinstance(schema, type)
    with pytest.raises(ValidationError, match="greater than 0"):
        schema(image="x.png", temperature=0)


def test_conflicting_arguments_read_as_one_sentence(tools: dict[str, BaseTool]) -> None:
    """A model-level check used to read `input: Value error, ... (got {'image': ..., ...})`, dumping every argument."""
    message = tools["caption_image"].invoke(
        {
            "type": "tool_call",
            "id": "c1",
            "name": "caption_image",
            "args": {"image": "x.png", "num_captions": 3, "num_beams": 2},
        }
    )
    text = str(message.content)
    assert "Value error" not in text and "got {" not in text, text
    assert "num_captions=3 needs num_beams >= 3" in text, text
