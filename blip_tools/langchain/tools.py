"""The six core LangChain tools over `Blip2Service`: captions, questions, text-image scores and embeddings.

Each tool returns a short text for the model and the full typed result (`blip_tools.results`) as the
`ToolMessage` artifact; embeddings travel only in the artifact. No model code lives here.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import BlipError
from ..params import MINIMUM_ZERO, nulls_as_defaults
from ..results import AnswerResult, CaptionResult, EmbeddingResult, GeneratedText, ScoreResult
from ..service import Blip2Service
from ._base import Blip2BaseTool, ToolOutput

MAX_IMAGE_CHARS = 30_000_000
"""Longest accepted `image` string: room for a base64 image at the default 20 MB byte limit."""
MAX_IMAGES = 100
MAX_TEXTS = 64
MAX_TEXT_CHARS = 1000

IMAGE_DESCRIPTION = (
    "The image to look at: an absolute file path (preferred), a file:// URI, a data:image/...;base64 URI or raw "
    "base64. http(s) URLs work only when the server allows them."
)

ImageArg = Annotated[str, Field(min_length=1, max_length=MAX_IMAGE_CHARS, description=IMAGE_DESCRIPTION)]
ShortText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class _Args(BaseModel):
    """Common config of every argument schema: unknown arguments are errors, not silently ignored; an explicit
    null for an optional argument that does not take null means its default."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _nulls_as_defaults(cls, data: Any) -> Any:
        return nulls_as_defaults(cls.model_fields, data)


class _DecodingArgs(_Args):
    """The decoding controls a model may want; None keeps the service default (greedy, 30 tokens)."""

    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description="Longest text to generate, in tokens (default 30; at most 256 unless the service allows more).",
    )
    num_beams: int | None = Field(
        default=None, ge=1, le=16, description="Beam-search width; more beams can give better text (default 1)."
    )
    do_sample: bool | None = Field(
        default=None, description="Sample for varied text instead of the single most likely one (default false)."
    )
    temperature: Annotated[float, Field(gt=0, le=5.0), MINIMUM_ZERO] | None = Field(
        default=None, description="Sampling temperature, > 0, with do_sample (default 1.0)."
    )
    top_p: Annotated[float, Field(gt=0, le=1.0), MINIMUM_ZERO] | None = Field(
        default=None, description="Nucleus sampling mass, > 0, with do_sample."
    )
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="Seed that makes sampled text reproducible.")

    def generation_kwargs(self) -> dict[str, Any]:
        """The set fields as `Blip2Service` generation keyword arguments."""
        names = ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "seed")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class _CaptionImageCore(_Args):
    """The leading fields of `caption_image` (listed before the decoding controls in the schema)."""

    image: ImageArg
    prompt: str | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        description="Optional start of the caption for the model to continue, e.g. 'a photo of'.",
    )
    num_captions: int = Field(
        default=1,
        ge=1,
        le=8,
        description="How many different captions to return (uses that many beams unless do_sample is true).",
    )


class CaptionImageInput(_DecodingArgs, _CaptionImageCore):
    """Arguments of `caption_image`."""

    @model_validator(mode="after")
    def _check_num_captions(self) -> CaptionImageInput:
        # Said here in this tool's own terms: the service would name `num_return_sequences`, which the model
        # never saw. Beam search returns at most one caption per beam; only sampling (1 beam) returns more.
        n, beams = self.num_captions, self.num_beams
        if n > 1 and beams is not None and beams < n and (beams > 1 or not self.do_sample):
            raise ValueError(
                f"num_captions={n} needs num_beams >= {n} (or leave num_beams out), or do_sample=true with "
                f"num_beams=1; got num_beams={beams}"
            )
        return self

    def generation_kwargs(self) -> dict[str, Any]:
        gen = super().generation_kwargs()
        if self.num_captions > 1:
            gen["num_return_sequences"] = self.num_captions
            if not self.do_sample and self.num_beams is None:
                gen["num_beams"] = self.num_captions
        return gen


class _CaptionImagesCore(_Args):
    """The leading fields of `caption_images`."""

    images: list[ImageArg] = Field(
        min_length=1,
        max_length=MAX_IMAGES,
        description=f"The images to caption (1 to {MAX_IMAGES}), each given as for caption_image.",
    )
    prompt: str | None = Field(
        default=None, min_length=1, max_length=500, description="Optional start of every caption to continue."
    )


class CaptionImagesInput(_DecodingArgs, _CaptionImagesCore):
    """Arguments of `caption_images`."""


class _AnswerQuestionCore(_Args):
    """The leading fields of `answer_question`."""

    image: ImageArg
    question: str = Field(
        min_length=1, max_length=MAX_TEXT_CHARS, description="One short question about the image, in English."
    )


class AnswerQuestionInput(_DecodingArgs, _AnswerQuestionCore):
    """Arguments of `answer_question`."""


