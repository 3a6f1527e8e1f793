"""`BLIP_CUDA_GRAPHS`' decoding loop (`blip_tools.decode`) against transformers' `generate()` on the tiny model.

On CPU the loop runs its step without graphs, so everything but the capture itself is checked here: the same
texts as `generate()` (float32 greedy is deterministic; seeded sampling draws the same tokens), log-probabilities
to float rounding, buffers that grow and are reused, padded bucket rows, early stops, fallbacks to `generate()`,
and a step that traces as one graph (no host sync, no data-dependent Python), which CUDA graph capture needs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blip_tools.params import GenerationParams
from blip_tools.runtime import Blip2Runtime, GenerationItem
from blip_tools.settings import BlipSettings

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Question: what is it? Answer:", "a photo of", "Question: which colour is the large thing here? Answer:"]


@pytest.fixture(scope="module")
def runtimes(settings: BlipSettings) -> Iterator[dict[bool, Blip2Runtime]]:
    """Two runtimes on the tiny checkpoint: `generate()` (False) and the graph decoding loop (True)."""
    yield {
        flag: Blip2Runtime(settings.model_copy(update={"cuda_graphs": flag, "feature_cache_size": 0}))
        for flag in (False, True)
    }


def _items(rt: Blip2Runtime, make_image: Callable[..., Any], prompts: list[str | None]) -> list[GenerationItem]:
    return [
        GenerationItem(rt.preprocess(make_image(300 + i), f"img{i}"), rt.encode_prompt(p))
        for i, p in enumerate(prompts)
    ]


def _texts(results: list[Any]) -> list[list[str]]:
    return [[g.text for g in group] for group in results]


def _compare(
    runtimes: dict[bool, Blip2Runtime],
    make_image: Callable[..., Any],
    prompts: list[str | None],
    params: GenerationParams,
) -> None:
    """Both runtimes give the same texts (and log-probabilities to rounding); the loop really decoded."""
    decoder_before = runtimes[True]._decoder.batches if runtimes[True]._decoder else 0
    want = runtimes[False].generate(_items(runtimes[False], make_image, prompts), params)
    got = runtimes[True].generate(_items(runtimes[True], make_image, prompts), params)
    assert _texts(got) == _texts(want)
    for g_group, w_group in zip(got, want, strict=True):
        assert not isinstance(g_group, BaseException) and not isinstance(w_group, BaseException)
        for g, w in zip(g_group, w_group, strict=True):
            assert g.mean_logprob == pytest.approx(w.mean_logprob, abs=1e-4)
    decoder = runtimes[True]._decoder
    assert decoder is not None and decoder.batches == decoder_before + 1


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(max_new_tokens=12),
        GenerationParams(max_new_tokens=10, min_new_tokens=10, repetition_penalty=1.6),
        GenerationParams(do_sample=True, seed=7, num_return_sequences=3, temperature=0.7, top_p=0.9),
        GenerationParams(do_sample=True, seed=11, top_k=5, max_new_tokens=8),
    ],
    ids=["greedy", "min-tokens+repetition-penalty", "sampled-3-per-image", "top-k"],
)
@pytest.mark.parametrize(
    "prompts",
    [[None, None, None], [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[1]], [None, PROMPTS[2]]],
    ids=["captions-3-rows-in-a-bucket-of-4", "prompts-with-prefix-cache-5-rows", "mixed-no-prefix"],
)
def test_loop_gives_what_generate_gives(
    runtimes: dict[bool, Blip2Runtime],
    make_image: Callable[..., Any],
    params: GenerationParams,
    prompts: list[str | None],
) -> None:
    _compare(runtimes, make_image, prompts, params)


def test_without_the_prefix_cache(settings: BlipSettings, make_image: Callable[..., Any]) -> None:
    """Prompts left-padded in the middle of the row (`[pad][image][prompt]`), as with the prefix cache off."""
    off = {"prefix_cache_size": 0, "feature_cache_size": 0}
    runtimes = {flag: Blip2Runtime(settings.model_copy(update={**off, "cuda_graphs": flag})) for flag in (False, True)}
    _compare(runtimes, make_image, [PROMPTS[2], PROMPTS[1], None], GenerationParams(max_new_tokens=9))


def test_buffers_grow_and_are_reused(runtimes: dict[bool, Blip2Runtime], make_image: Callable[..., Any]) -> None:
    """Buffers grow to cover a batch (rows to a power of two, cache slots to a power of two >= 64), are reused by
    batches they cover, and never hold most-rows-ever x longest-cache-ever beyond twice what a batch needs."""

    def size() -> tuple[int, int]:
        decoder = runtimes[True]._decoder
        assert decoder is not None and decoder._buffers is not None
        return decoder._buffers.rows, decoder._buffers.length

    runtimes[True].empty_cache()  # start from no buffers, whatever ran before
    _compare(runtimes, make_image, [None], GenerationParams(max_new_tokens=5))
    assert size() == (1, 64)
    _compare(runtimes, make_image, [None] * 9, GenerationParams(max_new_tokens=5))
    assert size() == (16, 64)
    _compare(runtimes, make_image, [None] * 3, GenerationParams(max_new_tokens=5))
    assert size() == (16, 64)  # covered: reused
    # Two long rows: 16 x 128 would be 8x what they need, so the buffers take their size.
    _compare(runtimes, make_image, [PROMPTS[0]] * 2, GenerationParams(max_new_tokens=100, min_new_tokens=100))
    assert size() == (2, 128)
    _compare(runtimes, make_image, [PROMPTS[1]], GenerationParams(max_new_tokens=6))
    assert size() == (2, 128)
    # Three short rows need 4 x 64; growing to 4 x 128 stays within twice that, so it grows.
    _compare(runtimes, make_image, [None] * 3, GenerationParams(max_new_tokens=6))
    assert size() == (4, 128)

    runtimes[True].empty_cache()  # after an out-of-memory error: the buffers go, the next batch rebuilds them
    assert runtimes[True]._decoder is not None and runtimes[True]._decoder._buffers is None
    _compare(runtimes, make_image, [None, None], GenerationParams(max_new_tokens=4))


def test_rows_that_end_are_padded_and_the_loop_stops(
    runtimes: dict[bool, Blip2Runtime], make_image: Callable[..., Any]
) -> None:
    """With end tokens the rows reach at different steps, each row is padded after its own, as `generate()` pads."""
    import torch

    rt = runtimes[True]
    cap = rt.load_captioner()
    lm = cap.model.language_model
    pad = cap.extra["pad_id"]
    items = _items(rt, make_image, [None, None])
    decoder = rt._graph_decoder(GenerationParams())
    assert decoder is not None
    with torch.inference_mode():
        input_ids, attention = rt._layout(
            items, cap.model.config.num_query_tokens, cap.extra["image_id"], pad, image_first=False
        )
        embeds = cap.model.get_input_embeddings()(input_ids)
        feats = rt._lm_features([it.image for it in items]).to(embeds.dtype)
        embeds = embeds.masked_scatter((input_ids == cap.extra["image_id"]).unsqueeze(-1), feats)
        params = GenerationParams(max_new_tokens=12)
        inputs = {"embeds": embeds, "attention": attention, "input_ids": input_ids, "past": None, "pad_id": pad}
        plain, _ = decoder.run(params, eos_ids=cap.extra["eos_ids"], **inputs)
        # Make the 3rd token of row 0 and the 6th of row 1 end tokens (greedy reaches them at those steps).
        ends = sorted({int(plain[0, 2]), int(plain[1, 5])})
        tokens, logprobs = decoder.run(params, eos_ids=ends, **inputs)
        want = lm.generate(
            inputs_embeds=embeds,
            attention_mask=attention,
            input_ids=input_ids,
            eos_token_id=ends,
            pad_token_id=pad,
            max_new_tokens=12,
            do_sample=False,
        )[:, input_ids.shape[1] :]
    # The loop checks for the end every few steps, so it may have run a step or two longer: only padding there.
    assert tokens.shape[1] < 12 and tokens.shape[1] >= want.shape[1]
    assert torch.equal(tokens[:, : want.shape[1]], want)
    assert bool((tokens[:, want.shape[1] :] == pad).all())
    assert logprobs.shape == tokens.shape


def test_beam_search_and_unknown_generation_options_keep_generate(
    settings: BlipSettings, make_image: Callable[..., Any]
) -> None:
    rt = Blip2Runtime(settings.model_copy(update={"cuda_graphs": True}))
    beams = GenerationParams(num_beams=3, num_return_sequences=2, max_new_tokens=6)
    assert rt._graph_decoder(beams) is None
    decoder = rt._decoder
    assert decoder is not None and decoder.unsupported(beams) == "beam search"
    results = rt.generate(_items(rt, make_image, [None, None]), beams)
    assert all(isinstance(r, list) and len(r) == 2 for r in results) and decoder.batches == 0

    # A checkpoint whose generation config asks for a processor the loop does not apply keeps generate().
    other = Blip2Runtime(settings.model_copy(update={"cuda_graphs": True}))
    other.load_captioner().model.language_model.generation_config.no_repeat_ngram_size = 2
    assert other._graph_decoder(GenerationParams()) is None
    assert other._decoder is not None
    assert "no_repeat_ngram_size" in (other._decoder.unsupported(GenerationParams()) or "")


@pytest.mark.parametrize(
    ("layer_norm_before", "projected"), [(True, False), (False, True)], ids=["opt-2.7b-style", "opt-350m-style"]
)
def test_other_opt_layouts(tiny_checkpoint: Path, layer_norm_before: bool, projected: bool) -> None:
    """The step's other OPT branches (layer norm after each block, word-embedding projections) match too."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from blip_tools.decode import GraphDecoder

    config = Blip2Config.from_pretrained(tiny_checkpoint / "captioner")
    config.text_config.do_layer_norm_before = layer_norm_before
    config.text_config.word_embed_proj_dim = 16 if projected else config.text_config.hidden_size
    torch.manual_seed(3)
    model = Blip2ForConditionalGeneration(config).eval()
    lm = model.language_model
    dec = lm.get_decoder()
    assert (dec.project_in is not None) is projected and (dec.final_layer_norm is not None) is layer_norm_before

    rows, width = 3, 7
    input_ids = torch.randint(3, 100, (rows, width))
    attention = torch.ones(rows, width, dtype=torch.long)
    attention[1, :3] = 0  # left padding
    input_ids[1, :3] = 1
    params = GenerationParams(max_new_tokens=9, min_new_tokens=9)
    with torch.inference_mode():
        embeds = dec.embed_tokens(input_ids)
        want = lm.generate(
            inputs_embeds=embeds,
            attention_mask=attention,
            input_ids=input_ids,
            eos_token_id=[2],
            pad_token_id=1,
            max_new_tokens=9,
            min_new_tokens=9,
            do_sample=False,
        )[:, width:]
        got, _ = GraphDecoder(model, "cpu").run(
            params, embeds=embeds, attention=attention, input_ids=input_ids, past=None, eos_ids=[2], pad_id=1
        )
    assert torch.equal(got, want)


