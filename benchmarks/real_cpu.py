"""REAL: the blip2-opt-2.7b architecture (random weights) on this CPU — our service vs plain transformers.

Plain path: `Blip2Processor/Blip2ForConditionalGeneration.from_pretrained(dir)` with defaults, then
`generate`, one image at a time. Ours: `Blip2Service` in float32, then with `quantize="int8"`. Outputs are
forced to a fixed length (`min_new_tokens = max_new_tokens`): a caption of `ctx.tokens` tokens, answers of
3 tokens. Also: a second question about the same image (feature cache + image-prefix KV cache), each cache's
share, per-stage times (vision, Q-Former, prefill, one decode step) and the int8 drift. The models are
loaded one after another (each needs ~14 GiB in float32). `--size small` runs the same code quickly.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from .harness import Check, ScenarioResult, median
from .scenarios import BenchContext
from .sizes import checkpoint, make_images, settings_for

logger = logging.getLogger(__name__)

Q1, Q2, Q3 = "what color is the car?", "is there a dog in the picture?", "how many people are there?"
SHORT = 3


def real_cpu(ctx: BenchContext) -> ScenarioResult:
    """Latency of one caption and of follow-up questions: plain transformers vs ours (float32, int8)."""
    cap_dir = checkpoint(ctx.size, ctx.root) / "captioner"
    images = make_images(5, ctx.size, seed=80)
    reps = 2
    plain = _plain(str(cap_dir), images, ctx.tokens, reps)
    gc.collect()
    fp32 = _ours(ctx, images, "none", reps)
    gc.collect()
    int8 = _ours(ctx, images, "int8", reps)
    gc.collect()

    rows = [
        {
            "path": "plain transformers",
            "caption_s": plain["caption"],
            "question_1_s": plain["q1"],
            "question_2_s": plain["q2"],
            "q2_features_only_s": float("nan"),
            "x_plain_caption": 1.0,
        }
    ]
    for name, res in (("blip-tools fp32", fp32), ("blip-tools int8", int8)):
        rows.append(
            {
                "path": name,
                "caption_s": res["caption"],
                "question_1_s": res["q1"],
                "question_2_s": res["q2"],
                "q2_features_only_s": res["q2_feat"],
                "x_plain_caption": res["caption"] / plain["caption"],
            }
        )
    stage_rows = [{"path": n, **r["stages"]} for n, r in (("fp32", fp32), ("int8", int8))]
    best = min(fp32["caption"], int8["caption"])
    best_name = "int8" if int8["caption"] <= fp32["caption"] else "fp32"
    q_ratio = fp32["q2"] / fp32["q1"]
    feat_share = (fp32["q1"] - fp32["q2_feat"]) / fp32["q1"]
    prefix_share = (fp32["q2_feat"] - fp32["q2"]) / fp32["q1"]
    same = sum(a == b for a, b in zip(fp32["tokens"], int8["tokens"], strict=False))
    notes = [
        f"caption = {ctx.tokens} tokens, answers = {SHORT} tokens; plain = from_pretrained defaults + generate",
        f"second question, fp32: feature cache saves {feat_share:.0%} of the first question's time, "
        f"the image-prefix KV cache a further {prefix_share:.0%}",
        f"int8 drift: image features cosine {int8['feature_cosine']:.4f} vs fp32; caption tokens equal to fp32 "
        f"{same}/{len(fp32['tokens'])} (greedy, same image); first-step logits max |diff| {int8['logit_diff']:.3g} "
        f"(max |logit| {int8['logit_scale']:.3g})",
        "stages (s): "
        + "; ".join(
            f"{r['path']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k != "path") for r in stage_rows
        ),
    ]
    checks = []
    if ctx.size == "real":
        checks = [
            Check(
                "real size on this CPU: one caption <= 0.5x plain transformers (fastest option)",
                best / plain["caption"] <= 0.5,
                f"{best / plain['caption']:.2f}x with {best_name} ({best:.1f} s vs {plain['caption']:.1f} s)",
            ),
            Check(
                "real size on this CPU: second question on the same image <= 0.5x the first",
                q_ratio <= 0.5,
                f"{q_ratio:.2f}x ({fp32['q2']:.1f} s vs {fp32['q1']:.1f} s, fp32)",
            ),
        ]
    result = ScenarioResult("REAL", "real-size latency vs plain transformers", ctx.size, rows, checks, notes)
    result.plot = None
    return result


def _plain(cap_dir: str, images: list[Any], tokens: int, reps: int) -> dict[str, Any]:
    """The plain transformers path with its defaults (one image at a time)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    processor = Blip2Processor.from_pretrained(cap_dir)
    model = Blip2ForConditionalGeneration.from_pretrained(cap_dir)
    model.eval()

    def caption(img: Any, n: int) -> float:
        start = time.perf_counter()
        model.generate(**processor(images=img, return_tensors="pt"), max_new_tokens=n, min_new_tokens=n)
        return time.perf_counter() - start

    def ask(img: Any, q: str) -> float:
        start = time.perf_counter()
        inputs = processor(images=img, text=f"Question: {q} Answer:", return_tensors="pt")
        model.generate(**inputs, max_new_tokens=SHORT, min_new_tokens=SHORT)
        return time.perf_counter() - start

    caption(images[4], 1)  # warm-up
    out = {
        "caption": median([caption(images[i], tokens) for i in range(reps)]),
        "q1": median([ask(images[2 + i], Q1) for i in range(reps)]),
        "q2": median([ask(images[2 + i], Q2) for i in range(reps)]),
    }
    logger.info("plain transformers: %s", out)
    return out


