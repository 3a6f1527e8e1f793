"""`gc_freeze`: after a model load the objects then alive leave the collector's reach, so full collections stop
stalling every request in flight; servers turn it on, a library user's process keeps it off.

Freezing changes the whole interpreter, so the loads run in child processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _testlib import ROOT, child_env

from blip_tools import BlipSettings


class _Stop(Exception):
    """Raised where the server would be built: the test only wants its settings."""


_CHILD = """
import gc, json, sys
from blip_tools import Blip2Service, BlipSettings
from blip_tools.testing import tiny_settings_kwargs
from PIL import Image

freezes = []
freeze = gc.freeze
gc.freeze = lambda: (freezes.append(1), freeze())[1]
kw = tiny_settings_kwargs(sys.argv[1])
out = {}
image = Image.new("RGB", (48, 40), (200, 30, 30))
with Blip2Service(BlipSettings(**kw)) as svc:  # the default: nothing frozen
    svc.caption(image, max_new_tokens=3)
    out["off"] = [len(freezes), gc.get_freeze_count()]
with Blip2Service(BlipSettings(**kw, gc_freeze=True)) as svc:
    svc.caption(image, max_new_tokens=3)
    svc.caption(image, max_new_tokens=3)
    out["on"] = [len(freezes), gc.get_freeze_count()]
print(json.dumps(out))
"""


def test_a_model_load_freezes_only_with_gc_freeze_on(tiny_checkpoint: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env({"PYTHONPATH": str(ROOT)}),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["off"] == [0, 0]
    freezes, frozen = counts["on"]
    assert freezes == 1  # once per load, not per call
    assert frozen > 10_000  # torch, transformers and the model


def test_for_server_turns_gc_freeze_on_unless_it_was_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLIP_GC_FREEZE", raising=False)
    assert BlipSettings().gc_freeze is False
    assert BlipSettings().for_server().gc_freeze is True
    assert BlipSettings(gc_freeze=False).for_server().gc_freeze is False
    monkeypatch.setenv("BLIP_GC_FREEZE", "false")
    assert BlipSettings().for_server().gc_freeze is False
    monkeypatch.setenv("BLIP_GC_FREEZE", "true")
    assert BlipSettings().gc_freeze is True


@pytest.mark.parametrize(("env", "expected"), [(None, True), ("false", False)])
def test_blip_mcp_serves_with_gc_freeze_on_unless_the_environment_says_otherwise(
    monkeypatch: pytest.MonkeyPatch, env: str | None, expected: bool
) -> None:
    import mcp_server.server
    from mcp_server.cli import main

    seen: list[Any] = []

    def create_server(settings: Any) -> Any:
        seen.append(settings)
        raise _Stop

    monkeypatch.setattr(mcp_server.server, "create_server", create_server)
    if env is None:
        monkeypatch.delenv("BLIP_GC_FREEZE", raising=False)
    else:
        monkeypatch.setenv("BLIP_GC_FREEZE", env)
    with pytest.raises(_Stop):
        main(["--transport", "http", "--port", "0"])
    assert [s.gc_freeze for s in seen] == [expected]


@pytest.mark.parametrize(("env", "expected"), [(None, True), ("false", False)])
def test_ray_replicas_serve_with_gc_freeze_on_unless_the_deploying_settings_say_otherwise(
    monkeypatch: pytest.MonkeyPatch, env: str | None, expected: bool
) -> None:
    pytest.importorskip("ray.serve")
    from blip_tools.ray_serve import build_app

    if env is None:
        monkeypatch.delenv("BLIP_GC_FREEZE", raising=False)
    else:
        monkeypatch.setenv("BLIP_GC_FREEZE", env)
    app = build_app(BlipSettings())
    replica_settings = app._bound_deployment.init_args[0]  # what each replica builds its BlipSettings from
    assert replica_settings["gc_freeze"] is expected