def test_step_reads_nothing_back_to_the_host(runtimes: dict[bool, Blip2Runtime]) -> None:
    """CUDA graph capture fails on a host sync (`.item()`, a branch on a tensor, a data-dependent shape, `.cpu()`).

    On the meta device (shapes, no data) every one of those raises, so a step that runs there has none.
    """
    import copy

    import torch

    from blip_tools.decode import GraphDecoder

    for sync in (
        lambda x: x.sum().item(),
        lambda x: x if bool(x.sum() > 0) else -x,
        lambda x: x[x > 0],
        torch.Tensor.cpu,
    ):
        with pytest.raises((RuntimeError, NotImplementedError)):
            sync(torch.ones(3, device="meta"))
    model = copy.deepcopy(runtimes[True].load_captioner().model).to("meta")
    decoder = GraphDecoder(model, "meta")
    assert decoder.use_graphs is False  # graphs are for CUDA only
    b = decoder._allocate(4, 64)
    with torch.inference_mode():
        decoder._forward(b, 4, 64)
    assert b.logits.shape == (4, model.config.text_config.vocab_size) and b.logits.device.type == "meta"


def test_step_traces_as_one_graph(runtimes: dict[bool, Blip2Runtime]) -> None:
    """The step traces whole (no data-dependent Python) and the trace computes what the eager step computes."""
    import torch

    rt = runtimes[True]
    decoder = rt._graph_decoder(GenerationParams())
    assert decoder is not None
    with pytest.raises(Exception, match=r"(?i)data-dependent"):  # the check can fail
        torch.compile(lambda x: x * 2 if x.sum() > 0 else x, backend="eager", fullgraph=True)(torch.ones(3))

    results = []
    # Eager, traced, and eager over the first 64 slots of longer buffers (as after an earlier long batch).
    for traced, allocated in ((False, 64), (True, 64), (False, 128)):
        b = decoder._allocate(4, allocated)
        torch.manual_seed(0)
        for k in b.keys + b.values:
            k.fill_(1e4)  # slots past the 64 read must not matter
            k[:, :, :64] = torch.randn(k[:, :, :64].shape)
        b.ids.copy_(torch.tensor([[5], [9], [13], [2]]))
        b.pos.copy_(torch.tensor([[7], [3], [7], [0]]))
        b.valid[:, :7] = True
        b.valid[1, :4] = False
        b.slot.fill_(7)
        step = torch.compile(decoder._forward, backend="eager", fullgraph=True) if traced else decoder._forward
        with torch.inference_mode():
            step(b, 4, 64)
        results.append((b.logits.clone(), b.keys[0][:, :, 7].clone(), b.slot.clone(), b.pos.clone(), b.valid.clone()))
    for eager, traced_out, longer in zip(*results, strict=True):
        assert torch.allclose(eager, traced_out, atol=1e-5)
        assert torch.allclose(eager, longer[..., : eager.shape[-1]], atol=1e-5)
    assert int(results[0][2]) == 8 and results[0][3].flatten().tolist() == [8, 4, 8, 1]
    assert bool(results[0][4][:, 7].all())
    decoder.release()


