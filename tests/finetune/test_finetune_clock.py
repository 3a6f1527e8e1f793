"""The report's `seconds` is the run's own time: the imports of torch and transformers (several seconds in a fresh
process, more than a tiny run takes) are reported apart, as `import_seconds`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

#: In a fresh interpreter, a fake clock that jumps 100 s whenever torch, transformers or the BLIP-2 model code is
#: first imported: slow imports made certain, without sleeping.
_SCRIPT = textwrap.dedent(
    """
    import json, sys, time

    real = time.perf_counter
    jumps = [0.0]
    time.perf_counter = lambda: real() + jumps[0]
    SLOW = {"torch", "transformers", "transformers.models.blip_2.modeling_blip_2"}

    class SlowImports:
        def find_spec(self, name, path=None, target=None):
            if name in SLOW:
                jumps[0] += 100.0
            return None

    sys.meta_path.insert(0, SlowImports())
    from blip_tools import BlipSettings
    from blip_tools.finetune import finetune

    data, out, model = sys.argv[1:4]
    settings = BlipSettings(model=model, device="cpu", dtype="float32")
    began = time.perf_counter()
    report = finetune(data, out, settings=settings, max_steps=1, val_fraction=0, progress=False)
    wall = time.perf_counter() - began
    imports = getattr(report, "import_seconds", None)
    print(json.dumps({"seconds": report.seconds, "imports": imports, "wall": wall}))
    """
)


def test_seconds_leave_the_imports_of_torch_and_transformers_out(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    argv = [sys.executable, "-c", _SCRIPT, str(caption_data), str(tmp_path / "out"), str(tiny_checkpoint / "captioner")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    times = json.loads(done.stdout.strip().splitlines()[-1])
    assert times["wall"] >= 300  # all three slow imports happened inside the call
    assert times["seconds"] < 100, times  # none of them counts as the run's time
    assert times["imports"] >= 300 and times["seconds"] + times["imports"] <= times["wall"]
