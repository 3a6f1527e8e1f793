"""Benchmark model sizes built offline: `tiny` (CI), `small` (compute-visible on CPU) and `real`.

`real` is the blip2-opt-2.7b architecture with random weights (3.7 B parameters, ~15 GB on disk in float32),
built from the published dimensions since nothing can be downloaded. Every size is saved with
`save_pretrained` once (under `~/.cache/blip-tools/bench/`) and loads through the normal `from_pretrained` path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SIZES = ("tiny", "small", "real")

#: blip2-opt-2.7b: ViT-g/14 at 224 px, a 12-layer Q-Former with 32 queries, OPT-2.7b.
REAL_VISION = {
    "hidden_size": 1408,
    "intermediate_size": 6144,
    "num_hidden_layers": 39,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    # The default 1e-10 would give near-zero (denormal) activations: slow on CPU and unlike real weights.
    "initializer_range": 0.02,
}
REAL_QFORMER = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "cross_attention_frequency": 2,
    "encoder_hidden_size": 1408,
    "vocab_size": 30522,
}
REAL_TEXT = {
    "model_type": "opt",
    "hidden_size": 2560,
    "ffn_dim": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 50272,
    "max_position_embeddings": 2048,
    "word_embed_proj_dim": 2560,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 2,
    "dropout": 0.0,
    "tie_word_embeddings": True,
}
REAL_QUERIES = 32

SMALL_VISION = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 96,
    "patch_size": 16,
    "initializer_range": 0.02,
}
SMALL_QFORMER = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "cross_attention_frequency": 1,
    "encoder_hidden_size": 256,
    "vocab_size": 64,
}
SMALL_TEXT = {
    "model_type": "opt",
    "hidden_size": 512,
    "ffn_dim": 2048,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "max_position_embeddings": 512,
    "word_embed_proj_dim": 512,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 2,
    "dropout": 0.0,
    "tie_word_embeddings": False,
}
SMALL_QUERIES = 16


def bench_root() -> Path:
    """Where benchmark checkpoints are kept between runs."""
    return Path.home() / ".cache" / "blip-tools" / "bench"


def checkpoint(size: str, root: Path | None = None) -> Path:
    """The checkpoint root (with `captioner/` and `retrieval/`) for a size, built on first use."""
    from blip_tools.testing import build_tiny_checkpoint

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    root = root or bench_root()
    tiny = root / "tiny"
    if not (tiny / "captioner" / "config.json").exists():
        build_tiny_checkpoint(tiny)
    if size == "tiny":
        return tiny
    target = root / size
    if not (target / "captioner" / "config.json").exists():
        logger.info("building the %s benchmark checkpoint in %s (once)", size, target)
        _build_scaled(tiny, target, size)
    return target


def blip2_config(size: str, image_token_index: int, vocab_size: int) -> Any:
    """A `Blip2Config` for `small` or `real` (the text vocabulary at least covers the tokenizer)."""
    from transformers import Blip2Config

    vision, qformer, text, queries = (
        (REAL_VISION, REAL_QFORMER, REAL_TEXT, REAL_QUERIES)
        if size == "real"
        else (SMALL_VISION, SMALL_QFORMER, dict(SMALL_TEXT, vocab_size=vocab_size), SMALL_QUERIES)
    )
    return Blip2Config(
        vision_config=dict(vision),
        qformer_config=dict(qformer),
        text_config=dict(text),
        num_query_tokens=queries,
        image_token_index=image_token_index,
    )


def scaled_processor(tiny: Path, size: str) -> Any:
    """The tiny tokenizer with this size's image resolution and number of query tokens."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny / "captioner")
    side = (REAL_VISION if size == "real" else SMALL_VISION)["image_size"]
    processor.image_processor.size = {"height": side, "width": side}
    processor.num_query_tokens = REAL_QUERIES if size == "real" else SMALL_QUERIES
    return processor


def _build_scaled(tiny: Path, target: Path, size: str) -> None:
    import shutil

    import torch
    from transformers import Blip2ForConditionalGeneration

    processor = scaled_processor(tiny, size)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = blip2_config(size, image_id, max(len(processor.tokenizer), image_id + 1))
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(target / "captioner")
    processor.save_pretrained(target / "captioner")
    del model
    # Captioning benchmarks never load the retrieval model; keep the tiny one so settings stay valid.
    shutil.copytree(tiny / "retrieval", target / "retrieval", dirs_exist_ok=True)


def settings_for(size: str, root: Path | None = None, **overrides: Any) -> Any:
    """`BlipSettings` on a benchmark checkpoint, CPU float32 unless overridden."""
    from blip_tools.settings import BlipSettings
    from blip_tools.testing import tiny_settings_kwargs

    kw: dict[str, Any] = tiny_settings_kwargs(checkpoint(size, root))
    kw.update(overrides)
    return BlipSettings(**kw)


def image_side(size: str) -> int:
    """Side of the generated test images (about the model's input resolution)."""
    return {"tiny": 48, "small": 96, "real": 224}[size]


def make_images(count: int, size: str, seed: int = 0) -> list[Any]:
    """Distinct random RGB images (distinct pixel hashes, so caches never hit by accident)."""
    import numpy as np
    from PIL import Image

    side = image_side(size)
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB") for _ in range(count)]
