"""`GenerationParams`: validated decoding parameters; equal params share a batch."""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Final, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

from .errors import InvalidInput


class _PublishMinimumZero:
    """`Annotated` marker for a `gt=0` field: publish `minimum: 0` instead of `exclusiveMinimum: 0`.

    Gemini's function declarations reject `exclusiveMinimum` (the whole request fails, every tool with it) and
    some host-side schema converters do not strip it. Validation is untouched: 0 is still refused (`gt`).
    """

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> Any:
        schema = handler(core_schema)
        if schema.get("exclusiveMinimum") == 0:
            del schema["exclusiveMinimum"]
            schema["minimum"] = 0
        return schema


MINIMUM_ZERO: Final = _PublishMinimumZero()
"""Use as `Annotated[float, Field(gt=0, le=5.0), MINIMUM_ZERO]` in tool argument schemas."""


def nulls_as_defaults(fields: Mapping[str, FieldInfo], arguments: Any) -> Any:
    """Tool `arguments` without the explicit nulls given to optional arguments that do not take null.

    Models often send `null` for an argument they mean to leave unset; for an argument with a default that
    means the default, not an error. Required arguments and arguments that accept null are left as given.
    """
    if not isinstance(arguments, dict) or None not in arguments.values():
        return arguments
    optional: set[str] = set()
    for name, info in fields.items():
        if not info.is_required() and not _accepts_none(info.annotation):
            optional.add(name)
            if info.alias:
                optional.add(info.alias)
    return {key: value for key, value in arguments.items() if value is not None or key not in optional}


def _accepts_none(annotation: Any) -> bool:
    return any(t is None or t is type(None) or t is Any for t in leaf_types(annotation))


def leaf_types(annotation: Any) -> Iterator[Any]:
    """The types an argument annotation admits, through `Annotated[...]` and unions (`int | None` → int, None)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        yield from leaf_types(get_args(annotation)[0])
    elif origin is Union or origin is types.UnionType:
        for arg in get_args(annotation):
            yield from leaf_types(arg)
    else:
        yield annotation


class GenerationParams(BaseModel):
    """Decoding parameters for captions and answers. Frozen and hashable: it is part of the batch key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(default=30, ge=1, le=512, description="Most tokens to generate.")
    min_new_tokens: int = Field(default=0, ge=0, le=512, description="Fewest tokens to generate.")
    num_beams: int = Field(default=1, ge=1, le=16, description="Beam-search width (1 = greedy or sampling).")
    do_sample: bool = Field(default=False, description="Sample instead of greedy/beam search.")
    temperature: float = Field(default=1.0, gt=0.0, le=5.0, description="Sampling temperature.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(default=50, ge=0, le=1000, description="Sample among the k most likely tokens (0 = all).")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0, description="Penalty for repeated tokens.")
    length_penalty: float = Field(default=1.0, ge=-10.0, le=10.0, description="Beam-search length penalty.")
    num_return_sequences: int = Field(default=1, ge=1, le=16, description="Texts returned per image.")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="Seed for reproducible sampling.")

    @model_validator(mode="after")
    def _check(self) -> GenerationParams:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})"
            )
        # Beam search (sampled or not) returns at most one text per beam; only plain sampling (num_beams=1)
        # can return more texts than beams.
        if self.num_return_sequences > self.num_beams and (self.num_beams > 1 or not self.do_sample):
            raise ValueError(
                f"num_return_sequences ({self.num_return_sequences}) needs num_beams >= it, or do_sample=true with "
                f"num_beams=1 (got num_beams={self.num_beams})"
            )
        return self

    @classmethod
    def from_kwargs(cls, params: GenerationParams | Mapping[str, Any] | None = None, **gen: Any) -> GenerationParams:
        """Build params from keyword arguments (over `params`, if given), raising `InvalidInput` when invalid."""
        from pydantic import ValidationError

        if isinstance(params, Mapping):
            gen = {**params, **gen}
            params = None
        elif params is not None and not isinstance(params, GenerationParams):
            raise InvalidInput(
                f"params must be a GenerationParams or a dict of its fields, got {type(params).__name__}"
            )
        if params is not None and not gen:
            return params
        base = params.model_dump() if params is not None else {}
        base.update({k: v for k, v in gen.items() if v is not None})
        try:
            return cls(**base)
        except ValidationError as exc:
            raise InvalidInput(format_validation_error(exc)) from None

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `transformers` `generate()` (seed excluded)."""
        kw: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
            "num_return_sequences": self.num_return_sequences,
        }
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.num_beams > 1:
            kw.update(length_penalty=self.length_penalty, early_stopping=True)
        return kw


def format_validation_error(exc: Exception) -> str:
    """One readable line per invalid field, e.g. `num_beams: Input should be less than or equal to 16 (got 99)`."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for err in exc.errors():
        whole = not err.get("loc")  # a model-level check (fields that conflict): its own words, no dump of the input
        loc = ".".join(str(p) for p in err.get("loc", ())) or "input"
        msg = err.get("msg", "invalid value")
        if err.get("type") == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])  # without pydantic's "Value error, " prefix
        if whole:
            parts.append(msg)
        elif "input" in err and err.get("type") not in ("missing",):
            got = repr(err["input"])
            if len(got) > 80:
                got = got[:77] + "..."
            parts.append(f"{loc}: {msg} (got {got})")
        else:
            parts.append(f"{loc}: {msg}")
    return "Invalid arguments: " + "; ".join(parts)
