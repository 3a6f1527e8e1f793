"""`Blip2Embeddings`: BLIP-2's aligned image/text embeddings as a LangChain `Embeddings`.

Texts and images land in one space, so a text query finds images. `embed_documents`/`embed_query` embed
text; `embed_image(uris)` embeds images (the method image-aware vector stores such as Chroma's `add_images`
call). With `image_documents=True`, `embed_documents` reads each document's text as an image reference,
so any vector store that only calls `embed_documents` (InMemoryVectorStore, FAISS, ...) can index images.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from langchain_core.embeddings import Embeddings
from pydantic import ConfigDict, Field, model_validator

from ..errors import BlipError, InvalidInput
from ..results import EmbeddingResult
from ..service import Blip2Service
from ..settings import BlipSettings
from ._base import KeepsService

logger = logging.getLogger(__name__)


def _vectors(results: Sequence[EmbeddingResult | BlipError]) -> list[list[float]]:
    out = []
    for r in results:
        if isinstance(r, BlipError):  # pragma: no cover - the service raises without return_exceptions
            raise r
        out.append(r.vector)
    return out


class Blip2Embeddings(KeepsService, Embeddings):
    """LangChain embeddings over `Blip2Service`: L2-normalised vectors in BLIP-2's shared image/text space.

    Args:
        service: The service to call; None means `Blip2Service.shared()` (or a private service when
            `settings` is given).
        settings: Settings for a private service, when no `service` is given.
        image_documents: Treat the texts passed to `embed_documents` as image references (paths, file://
            URIs, data: URIs, base64), for text→image search with any vector store.
        chunk_size: Most items sent to the service per call, to bound its queue.

    Copies share the service; embeddings on the process-wide service pickle (loaded again, they use that
    process's shared service), ones on a private service do not.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    service: Blip2Service | None = Field(default=None, exclude=True)
    """The service to call; None means `Blip2Service.shared()` at call time."""
    settings: BlipSettings | None = Field(default=None, exclude=True)
    """Settings for a private service, built at construction when no `service` is given."""
    image_documents: bool = False
    """When true, `embed_documents` embeds the image each text refers to instead of the text."""
    chunk_size: int = Field(default=64, ge=1, le=4096)
    """Most texts or images sent to the service at once."""

    @model_validator(mode="after")
    def _private_service(self) -> Blip2Embeddings:
        if self.service is None and self.settings is not None:
            self.service = Blip2Service(self.settings)
        return self

    def _service(self) -> Blip2Service:
        return self.service if self.service is not None else Blip2Service.shared()

    def _chunks(self, items: Sequence[str], what: str) -> list[list[str]]:
        # A lone string is a sequence too: sliced into chunks it would embed one vector per character.
        if isinstance(items, str | bytes | bytearray) or not isinstance(items, Iterable):
            one = "embed_query embeds one text" if what == "texts" else "pass [uri] for one image"
            raise InvalidInput(f"{what} must be a list of strings, got {type(items).__name__} ({one})")
        items = list(items)
        return [items[i : i + self.chunk_size] for i in range(0, len(items), self.chunk_size)]

    # ---------------------------------------------------------------- text side
    def embed_texts(self, texts: list[str]) -> list[list[float]]:
        """Embed texts (always the text side, whatever `image_documents` says)."""
        service = self._service()
        return [v for chunk in self._chunks(texts, "texts") for v in _vectors(service.embed_texts(chunk))]

    async def aembed_texts(self, texts: list[str]) -> list[list[float]]:
        """Async `embed_texts`."""
        service = self._service()
        return [v for chunk in self._chunks(texts, "texts") for v in _vectors(await service.aembed_texts(chunk))]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents: their text, or with `image_documents=True` the images they name."""
        return self.embed_image(texts) if self.image_documents else self.embed_texts(texts)

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """Async `embed_documents`."""
        return await self.aembed_image(texts) if self.image_documents else await self.aembed_texts(texts)

    def embed_query(self, text: str) -> list[float]:
        """Embed a search text; its vector is comparable with image vectors (cosine)."""
        return self.embed_texts([text])[0]

    async def aembed_query(self, text: str) -> list[float]:
        """Async `embed_query`."""
        return (await self.aembed_texts([text]))[0]

    # ---------------------------------------------------------------- image side
    def embed_image(self, uris: list[str]) -> list[list[float]]:
        """Embed images given as paths, file:// URIs, data: URIs or base64 (the image-store convention)."""
        service = self._service()
        return [v for chunk in self._chunks(uris, "uris") for v in _vectors(service.embed_images(chunk))]

    async def aembed_image(self, uris: list[str]) -> list[list[float]]:
        """Async `embed_image`."""
        service = self._service()
        return [v for chunk in self._chunks(uris, "uris") for v in _vectors(await service.aembed_images(chunk))]

    def __repr_args__(self) -> Any:
        # The service holds a model; keep reprs short.
        return [(k, v) for k, v in super().__repr_args__() if k not in ("service", "settings")]
