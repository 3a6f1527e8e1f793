"""Fast paths on the tiny checkpoint: the image-prefix KV cache, the feature cache, int8 and static-cache options.

Every fast path must leave greedy float32 output unchanged, token for token (int8 excepted: it is documented
to drift, so it is only checked to run and to quantize).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from blip_tools import Blip2Service, BlipSettings

QUESTIONS = [
    "what?",
    "what color is the car?",
    "how many people are sitting at the table next to the big tree?",
    "is there a dog?",
]


def _service(settings: BlipSettings, **overrides: Any) -> Blip2Service:
    return Blip2Service(settings.model_copy(update={"max_wait_ms": 200.0, **overrides})).start()


def _workload(svc: Blip2Service, images: list[Any]) -> list[Any]:
    """Captions (batched), many questions about one image, mixed pairs, beams, sampling, a prompt."""
    return [
        [r.caption for r in svc.caption_batch(images, max_new_tokens=12)],  # type: ignore[union-attr]
        [r.answer for r in svc.answer_batch([images[0]] * 4, QUESTIONS, max_new_tokens=8)],  # type: ignore[union-attr]
        [r.answer for r in svc.answer_batch(images[:4], QUESTIONS, max_new_tokens=8)],  # type: ignore[union-attr]
        [svc.answer(images[1], q, max_new_tokens=8).answer for q in QUESTIONS],
        [c.text for c in svc.caption(images[2], num_beams=3, num_return_sequences=2, max_new_tokens=8).captions],
        [
            c.text
            for c in svc.caption(images[2], do_sample=True, seed=3, num_return_sequences=3, max_new_tokens=8).captions
        ],
        svc.caption(images[3], prompt="a photo of", max_new_tokens=8, repetition_penalty=1.3).caption,
    ]


@pytest.fixture
def images(make_image: Callable[..., Any]) -> list[Any]:
    return [make_image(200 + i, size=(40, 36 + i)) for i in range(6)]


def test_prefix_cache_keeps_greedy_output_identical(settings: BlipSettings, images: list[Any]) -> None:
    with _service(settings, prefix_cache_size=0, feature_cache_size=0) as plain:
        expected = _workload(plain, images)
        assert plain.stats().prefix_cache_hits == 0
    with _service(settings) as fast:
        got = _workload(fast, images)
        stats = fast.stats()
    assert got == expected
    # Rows of later calls about already-seen images reuse both caches.
    assert stats.prefix_cache_hits >= 10
    assert stats.cache_hits >= 10
    assert len({tuple(x) if isinstance(x, list) else x for x in expected}) > 1


def test_second_question_hits_both_caches(settings: BlipSettings, make_image: Callable[..., Any]) -> None:
    image = make_image(300)
    with _service(settings) as svc:
        first = svc.answer(image, "what color is the car?", max_new_tokens=6)
        before = svc.stats()
        second = svc.answer(image, "is there a dog?", max_new_tokens=6)
        after = svc.stats()
        again = svc.answer(image, "what color is the car?", max_new_tokens=6)
    assert after.prefix_cache_hits == before.prefix_cache_hits + 1
    assert after.prefix_cache_misses == before.prefix_cache_misses  # found, not computed again
    assert before.prefix_cache_misses >= 1  # the first question computed it
    assert after.cache_hits == before.cache_hits + 1
    assert again.answer == first.answer and again.answers[0].mean_logprob == pytest.approx(
        first.answers[0].mean_logprob, abs=1e-5
    )
    assert isinstance(second.answer, str)


def test_cached_prefix_is_never_mutated(settings: BlipSettings, make_image: Callable[..., Any]) -> None:
    import torch

    image = make_image(301)
    with _service(settings) as svc:
        svc.caption(image, max_new_tokens=10)
        rt = svc.runtime
        (key,) = list(rt.prefix_cache._data)
        snapshot = [(k.clone(), v.clone()) for k, v in rt.prefix_cache._data[key]]
        for q in QUESTIONS:
            svc.answer(image, q, max_new_tokens=10, num_beams=2)
        assert all(
            torch.equal(k, k0) and torch.equal(v, v0)
            for (k, v), (k0, v0) in zip(rt.prefix_cache._data[key], snapshot, strict=True)
        )


def test_prefix_cache_is_bounded(settings: BlipSettings, make_image: Callable[..., Any]) -> None:
    with _service(settings, prefix_cache_size=2, feature_cache_size=3) as svc:
        svc.caption_batch([make_image(400 + i) for i in range(5)], max_new_tokens=4)
        assert len(svc.runtime.prefix_cache._data) == 2
        assert len(svc.runtime.feature_cache._data) == 3


def test_cached_features_hold_only_their_own_image(settings: BlipSettings, make_image: Callable[..., Any]) -> None:
    """A cache entry is one image's features, not a view that keeps its whole batch's output alive."""
    with _service(settings, feature_cache_size=8, max_batch_size=8) as svc:
        svc.caption_batch([make_image(500 + i) for i in range(6)], max_new_tokens=2)
        svc.embed_images([make_image(600 + i) for i in range(6)])
        for cache in (svc.runtime.feature_cache, svc.runtime.retrieval_cache):
            assert len(cache._data) == 6
            for value in cache._data.values():
                assert value.untyped_storage().nbytes() == value.numel() * value.element_size()


def test_static_cache_option_matches_dynamic(settings: BlipSettings, images: list[Any]) -> None:
    with _service(settings, prefix_cache_size=0) as plain:
        expected = [r.caption for r in plain.caption_batch(images[:3], max_new_tokens=8)]  # type: ignore[union-attr]
    with _service(settings, static_cache=True) as static:
        got = [r.caption for r in static.caption_batch(images[:3], max_new_tokens=8)]  # type: ignore[union-attr]
        assert static.runtime.prefix_cache.capacity == 0
    assert got == expected


def test_int8_quantization_runs_and_quantizes_the_language_model(settings: BlipSettings, images: list[Any]) -> None:
    import torch

    with _service(settings, quantize="int8") as svc:
        lm = svc.runtime.load_captioner().model.language_model
        linear_types = {type(m).__module__ for m in lm.modules() if "Linear" in type(m).__name__}
        assert any("quantized" in t for t in linear_types), linear_types
        assert not any(type(m) is torch.nn.Linear for m in lm.modules())
        results = svc.caption_batch(images[:3], max_new_tokens=8)
    for r in results:
        assert -50.0 < r.captions[0].mean_logprob <= 0.0  # type: ignore[union-attr]


@pytest.mark.parametrize("allowed", [False, True])
def test_loading_on_cuda_sets_pytorchs_cudnn_attention_switch_from_the_setting(
    settings: BlipSettings, allowed: bool
) -> None:
    """`cudnn_attention` reaches PyTorch's process-wide SDPA switch when a model is placed on a GPU.

    No GPU here: the placement is forced to cuda, so the move fails (ModelNotAvailable) after the switch is set.
    """
    import torch

    from blip_tools.errors import ModelNotAvailable
    from blip_tools.runtime import Blip2Runtime

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(not allowed)
    try:
        rt = Blip2Runtime(settings.model_copy(update={"cudnn_attention": allowed}))
        rt.__dict__["_placement"] = ("cuda", torch.float32, None)
        with pytest.raises(ModelNotAvailable, match="could not move it to cuda"):
            rt.load_captioner()
        assert torch.backends.cuda.cudnn_sdp_enabled() is allowed
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_loading_on_cpu_leaves_the_cudnn_attention_switch_alone(settings: BlipSettings) -> None:
    import torch

    from blip_tools.runtime import Blip2Runtime

    before = torch.backends.cuda.cudnn_sdp_enabled()
    Blip2Runtime(settings.model_copy(update={"cudnn_attention": not before})).load_captioner()
    assert torch.backends.cuda.cudnn_sdp_enabled() is before
