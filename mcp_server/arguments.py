"""Tool argument parsing: a string argument is always taken as the string it is.

The SDK's `FuncMetadata.pre_parse_json` parses a JSON-looking string before validation (so a host that sends
`"[\\"a\\", \\"b\\"]"` for a list still works), but it leaves strings alone only where a parameter is typed exactly
`str`. For our optional strings (`prompt: str | None`, `query`, `image`, `directory`) that turned `"null"` into
None (the call silently ran without a prompt) and `"[1, 2]"` into a list (rejected as not a string).
`StringsAsGiven` keeps the SDK's pre-parse for every other parameter and changes nothing in the input schema.

It also refuses arguments a tool does not take: the SDK's argument model ignores them, so a misspelt
`max_tokens` or `questions` ran silently with the defaults. They now fail validation like any bad argument
(`[invalid_input] Invalid arguments: max_tokens: Extra inputs are not permitted ...`), as in the LangChain tools.
And an explicit null for an optional argument that does not take null means its default (`nulls_as_defaults`).
"""

from __future__ import annotations

from typing import Any, TypeVar

from mcp.server.mcpserver.utilities.func_metadata import FuncMetadata
from pydantic import BaseModel, ConfigDict, PrivateAttr

from blip_tools.params import leaf_types, nulls_as_defaults

M = TypeVar("M", bound=BaseModel)


def accepts_str(annotation: Any) -> bool:
    """Whether a parameter typed `annotation` takes a string as such (`str`, `str | None`, `Annotated[str, ...]`)."""
    return any(t is str for t in leaf_types(annotation))


def forbid_extra(arg_model: type[M]) -> type[M]:
    """`arg_model` with unknown arguments refused (`extra="forbid"`); the same fields, so the same input schema."""
    if arg_model.model_config.get("extra") == "forbid":
        return arg_model
    config = ConfigDict(**{**arg_model.model_config, "extra": "forbid"})
    return type(arg_model.__name__, (arg_model,), {"model_config": config, "__module__": arg_model.__module__})


class StringsAsGiven(FuncMetadata):
    """`FuncMetadata` whose JSON pre-parse leaves a string alone wherever the parameter accepts a string, and whose
    argument model refuses unknown arguments."""

    _string_keys: frozenset[str] = PrivateAttr(default=frozenset())

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        keys: set[str] = set()
        for name, info in self.arg_model.model_fields.items():
            if accepts_str(info.annotation):
                keys.add(name)
                if info.alias:
                    keys.add(info.alias)
        self._string_keys = frozenset(keys)

    @classmethod
    def from_metadata(cls, metadata: FuncMetadata) -> StringsAsGiven:
        """The same metadata (argument model, output schema and model) with strings kept as given."""
        if isinstance(metadata, cls):
            return metadata
        return cls(
            arg_model=forbid_extra(metadata.arg_model),
            output_schema=metadata.output_schema,
            output_model=metadata.output_model,
            wrap_output=metadata.wrap_output,
        )

    def pre_parse_json(self, data: dict[str, Any]) -> dict[str, Any]:
        parsed = super().pre_parse_json(data)
        for key in self._string_keys.intersection(data):
            if isinstance(data[key], str):
                parsed[key] = data[key]
        result: dict[str, Any] = nulls_as_defaults(self.arg_model.model_fields, parsed)
        return result
