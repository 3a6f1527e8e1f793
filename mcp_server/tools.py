"""The six core MCP tools: captions, batch captions, VQA, image-text scores and embeddings.

Each tool is a thin adapter: typed, bounded arguments in; one async service call; the typed result as
structured content plus a short text block for the model. `BlipError`s become `ToolError`s in `tool_errors()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from mcp.server.mcpserver import Context
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, Field

from blip_tools.errors import BlipError
from blip_tools.params import MINIMUM_ZERO
from blip_tools.results import AnswerResult, CaptionResult, EmbeddingResult, ScoreResult

from ._common import ImageArg, ImagesArg, captioner_service, get_service, read_only, report_error, tool_errors

if TYPE_CHECKING:
    from .server import BlipMCPServer


# Decoding arguments: bounds mirror `blip_tools.params.GenerationParams`; None keeps the service default.
MaxNewTokens = Annotated[
    int | None,
    Field(description="Most tokens to generate (default 30; at most 256 unless the server allows more).", ge=1, le=512),
]
MinNewTokens = Annotated[int | None, Field(description="Fewest tokens to generate (default 0).", ge=0, le=512)]
NumBeams = Annotated[int | None, Field(description="Beam-search width; 1 = greedy (default).", ge=1, le=16)]
DoSample = Annotated[bool | None, Field(description="Sample instead of greedy/beam search (default false).")]
Temperature = Annotated[
    Annotated[float, Field(gt=0, le=5.0), MINIMUM_ZERO] | None,
    Field(description="Sampling temperature, > 0 (with do_sample; default 1.0)."),
]
TopP = Annotated[
    Annotated[float, Field(gt=0, le=1.0), MINIMUM_ZERO] | None,
    Field(description="Nucleus sampling mass, > 0 (with do_sample; default 1.0)."),
]
NumReturnSequences = Annotated[
    int | None,
    Field(description="Texts to return per image (needs num_beams >= it, or do_sample).", ge=1, le=16),
]
RepetitionPenalty = Annotated[
    Annotated[float, Field(gt=0, le=10.0), MINIMUM_ZERO] | None,
    Field(description="Penalty for repeated tokens, > 0 (1.0 = none, the default)."),
]
Seed = Annotated[int | None, Field(description="Seed for reproducible sampling.", ge=0, le=2**32 - 1)]


class ImageCaption(BaseModel):
    """The outcome for one image of `caption_images`: its caption, or why it failed."""

    image: str = Field(description="The image reference as given (base64 shortened).")
    ok: bool
    result: CaptionResult | None = None
    error: str | None = Field(default=None, description="Why this image failed (the others are unaffected).")


class CaptionImagesResult(BaseModel):
    """Captions for several images, in the order given."""

    items: list[ImageCaption]
    succeeded: int
    failed: int


def _gen(**values: Any) -> dict[str, Any]:
    """Only the decoding arguments the caller set, so the service defaults apply to the rest."""
    return {k: v for k, v in values.items() if v is not None}


def _short_ref(ref: str, limit: int = 120) -> str:
    """An image reference short enough to echo back (never echo a whole base64 payload)."""
    return ref if len(ref) <= limit else f"{ref[:60]}...({len(ref)} chars)"


def _texts(label: str, texts: list[tuple[str, float]]) -> str:
    if len(texts) == 1:
        text, conf = texts[0]
        return f"{label}: {text}\nConfidence: {conf:.3f}"
    lines = [f"{i}. {text} (confidence {conf:.3f})" for i, (text, conf) in enumerate(texts, 1)]
    return f"{label}s:\n" + "\n".join(lines)


def _result(text: str, model: BaseModel) -> CallToolResult:
    """Structured content (the full typed result) plus a short text block for the model."""
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=model.model_dump(mode="json")
    )


async def caption_image(
    image: ImageArg,
    ctx: Context,
    prompt: Annotated[
        str | None,
        Field(description="Optional text the caption should continue, e.g. 'a photo of'.", max_length=500),
    ] = None,
    max_new_tokens: MaxNewTokens = None,
    min_new_tokens: MinNewTokens = None,
    num_beams: NumBeams = None,
    do_sample: DoSample = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    num_return_sequences: NumReturnSequences = None,
    repetition_penalty: RepetitionPenalty = None,
    seed: Seed = None,
) -> Annotated[CallToolResult, CaptionResult]:
    """Describe one image in a short caption (BLIP-2, run locally). Pass the image as an absolute file path."""
    gen = _gen(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        num_beams=num_beams,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        num_return_sequences=num_return_sequences,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    with tool_errors():
        result = await (await captioner_service(ctx)).acaption(image, prompt, **gen)
    return _result(_texts("Caption", [(c.text, c.confidence) for c in result.captions]), result)


async def caption_images(
    images: ImagesArg,
    ctx: Context,
    prompt: Annotated[
        str | None, Field(description="Optional text every caption should continue.", max_length=500)
    ] = None,
    max_new_tokens: MaxNewTokens = None,
    num_beams: NumBeams = None,
) -> Annotated[CallToolResult, CaptionImagesResult]:
    """Caption several images at once (batched on the model); reports progress per image.

    A bad image fails alone: its entry carries the error and the others are captioned.
    """
    total = len(images)

    async def progress(done: int, count: int) -> None:
        await ctx.report_progress(done, count, f"captioned {done}/{count} images")

    with tool_errors():
        service = await captioner_service(ctx)
        outcomes = await service.acaption_batch(
            images,
            prompt,
            return_exceptions=True,
            on_progress=progress,  # a coroutine callback: acaption_batch awaits it
            **_gen(max_new_tokens=max_new_tokens, num_beams=num_beams),
        )
    items: list[ImageCaption] = []
    lines: list[str] = []
    for i, (ref, outcome) in enumerate(zip(images, outcomes, strict=True), 1):
        short = _short_ref(ref)
        if isinstance(outcome, BlipError):
            message = report_error(outcome)  # counted like a whole call's error
            items.append(ImageCaption(image=short, ok=False, error=message))
            lines.append(f"{i}. {short}: ERROR {message}")
        else:
            items.append(ImageCaption(image=short, ok=True, result=outcome))
            lines.append(f"{i}. {short}: {outcome.caption}")
    failed = sum(1 for item in items if not item.ok)
    summary = CaptionImagesResult(items=items, succeeded=total - failed, failed=failed)
    header = f"Captioned {total - failed} of {total} images" + (f" ({failed} failed)" if failed else "") + ":"
    return _result("\n".join([header, *lines]), summary)


async def answer_question(
    image: ImageArg,
    question: Annotated[
        str,
        Field(description="A question about the image, e.g. 'What color is the car?'", min_length=1, max_length=500),
    ],
    ctx: Context,
    max_new_tokens: MaxNewTokens = None,
    num_beams: NumBeams = None,
    do_sample: DoSample = None,
    temperature: Temperature = None,
    num_return_sequences: NumReturnSequences = None,
    seed: Seed = None,
) -> Annotated[CallToolResult, AnswerResult]:
    """Answer a question about one image (visual question answering; short answers work best)."""
    gen = _gen(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=do_sample,
        temperature=temperature,
        num_return_sequences=num_return_sequences,
        seed=seed,
    )
    with tool_errors():
        result = await (await captioner_service(ctx)).aanswer(image, question, **gen)
    return _result(_texts("Answer", [(a.text, a.confidence) for a in result.answers]), result)


async def score_image_text(
    image: ImageArg,
    texts: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=500)]],
        Field(description="Candidate descriptions to rank against the image.", min_length=1, max_length=64),
    ],
    ctx: Context,
) -> Annotated[CallToolResult, ScoreResult]:
    """Score how well each text matches the image (ITM probability and ITC similarity); names the best match."""
    with tool_errors():
        result = await get_service(ctx).ascore(image, texts)
    lines = [f"- {s.text}: match probability {s.itm_probability:.3f}, similarity {s.itc:.3f}" for s in result.scores]
    return _result("\n".join([f"Best match: {result.best}", *lines]), result)


async def embed_image(
    image: ImageArg,
    ctx: Context,
    include_query_vectors: Annotated[
        bool, Field(description="Also return one vector per Q-Former query token (large; default false).")
    ] = False,
) -> Annotated[CallToolResult, EmbeddingResult]:
    """Embed an image in the image-text space shared with `embed_text` (L2-normalised vector)."""
    with tool_errors():
        results = await get_service(ctx).aembed_images([image], include_query_vectors=include_query_vectors)
    result = results[0]
    if isinstance(result, BlipError):  # only with return_exceptions; kept for the type checker
        raise ValueError("unexpected error result")
    return _result(f"Image embedding: {result.dim}-d vector (in the structured content).", result)


async def embed_text(
    text: Annotated[str, Field(description="The text to embed.", min_length=1, max_length=2000)],
    ctx: Context,
) -> Annotated[CallToolResult, EmbeddingResult]:
    """Embed a text in the image-text space shared with `embed_image` (compare by dot product)."""
    with tool_errors():
        results = await get_service(ctx).aembed_texts([text])
    result = results[0]
    return _result(f"Text embedding: {result.dim}-d vector (in the structured content).", result)


def register(server: BlipMCPServer) -> None:
    """Add the six core tools to `server` (read-only; open-world only when URLs are allowed)."""
    urls = server.blip_settings.allow_urls
    server.add_tool(caption_image, annotations=read_only("Caption an image", open_world=urls))
    server.add_tool(caption_images, annotations=read_only("Caption several images", open_world=urls))
    server.add_tool(answer_question, annotations=read_only("Answer a question about an image", open_world=urls))
    server.add_tool(score_image_text, annotations=read_only("Score texts against an image", open_world=urls))
    server.add_tool(embed_image, annotations=read_only("Embed an image", open_world=urls))
    server.add_tool(embed_text, annotations=read_only("Embed a text"))
