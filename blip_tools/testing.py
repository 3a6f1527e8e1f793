"""Build a tiny, randomly initialised BLIP-2 checkpoint offline, for tests, CI and `--demo`.

It is saved with `save_pretrained` and loads through the same `from_pretrained` path as a real checkpoint:
a captioner (`Blip2ForConditionalGeneration` + `Blip2Processor`) and a retrieval model
(`Blip2ForImageTextRetrieval` with Q-Former text layers, projections and ITM head).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Words the tiny tokenizers learn; captions and questions in tests use them.
_CORPUS_WORDS = (
    "a an the photo picture image of with and on in at is are what where who how many which color "
    "dog cat man woman child person people car bus train boat plane bird horse cow sheep bear "
    "red green blue yellow black white orange purple brown gray pink small large big little "
    "sitting standing walking running flying lying eating looking holding riding playing "
    "table chair bed room kitchen street road field beach water sky tree grass snow mountain city "
    "question answer there this that it two three four one some many next to front behind "
    "square circle stripe striped pattern bright dark light shape left right top bottom center"
).split()

TINY_NUM_QUERY_TOKENS = 8
TINY_IMAGE_SIZE = 32
MARKER_FILE = "blip_tools_tiny.json"
#: Bumped when the tiny checkpoint changes, so `--demo` rebuilds an older one (2: room for the longest request;
#: 3: the retrieval config knows its `<image>` id).
TINY_VERSION = 3


def _corpus() -> list[str]:
    words = list(_CORPUS_WORDS)
    lines = [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)]
    lines += [f"Question: what is {w}? Answer: {w}" for w in words]
    lines += [w.capitalize() for w in words] + ["\n", "?", ".", ",", ":", "0 1 2 3 4 5 6 7 8 9"]
    return lines


def _opt_tokenizer(workdir: Path) -> Any:
    """A byte-level BPE trained offline, wrapped as an OPT-style GPT2Tokenizer (left padding)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(  # no progress display: the trainer writes it to stdout, which is the command's output
        _corpus(),
        vocab_size=600,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        show_progress=False,
    )
    bpe.save_model(str(workdir))
    vocab = json.loads((workdir / "vocab.json").read_text())
    merges = [
        tuple(line.split(" "))
        for line in (workdir / "merges.txt").read_text().splitlines()
        if line and not line.startswith("#version")
    ]
    return GPT2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # tuples are what the BPE model needs
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        padding_side="left",
    )


def _bert_tokenizer() -> Any:
    """A tiny WordPiece vocabulary for the retrieval model's Q-Former text side."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789?.,:'!-")
    words = sorted(set(_CORPUS_WORDS))
    # dict.fromkeys drops the repeats ("a" is a word and a char): a hole in the ids makes tokenizers < 0.23
    # print "The OrderedVocab ... contains holes" on stdout when the tokenizer is saved.
    vocab = list(dict.fromkeys(specials + words + chars + [f"##{c}" for c in chars if c.isalnum()]))
    return BertTokenizer(vocab={tok: i for i, tok in enumerate(vocab)})


def _image_processor() -> Any:
    from transformers import BlipImageProcessor

    return BlipImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        do_resize=True,
        do_normalize=True,
        do_convert_rgb=True,
    )


def _vision_config() -> dict[str, Any]:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": 8,
        # The default 1e-10 makes outputs nearly independent of the image.
        "initializer_range": 0.02,
    }


def _qformer_config(vocab_size: int, text_input: bool) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "cross_attention_frequency": 1,
        "encoder_hidden_size": 32,
        "max_position_embeddings": 128,
        "use_qformer_text_input": text_input,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def _save_quietly(model: Any, folder: Path) -> None:
    """`save_pretrained` without transformers' progress bars on stderr (a first `--demo` printed two)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_tiny_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random captioner to `path/captioner` and a retrieval model to `path/retrieval`.

    Deterministic for a given seed. Returns `path`. Both folders load with plain `from_pretrained`.
    """
    import tempfile

    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2ForImageTextRetrieval,
        Blip2Processor,
    )

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        opt_tok = _opt_tokenizer(work)
        bert_tok = _bert_tokenizer()

    # Captioner: vision -> Q-Former -> tiny OPT.
    processor = Blip2Processor(
        image_processor=_image_processor(), tokenizer=opt_tok, num_query_tokens=TINY_NUM_QUERY_TOKENS
    )
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    vocab_size = max(len(processor.tokenizer), image_token_id + 1)
    config = Blip2Config(
        vision_config=_vision_config(),
        qformer_config=_qformer_config(vocab_size=64, text_input=False),
        text_config={
            "model_type": "opt",
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            # Room for the longest request: 8 image tokens + a 256-token prompt + 256 new tokens (the default limit).
            "max_position_embeddings": 1024,
            "word_embed_proj_dim": 32,
            "pad_token_id": 1,
            "bos_token_id": 2,
            "eos_token_id": 2,
            "dropout": 0.0,
            # Tied + random weights make every caption empty.
            "tie_word_embeddings": False,
        },
        num_query_tokens=TINY_NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    cap_dir = root / "captioner"
    _save_quietly(model, cap_dir)
    processor.save_pretrained(cap_dir)

    # Retrieval: vision -> Q-Former with text layers -> projections + ITM head.
    r_processor = Blip2Processor(
        image_processor=_image_processor(), tokenizer=bert_tok, num_query_tokens=TINY_NUM_QUERY_TOKENS
    )
    r_config = Blip2Config(
        vision_config=_vision_config(),
        qformer_config=_qformer_config(vocab_size=len(r_processor.tokenizer), text_input=True),
        num_query_tokens=TINY_NUM_QUERY_TOKENS,
        image_text_hidden_size=16,
        # Its processor puts the query tokens' `<image>` placeholders before every text; the model removes them only
        # when it knows their id, so without it transformers' own `processor(images, text)` path scored wrongly.
        image_token_index=r_processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed + 1)
    r_model = Blip2ForImageTextRetrieval(r_config).eval()
    ret_dir = root / "retrieval"
    _save_quietly(r_model, ret_dir)
    r_processor.save_pretrained(ret_dir)

    marker = {"seed": seed, "kind": "blip-tools tiny checkpoint", "version": TINY_VERSION}
    (root / MARKER_FILE).write_text(json.dumps(marker) + "\n")
    logger.info("wrote tiny BLIP-2 checkpoint to %s", root)
    return root


def tiny_settings_kwargs(path: str | Path) -> dict[str, Any]:
    """Settings that point the service at a tiny checkpoint on CPU in float32."""
    root = Path(path)
    return {
        "model": str(root / "captioner"),
        "retrieval_model": str(root / "retrieval"),
        "device": "cpu",
        "dtype": "float32",
    }


def demo_checkpoint_dir() -> Path:
    """Where `--demo` keeps its tiny checkpoint (built on first use)."""
    return Path.home() / ".cache" / "blip-tools" / "tiny-checkpoint"


def ensure_demo_checkpoint() -> Path:
    """Build the demo checkpoint once and reuse it afterwards."""
    root = demo_checkpoint_dir()
    try:
        current = json.loads((root / MARKER_FILE).read_text()).get("version") == TINY_VERSION
    except (OSError, ValueError, AttributeError):
        current = False
    if not current:
        build_tiny_checkpoint(root)
    return root
