"""`blip-tools` CLI: arguments in, clean output and exit codes out, never a traceback.

Commands run in this process through `blip_tools.cli.main` on the tiny checkpoint (set through `BLIP_*`
variables, as a user would); the process-wide shared service the CLI installs is restored after each test.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blip_tools import Blip2Service
from blip_tools.cli import main


@pytest.fixture
def tiny_env(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`BLIP_*` variables pointing at the tiny checkpoint; the shared service is put back afterwards."""
    from blip_tools.testing import tiny_settings_kwargs

    for name in ("BLIP_REMOTE_URL", "BLIP_ALLOWED_DIRS", "BLIP_MAX_BATCH_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in tiny_settings_kwargs(tiny_checkpoint).items():
        monkeypatch.setenv(f"BLIP_{name.upper()}", value)
    previous = Blip2Service._shared
    yield
    Blip2Service.set_shared(previous)


@pytest.fixture
def one_image(tmp_path: Path, make_image: Callable[..., Any]) -> Path:
    path = tmp_path / "one.png"
    make_image(11).save(path)
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_caption_takes_a_data_uri(tiny_env: None, one_image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A data URI longer than a file name may be is an image, not a folder to look up."""
    uri = "data:image/png;base64," + base64.b64encode(one_image.read_bytes()).decode("ascii")
    assert len(uri) > 300
    code, out, _ = _run(capsys, "caption", uri, "--max-new-tokens", "3", "--json")
    assert code == 0
    assert json.loads(out)["image"]["source"].startswith("data URI")
