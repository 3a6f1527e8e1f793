"""Real-size BLIP-2 (blip2-opt-2.7b architecture, random weights) on a GPU: captions/s against the H100 roofline.

    python benchmarks/gpu_real.py                      # cuda, bfloat16, B = 32, 1, 8, 128
    python benchmarks/gpu_real.py --options graphs default --budget-s 480 --out bench-results
    python benchmarks/gpu_real.py --device cpu --size tiny --batches 1 8   # smoke test of the script

Builds the model on the device, saves it once with `save_pretrained` and serves it through `Blip2Service`'s
runtime (so the measured path is the production one), with fixed-length captions (`min_new_tokens =
max_new_tokens`). Options: `graphs` (`BLIP_CUDA_GRAPHS`: the decoding step replayed as a CUDA graph per
batch-size bucket), `default` (blip-tools' settings: cuDNN attention off), `cudnn` (PyTorch's own attention
choice), `static` (static KV cache), `static+compile`. For each option it prints captions/s per batch
size, the share of the H100 roofline (31 / 219 / 580 / 978 captions/s at B = 1 / 8 / 32 / 128), per-stage times
(vision, Q-Former, prefill, one decode step) and captions/s of 32 closed-loop callers through the service.
Target: >= 50 % of the roofline at B = 32.
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
OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "cudnn": {"cudnn_attention": True},  # PyTorch's own choice of attention kernel (cuDNN on Hopper)
    "static": {"static_cache": True},
    "static+compile": {"static_cache": True, "compile": True},
    "graphs": {"cuda_graphs": True},  # blip-tools' static-cache decode loop, each step a CUDA graph replay
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
    root: Path,
    device: str,
    dtype_name: str,
    option: str,
    batches: list[int],
    tokens: int,
    reps: int,
    deadline: float,
    report: Any,
    callers: int,
    rounds: int = 4,
) -> list[dict[str, Any]]:
    """captions/s and per-stage times per batch size for one option, each row reported as soon as it is measured.

    Batch sizes run in the order given (put the target first: compiling a new shape can take minutes); none is
    started after `deadline` (a `time.monotonic()` value).
    """

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
    rows: list[dict[str, Any]] = []
    with Blip2Service(settings).start() as svc:
        rt = svc.runtime
        model = rt.load_captioner().model
        load_s = rt.model_load_s  # from_pretrained and the fast paths, timed by the runtime
        side = model.config.vision_config.image_size
        images = make_images(max(batches), "real" if side >= 224 else "tiny", seed=90)
        prompt = rt.encode_prompt(None)
        items = [GenerationItem(rt.preprocess(img, f"g{i}"), prompt) for i, img in enumerate(images)]
        params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)
        for b in batches:
            if time.monotonic() > deadline:
                report({"option": option, "batch": b, "skipped": "time budget spent"})
                continue
            batch = items[:b]
            first = time.perf_counter()
            rt.generate(batch, params)  # warm-up (and compilation for this shape)
            _sync(device)
            first_s = time.perf_counter() - first
            seconds = _time(lambda batch=batch: rt.generate(batch, params), device, reps)
            row: dict[str, Any] = {
                "option": option,
                "batch": b,
                "captions_per_s": b / seconds,
                "batch_s": seconds,
                "first_call_s": first_s,
                "load_s": load_s,
            }
            if b in ROOFLINE and device.startswith("cuda"):
                row["roofline_pct"] = 100.0 * row["captions_per_s"] / ROOFLINE[b]
            row.update(_stages(rt, model, batch, prompt, device, reps))
            if settings.cuda_graphs:
                row.update(_graph_step(rt, b, device, reps))
            if device.startswith("cuda"):
                import torch

                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(row)
            report(row)
        if callers and not settings.compile and time.monotonic() < deadline:
            # Through the service's batcher, as concurrent users reach it (not with compile: every batch size
            # the batcher happens to form would compile anew).
            report(_service_loop(svc, images, callers, tokens, option, rounds))
    return rows


def _service_loop(
    svc: Any, images: list[Any], callers: int, tokens: int, option: str, rounds: int = 4
) -> dict[str, Any]:
    """Captions/s with `callers` threads each captioning distinct images through `Blip2Service.caption`."""
    from concurrent.futures import ThreadPoolExecutor

    from blip_tools.params import GenerationParams

    params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)

    def one(i: int) -> None:
        for r in range(rounds):
            svc.caption(images[(i + r * callers) % len(images)], params=params)

    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(lambda i: svc.caption(images[i % len(images)], params=params), range(callers)))  # warm-up
        batches_before = svc.stats().batches
        start = time.perf_counter()
        list(pool.map(one, range(callers)))
        seconds = time.perf_counter() - start
    return {
        "option": option,
        "service_callers": callers,
        "captions": callers * rounds,
        "captions_per_s": callers * rounds / seconds,
        "batches": svc.stats().batches - batches_before,
    }


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


def _graph_step(rt: Any, rows: int, device: str, reps: int) -> dict[str, Any]:
    """Seconds of one decoding step of the `cuda_graphs` decoder for `rows` rows (a replay on CUDA), as it ran."""
    import torch

    decoder = rt._decoder
    buffers = decoder._buffers if decoder is not None else None
    if buffers is None:
        return {}

    def step() -> None:
        with torch.inference_mode():  # the buffers were made under it
            buffers.slot.fill_(0)  # any slot: the timing does not depend on which one is written
            decoder._step(buffers, rows, decoder.last_length)

    return {
        "graph_step_s": _time(step, device, max(reps, 5)),
        "graphs_captured": decoder.captured,
        "graphs_used": decoder.use_graphs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=["tiny", "small", "real"], default="real")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 1, 8, 128], help="run in this order")
    parser.add_argument("--tokens", type=int, default=20, help="fixed caption length in tokens (default 20)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--options", nargs="+", default=["graphs", "default", "static+compile"], choices=list(OPTIONS))
    parser.add_argument("--service-callers", type=int, default=32, help="closed-loop callers through the service")
    parser.add_argument("--service-rounds", type=int, default=4, help="captions per caller in that run")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new measurement after this long")
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "blip2-bench")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    import torch
    import transformers

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; this script needs a GPU (or --device cpu --size tiny)", file=sys.stderr)
        return 2
    began = time.monotonic()
    deadline = began + args.budget_s if args.budget_s else float("inf")
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype_name]
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": dtype_name,
        "size": args.size,
        "tokens": args.tokens,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / f"gpu_real_{args.size}.json"
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []

    def save() -> None:
        out_file.write_text(json.dumps({"machine": info, "rows": rows, "errors": errors}, indent=2) + "\n")

    def report(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        save()

    start = time.perf_counter()
    root = build(args.size, args.device, dtype, args.model_dir / f"{args.size}-{dtype_name}")
    info["build_and_save_s"] = round(time.perf_counter() - start, 1)
    save()
    for option in args.options:
        if time.monotonic() > deadline:
            errors.append({"option": option, "error": "skipped: time budget spent"})
            continue
        try:
            measure(
                root,
                args.device,
                dtype_name,
                option,
                args.batches,
                args.tokens,
                args.reps,
                deadline,
                report,
                args.service_callers,
                args.service_rounds,
            )
        except Exception as exc:  # one option failing (a compile error, say) must not lose the others
            import traceback

            traceback.print_exc()
            errors.append({"option": option, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            save()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    save()
    print_table(rows)
    return 0


def print_table(rows: list[dict[str, Any]]) -> None:
    """The markdown table of measured rows, and the B = 32 target's verdict."""
    measured = sorted((r for r in rows if "batch_s" in r), key=lambda r: (r["option"], r["batch"]))
    print(
        "\n| option | B | captions/s | % roofline | first call s | vision s | qformer s | prefill s | decode step s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in measured:
        pct = f"{r['roofline_pct']:.0f}%" if "roofline_pct" in r else "-"
        print(
            f"| {r['option']} | {r['batch']} | {r['captions_per_s']:.1f} | {pct} | {r['first_call_s']:.1f} | "
            f"{r['vision_s']:.4f} | {r['qformer_s']:.4f} | {r['prefill_s']:.4f} | {r['decode_step_s']:.4f} |"
            + (f" graph step {r['graph_step_s']:.4f} s" if "graph_step_s" in r else "")
        )
    for r in rows:
        if "service_callers" in r:
            print(
                f"service, {r['option']}: {r['service_callers']} closed-loop callers, {r['captions_per_s']:.1f} "
                f"captions/s in {r['batches']} batches"
            )
    at32 = [r for r in measured if r["batch"] == 32 and "roofline_pct" in r]
    if at32:
        best = max(at32, key=lambda r: r["roofline_pct"])
        ok = best["roofline_pct"] >= 50.0
        print(
            f"{'PASS' if ok else 'FAIL'}: GPU real size, B=32: >= 50% of the H100 roofline — "
            f"{best['roofline_pct']:.0f}% ({best['option']})"
        )


if __name__ == "__main__":
    raise SystemExit(main())
