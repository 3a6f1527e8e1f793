"""blip-tools: BLIP-2 image captioning, VQA and image search for LLM agents, with one shared, batched model.

The public surface is `__all__`; heavy libraries (torch, transformers) load on first use, not on import. Apart from
the exceptions, the names load on first use too: importing the package (as the `blip-tools` and `blip-mcp` entry
points do) stays quick, so Ctrl-C right after starting a command reaches its `main()`, which ends quietly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes
from .errors import (
    BlipError,
    CapabilityUnavailable,
    ImageTooLarge,
    IndexBusy,
    IndexDamaged,
    IndexReadOnly,
    InferenceError,
    InvalidImage,
    InvalidInput,
    ModelNotAvailable,
    Overloaded,
    PathNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    ServiceClosed,
    UrlNotAllowed,
)

if TYPE_CHECKING:
    from .grounding import LocateResult
    from .index import DuplicateGroup, ImageIndex, IndexReport, SearchHit, SearchResult
    from .params import GenerationParams
    from .results import (
        AnswerResult,
        CaptionResult,
        EmbeddingResult,
        GeneratedText,
        ImageInfo,
        ModelInfo,
        ScoreResult,
        ServiceStats,
        TextScore,
        Timing,
    )
    from .service import Blip2Service
    from .settings import BlipSettings

#: Where each lazily loaded public name lives (numpy, PIL and pydantic models load with the first one used).
_HOMES = {
    "LocateResult": "grounding",
    "DuplicateGroup": "index",
    "ImageIndex": "index",
    "IndexReport": "index",
    "SearchHit": "index",
    "SearchResult": "index",
    "GenerationParams": "params",
    "AnswerResult": "results",
    "CaptionResult": "results",
    "EmbeddingResult": "results",
    "GeneratedText": "results",
    "ImageInfo": "results",
    "ModelInfo": "results",
    "ScoreResult": "results",
    "ServiceStats": "results",
    "TextScore": "results",
    "Timing": "results",
    "Blip2Service": "service",
    "BlipSettings": "settings",
}

__version__ = "0.1.0"  # the one place the version lives: pyproject.toml reads it (dynamic version)

__all__ = [
    "AnswerResult",
    "Blip2Service",
    "BlipError",
    "BlipSettings",
    "CapabilityUnavailable",
    "CaptionResult",
    "DuplicateGroup",
    "EmbeddingResult",
    "GeneratedText",
    "GenerationParams",
    "ImageIndex",
    "ImageInfo",
    "ImageTooLarge",
    "IndexBusy",
    "IndexDamaged",
    "IndexReadOnly",
    "IndexReport",
    "InferenceError",
    "InvalidImage",
    "InvalidInput",
    "LocateResult",
    "ModelInfo",
    "ModelNotAvailable",
    "Overloaded",
    "PathNotAllowed",
    "PayloadTooLarge",
    "RequestTimeout",
    "ScoreResult",
    "SearchHit",
    "SearchResult",
    "ServiceClosed",
    "ServiceStats",
    "TextScore",
    "Timing",
    "UrlNotAllowed",
    "__version__",
]


if not TYPE_CHECKING:  # type checkers see the imports above, so a misspelt name is still an error there
    __getattr__, __dir__ = lazy_attributes(__name__, _HOMES, globals(), __all__)
