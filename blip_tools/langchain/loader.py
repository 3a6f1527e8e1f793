"""`Blip2ImageLoader`: images (files or folders) → LangChain `Document`s whose text is the caption.

Captions (and optional answers to fixed questions) are computed in batches through the shared service,
so loading a folder is as fast as the batcher allows; `lazy_load` yields documents chunk by chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document

from ..errors import BlipError, InferenceError, InvalidImage, InvalidInput
from ..params import GenerationParams
from ..results import AnswerResult, CaptionResult
from ..service import Blip2Service

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""File name endings a folder scan picks up (case-insensitive); explicit file paths are always taken."""


class Blip2ImageLoader(BaseLoader):
    """Load images as `Document`s: the caption is the page content, facts about the image the metadata.

    Metadata: `source` (the path), `width`, `height`, `sha256` (of the decoded pixels), `confidence`
    (the caption's geometric-mean token probability), and `answers` ({question: answer}) when `questions`
    are given.

    Args:
        paths: An image file, a folder, or a list of either. Folders are scanned with `glob`.
        glob: Pattern for files inside folders (default every file; only image suffixes are kept).
        recursive: Scan folders recursively.
        questions: Questions to answer about every image; answers go in `metadata["answers"]`. A single
            string is one question (not a sequence of characters); each must be a non-empty string.
        prompt: Optional caption prefix to continue (prompted captioning).
        params: Decoding parameters for captions and answers.
        batch_size: Images per chunk handed to the service (and yielded together by `lazy_load`).
        on_error: "raise" stops at the first unreadable image; "skip" logs a warning and goes on. Only errors of
            one image are skipped (`InvalidImage` and its leaves: missing, unreadable, too large, not allowed; and an
            `InferenceError` the model raised on that image alone, after its batch was split); errors of the
            call itself (`ModelNotAvailable`, `InvalidInput` about the prompt or parameters, `Overloaded`,
            `ServiceClosed`, ...) always raise, since every other image would fail the same way.
        service: The service to call; None means `Blip2Service.shared()`.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        *,
        glob: str = "*",
        recursive: bool = False,
        questions: str | Sequence[str] = (),
        prompt: str | None = None,
        params: GenerationParams | None = None,
        batch_size: int = 16,
        on_error: Literal["raise", "skip"] = "raise",
        service: Blip2Service | None = None,
    ) -> None:
        if batch_size < 1:
            raise InvalidInput(f"batch_size must be >= 1, got {batch_size}")
        if on_error not in ("raise", "skip"):
            raise InvalidInput(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.paths = [paths] if isinstance(paths, str | Path) else list(paths)
        self.glob = glob
        self.recursive = recursive
        self.questions = _check_questions(questions)
        self.prompt = prompt
        self.params = params
        self.batch_size = batch_size
        self.on_error = on_error
        self.service = service

    def _service(self) -> Blip2Service:
        return self.service if self.service is not None else Blip2Service.shared()

    def image_paths(self) -> list[Path]:
        """The files this loader will read, in order: given files as given, folder contents sorted.

        A given path that does not exist raises `InvalidInput`, except, with `on_error="skip"`, one named like an
        image file: it stays in the list and is skipped when it cannot be read.
        """
        found: list[Path] = []
        for entry in self.paths:
            path = Path(entry).expanduser()
            if path.is_dir():
                matches = path.rglob(self.glob) if self.recursive else path.glob(self.glob)
                found.extend(sorted(p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
            elif path.exists():
                found.append(path)
            elif self.on_error == "skip" and path.suffix.lower() in IMAGE_SUFFIXES:
                # A listed image file that is gone (deleted since it was listed) is one image's error: keep it, so
                # reading it fails alone (`InvalidImage`, "not found") and is skipped with a warning like an
                # unreadable one. A missing folder, or anything else, is the caller's mistake and raises.
                found.append(path)
            else:
                raise InvalidInput(f"Image path not found: {path}. Pass existing image files or folders.")
        return found

    def lazy_load(self) -> Iterator[Document]:
        """Yield one `Document` per image, captioning `batch_size` images per service call."""
        paths = self.image_paths()
        service = self._service()
        for start in range(0, len(paths), self.batch_size):
            chunk = paths[start : start + self.batch_size]
            captions = service.caption_batch(chunk, self.prompt, params=self.params, return_exceptions=True)
            answers = self._answers(service, chunk, captions)
            for i, (path, caption) in enumerate(zip(chunk, captions, strict=True)):
                if isinstance(caption, BlipError):
                    self._fail(path, caption)
                    continue
                doc = self._document(path, caption, answers[i])
                if doc is not None:
                    yield doc

    def _answers(
        self, service: Blip2Service, chunk: list[Path], captions: list[CaptionResult | BlipError]
    ) -> list[list[AnswerResult | BlipError]]:
        """Answers to every question for the readable images of a chunk, in one batched call."""
        if not self.questions:
            return [[] for _ in chunk]
        readable = [p for p, c in zip(chunk, captions, strict=True) if isinstance(c, CaptionResult)]
        pairs = [(p, q) for p in readable for q in self.questions]
        flat = service.answer_batch(
            [p for p, _ in pairs], [q for _, q in pairs], params=self.params, return_exceptions=True
        )
        per_image = iter([flat[i : i + len(self.questions)] for i in range(0, len(flat), len(self.questions))])
        return [next(per_image) if isinstance(c, CaptionResult) else [] for c in captions]

    def _document(self, path: Path, caption: CaptionResult, answers: list[AnswerResult | BlipError]) -> Document | None:
        metadata: dict[str, Any] = {
            "source": str(path),
            "width": caption.image.width,
            "height": caption.image.height,
            "sha256": caption.image.sha256,
            "confidence": caption.captions[0].confidence,
        }
        if self.questions:
            failed = next((a for a in answers if isinstance(a, BlipError)), None)
            if failed is not None:
                self._fail(path, failed)
                return None
            metadata["answers"] = {a.question: a.answer for a in answers if isinstance(a, AnswerResult)}
        return Document(page_content=caption.caption, metadata=metadata)

    def _fail(self, path: Path, exc: BlipError) -> None:
        if self.on_error == "raise" or not isinstance(exc, InvalidImage | InferenceError):
            raise exc
        logger.warning("skipping image %s: %s", path, exc)


def _check_questions(questions: str | Sequence[str]) -> list[str]:
    """The questions as a list; a single string is one question, and each must be a non-empty string."""
    found = [questions] if isinstance(questions, str) else list(questions)
    for question in found:
        if not isinstance(question, str) or not question.strip():
            raise InvalidInput(
                f"questions must be non-empty strings, e.g. ['What is the main object?'], got {question!r}"
            )
    return found
