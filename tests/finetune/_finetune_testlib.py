"""Helpers for the fine-tuning tests (imported by name, like tests/mcp/_mcp_testlib.py, to avoid conftest clashes).

The shared tiny checkpoint's OPT is random: its near-uniform output head bounds every logit (the loss cannot fall
below ~ln(vocab)), and nothing it does depends much on the image tokens, so no choice of Q-Former weights can
make it say a given caption. A real BLIP-2 freezes a *pretrained* LLM that reads its soft prompt. To stand in
for one, `pretrain_copy_lm` first trains the tiny OPT alone on a copy task (token embeddings placed in the image
slots → the same tokens as text, then the newline), then saves the whole BLIP-2 with `save_pretrained`. The
fine-tuning tests then train only the default set (Q-Former, query tokens, projection) with the OPT and the
vision encoder frozen — exactly the real setting.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Captions of the memorisation test: corpus words, each at most 7 tokens (the 8 image slots hold them + "\n").
CAPTIONS = (
    "a red dog on the grass",
    "two cat sitting on a bed",
    "a man riding a horse",
    "a blue car in the city",
    "a bird flying in the sky",
    "people walking on the beach",
)


def pretrain_copy_lm(src: Path, dst: Path, *, words: tuple[str, ...], max_steps: int = 1500, seed: int = 1) -> dict:
    """Train the OPT of the BLIP-2 at `src` (alone) to copy the tokens in its image slots; save all to `dst`.

    The copy ability appears suddenly (a phase change) at a seed-dependent step, so training stops once the mean
    loss of the last 20 steps is below 0.05. CPU float32 with one thread is deterministic for a given seed.
    """
    import torch
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(src)
    processor = AutoProcessor.from_pretrained(src)
    tok = processor.tokenizer
    q = int(model.config.num_query_tokens)
    newline = tok.encode("\n", add_special_tokens=False)[0]
    bos, pad = tok.bos_token_id, tok.pad_token_id
    vocab = sorted({i for w in words for t in (w, " " + w) for i in tok(t, add_special_tokens=False)["input_ids"]})
    vocab_t = torch.tensor(vocab)
    lm = model.language_model
    embed = lm.get_input_embeddings()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2, weight_decay=0.0)
    pos = torch.arange(q).unsqueeze(0)
    batch = 32
    recent: list[float] = []
    step = 0
    while step < max_steps:
        step += 1
        lengths = torch.randint(1, q, (batch, 1), generator=gen)
        toks = vocab_t[torch.randint(0, len(vocab), (batch, q), generator=gen)]
        # Slots: the tokens, then the newline, then padding; the text after BOS repeats them.
        slots = torch.where(pos < lengths, toks, torch.where(pos == lengths, newline, pad))
        ids = torch.cat([torch.full((batch, q), pad), torch.full((batch, 1), bos), slots], dim=1)
        labels = torch.cat([torch.full((batch, q + 1), -100), torch.where(slots == pad, -100, slots)], dim=1)
        mask = (ids != pad).long()
        mask[:, :q] = 1
        inputs = embed(ids).clone()
        inputs[:, :q] = embed(slots)
        logits = lm(inputs_embeds=inputs, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        recent = [*recent[-19:], loss.item()]
        if len(recent) == 20 and sum(recent) / 20 < 0.05:
            break
    model.save_pretrained(dst)
    processor.save_pretrained(dst)
    return {"steps": step, "loss": sum(recent) / len(recent)}


def write_image(path: Path, seed: int) -> Path:
    """A distinct random RGB PNG (48×40)."""
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path)
    return path


def write_caption_data(folder: Path, captions: tuple[str, ...] = CAPTIONS) -> Path:
    """`folder/captions.jsonl` pairing distinct images `folder/img/i.png` with `captions`; returns the folder."""
    lines = []
    for i, caption in enumerate(captions):
        write_image(folder / "img" / f"{i}.png", 300 + i)
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder
