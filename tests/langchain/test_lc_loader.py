"""`Blip2ImageLoader`: folders and files → caption Documents with metadata, batched, errors raised or skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from blip_tools.errors import InvalidImage, InvalidInput
from blip_tools.langchain import Blip2ImageLoader


def test_folder_loads_as_caption_documents_in_batches(service: Any, image_dir: Path) -> None:
    nested = image_dir / "sub"
    nested.mkdir()
    (image_dir / "img0.png").rename(nested / "img0.png")
    (image_dir / "notes.txt").write_text("not an image")
    questions = ["What is this?", "Is it outdoors?"]

    loader = Blip2ImageLoader(image_dir, recursive=True, questions=questions, batch_size=4, service=service)
    paths = loader.image_paths()
    assert [p.name for p in paths] == ["img1.png", "img2.png", "img3.png", "img4.png", "img5.png", "img0.png"]
    assert len(Blip2ImageLoader(image_dir, service=service).image_paths()) == 5  # not recursive

    docs = list(loader.lazy_load())
    assert [d.metadata["source"] for d in docs] == [str(p) for p in paths]
    for doc, path in zip(docs, paths, strict=True):
        expected = service.caption(path)
        assert doc.page_content == expected.caption
        assert doc.metadata["width"] == 48 and doc.metadata["height"] == 40
        assert doc.metadata["sha256"] == expected.image.sha256
        assert doc.metadata["confidence"] == pytest.approx(expected.captions[0].confidence, abs=1e-6)
        assert doc.metadata["answers"] == {q: service.answer(path, q).answer for q in questions}


def test_files_glob_and_bad_images(service: Any, image_dir: Path) -> None:
    bad = image_dir / "broken.png"
    bad.write_bytes(b"\x89PNG truncated")
    files = [image_dir / "img2.png", bad, image_dir / "img4.png"]

    with pytest.raises(InvalidImage):
        Blip2ImageLoader(files, service=service).load()
    docs = Blip2ImageLoader(files, on_error="skip", service=service).load()
    assert [Path(d.metadata["source"]).name for d in docs] == ["img2.png", "img4.png"]
    assert "answers" not in docs[0].metadata

    only = Blip2ImageLoader(image_dir, glob="img[13].png", service=service).load()
    assert [Path(d.metadata["source"]).name for d in only] == ["img1.png", "img3.png"]

    with pytest.raises(InvalidInput, match="not found"):
        Blip2ImageLoader(image_dir / "missing", service=service).load()


def test_skip_skips_only_image_errors(service: Any, image_dir: Path, tmp_path: Path) -> None:
    """A call that fails for every image (no model, bad parameters, a closed service) raises even with "skip"."""
    from blip_tools import Blip2Service, BlipSettings
    from blip_tools.errors import ModelNotAvailable, ServiceClosed
    from blip_tools.params import GenerationParams

    files = [image_dir / "img0.png", image_dir / "junk.png", image_dir / "img1.png"]
    (image_dir / "junk.png").write_bytes(b"not a png")
    assert len(Blip2ImageLoader(files, on_error="skip", service=service).load()) == 2  # the image error is skipped

    no_model = BlipSettings(**{**service.settings.model_dump(), "model": str(tmp_path / "no-such-model")})
    with Blip2Service(no_model) as broken, pytest.raises(ModelNotAvailable):
        Blip2ImageLoader(files, on_error="skip", service=broken).load()

    too_long = GenerationParams(max_new_tokens=service.settings.max_new_tokens_limit + 1)
    with pytest.raises(InvalidInput, match="max_new_tokens"):
        Blip2ImageLoader(files, on_error="skip", params=too_long, service=service).load()

    closed = Blip2Service(service.settings)
    closed.close()
    with pytest.raises(ServiceClosed):
        Blip2ImageLoader(files, on_error="skip", service=closed).load()


def test_questions_are_checked_and_a_string_is_one_question(service: Any, image_dir: Path) -> None:
    for bad in ([""], ["What?", "  "], [None]):
        with pytest.raises(InvalidInput, match="questions must be non-empty strings"):
            Blip2ImageLoader(image_dir, questions=bad, on_error="skip", service=service)  # type: ignore[arg-type]
    (doc,) = Blip2ImageLoader(image_dir / "img0.png", questions="What is it?", service=service).load()
    assert list(doc.metadata["answers"]) == ["What is it?"]


def test_skip_also_skips_an_image_the_model_fails_on(settings: Any, image_dir: Path, make_image: Any) -> None:
    """The guilty image of a failed batch fails alone (InferenceError) and is skipped like an unreadable one."""
    from blip_tools import Blip2Service
    from blip_tools.errors import InferenceError
    from blip_tools.runtime import Blip2Runtime

    class PoisonedRuntime(Blip2Runtime):
        def generate(self, items: Any, params: Any) -> Any:
            if any(item.image.image.width == 99 for item in items):
                raise ValueError("simulated failure on one image")
            return super().generate(items, params)

    make_image(7, size=(99, 40)).save(image_dir / "poison.png")
    files = [image_dir / "img0.png", image_dir / "poison.png", image_dir / "img1.png"]
    with Blip2Service(settings, runtime=PoisonedRuntime(settings)) as svc:
        with pytest.raises(InferenceError):
            Blip2ImageLoader(files, service=svc).load()
        docs = Blip2ImageLoader(files, on_error="skip", batch_size=3, service=svc).load()
    assert [Path(d.metadata["source"]).name for d in docs] == ["img0.png", "img1.png"]


def test_skip_skips_a_listed_image_file_that_is_gone(service: Any, image_dir: Path, caplog: Any) -> None:
    """A file in a list of images that no longer exists is one image's error: "skip" skips it, "raise" raises.

    A missing folder (or a path not named like an image) is still the caller's mistake and raises either way.
    """
    gone = image_dir / "deleted.png"
    files = [image_dir / "img0.png", gone, image_dir / "img1.png"]

    with caplog.at_level("WARNING", logger="blip_tools.langchain.loader"):
        docs = Blip2ImageLoader(files, on_error="skip", batch_size=3, service=service).load()
    assert [Path(d.metadata["source"]).name for d in docs] == ["img0.png", "img1.png"]
    assert f"skipping image {gone}: " in caplog.text and "PosixPath" not in caplog.text

    with pytest.raises(InvalidInput, match="not found"):
        Blip2ImageLoader(files, service=service).load()
    for missing in (image_dir / "no-such-folder", image_dir / "notes.txt"):
        with pytest.raises(InvalidInput, match="not found"):
            Blip2ImageLoader([image_dir / "img0.png", missing], on_error="skip", service=service).load()
