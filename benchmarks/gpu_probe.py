"""Why a batch of a size not seen before is slow on a GPU: first-call times, a profile, and attention backends.

    python benchmarks/gpu_probe.py --out bench-results     # reuses the model gpu_real.py saved, or builds it

On the H200 run of `gpu_real.py`, the first batch of each new size took ~1 s longer than the next ones, and
32 closed-loop callers through the service (whose batches vary in size) reached a quarter of the offline
throughput. This measures first calls at unseen batch sizes with cuDNN attention on and off, profiles one, and
runs the service's closed loop both ways (results of the first run: README, *GPU*; `benchmarks/results/GPU_probe*`).
The attention switch is flipped here directly (PyTorch's process-wide flag); the service's own setting is
`BLIP_CUDNN_ATTENTION`, applied when a model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=["tiny", "small", "real"], default="real")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp") / "blip2-bench")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.gpu_real import _service_loop, _sync, build
    from benchmarks.sizes import make_images
    from blip_tools.params import GenerationParams
    from blip_tools.runtime import GenerationItem
    from blip_tools.service import Blip2Service
    from blip_tools.settings import BlipSettings
    from blip_tools.testing import tiny_settings_kwargs

    cuda = args.device.startswith("cuda")
    dtype_name = "bfloat16" if cuda else "float32"
    dtype = torch.bfloat16 if cuda else torch.float32
    root = build(args.size, args.device, dtype, args.model_dir / f"{args.size}-{dtype_name}")
    settings = BlipSettings(
        **(tiny_settings_kwargs(root) | {"device": args.device, "dtype": dtype_name}),
        max_batch_size=64,
        feature_cache_size=0,
        prefix_cache_size=0,
        cudnn_attention=True,  # "default" below = PyTorch's own choice (cuDNN on Hopper); the probe flips it
    )
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"first_calls": [], "service": []}

    def save() -> None:
        (args.out / f"gpu_probe_{args.size}.json").write_text(json.dumps(result, indent=2) + "\n")

    with Blip2Service(settings).start() as svc:
        rt = svc.runtime
        model = rt.load_captioner().model
        side = model.config.vision_config.image_size
        images = make_images(64, "real" if side >= 224 else "tiny", seed=91)
        prompt = rt.encode_prompt(None)
        items = [GenerationItem(rt.preprocess(img, f"p{i}"), prompt) for i, img in enumerate(images)]
        params = GenerationParams(max_new_tokens=args.tokens, min_new_tokens=args.tokens)

        def call(b: int) -> float:
            _sync(args.device)
            start = time.perf_counter()
            rt.generate(items[:b], params)
            _sync(args.device)
            return time.perf_counter() - start

        def first_calls(label: str, sizes: list[int]) -> None:
            for b in sizes:
                row = {"backends": label, "batch": b, "first_s": call(b), "second_s": call(b)}
                result["first_calls"].append(row)
                print(json.dumps(row), flush=True)
            save()

        call(32)
        call(32)
        first_calls("default", [20, 21])
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            call(22)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50)
        print(table, flush=True)
        (args.out / "gpu_probe_profile.txt").write_text(table)
        if cuda:
            torch.backends.cuda.enable_cudnn_sdp(False)
        first_calls("no cudnn sdpa", [23, 24])
        if cuda:
            torch.backends.cuda.enable_cudnn_sdp(True)
        result["service"].append({"backends": "default", **_service_loop(svc, images, 32, args.tokens, "default")})
        print(json.dumps(result["service"][-1]), flush=True)
        save()
        if cuda:
            torch.backends.cuda.enable_cudnn_sdp(False)
        result["service"].append(
            {"backends": "no cudnn sdpa", **_service_loop(svc, images, 32, args.tokens, "default")}
        )
        print(json.dumps(result["service"][-1]), flush=True)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
