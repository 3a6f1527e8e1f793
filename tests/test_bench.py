"""The benchmark harness itself: B0/B1/B7 on the tiny checkpoint with quick sizes write tables, JSON and plots."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_root(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A benchmark checkpoint root whose `tiny/` is the session's tiny checkpoint (nothing rebuilt)."""
    root = tmp_path / "bench-root"
    root.mkdir()
    (root / "tiny").symlink_to(tiny_checkpoint, target_is_directory=True)
    return root


def test_quick_run_writes_tables_json_and_plots(bench_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(REPO))
    from benchmarks.run import run

    out = tmp_path / "out"
    stream = io.StringIO()
    results = run(["B0", "B1", "B7"], "tiny", out, quick=True, tokens=4, root=bench_root, stream=stream)
    text = stream.getvalue()

    assert [r.scenario for r in results] == ["B0", "B1", "B7"]
    b0 = json.loads((out / "B0_tiny.json").read_text())
    assert [row["batch"] for row in b0["rows"]] == [1, 4, 16]
    assert all(row["items_per_s"] > 0 for row in b0["rows"])
    assert b0["machine"]["cores"] >= 1
    assert (out / "B0_tiny.png").stat().st_size > 1000
    assert (out / "B1_tiny.png").exists()

    b1 = json.loads((out / "B1_tiny.json").read_text())
    modes = {(row["mode"], row["callers"]) for row in b1["rows"]}
    modes_run = ("runtime_bound", "offline", "one_by_one", "dynamic", "dynamic_async")
    assert modes == {(m, n) for m in modes_run for n in (8, 32)}
    assert {c["name"] for c in b1["checks"]} == {
        "tiny, 32 callers: dynamic >= 0.9x offline",
        "tiny, 32 callers: dynamic >= 8x one-by-one",
        "tiny, 32 asyncio callers (as in the MCP server): dynamic >= 0.9x offline",
    }
    # Batching really happened for 32 callers; batching off really ran one at a time.
    rows = {(row["mode"], row["callers"]): row for row in b1["rows"]}
    assert rows[("dynamic", 32)]["mean_batch"] > 2
    assert rows[("one_by_one", 32)]["mean_batch"] == 1

    # B7 is a correctness check as much as a timing: only the poisoned request fails.
    assert all(c.passed for c in results[2].checks), results[2].checks
    assert "| batch | items_per_s |" in text and ("PASS:" in text or "FAIL:" in text)
    assert "## Run" in (out / "summary.md").read_text()


def test_bench_command_is_registered() -> None:
    from blip_tools.cli import build_parser

    args = build_parser().parse_args(["bench", "--scenario", "B0", "--size", "tiny", "--quick", "--out", "x"])
    assert args.scenario == ["B0"] and args.size == "tiny" and args.quick


def test_null_runtime_returns_at_once(settings) -> None:  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(REPO))
    from benchmarks.null_model import NullRuntime
    from blip_tools import Blip2Service

    with Blip2Service(settings, runtime=NullRuntime(settings)).start() as svc:
        result = svc.caption(Image.new("RGB", (20, 20)), num_beams=2)
    assert result.caption == "a null caption"