class ScoreImageTextInput(_Args):
    """Arguments of `score_image_text`."""

    image: ImageArg
    texts: list[ShortText] = Field(
        min_length=1,
        max_length=MAX_TEXTS,
        description=f"Candidate descriptions to compare with the image (1 to {MAX_TEXTS}).",
    )


class EmbedImageInput(_Args):
    """Arguments of `embed_image`."""

    image: ImageArg


class EmbedTextInput(_Args):
    """Arguments of `embed_text`."""

    texts: list[ShortText] = Field(
        min_length=1, max_length=MAX_TEXTS, description=f"The texts to embed (1 to {MAX_TEXTS})."
    )


class ImageError(BaseModel):
    """One image that failed inside a multi-image call: which one, and why."""

    image: str = Field(description="The image argument as given (shortened when long).")
    error: str = Field(description="The readable error message.")
    code: str = Field(description="The error's code, e.g. 'invalid_image' or 'path_not_allowed'.")

    @classmethod
    def from_error(cls, ref: str, exc: BlipError) -> ImageError:
        return cls(image=_short(ref), error=str(exc), code=exc.code)


def _short(ref: str) -> str:
    """An image argument fit to echo back: paths as they are, long base64 cut."""
    return ref if len(ref) <= 120 else ref[:60] + f"... ({len(ref)} chars)"


def _quote(text: GeneratedText) -> str:
    return f'"{text.text}" (confidence {text.confidence:.2f})'


def caption_text(result: CaptionResult) -> str:
    """The short text the model reads for a caption result."""
    where = f"{result.image.source} ({result.image.width}x{result.image.height})"
    if len(result.captions) == 1:
        return f"Caption of {where}: {_quote(result.captions[0])}"
    lines = [f"{i}. {_quote(t)}" for i, t in enumerate(result.captions, 1)]
    return f"Captions of {where}, best first:\n" + "\n".join(lines)


def answer_text(result: AnswerResult) -> str:
    """The short text the model reads for an answer result."""
    return f"Answer to {result.question!r} about {result.image.source}: {_quote(result.answers[0])}"


def score_text(result: ScoreResult) -> str:
    """Texts ranked by match probability, best first."""
    ranked = sorted(result.scores, key=lambda s: s.itm_probability, reverse=True)
    lines = [f"{s.itm_probability:.3f} match, {s.itc:+.3f} similarity: {s.text!r}" for s in ranked]
    return f"Best match for {result.image.source}: {result.best!r}\n" + "\n".join(lines)


class CaptionImageTool(Blip2BaseTool):
    """`caption_image`: describe one image in a sentence."""

    name: str = "caption_image"
    description: str = (
        "Describe what an image shows in one short sentence. Use it first to learn what is in an image you "
        "cannot see. `image` is an absolute file path, file:// URI, data: URI or base64. Set num_captions > 1 "
        "for alternative captions, or a prompt like 'a photo of' to steer the wording."
    )
    args_schema: type[BaseModel] = CaptionImageInput

    def _call_service(self, service: Blip2Service, args: CaptionImageInput) -> ToolOutput:
        result = service.caption(args.image, args.prompt, **args.generation_kwargs())
        return caption_text(result), result

    async def _acall_service(self, service: Blip2Service, args: CaptionImageInput) -> ToolOutput:
        result = await service.acaption(args.image, args.prompt, **args.generation_kwargs())
        return caption_text(result), result


class CaptionImagesTool(Blip2BaseTool):
    """`caption_images`: caption several images in one batched call; a bad image fails alone."""

    name: str = "caption_images"
    description: str = (
        "Caption several images at once (faster than one call per image). Returns one line per image in the "
        "given order; an image that cannot be read gets an error line and the others still get captions."
    )
    args_schema: type[BaseModel] = CaptionImagesInput

    @staticmethod
    def _output(images: list[str], results: list[CaptionResult | BlipError]) -> ToolOutput:
        lines = []
        for i, (ref, r) in enumerate(zip(images, results, strict=True), 1):
            if isinstance(r, CaptionResult):
                lines.append(f"{i}. {r.image.source}: {_quote(r.captions[0])}")
            else:
                lines.append(f"{i}. error for {_short(ref)}: {r}")
        errors = [r for r in results if isinstance(r, BlipError)]
        if len(errors) == len(results):
            # Nothing to show: fail the call, so the agent gets an error ToolMessage.
            raise errors[0] if len(errors) == 1 else BlipError("No image could be captioned:\n" + "\n".join(lines))
        artifact: list[CaptionResult | ImageError] = [
            r if isinstance(r, CaptionResult) else ImageError.from_error(ref, r)
            for ref, r in zip(images, results, strict=True)
        ]
        return "\n".join(lines), artifact

    def _call_service(self, service: Blip2Service, args: CaptionImagesInput) -> ToolOutput:
        results = service.caption_batch(args.images, args.prompt, return_exceptions=True, **args.generation_kwargs())
        return self._output(args.images, results)

    async def _acall_service(self, service: Blip2Service, args: CaptionImagesInput) -> ToolOutput:
        results = await service.acaption_batch(
            args.images, args.prompt, return_exceptions=True, **args.generation_kwargs()
        )
        return self._output(args.images, results)


