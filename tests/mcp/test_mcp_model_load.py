"""A checkpoint whose load fails slowly (a hub id with the hub unreachable takes minutes of retries to fail).

The calls that arrive during the background load wait for it and get its `[model_not_available]` error as soon as
it fails, instead of starting a second load of their own (which doubled the time before the host heard anything,
well past its request timeout). A call that arrives after the failure still tries the load again.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from _mcp_testlib import WAIT_S
from mcp import Client

import mcp_server._common as common
from blip_tools import BlipSettings
from blip_tools.errors import ModelNotAvailable
from blip_tools.runtime import Blip2Runtime
from mcp_server import create_server

pytestmark = pytest.mark.anyio


class _FailingLoad:
    """Stands in for `Blip2Runtime._from_pretrained`: each attempt counts, blocks until released, then fails."""

    def __init__(self) -> None:
        self.attempts = 0
        self.release = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.attempts += 1
        if not self.release.wait(WAIT_S):
            raise AssertionError("the test never released the load")
        raise ModelNotAvailable("Could not load the BLIP-2 checkpoint 'x/y': the hub is unreachable.")


def _text(result: Any) -> str:
    return "\n".join(block.text for block in result.content if getattr(block, "type", "") == "text")


async def test_calls_waiting_for_a_failing_load_get_its_error_without_loading_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mcp_images: list[str]
) -> None:
    load = _FailingLoad()
    monkeypatch.setattr(Blip2Runtime, "_from_pretrained", lambda runtime, *a, **kw: load(*a, **kw))
    entered: list[str] = []
    real_app_context = common.app_context

    def counting_app_context(ctx: Any) -> Any:  # every tool reaches the service through this
        entered.append("call")
        return real_app_context(ctx)

    monkeypatch.setattr(common, "app_context", counting_app_context)
    server = create_server(BlipSettings(model=str(tmp_path / "a"), retrieval_model=str(tmp_path / "b"), device="cpu"))
    calls = [
        ("caption_image", {"image": mcp_images[0]}),
        ("answer_question", {"image": mcp_images[0], "question": "what is it?"}),
        ("caption_images", {"images": mcp_images[:2]}),
    ]
    results: dict[str, Any] = {}
    with anyio.fail_after(WAIT_S):
        async with Client(server) as client:

            async def call(name: str, arguments: dict[str, Any]) -> None:
                results[name] = await client.call_tool(name, arguments)

            async with anyio.create_task_group() as tg:
                for name, arguments in calls:
                    tg.start_soon(call, name, arguments)
                while len(entered) < len(calls):  # all three are in their tools, waiting for the model
                    await anyio.sleep(0.005)
                load.release.set()  # the background load fails now
            assert load.attempts == 1, f"the waiting calls loaded the model again ({load.attempts} attempts)"
            for name, _ in calls:
                assert results[name].is_error, name
                assert _text(results[name]).startswith("[model_not_available] Could not load"), _text(results[name])

            later = await client.call_tool("caption_image", {"image": mcp_images[0]})  # after the failure: retried
    assert load.attempts == 2
    assert later.is_error and "[model_not_available]" in _text(later)
