"""Shared bits of every blip-tools LangChain tool: the one error mapping and a base class holding the service.

Tool modules (ours and `collection_tools.py`) subclass `Blip2BaseTool` and implement `_call_service` and
`_acall_service`; the base class validates arguments into the tool's `args_schema`, maps `BlipError` to
`ToolException` once, and sets the response format and error handling every tool shares. `KeepsService` holds the
copy and pickle rules of everything here that holds a service (tools, toolkit, embeddings).

No `from __future__ import annotations` here: LangChain resolves `_run`'s type hints on every call, and string
annotations would be compiled again each time.
"""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.tools import BaseTool, ToolException
from langchain_core.tools.base import FILTERED_ARGS
from pydantic import BaseModel, Field

from ..errors import BlipError
from ..params import format_validation_error
from ..service import Blip2Service

logger = logging.getLogger(__name__)

ToolOutput = tuple[str | list[str | dict[str, Any]], Any]
"""What a tool returns under `response_format="content_and_artifact"`: (content for the model, artifact)."""


_PLAIN_SCHEMAS: dict[tuple[type, type], bool] = {}
"""Per (tool class, args schema): whether LangChain injects nothing into it (see `Blip2BaseTool._plain_schema`)."""


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


class KeepsService(BaseModel):
    """Copy and pickle rules for a LangChain object that holds a `Blip2Service` (tools, toolkit, embeddings).

    A service owns a loaded model and its worker thread, so it is never copied: `copy.deepcopy` gives an object
    that calls the same service. Pickling (multiprocessing, Ray, caches) stores the process-wide service as
    "the shared service" (None), so the copy uses `Blip2Service.shared()` of the process it is loaded in, as an
    object built without a service does; a private service cannot leave its process, and pickling an object
    bound to one raises a `TypeError` that says so, instead of pickle's "cannot pickle '_thread.RLock' object".
    """

    _model_owners: ClassVar[tuple[str, ...]] = ("service",)
    """Fields holding a service (or an object owning one, like an `ImageIndex`): shared by copies, never pickled."""

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Any:
        memo = {} if memo is None else memo
        for name in self._model_owners:
            owner = self.__dict__.get(name)
            if owner is not None:
                memo.setdefault(id(owner), owner)  # deepcopy returns what the memo holds: the same object
        return super().__deepcopy__(memo)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        fields = dict(state["__dict__"])
        for name in self._model_owners:
            owner = fields.get(name)
            if owner is None:
                continue
            # Read, not `Blip2Service.shared()`: that would build a service while pickling an unrelated object.
            if name == "service" and owner is Blip2Service._shared:
                fields[name] = None
                continue
            label = getattr(self, "name", None) or type(self).__name__
            kind = "a private Blip2Service" if name == "service" else f"its own {type(owner).__name__}"
            without = " or ".join(f"{n}=" for n in ("service", "settings", "index") if n in type(self).model_fields)
            raise TypeError(
                f"{label} is bound to {kind}, which cannot be pickled (it owns a loaded model and a worker thread). "
                f"Pickle a {type(self).__name__}() built without {without} instead: it uses the process-wide "
                "service, and once loaded, Blip2Service.shared() of the process that loads it."
            )
        return {**state, "__dict__": fields}


def format_tool_validation_error(exc: Exception) -> str:
    """Readable text for bad tool arguments: one line per field with the bad value, and what to do next."""
    return f"{format_validation_error(exc)}. Fix these arguments and call the tool again."


class Blip2BaseTool(KeepsService, BaseTool):
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

    def _schema(self) -> type[BaseModel]:
        schema = self.args_schema
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):  # pragma: no cover - set by subclasses
            raise TypeError(f"{type(self).__name__}.args_schema must be a pydantic model class")
        return schema

    def _args(self, kwargs: dict[str, Any]) -> Any:
        return self._schema().model_validate(kwargs)

    def _plain_schema(self) -> type[BaseModel] | None:
        """The args schema if LangChain injects nothing into this tool (no injected fields or parameters), else None.

        For such a tool the base class validates the arguments once itself and skips LangChain's per-call
        injected-argument scan of the schema: about half of LangChain's own per-call cost (issue 6, B3).
        """
        schema = self._schema()
        key = (type(self), schema)
        plain = _PLAIN_SCHEMAS.get(key)
        if plain is None:
            fields = dict.fromkeys(schema.model_fields)
            plain = not self._injected_args_keys and BaseTool._filter_injected_args(self, fields) == fields
            _PLAIN_SCHEMAS[key] = plain
        return schema if plain else None

    def _filter_injected_args(self, tool_input: dict[str, Any]) -> dict[str, Any]:
        # What callbacks see as the tool's inputs; with nothing injected, only LangChain's own arguments go.
        if self._plain_schema() is None:
            return super()._filter_injected_args(tool_input)
        return {k: v for k, v in tool_input.items() if k not in FILTERED_ARGS}

    def _to_args_and_kwargs(
        self, tool_input: str | dict[str, Any], tool_call_id: str | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # Validate once, here, and hand `_run` the validated model. A plain string fills the schema's first field
        # (`tool.invoke("/x.jpg")`, older agents), as LangChain does.
        schema = self._plain_schema()
        if schema is None:
            args, kwargs = super()._to_args_and_kwargs(tool_input, tool_call_id)
            if args:  # LangChain passes a validated string on positionally; `_run` takes keyword arguments only
                return (), {next(iter(self._schema().model_fields)): args[0], **kwargs}
            return args, kwargs
        if isinstance(tool_input, str):
            tool_input = {next(iter(schema.model_fields)): tool_input}
        return (schema.model_validate(tool_input),), {}

    def _run(
        self,
        validated: BaseModel | None = None,
        /,
        *,
        run_manager: CallbackManagerForToolRun | None = None,
        **kwargs: Any,
    ) -> ToolOutput:
        args = validated if validated is not None else self._args(kwargs)
        with map_blip_errors():
            return self._call_service(self._service(), args)

    async def _arun(
        self,
        validated: BaseModel | None = None,
        /,
        *,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
        **kwargs: Any,
    ) -> ToolOutput:
        args = validated if validated is not None else self._args(kwargs)
        with map_blip_errors():
            return await self._acall_service(self._service(), args)

    def _call_service(self, service: Blip2Service, args: Any) -> ToolOutput:
        """Run the capability synchronously; return `(content, artifact)`."""
        raise NotImplementedError

    async def _acall_service(self, service: Blip2Service, args: Any) -> ToolOutput:
        """Run the capability without blocking the event loop; return `(content, artifact)`."""
        raise NotImplementedError
