"""Copying, pickling and printing the LangChain objects: copies share the model, a private service stays private."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.messages import ToolMessage

from blip_tools import Blip2Service
from blip_tools.langchain import Blip2Embeddings, Blip2Toolkit


@pytest.fixture
def as_shared(service: Blip2Service) -> Iterator[Blip2Service]:
    """The session's tiny-checkpoint service installed as `Blip2Service.shared()` for one test."""
    before = Blip2Service._shared
    Blip2Service.set_shared(service)
    try:
        yield service
    finally:
        Blip2Service.set_shared(before)


def test_deep_copies_share_the_service_and_still_work(service: Blip2Service, lc_image: str) -> None:
    toolkit = Blip2Toolkit(service=service)
    tools = {t.name: t for t in toolkit.get_tools()}
    embeddings = Blip2Embeddings(service=service)

    for original in (toolkit, *tools.values(), embeddings):
        assert copy.deepcopy(original).service is service  # was: TypeError: cannot pickle '_thread.RLock' object

    tool = copy.deepcopy(tools["caption_image"])
    message = tool.invoke(
        {"type": "tool_call", "id": "c1", "name": "caption_image", "args": {"image": lc_image, "max_new_tokens": 2}}
    )
    assert isinstance(message, ToolMessage) and message.status == "success"
    assert len(copy.deepcopy(embeddings).embed_query("a photo")) == len(embeddings.embed_query("a photo"))


def test_objects_on_the_shared_service_pickle_and_use_it_when_loaded(as_shared: Blip2Service, lc_image: str) -> None:
    toolkit = Blip2Toolkit()  # the README's way: Blip2Service.shared()
    tool = pickle.loads(pickle.dumps(toolkit.get_tools()[0]))
    assert tool._service() is as_shared
    assert tool.invoke({"image": lc_image, "max_new_tokens": 2}).startswith("Caption of ")

    loaded: Any = pickle.loads(pickle.dumps(toolkit))
    assert loaded.service is as_shared and all(t._service() is as_shared for t in loaded.get_tools())
    assert len(pickle.loads(pickle.dumps(Blip2Embeddings())).embed_query("a photo")) > 0


def test_a_private_service_refuses_to_pickle_with_a_message_that_says_why(service: Blip2Service) -> None:
    toolkit = Blip2Toolkit(service=service)
    tools = {t.name: t for t in toolkit.get_tools()}
    for obj, name in [
        (toolkit, "Blip2Toolkit"),
        (tools["caption_image"], "caption_image"),
        (tools["search_images"], "search_images"),
        (Blip2Embeddings(service=service), "Blip2Embeddings"),
    ]:
        with pytest.raises(TypeError, match=f"{name} is bound to a private Blip2Service, which cannot be pickled"):
            pickle.dumps(obj)


def test_reprs_leave_out_the_settings_and_their_token(service: Blip2Service) -> None:
    settings = service.settings.model_copy(update={"token": "s3cret-token"})
    for obj in (Blip2Toolkit(service=service, settings=settings), Blip2Embeddings(service=service, settings=settings)):
        assert "s3cret-token" not in repr(obj) and "s3cret-token" not in str(obj)
    assert "image_outputs=True" in repr(Blip2Toolkit(service=service))