def test_service_batches_through_the_loop(settings: BlipSettings, make_image: Callable[..., Any]) -> None:
    """Concurrent callers of a service with `cuda_graphs` get one-by-one's captions, batched through the loop."""
    from concurrent.futures import ThreadPoolExecutor

    from blip_tools import Blip2Service

    images = [make_image(400 + i) for i in range(6)]
    with Blip2Service(settings.model_copy(update={"cuda_graphs": True, "max_wait_ms": 50.0})).start() as svc:
        alone = [svc.caption(im, max_new_tokens=8).caption for im in images]
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda im: svc.caption(im, max_new_tokens=8).caption, images))
        answer = svc.answer(images[0], "what is it?", max_new_tokens=5).answer
        decoder = svc.runtime.decoder
        assert decoder is not None and decoder.batches >= 8
        stats = svc.stats()
        assert stats.graph_batches == decoder.batches and stats.graphs_captured == 0 and stats.graph_error is None
    assert together == alone
    with Blip2Service(settings).start() as plain:
        assert [plain.caption(im, max_new_tokens=8).caption for im in images] == alone
        assert plain.answer(images[0], "what is it?", max_new_tokens=5).answer == answer


def test_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIP_CUDA_GRAPHS", "true")
    assert BlipSettings().cuda_graphs is True
    monkeypatch.delenv("BLIP_CUDA_GRAPHS")
    assert BlipSettings().cuda_graphs is False


