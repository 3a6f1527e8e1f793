"""`Blip2Toolkit(settings=...)`: settings given as a dict (as from a config file), and bad fields that build nothing."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from pydantic import ValidationError

from blip_tools import BlipSettings
from blip_tools.langchain import Blip2Toolkit


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("blip-model-worker")]


def test_settings_as_a_dict_build_the_private_service(settings: BlipSettings) -> None:
    toolkit = Blip2Toolkit(settings={**settings.model_dump(), "max_batch_size": 3})  # was: AttributeError
    try:
        assert isinstance(toolkit.settings, BlipSettings)
        assert toolkit.service.settings.max_batch_size == 3
        assert all(t.service is toolkit.service for t in toolkit.get_tools())  # type: ignore[attr-defined]
    finally:
        toolkit.service.close()


@pytest.mark.parametrize("fields", [{"settings": "fast"}, {"image_outputs": "maybe"}])
def test_a_bad_field_fails_before_any_service_starts(settings: BlipSettings, fields: dict[str, Any]) -> None:
    before = set(_workers())
    with pytest.raises(ValidationError):
        Blip2Toolkit.model_validate({"settings": settings, **fields})
    assert set(_workers()) <= before  # was: a private service's worker threads left running with nothing to close them
