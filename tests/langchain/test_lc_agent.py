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