@pytest.fixture
def bench_scripts(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`benchmarks` importable, its checkpoint root holding the session's tiny checkpoint (nothing rebuilt)."""
    sys.path.insert(0, str(REPO))
    import benchmarks.sizes

    root = tmp_path / "bench-root"
    root.mkdir()
    (root / "tiny").symlink_to(tiny_checkpoint, target_is_directory=True)
    monkeypatch.setattr(benchmarks.sizes, "bench_root", lambda: root)


@pytest.mark.usefixtures("bench_scripts")
def test_gpu_check_script_runs_on_cpu(tmp_path: Path) -> None:
    """`benchmarks/gpu_check.py` (the first thing a GPU session runs) compares both paths in its smoke mode."""
    import json

    from benchmarks import gpu_check

    out = tmp_path / "out"
    assert gpu_check.main(["--device", "cpu", "--sizes", "tiny", "--batches", "3", "--out", str(out)]) == 0
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["ok"] is True and data["errors"] == []
    assert [r["params"] for r in data["rows"]] == ["greedy", "min-tokens+repetition", "sampled-2-per-image"]
    assert all(r["rows_equal"] == 3 and r["loop_batches"] > 0 and not r["graphs_used"] for r in data["rows"])


@pytest.mark.usefixtures("bench_scripts")
def test_gpu_benchmark_script_runs_on_cpu(tmp_path: Path) -> None:
    """`benchmarks/gpu_real.py` (run in GPU sessions only) still runs end to end: its smoke mode on the tiny model."""
    import json

    from benchmarks import gpu_real

    out = tmp_path / "out"
    args = ["--device", "cpu", "--size", "tiny", "--batches", "3", "--tokens", "4", "--reps", "1"]
    args += ["--options", "graphs", "default", "--service-callers", "3", "--service-rounds", "1", "--out", str(out)]
    assert gpu_real.main(args) == 0
    data = json.loads((out / "gpu_real_tiny.json").read_text())
    assert data["errors"] == []
    rows = {(r["option"], r.get("batch", "service")): r for r in data["rows"]}
    assert set(rows) == {("graphs", 3), ("default", 3), ("graphs", "service"), ("default", "service")}
    assert rows[("graphs", 3)]["graph_step_s"] > 0 and rows[("graphs", 3)]["graphs_used"] is False
    assert "graph_step_s" not in rows[("default", 3)]


class _FakeGraph:
    """Stands in for `torch.cuda.CUDAGraph` on CPU: records the step's call instead of running it, replays it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def replay(self) -> None:
        for decoder, args in self.calls:
            type(decoder)._forward(decoder, *args)  # the real step again, outside the recording


def test_capture_and_replay_protocol(
    runtimes: dict[bool, Blip2Runtime], make_image: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph path with CUDA's capture simulated: a capture records the step without running it, a replay runs
    it on the buffers it was recorded with. So the warm-up must leave the batch's state as it found it, a graph is
    captured once per batch-size bucket and reused, and graphs recorded against old buffers are never replayed."""
    import contextlib

    import torch

    from blip_tools.decode import GraphDecoder

    @contextlib.contextmanager
    def graph(g: _FakeGraph, pool: Any = None, capture_error_mode: str = "global") -> Iterator[None]:
        def record(self: GraphDecoder, *args: Any) -> None:
            g.calls.append((self, args))

        with monkeypatch.context() as m:
            m.setattr(GraphDecoder, "_forward", record)
            yield

    class _Stream:
        def wait_stream(self, other: object) -> None:
            return None

    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", _Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)

    rt = runtimes[True]
    rt.empty_cache()
    decoder = rt._graph_decoder(GenerationParams())
    assert decoder is not None
    monkeypatch.setattr(decoder, "use_graphs", True)
    captured = decoder.captured
    # A prompt that fills the 64-slot cache but for the one slot the single decoding step writes: the warm-up
    # steps before a capture must stay inside the cache and leave the batch's keys alone.
    queries = rt.load_captioner().model.config.num_query_tokens
    words = next(n for n in range(1, 64) if queries + len(rt.encode_prompt(" ".join(["a"] * n))) >= 63)
    full = " ".join(["a"] * words)
    assert queries + len(rt.encode_prompt(full)) == 63
    _compare(runtimes, make_image, [full, full, full], GenerationParams(max_new_tokens=2))
    assert decoder._buffers is not None and decoder._buffers.length == 64
    assert decoder.captured == captured + 1 and set(decoder._graphs) == {(4, 64)}
    _compare(runtimes, make_image, [None, PROMPTS[0], None], GenerationParams(max_new_tokens=12))
    _compare(runtimes, make_image, [PROMPTS[1]], GenerationParams(max_new_tokens=12))
    assert decoder.captured == captured + 2 and set(decoder._graphs) == {(1, 64), (4, 64)}
    # Longer captions need a longer cache: new buffers, so every graph is captured anew.
    _compare(runtimes, make_image, [PROMPTS[2]] * 3, GenerationParams(max_new_tokens=90, min_new_tokens=90))
    assert decoder.captured == captured + 3 and set(decoder._graphs) == {(4, 128)}
    # Short captions after it attend over 64 slots again (their own graph over the grown buffers), not 128.
    _compare(runtimes, make_image, [None, None], GenerationParams(max_new_tokens=12))
    assert decoder.captured == captured + 4 and set(decoder._graphs) == {(4, 128), (2, 64)}
    assert decoder._buffers.length == 128 and decoder.last_length == 64
    assert decoder.graph_error is None


def test_a_failed_capture_falls_back_to_the_plain_step(
    runtimes: dict[bool, Blip2Runtime], make_image: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step that cannot be captured is logged once and run without graphs; out of memory is the batch's error."""
    import torch

    rt = runtimes[True]
    rt.empty_cache()
    decoder = rt._graph_decoder(GenerationParams())
    assert decoder is not None

    def out_of_memory(buffers: Any, size: int, length: int) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(decoder, "use_graphs", True)
    monkeypatch.setattr(decoder, "_capture", out_of_memory)
    items = _items(rt, make_image, [None, None])
    with pytest.raises(torch.cuda.OutOfMemoryError):
        rt.generate(items, GenerationParams(max_new_tokens=5))
    assert decoder.use_graphs is True and decoder.graph_error is None

    def not_capturable(buffers: Any, size: int, length: int) -> Any:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decoder, "_capture", not_capturable)
    _compare(runtimes, make_image, [None, None], GenerationParams(max_new_tokens=5))
    assert decoder.use_graphs is False and "not permitted" in (decoder.graph_error or "")
    _compare(runtimes, make_image, [None, PROMPTS[0]], GenerationParams(max_new_tokens=5))
