"""blip-tools: BLIP-2 image captioning, VQA and image search for LLM agents, with one shared, batched model.

The public surface is `__all__`; heavy libraries (torch, transformers) load on first use, not on import.
"""

from __future__ import annotations

from .errors import (
    BlipError,
    CapabilityUnavailable,
    ImageTooLarge,
    IndexBusy,
    IndexDamaged,
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
