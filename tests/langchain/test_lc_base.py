"""`Blip2BaseTool`'s own argument handling: one validation per call for our tools, and LangChain's injected
arguments kept for subclasses that declare them."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool, InjectedToolArg, InjectedToolCallId
from pydantic import BaseModel

import blip_tools.langchain.tools as lc_tools
from blip_tools.langchain import Blip2BaseTool
from blip_tools.langchain._base import ToolOutput
from blip_tools.service import Blip2Service


class _Inputs(BaseCallbackHandler):
    """Records the inputs LangChain shows callbacks at each tool start."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any] | None] = []

    def on_tool_start(
        self, serialized: Any, input_str: str, *, inputs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        self.seen.append(inputs)


async def test_our_tools_validate_their_arguments_once_per_call(
    tools: dict[str, BaseTool], lc_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LangChain validated the arguments, dumped them to a dict, and the tool validated that dict again; the base
    # class now validates once and hands `_run` the model (B3: LangChain's per-call cost halved).
    calls = []
    real = lc_tools.nulls_as_defaults

    def counting(fields: Any, data: Any) -> Any:
        calls.append(data)
        return real(fields, data)

    monkeypatch.setattr(lc_tools, "nulls_as_defaults", counting)
    tool = tools["caption_image"]
    call = {"name": "caption_image", "args": {"image": lc_image, "max_new_tokens": 3}, "id": "c1", "type": "tool_call"}
    seen = _Inputs()
    for run in (
        lambda: tool.invoke(call, config={"callbacks": [seen]}),
        lambda: tool.invoke(lc_image),
        lambda: tool.run({"image": lc_image, "max_new_tokens": 3}),
    ):
        calls.clear()
        message = run()
        assert len(calls) == 1
        assert "Caption of" in (message.content if isinstance(message, ToolMessage) else message)
    calls.clear()
    message = await tool.ainvoke(call, config={"callbacks": [seen]})
    assert isinstance(message, ToolMessage) and message.status == "success" and len(calls) == 1
    assert seen.seen == [{"image": lc_image, "max_new_tokens": 3}] * 2


def test_bad_arguments_are_still_a_readable_error_message(tools: dict[str, BaseTool], lc_image: str) -> None:
    args = {"image": lc_image, "max_new_tokens": 0, "colour": "red"}
    message = tools["caption_image"].invoke({"name": "caption_image", "args": args, "id": "c1", "type": "tool_call"})
    assert isinstance(message, ToolMessage) and message.status == "error"
    assert message.content.startswith("Invalid arguments:")
    assert "max_new_tokens" in message.content and "colour" in message.content


class _InjectedInput(BaseModel):
    text: str
    user: Annotated[str, InjectedToolArg]
    call_id: Annotated[str, InjectedToolCallId]


class _InjectedTool(Blip2BaseTool):
    """A subclass that takes LangChain-injected arguments: the base class leaves those to LangChain."""

    name: str = "injected"
    description: str = "Echo the arguments."
    args_schema: type[BaseModel] = _InjectedInput

    def _call_service(self, service: Blip2Service, args: Any) -> ToolOutput:
        return f"{args.text} for {args.user} in {args.call_id}", args

    async def _acall_service(self, service: Blip2Service, args: Any) -> ToolOutput:
        return self._call_service(service, args)


async def test_a_subclass_with_injected_arguments_gets_them_from_langchain(service: Blip2Service) -> None:
    tool = _InjectedTool(service=service)
    assert set(tool.tool_call_schema.model_json_schema()["properties"]) == {"text"}  # the model never sees them
    call = {"name": "injected", "args": {"text": "hi", "user": "ann"}, "id": "call-7", "type": "tool_call"}
    seen = _Inputs()
    sync = tool.invoke(call, config={"callbacks": [seen]})
    async_ = await tool.ainvoke(call, config={"callbacks": [seen]})
    for message in (sync, async_):
        assert isinstance(message, ToolMessage) and message.status == "success"
        assert message.content == "hi for ann in call-7"
    assert seen.seen == [{"text": "hi"}] * 2  # injected arguments are not shown to callbacks
