"""Fine-tuning on the tiny checkpoint: the model really learns, the vision encoder stays bit-identical, the output
serves through `Blip2Service`, the MCP server and the CLI, resume continues the same run, and bad lines are
reported in both modes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from _finetune_testlib import CAPTIONS, write_caption_data, write_image

from blip_tools import Blip2Service, BlipSettings, InvalidInput
from blip_tools.finetune import FinetuneReport, finetune
from blip_tools.finetune.trainer import StepInfo

#: Memorisation run: a high learning rate and 200 full-batch steps (the tiny model needs both). 120 steps were
#: borderline: the loss ended at 0.12 on one CPU and 5 of the 6 captions came back (float rounding differs by CPU).
MEMORISE = {"max_steps": 200, "batch_size": 6, "lr": 1e-2, "warmup_steps": 5, "weight_decay": 0.0, "val_fraction": 0}


def _settings(model: Path | str) -> BlipSettings:
    return BlipSettings(model=str(model), device="cpu", dtype="float32", max_wait_ms=1.0)


@pytest.fixture(scope="module")
def trained(steerable_base: Path, caption_data: Path, tmp_path_factory: pytest.TempPathFactory) -> FinetuneReport:
    """One fine-tuning run of the default trainable set on the six captioned images."""
    out = tmp_path_factory.mktemp("ftout") / "model"
    return finetune(caption_data, out, settings=_settings(steerable_base), progress=False, **MEMORISE)


def test_loss_falls_and_every_training_caption_is_memorised(trained: FinetuneReport, caption_data: Path) -> None:
    metrics = json.loads(trained.metrics_path.read_text())
    losses = [s["loss"] for s in metrics["steps"]]
    assert [s["step"] for s in metrics["steps"]] == list(range(1, MEMORISE["max_steps"] + 1))
    assert trained.first_loss == losses[0]
    assert trained.final_loss is not None and trained.final_loss <= losses[0] / 2
    assert min(losses[-10:]) < 0.1 * losses[0]
    lrs = [s["lr"] for s in metrics["steps"]]
    # The rate each step applied: linear warm-up from 0 over 5 steps, the peak at step 6, then cosine decay to 0.
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(0.8e-2) and lrs[5] == pytest.approx(1e-2)
    assert 0.0 < lrs[-1] < 1e-5 and lrs[60] < lrs[10]
    assert trained.steps == MEMORISE["max_steps"] and trained.train_examples == 6 and trained.skipped == []
    # The default trainable set is tiny next to the whole model: Q-Former + query tokens + projection.
    assert trained.trainable_params < trained.total_params / 2

    with Blip2Service(_settings(trained.out_dir)) as service:
        got = [service.caption(str(caption_data / "img" / f"{i}.png")).caption for i in range(len(CAPTIONS))]
    assert got == list(CAPTIONS)


def test_frozen_weights_are_bit_identical(trained: FinetuneReport, steerable_base: Path) -> None:
    import torch
    from transformers import Blip2ForConditionalGeneration

    before = dict(Blip2ForConditionalGeneration.from_pretrained(steerable_base).named_parameters())
    after = dict(Blip2ForConditionalGeneration.from_pretrained(trained.out_dir).named_parameters())
    assert before.keys() == after.keys()
    vision = [n for n in before if n.startswith("vision_model.")]
    assert vision
    assert all(torch.equal(before[n], after[n]) for n in vision)
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("language_model."))
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert any(n.startswith("qformer.") for n in changed)
    assert "query_tokens" in changed and "language_projection.weight" in changed


def test_trainer_keeps_vision_frozen_in_eval_mode(tiny_checkpoint: Path, caption_data: Path, tmp_path: Path) -> None:
    import torch

    from blip_tools.finetune.config import FinetuneConfig
    from blip_tools.finetune.data import IssueLog, read_examples
    from blip_tools.finetune.trainer import Trainer

    log = IssueLog("stop")
    ds = read_examples(caption_data, _settings("x"), log)
    trainer = Trainer(
        model_name=str(tiny_checkpoint / "captioner"),
        out_dir=tmp_path / "out",
        config=FinetuneConfig(max_steps=3, batch_size=3, lr=1e-2, progress=False, cache_features=False),
        settings=_settings(tiny_checkpoint / "captioner"),
        train=ds.examples,
        val=[],
        log=log,
        data_file=ds.file,
    )
    seen: list[tuple[bool, bool]] = []

    def check(info: StepInfo) -> None:
        vision = trainer.model.vision_model
        seen.append((vision.training, any(p.requires_grad or p.grad is not None for p in vision.parameters())))

    trainer.on_step = check
    trainer.run()
    original = {n: p.clone() for n, p in _load(tiny_checkpoint / "captioner").vision_model.named_parameters()}
    assert seen == [(False, False)] * 3  # eval mode, no gradients, every step (features not cached here)
    current = dict(trainer.model.vision_model.named_parameters())
    assert all(torch.equal(original[n], current[n]) for n in original)
    assert trainer.model.qformer.training  # the trained part is in train mode


def _load(path: Path) -> Any:
    from transformers import Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration.from_pretrained(path)


def test_vqa_labels_mask_image_prompt_and_padding(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from blip_tools.finetune.config import FinetuneConfig
    from blip_tools.finetune.data import IssueLog, read_examples
    from blip_tools.finetune.trainer import Trainer

    write_image(tmp_path / "q.png", 9)
    (tmp_path / "vqa.jsonl").write_text(
        json.dumps({"image": "q.png", "question": "what color is the dog?", "answer": "red"})
        + "\n"
        + json.dumps({"image": "q.png", "caption": "a red dog on the grass"})
        + "\n"
    )
    log = IssueLog("stop")
    ds = read_examples(tmp_path / "vqa.jsonl", _settings("x"), log)
    trainer = Trainer(
        model_name=str(tiny_checkpoint / "captioner"),
        out_dir=tmp_path / "o",
        config=FinetuneConfig(),
        settings=_settings(tiny_checkpoint / "captioner"),
        train=ds.examples,
        val=[],
        log=log,
        data_file=ds.file,
    )
    trainer._load()
    tok = trainer.processor.tokenizer
    rows = trainer._encode(ds.examples, "t")
    q = trainer.num_query
    newline = tok.encode("\n", add_special_tokens=False)
    assert trainer.end_id == newline[0] and trainer.end_id in trainer.eos_ids  # what the runtime stops at
    vqa, cap = rows
    prompt = tok("Question: what color is the dog? Answer:")["input_ids"]
    answer = tok(" red", add_special_tokens=False)["input_ids"]
    assert vqa.input_ids == [trainer.image_id] * q + prompt + answer + newline
    assert vqa.labels == [-100] * (q + len(prompt)) + answer + newline
    caption = tok("a red dog on the grass", add_special_tokens=False)["input_ids"]
    assert cap.labels == [-100] * (q + 1) + caption + newline  # image tokens and BOS masked
    ids, mask, labels = trainer._collate(rows)
    assert (labels[mask == 0] == -100).all() and ids.shape == labels.shape


def test_served_through_the_mcp_server(trained: FinetuneReport, caption_data: Path) -> None:
    pytest.importorskip("mcp_server.server")
    import anyio
    from mcp import Client

    from mcp_server.server import create_server

    async def main() -> list[str]:
        with Blip2Service(_settings(trained.out_dir)) as service:
            server = create_server(service)
            with anyio.fail_after(60):
                async with Client(server) as client:
                    out = []
                    for i in (0, 3):
                        result = await client.call_tool(
                            "caption_image", {"image": str(caption_data / "img" / f"{i}.png")}
                        )
                        assert not result.is_error, result
                        assert result.structured_content is not None
                        out.append(result.structured_content["caption"])
                    return out

    assert anyio.run(main) == [CAPTIONS[0], CAPTIONS[3]]


def test_resume_continues_the_same_run(tiny_checkpoint: Path, caption_data: Path, tmp_path: Path) -> None:
    base = tiny_checkpoint / "captioner"
    # 6 examples, batch 1 × accumulation 2 → 3 steps per epoch; checkpoint every 4 steps; 10 steps in all.
    options: dict[str, Any] = {
        "max_steps": 10,
        "batch_size": 1,
        "grad_accum": 2,
        "lr": 3e-3,
        "save_every": 4,
        "val_fraction": 0,
        "progress": False,
    }
    straight = finetune(caption_data, tmp_path / "straight", settings=_settings(base), **options)
    full = [s["loss"] for s in json.loads(straight.metrics_path.read_text())["steps"]]

    class Crash(RuntimeError):
        pass

    def crash_at_8(info: StepInfo) -> None:
        if info.step == 8:  # after the step-8 checkpoint was written
            raise Crash

    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        finetune(caption_data, out, settings=_settings(base), on_step=crash_at_8, **options)
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["step-0000004", "step-0000008"]
    with pytest.raises(InvalidInput, match="not empty"):
        finetune(caption_data, out, settings=_settings(base), **options)

    steps: list[int] = []
    report = finetune(
        caption_data, out, settings=_settings(base), resume=True, on_step=lambda i: steps.append(i.step), **options
    )
    assert report.resumed_from_step == 8 and report.steps == 10 and steps == [9, 10]
    resumed = json.loads(report.metrics_path.read_text())["steps"]
    assert [s["step"] for s in resumed] == list(range(1, 11))
    # Same data order, optimizer, schedule and RNG: the resumed losses and weights are the uninterrupted run's.
    assert [s["loss"] for s in resumed] == pytest.approx(full, rel=1e-5, abs=1e-6)
    import torch

    a, b = (dict(_load(r.out_dir).named_parameters()) for r in (straight, report))
    assert all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-7) for n in a)

    with pytest.raises(InvalidInput, match="differs"):
        finetune(caption_data, out, settings=_settings(base), resume=True, **(options | {"batch_size": 2}))


def test_bad_lines_stop_or_skip_by_line_number(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = write_caption_data(tmp_path / "data", CAPTIONS[:3])
    with (data / "captions.jsonl").open("a") as fh:
        fh.write('{"image": "img/404.png", "caption": "a dog"}\n')  # line 4: missing image
        fh.write("{not json\n")  # line 5: malformed
        fh.write('{"image": "img/0.png", "caption": ""}\n')  # line 6: empty caption
    settings = _settings(tiny_checkpoint / "captioner")

    with pytest.raises(InvalidInput) as err:
        finetune(data, tmp_path / "stop", settings=settings, max_steps=1, progress=False)
    for line in (4, 5, 6):
        assert f"captions.jsonl:{line}:" in str(err.value)
    assert not (tmp_path / "stop").exists()  # refused before training

    report = finetune(
        data, tmp_path / "skip", settings=settings, on_error="skip", max_steps=2, val_fraction=0, progress=False
    )
    assert [(s.line, s.reason.split(":")[0]) for s in report.skipped] == [
        (4, "missing image"),
        (5, "malformed line"),
        (6, "empty caption"),
    ]
    assert report.train_examples == 3
    metrics = json.loads(report.metrics_path.read_text())
    assert [s["line"] for s in metrics["report"]["skipped"]] == [4, 5, 6]


def test_validation_early_stopping_keeps_best(tiny_checkpoint: Path, caption_data: Path, tmp_path: Path) -> None:
    # min_delta is so large that no later evaluation counts as better: patience 2 stops at the third one.
    report = finetune(
        caption_data,
        tmp_path / "out",
        settings=_settings(tiny_checkpoint / "captioner"),
        epochs=50,
        batch_size=5,
        val_fraction=0.2,
        patience=2,
        min_delta=1e3,
        progress=False,
    )
    assert report.train_examples == 5 and report.val_examples == 1
    assert report.early_stopped and report.steps == 3 and report.best_step == 1
    evals = json.loads(report.metrics_path.read_text())["eval"]
    assert [e["step"] for e in evals] == [1, 2, 3] and report.best_val_loss == evals[0]["val_loss"]


def test_lora_is_merged_into_a_plain_checkpoint(tiny_checkpoint: Path, caption_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    import torch

    base = tiny_checkpoint / "captioner"
    report = finetune(
        caption_data,
        tmp_path / "lora",
        settings=_settings(base),
        lora=True,
        lora_r=4,
        max_steps=4,
        batch_size=6,
        lr=1e-2,
        val_fraction=0,
        progress=False,
    )
    assert report.lora
    before = dict(_load(base).named_parameters())
    after = dict(_load(report.out_dir).named_parameters())
    assert before.keys() == after.keys()  # merged: no adapter tensors left, loads as a plain checkpoint
    targets = [n for n in before if n.startswith("language_model.") and (".q_proj." in n or ".v_proj." in n)]
    assert targets and all(not torch.equal(before[n], after[n]) for n in targets if n.endswith("weight"))
    others = [n for n in before if n.startswith(("vision_model.", "language_model.")) and n not in targets]
    assert all(torch.equal(before[n], after[n]) for n in others)
    with Blip2Service(_settings(report.out_dir)) as service:
        assert isinstance(service.caption(str(caption_data / "img" / "0.png")).caption, str)


def test_cli_finetune(tiny_checkpoint: Path, caption_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from blip_tools.cli import main

    out = tmp_path / "cli"
    argv = ["finetune", "--data", str(caption_data), "--out", str(out), "--model", str(tiny_checkpoint / "captioner")]
    code = main([*argv, "--device", "cpu", "--max-steps", "2", "--val-fraction", "0", "--no-progress", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 2 and Path(report["out_dir"]) == out and (out / "config.json").is_file()
    assert main([*argv, "--device", "cpu", "--max-steps", "2"]) == 2  # not empty, no --resume
    assert "not empty" in capsys.readouterr().err


def test_gradient_checkpointing_and_uncached_features_change_nothing(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    options: dict[str, Any] = {"max_steps": 3, "batch_size": 3, "lr": 1e-2, "val_fraction": 0, "progress": False}
    settings = _settings(tiny_checkpoint / "captioner")
    plain = finetune(caption_data, tmp_path / "a", settings=settings, **options)
    other = finetune(
        caption_data, tmp_path / "b", settings=settings, gradient_checkpointing=True, cache_features=False, **options
    )
    losses = [[s["loss"] for s in json.loads(r.metrics_path.read_text())["steps"]] for r in (plain, other)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_resume_refuses_a_folder_that_holds_no_run(tiny_checkpoint: Path, caption_data: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "my_project"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"mine": true}')
    options: dict[str, Any] = {"max_steps": 1, "val_fraction": 0, "progress": False}
    settings = _settings(tiny_checkpoint / "captioner")
    with pytest.raises(InvalidInput, match="holds no fine-tuning run to resume"):
        finetune(caption_data, foreign, settings=settings, resume=True, **options)
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json"]
    assert (foreign / "config.json").read_text() == '{"mine": true}'
    # Our own folders may be resumed: a finished run (metrics.json, no checkpoint) and a run stopped before
    # its first checkpoint completed (only checkpoints/ with a temporary folder).
    done = finetune(caption_data, tmp_path / "done", settings=settings, **options)
    assert finetune(caption_data, done.out_dir, settings=settings, resume=True, **options).steps == 1
    early = tmp_path / "early"
    (early / "checkpoints" / "step-0000001.tmp").mkdir(parents=True)
    assert finetune(caption_data, early, settings=settings, resume=True, **options).resumed_from_step is None


def test_damaged_checkpoint_names_itself_and_says_delete_it(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    options: dict[str, Any] = {"max_steps": 3, "save_every": 1, "val_fraction": 0, "progress": False}
    settings = _settings(tiny_checkpoint / "captioner")

    class Crash(RuntimeError):
        pass

    def stop_at_2(info: StepInfo) -> None:
        if info.step == 2:
            raise Crash

    out = tmp_path / "run"
    with pytest.raises(Crash):
        finetune(caption_data, out, settings=settings, on_step=stop_at_2, **options)
    last = out / "checkpoints" / "step-0000002"
    with open(last / "state.pt", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(InvalidInput, match=r"step-0000002: it is damaged or incomplete.*Delete that folder"):
        finetune(caption_data, out, settings=settings, resume=True, **options)
    import torch

    torch.save({"fingerprint": ["not", "a", "dict"]}, last / "state.pt")  # readable, but not ours
    with pytest.raises(InvalidInput, match=r"step-0000002: it is damaged or incomplete"):
        finetune(caption_data, out, settings=settings, resume=True, **options)
    import shutil

    shutil.rmtree(last)  # as the message says: the run resumes from the checkpoint before it
    assert finetune(caption_data, out, settings=settings, resume=True, **options).resumed_from_step == 1


def test_lora_targets_matching_nothing_and_unknown_devices_are_typed(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    from blip_tools import ModelNotAvailable

    settings = _settings(tiny_checkpoint / "captioner")
    options: dict[str, Any] = {"max_steps": 1, "val_fraction": 0, "progress": False}
    with pytest.raises(InvalidInput, match=r"matched no linear layer.*q_proj"):
        finetune(caption_data, tmp_path / "a", settings=settings, lora=True, lora_targets=("nothing",), **options)
    for device in ("nonsense", "cuda:99"):
        with pytest.raises(ModelNotAvailable, match="--device"):
            finetune(caption_data, tmp_path / "b", settings=settings, device=device, **options)


def test_an_output_folder_that_cannot_be_created_is_refused_before_training(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tiny_checkpoint / "captioner")
    options: dict[str, Any] = {"max_steps": 1, "val_fraction": 0, "progress": False}
    steps: list[int] = []
    (tmp_path / "a_file").write_text("")
    with pytest.raises(InvalidInput, match=r"a_file is a file, not a folder"):
        finetune(caption_data, tmp_path / "a_file" / "out", settings=settings, on_step=lambda i: steps.append(i.step))
    # A folder without write permission (faked: the tests may run as root, who may write anywhere).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(InvalidInput, match=r"is not writable"):
        finetune(caption_data, tmp_path / "new" / "out", settings=settings, on_step=lambda i: steps.append(i.step))
    assert steps == [] and not (tmp_path / "new").exists()  # refused before any training, nothing created
    monkeypatch.undo()
    assert finetune(caption_data, tmp_path / "new" / "out", settings=settings, **options).steps == 1


def test_prompts_and_lines_too_long_to_serve_are_bad_lines(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from blip_tools.runtime import MAX_PROMPT_TOKENS

    data = write_caption_data(tmp_path / "data", CAPTIONS[:1])
    with (data / "captions.jsonl").open("a") as fh:
        # line 2: a question the service would refuse (over MAX_PROMPT_TOKENS)
        fh.write(json.dumps({"image": "img/0.png", "question": "why " * MAX_PROMPT_TOKENS, "answer": "yes"}) + "\n")
        # line 3: image + prompt + caption tokens past the tiny OPT's 1024 positions (an IndexError in training)
        fh.write(json.dumps({"image": "img/0.png", "caption": "dog " * 1100}) + "\n")
    settings = _settings(tiny_checkpoint / "captioner")
    options: dict[str, Any] = {"max_steps": 1, "val_fraction": 0, "progress": False, "max_target_tokens": 2048}
    with pytest.raises(InvalidInput) as err:
        finetune(data, tmp_path / "stop", settings=settings, **options)
    assert "captions.jsonl:2: prompt too long" in str(err.value)
    assert "captions.jsonl:3: too long for the model" in str(err.value) and "1024 positions" in str(err.value)
    report = finetune(data, tmp_path / "skip", settings=settings, on_error="skip", **options)
    assert report.train_examples == 1 and [s.line for s in report.skipped] == [2, 3]


def test_a_retrieval_checkpoint_is_refused_as_a_base(tiny_checkpoint: Path, caption_data: Path, tmp_path: Path) -> None:
    from blip_tools import ModelNotAvailable

    # It loaded as a captioner with a random decoder; training on that would write a noise captioner.
    settings = _settings(tiny_checkpoint / "retrieval")
    with pytest.raises(ModelNotAvailable, match=r"no weights for its language_model.*a retrieval checkpoint"):
        finetune(caption_data, tmp_path / "out", settings=settings, max_steps=1, val_fraction=0, progress=False)
    assert not (tmp_path / "out").exists()


def test_patience_without_validation_examples_warns(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_caption_data(tmp_path / "one", CAPTIONS[:1])  # one image: none can be held out
    settings = _settings(tiny_checkpoint / "captioner")
    with caplog.at_level("WARNING", logger="blip_tools.finetune"):
        report = finetune(data, tmp_path / "out", settings=settings, max_steps=2, patience=1, progress=False)
    assert report.val_examples == 0 and report.steps == 2
    assert "patience=1 is ignored: there are no validation examples (none could be held out)" in caplog.text


def test_bad_lines_in_the_validation_data_are_reported_under_that_file(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    val = tmp_path / "val.jsonl"
    val.write_text('{"image": "missing.png", "caption": "a dog"}\n')
    settings = _settings(tiny_checkpoint / "captioner")
    with pytest.raises(InvalidInput) as info:
        finetune(caption_data, tmp_path / "out", settings=settings, val_data=str(val), max_steps=1, progress=False)
    message = str(info.value)
    assert f"the validation data {val}" in message and f"{val}:1:" in message  # not "in the data of <train file>"


def test_lora_without_peft_is_refused_before_the_data_check_and_the_model_load(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import blip_tools.finetune as ft
    from blip_tools.finetune.trainer import Trainer

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError, as without the [lora] extra
    read: list[Path] = []
    real_read = ft.read_examples

    def read_examples(data: Path, *args: Any, **kwargs: Any) -> Any:
        read.append(data)
        return real_read(data, *args, **kwargs)

    def load(self: Trainer) -> None:
        raise AssertionError("the base model was loaded before the missing peft was reported")

    monkeypatch.setattr(ft, "read_examples", read_examples)
    monkeypatch.setattr(Trainer, "_load", load)
    out = tmp_path / "out"
    options: dict[str, Any] = {"lora": True, "max_steps": 1, "val_fraction": 0, "progress": False}
    with pytest.raises(InvalidInput, match=r"needs the peft package: pip install 'blip-tools\[lora\]'"):
        finetune(caption_data, out, settings=_settings(tiny_checkpoint / "captioner"), **options)
    assert read == [] and not out.exists()  # told at once: no image decoded, no model loaded, nothing written


def test_validation_data_with_no_usable_example_is_refused(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    val = tmp_path / "val.jsonl"
    val.write_text('{"image": "missing.png", "caption": "a dog"}\n')
    out = tmp_path / "out"
    settings = _settings(tiny_checkpoint / "captioner")
    with pytest.raises(InvalidInput) as info:  # skipping its only line would silently train with no validation
        finetune(caption_data, out, settings=settings, val_data=str(val), on_error="skip", max_steps=1, progress=False)
    assert str(info.value).startswith(f"No usable validation examples in {val} (all its lines were bad and skipped)")
    assert not out.exists()
    val.write_text("")
    with pytest.raises(InvalidInput, match=f"No usable validation examples in {val}: fix that file"):
        finetune(caption_data, out, settings=settings, val_data=str(val), max_steps=1, progress=False)
    long = {"image": str(caption_data / "img" / "0.png"), "caption": "a dog " * 50}  # found once tokenized
    val.write_text(json.dumps(long) + "\n")
    with pytest.raises(InvalidInput, match=f"No usable validation examples in {val}: every one was skipped as too"):
        finetune(caption_data, out, settings=settings, val_data=str(val), on_error="skip", max_steps=1, progress=False)


def test_resume_with_nothing_to_resume_warns_that_it_starts_from_step_0(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "mistyped"  # e.g. --out my_blip2 for my-blip2: a new run, not the saved one
    settings = _settings(tiny_checkpoint / "captioner")
    with caplog.at_level("WARNING", logger="blip_tools.finetune"):
        report = finetune(
            caption_data, out, settings=settings, resume=True, max_steps=1, val_fraction=0, progress=False
        )
    assert report.steps == 1 and report.resumed_from_step is None
    assert f"nothing to resume in {out} (no checkpoint, no metrics.json of a run): starting from step 0" in caplog.text


def test_running_out_of_gpu_memory_is_one_line_saying_what_to_change(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from blip_tools.finetune.trainer import Trainer

    def out_of_memory(self: Trainer, *args: Any) -> float:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "_train_step", out_of_memory)
    options: dict[str, Any] = {"max_steps": 2, "val_fraction": 0, "progress": False, "batch_size": 4}
    with pytest.raises(InvalidInput) as info:
        finetune(caption_data, tmp_path / "out", settings=_settings(tiny_checkpoint / "captioner"), **options)
    message = str(info.value)
    assert message.startswith(
        "Out of memory on cpu during training step 1 with batch size 4 (CUDA out of memory. Tried to allocate 2.00 "
        "GiB)."
    )
    assert "--gradient-checkpointing" in message and "--grad-accum" in message and "\n" not in message


def test_a_base_model_path_that_does_not_exist_is_refused_before_the_data_check(
    caption_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import blip_tools.finetune as ft
    from blip_tools import ModelNotAvailable

    def read_examples(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("every image was checked before the missing base model was reported")

    monkeypatch.setattr(ft, "read_examples", read_examples)
    missing = tmp_path / "modles" / "blip2-ft"  # a typo: minutes of image checks on a large data set, then this
    with pytest.raises(ModelNotAvailable, match=f"The base model folder {missing} does not exist: point --model"):
        finetune(caption_data, tmp_path / "out", settings=_settings(missing), max_steps=1, progress=False)
    assert not (tmp_path / "out").exists()
