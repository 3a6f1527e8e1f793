"""Real-size BLIP-2 (blip2-opt-2.7b architecture, random weights) on a GPU: captions/s against the H100 roofline.

    python benchmarks/gpu_real.py                      # cuda, bfloat16, B = 1, 8, 32, 128
    python benchmarks/gpu_real.py --options default static static+compile --out bench-results
    python benchmarks/gpu_real.py --device cpu --size tiny --batches 1 8   # smoke test of the script

Builds the model on the device, saves it once with `save_pretrained` and serves it through `Blip2Service`'s
runtime (so the measured path is the production one), with fixed-length captions (`min_new_tokens =
max_new_tokens`). For each option it prints captions/s per batch size, the share of the H100 roofline
(31 / 219 / 580 / 978 captions/s at B = 1 / 8 / 32 / 128) and per-stage times (vision, Q-Former, prefill,
one decode step). Target: >= 50 % of the roofline at B = 32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOFLINE = {1: 31.0, 8: 219.0, 32: 580.0, 128: 978.0}
OPTIONS = {
    "default": {},
    "static": {"static_cache": True},
    "static+compile": {"static_cache": True, "compile": True},
}


def build(size: str, device: str, dtype: Any, folder: Path) -> Path:
    """Save a random model of `size` (built directly on `device`) plus processor to `folder`/captioner."""
    import shutil

    import torch
    from transformers import Blip2ForConditionalGeneration

    from benchmarks.sizes import blip2_config, checkpoint, scaled_processor

    tiny = checkpoint("tiny")
    if size == "tiny":
        return tiny
    cap = folder / "captioner"
    if (cap / "config.json").exists():
        return folder
    processor = scaled_processor(tiny, size)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = blip2_config(size, image_id, max(len(processor.tokenizer), image_id + 1))
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config).to(dtype).eval()
    model.save_pretrained(cap)
    processor.save_pretrained(cap)
    shutil.copytree(tiny / "retrieval", folder / "retrieval", dirs_exist_ok=True)
    del model
    return folder


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn: Any, device: str, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    root: Path, device: str, dtype_name: str, option: str, batches: list[int], tokens: int, reps: int
) -> list[dict[str, Any]]:
    """captions/s and per-stage times per batch size for one option."""

    from benchmarks.sizes import make_images
    from blip_tools.params import GenerationParams
    from blip_tools.runtime import GenerationItem
    from blip_tools.service import Blip2Service
    from blip_tools.settings import BlipSettings
    from blip_tools.testing import tiny_settings_kwargs

    kw = tiny_settings_kwargs(root) | {"device": device, "dtype": dtype_name}
    settings = BlipSettings(
        **kw, max_batch_size=max(batches), feature_cache_size=0, prefix_cache_size=0, **OPTIONS[option]
    )
    rows = []
    with Blip2Service(settings).start() as svc:
        rt = svc.runtime
        model = rt.load_captioner().model
        side = model.config.vision_config.image_size
        images = make_images(max(batches), "real" if side >= 224 else "tiny", seed=90)
        prompt = rt.encode_prompt(None)
        items = [GenerationItem(rt.preprocess(img, f"g{i}"), prompt) for i, img in enumerate(images)]
        params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)
        for b in batches:
            batch = items[:b]
            rt.generate(batch, params)  # warm-up (and compilation for this shape)
            seconds = _time(lambda batch=batch: rt.generate(batch, params), device, reps)
            row: dict[str, Any] = {"option": option, "batch": b, "captions_per_s": b / seconds, "batch_s": seconds}
            if b in ROOFLINE and device.startswith("cuda"):
                row["roofline_pct"] = 100.0 * row["captions_per_s"] / ROOFLINE[b]
            row.update(_stages(rt, model, batch, prompt, device, reps))
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def _stages(rt: Any, model: Any, batch: list[Any], prompt: list[int], device: str, reps: int) -> dict[str, float]:
    """Seconds per stage for one batch: vision encoder, Q-Former + projection, prefill, one decode step."""
    import torch

    from blip_tools.runtime import _cache_kwarg

    b = len(batch)
    lm = model.language_model
    out: dict[str, float] = {}
    with torch.inference_mode():
        pixels = torch.cat([it.image.pixel_values for it in batch]).to(rt.device, rt.dtype)
        out["vision_s"] = _time(lambda: model.vision_model(pixel_values=pixels), device, reps)
        feats_s = _time(lambda: model.get_image_features(pixel_values=pixels), device, reps)
        out["qformer_s"] = max(feats_s - out["vision_s"], 0.0)
        feats = model.get_image_features(pixel_values=pixels).pooler_output
        ids = torch.tensor([prompt] * b, device=rt.device)
        embeds = torch.cat([feats.to(lm.dtype), model.get_input_embeddings()(ids)], dim=1)
        out["prefill_s"] = _time(lambda: lm(inputs_embeds=embeds, use_cache=True), device, reps)
        cache = getattr(lm(inputs_embeds=embeds, use_cache=True), _cache_kwarg())
        step = torch.full((b, 1), 5, device=rt.device)
        mask = torch.ones((b, embeds.shape[1] + 1), dtype=torch.long, device=rt.device)
        kv = {_cache_kwarg(): cache}  # `cache` from transformers 5.24, which deprecates `past_key_values`
        out["decode_step_s"] = _time(lambda: lm(input_ids=step, attention_mask=mask, **kv), device, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=["tiny", "small", "real"], default="real")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--tokens", type=int, default=20, help="fixed caption length in tokens (default 20)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--options", nargs="+", default=["default", "static", "static+compile"], choices=list(OPTIONS))
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "blip2-bench")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    import torch

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; this script needs a GPU (or --device cpu --size tiny)", file=sys.stderr)
        return 2
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype_name]
    root = build(args.size, args.device, dtype, args.model_dir / f"{args.size}-{dtype_name}")
    rows = []
    for option in args.options:
        rows += measure(root, args.device, dtype_name, option, args.batches, args.tokens, args.reps)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device}
    (args.out / f"gpu_real_{args.size}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    print("\n| option | B | captions/s | % roofline | vision s | qformer s | prefill s | decode step s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        pct = f"{r['roofline_pct']:.0f}%" if "roofline_pct" in r else "-"
        print(
            f"| {r['option']} | {r['batch']} | {r['captions_per_s']:.1f} | {pct} | {r['vision_s']:.4f} | "
            f"{r['qformer_s']:.4f} | {r['prefill_s']:.4f} | {r['decode_step_s']:.4f} |"
        )
    at32 = [r for r in rows if r["batch"] == 32 and "roofline_pct" in r]
    if at32:
        best = max(at32, key=lambda r: r["roofline_pct"])
        ok = best["roofline_pct"] >= 50.0
        print(
            f"{'PASS' if ok else 'FAIL'}: GPU real size, B=32: >= 50% of the H100 roofline — "
            f"{best['roofline_pct']:.0f}% ({best['option']})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
