"""MCP tools for image collections and grounding: `index_images`, `search_images`, `locate_in_image`.

`index_images` reports progress per image and can be cancelled (the run stops after its current chunk, which
is saved; calling it again resumes). `locate_in_image` returns the heatmap overlay as an image block with a text
summary. The image index is the one at `BLIP_INDEX_PATH` for the server's service, opened on first use.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Annotated

from mcp.server.mcpserver import Context
from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import AfterValidator, Field

from blip_tools.errors import InvalidInput
from blip_tools.grounding import LocateResult
from blip_tools.index import ImageIndex, IndexReport, SearchResult, folder_without_nul

from ._common import ImageArg, app_context, get_service, read_only, tool_errors

if TYPE_CHECKING:
    from .server import BlipMCPServer

_EXTRAS_KEY = "collections"


Directory = Annotated[
    str,
    Field(description="Absolute path of a folder of images on this machine.", min_length=1, max_length=4096),
    AfterValidator(folder_without_nul),
]


def _index(ctx: Context) -> ImageIndex:
    """The server's image index (kept in the lifespan context's extras)."""
    app = app_context(ctx)
    index = app.extras.get(_EXTRAS_KEY)
    if not isinstance(index, ImageIndex):
        with tool_errors():
            index = ImageIndex.for_service(app.service)
        app.extras[_EXTRAS_KEY] = index
    return index


async def index_images(
    directory: Directory,
    ctx: Context,
    recursive: Annotated[bool, Field(description="Include subfolders (default true).")] = True,
    captions: Annotated[
        bool, Field(description="Also caption each image so search results say what they show (slower; default true).")
    ] = True,
) -> Annotated[CallToolResult, IndexReport]:
    """Index a folder's images so search_images can find them. Incremental and resumable: only new or changed
    images are processed and deleted ones dropped, so calling it again is cheap. Reports progress per image."""
    index = _index(ctx)

    async def progress(done: int, total: int) -> None:
        await ctx.report_progress(done, total, f"indexed {done}/{total} images")

    with tool_errors():
        report = await index.aindex(directory, recursive=recursive, captions=captions, on_progress=progress)
    return CallToolResult(
        content=[TextContent(type="text", text=report.summary())], structured_content=report.model_dump(mode="json")
    )


async def search_images(
    ctx: Context,
    query: Annotated[
        str | None,
        Field(description="What to look for in words, e.g. 'a dog on a beach'. Give this or `image`.", max_length=1000),
    ] = None,
    top_k: Annotated[int, Field(description="How many results (1 to 50, default 5).", ge=1, le=50)] = 5,
    directory: Annotated[
        # The bounds sit on the inner str: on the outer Optional, next to a validator, pydantic would check them
        # apart from the string (losing its refusal of lone surrogates). Same published schema.
        Annotated[str, Field(max_length=4096), AfterValidator(folder_without_nul)] | None,
        Field(description="Only search images under this folder."),
    ] = None,
    image: Annotated[
        str | None,
        Field(description="Instead of `query`: an example image (absolute path preferred) to find similar ones."),
    ] = None,
    rerank: Annotated[
        bool,
        Field(description="Re-score the top results with the image-text matching head (text queries; default false)."),
    ] = False,
) -> Annotated[CallToolResult, SearchResult]:
    """Find images in folders indexed with index_images that match a description, or that look like an example
    image. Returns absolute paths, best first, with scores and captions."""
    index = _index(ctx)
    with tool_errors():
        if (query is None) == (image is None):
            raise InvalidInput("search_images needs exactly one of `query` (text) or `image` (an example image).")
        result = await index.asearch(query, image=image, top_k=top_k, directory=directory, rerank=rerank)
    return CallToolResult(
        content=[TextContent(type="text", text=result.summary())], structured_content=result.model_dump(mode="json")
    )


async def locate_in_image(
    image: ImageArg,
    text: Annotated[
        str, Field(description="What to find in the image, e.g. 'the red car'.", min_length=1, max_length=1000)
    ],
    ctx: Context,
) -> Annotated[CallToolResult, LocateResult]:
    """Find where in an image something is: the pixel box [x0, y0, x1, y1] of the region that best matches the
    text, the match probability, and a heatmap overlay image (ITM Grad-CAM)."""
    with tool_errors():
        result = await get_service(ctx).alocate(image, text)
    png = base64.b64encode(result.overlay_png(max_side=512)).decode("ascii")
    return CallToolResult(
        content=[
            TextContent(type="text", text=result.summary()),
            ImageContent(type="image", data=png, mime_type="image/png"),
        ],
        structured_content=result.model_dump(mode="json"),
    )


def register(server: BlipMCPServer) -> None:
    """Add `index_images`, `search_images` and `locate_in_image` to `server`."""
    urls = server.blip_settings.allow_urls
    # Not read-only: it writes the index database (never the images). Re-running it is harmless (idempotent).
    writes_index = ToolAnnotations(
        title="Index a folder of images",
        read_only_hint=False,
        destructive_hint=False,
        idempotent_hint=True,
        open_world_hint=False,
    )
    server.add_tool(index_images, annotations=writes_index)
    server.add_tool(search_images, annotations=read_only("Search indexed images", open_world=urls, idempotent=True))
    server.add_tool(locate_in_image, annotations=read_only("Locate a text in an image", open_world=urls))
