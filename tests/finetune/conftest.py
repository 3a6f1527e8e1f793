"""Fixtures for the fine-tuning tests: a tiny base whose OPT reads its image tokens, and captioned images."""

from __future__ import annotations

from pathlib import Path

import pytest
from _finetune_testlib import CAPTIONS, pretrain_copy_lm, write_caption_data


@pytest.fixture(scope="session")
def steerable_base(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny captioner with its OPT pre-trained to read its image tokens (a stand-in for a pretrained LLM)."""
    words = tuple(sorted({w for c in CAPTIONS for w in c.split()}))
    dst = tmp_path_factory.mktemp("ft") / "base"
    info = pretrain_copy_lm(tiny_checkpoint / "captioner", dst, words=words)
    assert info["loss"] < 0.05, f"the tiny OPT did not learn to copy its image slots: {info}"
    return dst


@pytest.fixture(scope="session")
def caption_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with six distinct PNG images and a captions.jsonl pairing each with one of `CAPTIONS`."""
    return write_caption_data(tmp_path_factory.mktemp("ftdata"))