class AnswerQuestionTool(Blip2BaseTool):
    """`answer_question`: visual question answering on one image."""

    name: str = "answer_question"
    description: str = (
        "Answer a short question about an image, e.g. 'What color is the car?' or 'How many people are there?'. "
        "Answers are short (a few words). Ask one question per call; call again for follow-ups. "
        "`image` is an absolute file path, file:// URI, data: URI or base64."
    )
    args_schema: type[BaseModel] = AnswerQuestionInput

    def _call_service(self, service: Blip2Service, args: AnswerQuestionInput) -> ToolOutput:
        result = service.answer(args.image, args.question, **args.generation_kwargs())
        return answer_text(result), result

    async def _acall_service(self, service: Blip2Service, args: AnswerQuestionInput) -> ToolOutput:
        result = await service.aanswer(args.image, args.question, **args.generation_kwargs())
        return answer_text(result), result


class ScoreImageTextTool(Blip2BaseTool):
    """`score_image_text`: how well each candidate text matches an image (ITM probability and ITC cosine)."""

    name: str = "score_image_text"
    description: str = (
        "Check which of several descriptions fits an image best, e.g. to verify a claim or pick a label. "
        "Returns the texts ranked by match probability (0 to 1) with a similarity score."
    )
    args_schema: type[BaseModel] = ScoreImageTextInput

    def _call_service(self, service: Blip2Service, args: ScoreImageTextInput) -> ToolOutput:
        result = service.score(args.image, args.texts)
        return score_text(result), result

    async def _acall_service(self, service: Blip2Service, args: ScoreImageTextInput) -> ToolOutput:
        result = await service.ascore(args.image, args.texts)
        return score_text(result), result


class EmbedImageTool(Blip2BaseTool):
    """`embed_image`: an image's vector in the shared image/text space (vector only in the artifact)."""

    name: str = "embed_image"
    description: str = (
        "Compute an image's embedding vector for similarity search by other code. The vector is attached to "
        "the result for the application, not shown to you; use caption_image to learn what the image shows."
    )
    args_schema: type[BaseModel] = EmbedImageInput

    @staticmethod
    def _output(results: list[EmbeddingResult | BlipError]) -> ToolOutput:
        result = results[0]
        if isinstance(result, BlipError):  # pragma: no cover - embed_images raises without return_exceptions
            raise result
        return f"Embedded {result.image.source if result.image else 'the image'}: {result.dim}-dim vector.", result

    def _call_service(self, service: Blip2Service, args: EmbedImageInput) -> ToolOutput:
        return self._output(service.embed_images([args.image]))

    async def _acall_service(self, service: Blip2Service, args: EmbedImageInput) -> ToolOutput:
        return self._output(await service.aembed_images([args.image]))


class EmbedTextTool(Blip2BaseTool):
    """`embed_text`: text vectors in the space shared with `embed_image` (vectors only in the artifact)."""

    name: str = "embed_text"
    description: str = (
        "Compute embedding vectors of texts, in the same space as embed_image, for similarity search by other "
        "code. The vectors are attached to the result for the application, not shown to you."
    )
    args_schema: type[BaseModel] = EmbedTextInput

    @staticmethod
    def _output(results: list[EmbeddingResult]) -> ToolOutput:
        return f"Embedded {len(results)} text(s): {results[0].dim}-dim vectors.", results

    def _call_service(self, service: Blip2Service, args: EmbedTextInput) -> ToolOutput:
        return self._output(service.embed_texts(args.texts))

    async def _acall_service(self, service: Blip2Service, args: EmbedTextInput) -> ToolOutput:
        return self._output(await service.aembed_texts(args.texts))


CORE_TOOLS: tuple[type[Blip2BaseTool], ...] = (
    CaptionImageTool,
    CaptionImagesTool,
    AnswerQuestionTool,
    ScoreImageTextTool,
    EmbedImageTool,
    EmbedTextTool,
)
"""The core tool classes, in the order `Blip2Toolkit.get_tools()` returns them."""

__all__ = [
    "CORE_TOOLS",
    "AnswerQuestionInput",
    "AnswerQuestionTool",
    "CaptionImageInput",
    "CaptionImageTool",
    "CaptionImagesInput",
    "CaptionImagesTool",
    "EmbedImageInput",
    "EmbedImageTool",
    "EmbedTextInput",
    "EmbedTextTool",
    "ImageError",
    "ScoreImageTextInput",
    "ScoreImageTextTool",
]
