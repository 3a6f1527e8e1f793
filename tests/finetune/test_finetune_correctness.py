"""Training arithmetic against first principles: the loss equals plain transformers' on the same batch, gradient
accumulation equals one large batch, the logged learning rate is the one each step applied, serving speed-ups stay
out of training, and a resume refuses data or options that would not continue the same run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from _finetune_testlib import write_image

from blip_tools import BlipSettings, InvalidInput
from blip_tools.finetune import FinetuneReport, finetune
from blip_tools.finetune.trainer import StepInfo, Trainer

FAST: dict[str, Any] = {"val_fraction": 0, "progress": False}


def _settings(model: Path, **extra: Any) -> BlipSettings:
    return BlipSettings(model=str(model), device="cpu", dtype="float32", max_wait_ms=1.0, **extra)


def _losses(report: FinetuneReport) -> list[float]:
    return [s["loss"] for s in json.loads(report.metrics_path.read_text())["steps"]]


def test_loss_equals_plain_transformers_on_the_same_batch(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from blip_tools.finetune.config import FinetuneConfig
    from blip_tools.finetune.data import IssueLog, read_examples

    base = tiny_checkpoint / "captioner"
    write_image(tmp_path / "a.png", 1)
    write_image(tmp_path / "b.png", 2)
    rows = [
        {"image": "a.png", "caption": "a red dog on the grass"},
        {"image": "b.png", "question": "what color is the dog?", "answer": "red"},
        {"image": "a.png", "caption": "blue", "prompt": "a photo of"},
        {"image": "b.png", "caption": "two cat sitting on a bed in the city"},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = IssueLog("stop")
    ds = read_examples(tmp_path / "d.jsonl", _settings(base), log)
    trainer = Trainer(
        model_name=str(base),
        out_dir=tmp_path / "o",
        config=FinetuneConfig(cache_features=False, progress=False),
        settings=_settings(base),
        train=ds.examples,
        val=[],
        log=log,
        data_file=ds.file,
    )
    trainer._load()
    encoded = trainer._encode(ds.examples, "t")
    with torch.no_grad():
        trainer.model.eval()
        loss_sum, tokens = trainer._loss_sum(encoded, ds.examples)

    # The same batch built the plain way: the processor expands <image>, the target (with "\n") follows the prompt.
    model = Blip2ForConditionalGeneration.from_pretrained(base).eval()
    processor = AutoProcessor.from_pretrained(base)
    ids, labels, pixels = [], [], []
    for row in rows:
        if "question" in row:
            prompt, target = f"Question: {row['question']} Answer:", f" {row['answer']}\n"
        elif "prompt" in row:
            prompt, target = row["prompt"], f" {row['caption']}\n"
        else:
            prompt, target = "", f"{row['caption']}\n"
        image = Image.open(tmp_path / row["image"]).convert("RGB")
        full = processor(images=image, text=prompt + target, return_tensors="pt")
        masked = processor(images=image, text=prompt, return_tensors="pt").input_ids.shape[1]
        ids.append(full.input_ids[0])
        labels.append(torch.cat([torch.full((masked,), -100), full.input_ids[0, masked:]]))
        pixels.append(full.pixel_values)
    width = max(len(i) for i in ids)
    pad = processor.tokenizer.pad_token_id
    batch_ids = torch.stack([torch.cat([i, torch.full((width - len(i),), pad)]) for i in ids])
    batch_labels = torch.stack([torch.cat([lab, torch.full((width - len(lab),), -100)]) for lab in labels])
    mask = torch.stack([torch.cat([torch.ones(len(i)), torch.zeros(width - len(i))]).long() for i in ids])
    with torch.no_grad():
        out = model(pixel_values=torch.cat(pixels), input_ids=batch_ids, attention_mask=mask, labels=batch_labels)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch_labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert tokens == int((batch_labels[:, 1:] != -100).sum())
    assert loss_sum.item() / tokens == pytest.approx(expected.item(), rel=1e-5)
    assert loss_sum.item() / tokens == pytest.approx(out.loss.item(), rel=1e-5)


def test_accumulated_micro_batches_equal_one_large_batch(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    import torch

    settings = _settings(tiny_checkpoint / "captioner")
    opts = FAST | {"max_steps": 2, "lr": 1e-2, "warmup_steps": 0}
    runs = [
        finetune(caption_data, tmp_path / f"{bs}x{accum}", settings=settings, batch_size=bs, grad_accum=accum, **opts)
        for bs, accum in ((6, 1), (2, 3))
    ]
    assert _losses(runs[0]) == pytest.approx(_losses(runs[1]), rel=1e-5)
    one, many = (_trained(r.out_dir) for r in runs)
    assert max((one[n] - many[n]).abs().max().item() for n in one) < 1e-5
    base = _trained(tiny_checkpoint / "captioner")
    assert any(not torch.equal(one[n], base[n]) for n in one)


def _trained(path: Path) -> dict[str, Any]:
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(path)
    frozen = ("vision_model.", "language_model.")
    return {n: p.detach() for n, p in model.named_parameters() if not n.startswith(frozen)}


def test_logged_lr_is_the_rate_each_step_applied(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    applied: list[float] = []
    original = Trainer._train_step

    def spy(self: Trainer, group: Any, optimizer: Any, scheduler: Any, scaler: Any) -> float:
        applied.append(optimizer.param_groups[0]["lr"])
        return original(self, group, optimizer, scheduler, scaler)

    monkeypatch.setattr(Trainer, "_train_step", spy)
    seen: list[float] = []
    report = finetune(
        caption_data,
        tmp_path / "out",
        settings=_settings(tiny_checkpoint / "captioner"),
        max_steps=4,
        batch_size=6,
        lr=1.0,
        warmup_steps=2,
        on_step=lambda info: seen.append(info.lr),
        **FAST,
    )
    # Linear warm-up from 0 over 2 steps, then cosine decay towards 0 over the other 2.
    assert applied == pytest.approx([0.0, 0.5, 1.0, 0.5])
    logged = [s["lr"] for s in json.loads(report.metrics_path.read_text())["steps"]]
    assert logged == applied and seen == applied


def test_serving_int8_quantization_stays_out_of_training(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    base = tiny_checkpoint / "captioner"
    options = FAST | {"max_steps": 2, "batch_size": 6, "lr": 1e-2, "warmup_steps": 0}
    # BLIP_QUANTIZE=int8 speeds up CPU serving; the quantized decoder has no backward, so nothing would learn.
    report = finetune(caption_data, tmp_path / "q", settings=_settings(base, quantize="int8"), **options)
    first, second = _losses(report)
    assert second < first
    import torch

    assert not torch.equal(_trained(report.out_dir)["query_tokens"], _trained(base)["query_tokens"])


def test_resume_refuses_other_options_or_data_and_says_which(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    pytest.importorskip("peft")
    settings = _settings(tiny_checkpoint / "captioner")
    options = FAST | {"max_steps": 2, "batch_size": 6, "save_every": 1, "lora": True, "lora_r": 2}
    out = tmp_path / "run"
    finetune(caption_data, out, settings=settings, **options)  # leaves checkpoints/step-0000001
    changes: list[tuple[dict[str, Any], str]] = [
        ({"lr": 1e-3}, "lr"),  # the optimizer state would silently keep the old rate
        ({"weight_decay": 0.5}, "weight_decay"),
        ({"warmup_steps": 1}, "warmup_steps"),
        ({"lora_alpha": 4}, "lora_alpha"),
        ({"lora_targets": ("k_proj",)}, "lora_targets"),  # was reported as a damaged checkpoint to delete
    ]
    for change, key in changes:
        with pytest.raises(InvalidInput, match=rf"differs in \{{'{key}'") as err:
            finetune(caption_data, out, settings=settings, resume=True, **(options | change))
        assert "damaged" not in str(err.value)

    other = tmp_path / "other"
    shutil.copytree(caption_data, other)
    lines = (other / "captions.jsonl").read_text().replace("dog", "cat")
    (other / "captions.jsonl").write_text(lines)  # as many examples, other captions
    with pytest.raises(InvalidInput, match=r"differs in \{'train_data'"):
        finetune(other, out, settings=settings, resume=True, **options)

    steps: list[int] = []

    def record(info: StepInfo) -> None:
        steps.append(info.step)

    # What leaves the arithmetic alone may change: the resumed run continues from the checkpoint.
    report = finetune(
        caption_data, out, settings=settings, resume=True, on_step=record, **(options | {"cache_features": False})
    )
    assert report.resumed_from_step == 1 and steps == [2]


def test_a_finished_run_with_no_checkpoint_left_is_resumed_only_with_the_same_data_and_options(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    settings = _settings(tiny_checkpoint / "captioner")
    options = FAST | {"max_steps": 2, "batch_size": 3}
    out = tmp_path / "run"
    done = finetune(caption_data, out, settings=settings, **options)
    assert not (out / "checkpoints").exists()  # 2 steps: no checkpoint (as after pruning or deleting them)
    metrics = out / "metrics.json"
    before = metrics.read_text()
    # As a resume from a checkpoint does, a resume from what metrics.json records refuses other options or data.
    changes: list[tuple[dict[str, Any], str]] = [
        ({"lr": 1e-3}, "lr"),
        ({"max_steps": 3}, "total_steps"),
        ({"seed": 1}, "seed"),
        ({"batch_size": 2}, "batch_size"),
    ]
    for change, key in changes:
        with pytest.raises(InvalidInput, match=rf"Cannot resume the run in .*metrics\.json.*differs in \{{'{key}'"):
            finetune(caption_data, out, settings=settings, resume=True, **(options | change))
    other = tmp_path / "other"
    shutil.copytree(caption_data, other)
    (other / "captions.jsonl").write_text((other / "captions.jsonl").read_text().replace("dog", "cat"))
    with pytest.raises(InvalidInput, match=r"differs in \{'train_data'"):
        finetune(other, out, settings=settings, resume=True, **options)
    assert metrics.read_text() == before  # refused before anything was written

    # A metrics.json written before it kept the fingerprint: the options and step count it records still count.
    old = json.loads(before)
    del old["fingerprint"]
    metrics.write_text(json.dumps(old))
    with pytest.raises(InvalidInput, match=r"differs in \{'lr'"):
        finetune(caption_data, out, settings=settings, resume=True, **(options | {"lr": 1e-3}))

    # The same data and options: the run is trained again from step 0 — the saved run again, step for step.
    again = finetune(caption_data, out, settings=settings, resume=True, **options)
    assert again.resumed_from_step is None and again.steps == 2
    assert _losses(again) == pytest.approx([s["loss"] for s in json.loads(before)["steps"]], rel=1e-5)
    assert done.final_loss == pytest.approx(again.final_loss, rel=1e-5)


def test_resume_from_another_folder_with_the_base_written_another_way(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(tiny_checkpoint / "captioner", tmp_path / "base")
    (tmp_path / "jobs").mkdir()
    options = FAST | {"max_steps": 2, "save_every": 1}
    monkeypatch.chdir(tmp_path)
    finetune(caption_data, "run", settings=_settings(Path("base")), **options)  # leaves checkpoints/step-0000001
    monkeypatch.chdir(tmp_path / "jobs")  # the same command from another folder, as a job script would run it
    report = finetune(caption_data, "../run", settings=_settings(tmp_path / "base"), resume=True, **options)
    assert report.resumed_from_step == 1 and report.steps == 2

    shutil.copytree(tmp_path / "base", tmp_path / "other")  # another base (even with the same weights) is refused
    with pytest.raises(InvalidInput, match=r"differs in \{'base_model'"):
        finetune(caption_data, "../run", settings=_settings(Path("../other")), resume=True, **options)
