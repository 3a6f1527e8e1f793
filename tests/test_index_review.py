"""ImageIndex as a user meets it: checkpoints named by relative paths, model changes, odd arguments."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from blip_tools import Blip2Service, BlipSettings
from blip_tools.index import ImageIndex


def _embeds(service: Blip2Service) -> int:
    task = service.stats().per_task.get("embed_image")
    return task.requests if task else 0


def test_a_checkpoint_folder_is_one_model_however_it_is_named(
    tmp_path: Path,
    tiny_checkpoint: Path,
    settings: BlipSettings,
    service: Blip2Service,
    image_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same folder named relatively (from its parent) and absolutely is one model: nothing is re-embedded or
    re-captioned, nothing is stale. The same relative name from another working directory, where it means another
    folder, is another model: its vectors are not mixed with the first folder's."""
    db = tmp_path / "index.sqlite"
    monkeypatch.chdir(tiny_checkpoint.parent)
    relative = settings.model_copy(
        update={"model": f"{tiny_checkpoint.name}/captioner", "retrieval_model": f"{tiny_checkpoint.name}/retrieval"}
    )
    with Blip2Service(relative) as svc, ImageIndex(db, service=svc) as index:
        assert index.index(image_dir).embedded == 6

    before = _embeds(service)
    with ImageIndex(db, service=service) as index:  # the absolute paths of the same folders
        assert index.stats().stale == 0
        report = index.index(image_dir)
        assert (report.embedded, report.captioned, report.unchanged) == (0, 0, 6)
        assert len(index.search("a dog", top_k=10).hits) == 6
    assert _embeds(service) == before

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_checkpoint, elsewhere / tiny_checkpoint.name)
    monkeypatch.chdir(elsewhere)
    with Blip2Service(relative) as svc, ImageIndex(db, service=svc) as index:
        assert index.stats().stale == 6
        assert index.search("a dog", top_k=10).hits == []
        assert index.retrieval_model == str((elsewhere / tiny_checkpoint.name / "retrieval").resolve())
