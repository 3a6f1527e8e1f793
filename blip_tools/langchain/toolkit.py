"""`Blip2Toolkit`: every blip-tools LangChain tool, all sharing one `Blip2Service`."""

from __future__ import annotations

import logging
from typing import Any

from langchain_core.tools import BaseTool, BaseToolkit
from pydantic import ConfigDict, Field, model_validator

from ..service import Blip2Service
from ..settings import BlipSettings
from ._base import Blip2BaseTool, KeepsService
from .collection_tools import COLLECTION_TOOLS
from .tools import CORE_TOOLS

logger = logging.getLogger(__name__)

TOOL_CLASSES: list[type[Blip2BaseTool]] = [*CORE_TOOLS, *COLLECTION_TOOLS]
"""The tool classes `get_tools()` instantiates, in order; adding a tool is one more entry here."""


class Blip2Toolkit(KeepsService, BaseToolkit):
    """All blip-tools LangChain tools over one shared service.

    `Blip2Toolkit()` uses `Blip2Service.shared()`; `Blip2Toolkit(settings=...)` builds a private service
    from those settings (close it with `toolkit.service.close()` when done); `Blip2Toolkit(service=...)`
    uses the given one (e.g. in tests). Copies share the service; a toolkit on the process-wide service pickles
    (loaded again, it uses that process's shared service), one on a private service does not.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    service: Blip2Service = Field(default=None, exclude=True)  # type: ignore[assignment]
    """The service every tool calls (filled in at construction)."""
    settings: BlipSettings | None = Field(default=None, exclude=True)
    """Settings for a private service, when no `service` is given."""
    image_outputs: bool = True
    """Whether tools may return images to the model (`locate_in_image`'s overlay). Set False for chat models or
    endpoints that take only text in tool results; artifacts are the same either way."""

    @model_validator(mode="after")
    def _resolve_service(self) -> Blip2Toolkit:
        # After validation: `settings` is a BlipSettings by now (a dict works too), and a call with a bad field
        # builds no service (and starts no worker threads) before it fails.
        if self.service is None:
            self.service = Blip2Service(self.settings) if self.settings is not None else Blip2Service.shared()
        return self

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        if self.service is None:  # pickled on the process-wide service: use this process's
            object.__setattr__(self, "service", Blip2Service.shared())

    def __repr_args__(self) -> Any:
        # Settings can hold a secret (`token`, from BLIP_TOKEN) and the service holds a model: keep both out of
        # reprs, which end up in logs, tracebacks and notebooks.
        return [(k, v) for k, v in super().__repr_args__() if k not in ("service", "settings")]

    def get_tools(self) -> list[BaseTool]:
        """One instance of every tool class, all bound to this toolkit's service."""
        tools: list[BaseTool] = []
        for tool_class in TOOL_CLASSES:
            fields: dict[str, Any] = {"service": self.service}
            if "overlay" in tool_class.model_fields:
                fields["overlay"] = self.image_outputs
            tools.append(tool_class.model_validate(fields))
        return tools
