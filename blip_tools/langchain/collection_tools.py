"""LangChain tools for image collections and grounding: `index_images`, `search_images`, `locate_in_image`.

They follow the core tools' contract (`Blip2BaseTool`): text for the model, the typed result as artifact,
`BlipError` → `ToolException`. `locate_in_image` also puts the heatmap overlay in the content as a standard
image block, so a multimodal chat model can see where the match is (`overlay=False` leaves it out).
"""

from __future__ import annotations

import asyncio
import base64
from typing import ClassVar

from langchain_core.messages.content import create_image_block
from pydantic import BaseModel, Field, field_validator, model_validator

from ..errors import InvalidInput
from ..grounding import LocateResult
from ..index import ImageIndex, folder_without_nul
from ..service import Blip2Service
from ._base import Blip2BaseTool, ToolOutput
from .tools import ImageArg, _Args

MAX_TOP_K = 50


class IndexImagesInput(_Args):
    """Arguments of `index_images`."""

    directory: str = Field(
        min_length=1, max_length=4096, description="Absolute path of the folder whose images to index."
    )
    recursive: bool = Field(default=True, description="Include images in subfolders (default true).")
    captions: bool = Field(
        default=True, description="Also caption each image so search results show what they are (slower)."
    )

    _check_directory = field_validator("directory")(folder_without_nul)


class SearchImagesInput(_Args):
    """Arguments of `search_images`."""

    query: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="What to look for, in words, e.g. 'a dog on a beach'. Give this or `image`.",
    )
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K, description=f"How many results (1 to {MAX_TOP_K}).")
    directory: str | None = Field(
        default=None, min_length=1, max_length=4096, description="Only search images under this folder."
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=30_000_000,
        description="Instead of `query`: an example image (path, file:// or data: URI, base64) to find similar ones.",
    )
    rerank: bool = Field(
        default=False, description="Re-score the top results with the image-text matching head (text queries)."
    )

    _check_directory = field_validator("directory")(folder_without_nul)


class LocateInImageInput(_Args):
    """Arguments of `locate_in_image`."""

    image: ImageArg
    text: str = Field(
        min_length=1, max_length=1000, description="What to find in the image, e.g. 'the red car' or 'a dog'."
    )


class _IndexTool(Blip2BaseTool):
    """A tool that works on the image index (default: the one at `BLIP_INDEX_PATH` for the tool's service)."""

    index: ImageIndex | None = Field(default=None, exclude=True)
    """The index to use; None means `ImageIndex.for_service(service)`."""

    _model_owners: ClassVar[tuple[str, ...]] = ("service", "index")  # an index holds a service and a database

    def _index(self, service: Blip2Service) -> ImageIndex:
        return self.index if self.index is not None else ImageIndex.for_service(service)


class IndexImagesTool(_IndexTool):
    """`index_images`: add a folder's images to the searchable index (incremental)."""

    name: str = "index_images"
    description: str = (
        "Index a folder of images so search_images can find them by description. Incremental: only new or changed "
        "images are processed, deleted ones are dropped, so it is cheap to call again. Pass an absolute folder path."
    )
    args_schema: type[BaseModel] = IndexImagesInput

    def _call_service(self, service: Blip2Service, args: IndexImagesInput) -> ToolOutput:
        report = self._index(service).index(args.directory, recursive=args.recursive, captions=args.captions)
        return report.summary(), report

    async def _acall_service(self, service: Blip2Service, args: IndexImagesInput) -> ToolOutput:
        index = await asyncio.to_thread(self._index, service)  # opening it may touch the disk or ask a daemon
        report = await index.aindex(args.directory, recursive=args.recursive, captions=args.captions)
        return report.summary(), report


class SearchImagesTool(_IndexTool):
    """`search_images`: find indexed images by a description or by an example image."""

    name: str = "search_images"
    description: str = (
        "Find images in folders indexed with index_images that match a description (query), or that look like an "
        "example image (image). Returns file paths ranked best first with a score and a caption; use "
        "caption_image or answer_question on a path to look closer."
    )
    args_schema: type[BaseModel] = SearchImagesInput

    @staticmethod
    def _check(args: SearchImagesInput) -> None:
        if (args.query is None) == (args.image is None):
            raise InvalidInput("search_images needs exactly one of `query` (text) or `image` (an example image).")

    def _call_service(self, service: Blip2Service, args: SearchImagesInput) -> ToolOutput:
        self._check(args)
        result = self._index(service).search(
            args.query, image=args.image, top_k=args.top_k, directory=args.directory, rerank=args.rerank
        )
        return result.summary(), result

    async def _acall_service(self, service: Blip2Service, args: SearchImagesInput) -> ToolOutput:
        self._check(args)
        index = await asyncio.to_thread(self._index, service)  # opening it may touch the disk or ask a daemon
        result = await index.asearch(
            args.query, image=args.image, top_k=args.top_k, directory=args.directory, rerank=args.rerank
        )
        return result.summary(), result


class LocateInImageTool(Blip2BaseTool):
    """`locate_in_image`: where in an image a description matches (Grad-CAM heatmap and box)."""

    name: str = "locate_in_image"
    description: str = ""  # set from `overlay` (below), so the model is told what it will get
    args_schema: type[BaseModel] = LocateInImageInput
    overlay: bool = True
    """Send the heatmap overlay to the model as an image block next to the text. Turn it off for chat models or
    endpoints that take only text in tool results (OpenAI-compatible Chat Completions endpoints refuse images
    there); the artifact still draws it (`LocateResult.overlay_png()`)."""

    @model_validator(mode="after")
    def _describe(self) -> LocateInImageTool:
        if not self.description:
            image = ", and a heatmap overlay image" if self.overlay else ""
            self.description = (
                "Find where in an image something is: returns the pixel box [x0, y0, x1, y1] around the region that "
                f"best matches the text and the match probability{image}. `image` is an absolute file path, "
                "file:// URI, data: URI or base64."
            )
        return self

    def _output(self, result: LocateResult) -> ToolOutput:
        if not self.overlay:
            return result.summary(), result
        png = base64.b64encode(result.overlay_png(max_side=512)).decode("ascii")
        block = create_image_block(base64=png, mime_type="image/png")
        return [{"type": "text", "text": result.summary()}, dict(block)], result

    def _call_service(self, service: Blip2Service, args: LocateInImageInput) -> ToolOutput:
        return self._output(service.locate(args.image, args.text))

    async def _acall_service(self, service: Blip2Service, args: LocateInImageInput) -> ToolOutput:
        result = await service.alocate(args.image, args.text)
        if not self.overlay:
            return self._output(result)
        # Off the loop: drawing the overlay decodes the image (through a daemon, read or fetched again here).
        return await asyncio.to_thread(self._output, result)


COLLECTION_TOOLS: tuple[type[Blip2BaseTool], ...] = (IndexImagesTool, SearchImagesTool, LocateInImageTool)
"""The collection tool classes, in the order the toolkit lists them."""

__all__ = [
    "COLLECTION_TOOLS",
    "IndexImagesInput",
    "IndexImagesTool",
    "LocateInImageInput",
    "LocateInImageTool",
    "SearchImagesInput",
    "SearchImagesTool",
]
