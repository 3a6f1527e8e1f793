"""Shared bits of every blip-tools LangChain tool: the one error mapping and a base class holding the service.

Tool modules (ours and `collection_tools.py`) subclass `Blip2BaseTool` and implement `_call_service` and
`_acall_service`; the base class validates arguments into the tool's `args_schema`, maps `BlipError` to
`ToolException` once, and sets the response format and error handling every tool shares.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, Field

from ..errors import BlipError
from ..params import format_validation_error
from ..service import Blip2Service

logger = logging.getLogger(__name__)

ToolOutput = tuple[str | list[str | dict[str, Any]], Any]
"""What a tool returns under `response_format="content_and_artifact"`: (content for the model, artifact)."""


def to_tool_exception(exc: BlipError) -> ToolException:
    """The `ToolException` whose text the model reads for a `BlipError` (its message is safe to show)."""
    return ToolException(str(exc))


@contextmanager
def map_blip_errors() -> Iterator[None]:
    """Re-raise any `BlipError` in the block as a `ToolException`, so the agent gets an error `ToolMessage`.

    Other exceptions are bugs and propagate unchanged.
    """
    try:
        yield
    except BlipError as exc:
        logger.debug("tool call failed: %s: %s", type(exc).__name__, exc)
        raise to_tool_exception(exc) from exc


def format_tool_validation_error(exc: Exception) -> str:
    """Readable text for bad tool arguments: one line per field with the bad value, and what to do next."""
    return f"{format_validation_error(exc)}. Fix these arguments and call the tool again."


class Blip2BaseTool(BaseTool):
    """Base of every blip-tools LangChain tool: holds the shared service and maps errors once.

    Subclasses set `name`, `description` and `args_schema` (a pydantic model), and implement
    `_call_service(service, args)` and `_acall_service(service, args)`, which get the validated `args_schema`
    instance and return `(content, artifact)`. A `BlipError` raised there reaches the model as an error
    `ToolMessage` with the error's message.
    """

    service: Blip2Service | None = Field(default=None, exclude=True)
    """The service to call; None means `Blip2Service.shared()`, resolved on each call."""

    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool | str | Callable[..., Any] | None = True
    handle_validation_error: bool | str | Callable[..., str] | None = format_tool_validation_error

    def _service(self) -> Blip2Service:
        return self.service if self.service is not None else Blip2Service.shared()

    def _args(self, kwargs: dict[str, Any]) -> Any:
        schema = self.args_schema
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):  # pragma: no cover - set by subclasses
            raise TypeError(f"{type(self).__name__}.args_schema must be a pydantic model class")
        return schema.model_validate(kwargs)

    def _to_args_and_kwargs(
        self, tool_input: str | dict[str, Any], tool_call_id: str | None
    ) -> tuple[tuple[str, ...], dict[str, Any]]:
        # LangChain validates a plain string input as the schema's first field, then passes it on positionally
        # (`tool.invoke("/x.jpg")`, older agents); our `_run` takes keyword arguments only, so name it here.
        args, kwargs = super()._to_args_and_kwargs(tool_input, tool_call_id)
        if args and isinstance(self.args_schema, type) and issubclass(self.args_schema, BaseModel):
            first = next(iter(self.args_schema.model_fields))
            return (), {first: args[0], **kwargs}
        return args, kwargs

    def _run(self, *, run_manager: CallbackManagerForToolRun | None = None, **kwargs: Any) -> ToolOutput:
        args = self._args(kwargs)
        with map_blip_errors():
            return self._call_service(self._service(), args)

    async def _arun(self, *, run_manager: AsyncCallbackManagerForToolRun | None = None, **kwargs: Any) -> ToolOutput:
        args = self._args(kwargs)
        with map_blip_errors():
            return await self._acall_service(self._service(), args)

    def _call_service(self, service: Blip2Service, args: Any) -> ToolOutput:
        """Run the capability synchronously; return `(content, artifact)`."""
        raise NotImplementedError

    async def _acall_service(self, service: Blip2Service, args: Any) -> ToolOutput:
        """Run the capability without blocking the event loop; return `(content, artifact)`."""
        raise NotImplementedError