def _ours(ctx: BenchContext, images: list[Any], quantize: str, reps: int) -> dict[str, Any]:
    import torch

    from blip_tools.service import Blip2Service

    settings = settings_for(ctx.size, ctx.root, quantize=quantize, max_batch_size=8)
    gen = {"max_new_tokens": ctx.tokens, "min_new_tokens": ctx.tokens}
    short = {"max_new_tokens": SHORT, "min_new_tokens": SHORT}
    with Blip2Service(settings).start() as svc:
        rt = svc.runtime
        svc.caption(images[4], max_new_tokens=1)  # warm-up
        times = []
        for i in range(reps):
            start = time.perf_counter()
            svc.caption(images[i], **gen)
            times.append(time.perf_counter() - start)
        out: dict[str, Any] = {"caption": median(times)}
        q1, q2, q2_feat = [], [], []
        for i in range(reps):
            image = images[2 + i]
            q1.append(_t(lambda image=image: svc.answer(image, Q1, **short)))
            q2.append(_t(lambda image=image: svc.answer(image, Q2, **short)))
            # The same kind of follow-up with only the feature cache: the prefix cache off for one call.
            capacity, rt.prefix_cache.capacity = rt.prefix_cache.capacity, 0
            rt.prefix_cache.clear()
            q2_feat.append(_t(lambda image=image: svc.answer(image, Q3, **short)))
            rt.prefix_cache.capacity = capacity
        out.update(q1=median(q1), q2=median(q2), q2_feat=median(q2_feat))
        out["stages"] = _stages(rt, images[4])
        model = rt.load_captioner().model
        processor = rt.load_captioner().processor
        with torch.inference_mode():
            # Greedy token ids of one caption, through the same (possibly quantized) model.
            inputs = processor(images=images[0], return_tensors="pt")
            seq = model.generate(**inputs, max_new_tokens=ctx.tokens, min_new_tokens=ctx.tokens)
            out["tokens"] = seq[0, -ctx.tokens :].tolist()
        with torch.inference_mode():
            pixels = rt.preprocess(images[0], "drift").pixel_values
            feats = model.get_image_features(pixel_values=pixels).pooler_output.float()
            if quantize == "none":
                _REF["features"] = feats
            ref = _REF.get("features")
            out["feature_cosine"] = (
                float(torch.nn.functional.cosine_similarity(feats.flatten(), ref.flatten(), dim=0))
                if ref is not None
                else 1.0
            )
            ids = torch.tensor([rt.encode_prompt(None)])
            logits = (
                model.language_model(inputs_embeds=torch.cat([feats, model.get_input_embeddings()(ids)], 1))
                .logits[:, -1]
                .float()
            )
            if quantize == "none":
                _REF["logits"] = logits
            out["logit_diff"] = float((logits - _REF["logits"]).abs().max()) if "logits" in _REF else 0.0
            out["logit_scale"] = float(_REF["logits"].abs().max()) if "logits" in _REF else 0.0
    logger.info("blip-tools %s: %s", quantize, {k: v for k, v in out.items() if k != "tokens"})
    return out


_REF: dict[str, Any] = {}


def _t(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _stages(rt: Any, image: Any) -> dict[str, float]:
    """Seconds per stage for one image: vision encoder, Q-Former + projection, prefill, one decode step."""
    import torch

    from blip_tools.runtime import _cache_kwarg

    model = rt.load_captioner().model
    lm = model.language_model
    q = int(model.config.num_query_tokens)
    with torch.inference_mode():
        pixels = rt.preprocess(image, "stages").pixel_values.to(rt.device, rt.dtype)
        t_vision, vision = _timed(lambda: model.vision_model(pixel_values=pixels, return_dict=True))
        t_all, feats = _timed(lambda: model.get_image_features(pixel_values=pixels).pooler_output)
        prompt = torch.tensor([rt.encode_prompt(f"Question: {Q1} Answer:")], device=rt.device)
        embeds = torch.cat([feats.to(lm.dtype), model.get_input_embeddings()(prompt)], dim=1)
        t_prefill, out = _timed(lambda: lm(inputs_embeds=embeds, use_cache=True))
        pkv = getattr(out, _cache_kwarg())
        step = torch.tensor([[5]], device=rt.device)
        mask = torch.ones((1, embeds.shape[1] + 1), dtype=torch.long, device=rt.device)
        t_decode, _ = _timed(
            lambda: lm(input_ids=step, attention_mask=mask, use_cache=True, **{_cache_kwarg(): pkv}), reps=1
        )
    del vision
    return {
        "vision": t_vision,
        "qformer": max(t_all - t_vision, 0.0),
        f"prefill_{embeds.shape[1]}": t_prefill,
        "decode_step": t_decode,
        "image_prefix_tokens": float(q),
    }


def _timed(fn: Any, reps: int = 2) -> tuple[float, Any]:
    """Median seconds over `reps` calls, and the last call's value."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return median(times), value
