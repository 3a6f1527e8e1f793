"""`GraphDecoder`: greedy and sampled decoding of OPT with a static KV cache, each step a CUDA graph replay.

On a GPU, an eager OPT-2.7B decoding step is bound by launching its ~1,000 kernels from Python (10-22 ms at any
batch size on an H200), not by arithmetic. Here the step (embed → 32 layers → logits) writes into preallocated
buffers only, with no host sync and no shape that changes between steps, so on CUDA it is captured once per
batch-size bucket (1, 2, 4, ... rows; a batch is padded up to its bucket) and replayed. The prefill stays
transformers' own forward (it runs once per batch, and the image-prefix KV cache feeds it); its KV is copied into
the static buffers. Token choice (logits processors, sampling) runs eagerly on the chosen rows with transformers'
own processor classes, so greedy results are those of `generate()`. Elsewhere (CPU, MPS) the same step runs
without graphs, which is how the tests check it against `generate()`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .params import GenerationParams

logger = logging.getLogger(__name__)

# Keys of the language model's generation config that do not change how a token is chosen; any other non-default
# entry (no_repeat_ngram_size, forced_eos_token_id, suppress_tokens...) is a logits processor this loop does not
# apply, so batches fall back to `generate()`.
_NEUTRAL_GENERATION_KEYS = frozenset(
    {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "decoder_start_token_id",
        "max_length",
        "max_new_tokens",
        "min_new_tokens",
        "do_sample",
        "num_beams",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "num_return_sequences",
        "use_cache",
        "cache_implementation",
        "transformers_version",
        "_from_model_config",
        "output_logits",
        "output_scores",
        "output_attentions",
        "output_hidden_states",
        "return_dict_in_generate",
    }
)
_MIN_CACHE_LEN = 64
_STOP_CHECK_EVERY = 4
"""Steps between checks that every row has finished: each check waits for the device, so it is not done per step."""


def _bucket(n: int, floor: int = 1) -> int:
    """The power of two >= n (and >= floor): batches are padded to one of a few captured sizes."""
    size = floor
    while size < n:
        size *= 2
    return size


@dataclass
class _Buffers:
    """Everything a decoding step reads or writes, preallocated for `rows` rows and `length` cache positions."""

    rows: int
    length: int
    keys: list[torch.Tensor]  # per layer (rows, heads, length, head_dim)
    values: list[torch.Tensor]
    ids: torch.Tensor  # (rows, 1) the token fed in
    pos: torch.Tensor  # (rows, 1) its position id
    slot: torch.Tensor  # (1,) the cache slot it is written to (the same for every row: rows are left-padded)
    valid: torch.Tensor  # (rows, length) bool: cache slots a row attends to
    logits: torch.Tensor  # (rows, vocab) float32 out


class GraphDecoder:
    """Decodes one batch at a time for one loaded captioner (used only by the model worker thread)."""

    def __init__(self, model: Any, device: str) -> None:
        self.lm = model.language_model
        self.decoder = self.lm.get_decoder()
        self.device = device
        self.use_graphs = device.startswith("cuda")
        """Capture and replay the step (CUDA only); False elsewhere, or after a capture failed."""
        self._buffers: _Buffers | None = None
        self._graphs: dict[tuple[int, int], Any] = {}  # (rows, cache positions) -> graph
        self._pool: Any = None
        self._lock = threading.Lock()
        self.captured = 0
        """Graphs captured so far (one per batch-size bucket and cache-length bucket)."""
        self.batches = 0
        """Batches decoded by this loop."""
        self.graph_error: str | None = None
        """Why capturing a graph failed, if it did; the step then runs without graphs (still correct, slower)."""
        self._checked_config: str | None = None
        self.last_length = 0
        """Cache slots the last batch's steps attended over (its bucket)."""

    def release(self) -> None:
        """Drop the static buffers and graphs (after an out-of-memory error); the next batch rebuilds them."""
        with self._lock:
            self._buffers = None
            self._graphs.clear()
            self._pool = None

    # ------------------------------------------------------------------ eligibility
    def unsupported(self, params: GenerationParams) -> str | None:
        """Why `params` (with this model's generation config) needs `generate()` instead, or None."""
        if params.num_beams > 1:
            return "beam search"
        if self._checked_config is None:
            from transformers import GenerationConfig

            config, default = self.lm.generation_config, GenerationConfig()
            extra = sorted(
                key
                for key, value in config.to_dict().items()
                if key not in _NEUTRAL_GENERATION_KEYS and value != getattr(default, key, None)
            )
            self._checked_config = f"the model's generation config sets {', '.join(extra)}" if extra else ""
            if extra:
                logger.info("decoding with generate(): %s", self._checked_config)
        return self._checked_config or None

    # ------------------------------------------------------------------ one batch
    def run(
        self,
        params: GenerationParams,
        *,
        embeds: torch.Tensor,
        attention: torch.Tensor,
        input_ids: torch.Tensor,
        past: Any,
        eos_ids: Sequence[int],
        pad_id: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New tokens (rows, steps) and each token's log-probability under the model (rows, steps).

        `embeds`/`attention`/`input_ids` are the left-padded prompt rows, already repeated per returned sequence;
        `past` is a cache holding the first positions (the image prefix) or None. Rows that finish are padded with
        `pad_id` after their end token, as `generate()` pads them.
        """
        import torch

        from .runtime import _cache_kwarg  # the runtime imports this module lazily, so no import cycle at load

        lm = self.lm
        rows, width = input_ids.shape
        steps = params.max_new_tokens
        cached = past.get_seq_length() if past is not None else 0
        kwargs: dict[str, Any] = {"use_cache": True, "logits_to_keep": 1}
        if past is not None:
            kwargs[_cache_kwarg()] = past
        out = lm(inputs_embeds=embeds[:, cached:], attention_mask=attention, return_dict=True, **kwargs)
        first_logits = out.logits[:, -1].float()
        cache = getattr(out, _cache_kwarg())
        processors = self._processors(params, width, eos_ids)

        seq = torch.full((rows, width + steps), pad_id, dtype=torch.long, device=input_ids.device)
        seq[:, :width] = input_ids
        logprobs = torch.zeros((rows, steps), dtype=torch.float32, device=input_ids.device)
        unfinished = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
        eos = torch.tensor(list(eos_ids), device=input_ids.device)
        done = 0
        # Steps attend over this many cache slots: the batch's own need, bucketed (not the buffers' length, which
        # an earlier long batch may have grown: that would make every later step read its unused slots).
        length = _bucket(width + steps - 1, _MIN_CACHE_LEN)
        self.last_length = length
        buffers: _Buffers | None = None
        with self._lock:
            for step in range(steps):
                if step == 0:
                    logits = first_logits
                else:
                    if buffers is None:
                        buffers = self._load_prefill(cache, attention, rows, length)
                        # The prefill's own cache is copied: free it now (1.7 GB at 128 rows of the real model).
                        cache = out = past = None
                        kwargs.clear()
                    buffers.ids[:rows].copy_(seq[:, width + step - 1 : width + step])
                    self._step(buffers, rows, length)
                    logits = buffers.logits[:rows]
                # A copy for the processors: `logits` also gives the token's log-probability under the model.
                scores = processors(seq[:, : width + step], logits.clone()) if processors else logits
                if params.do_sample:
                    token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
                else:
                    token = torch.argmax(scores, dim=-1)
                token = torch.where(unfinished, token, pad_id)
                seq[:, width + step] = token
                logprobs[:, step] = torch.log_softmax(logits, dim=-1).gather(1, token[:, None]).squeeze(1)
                unfinished &= ~torch.isin(token, eos)
                done = step + 1
                if done % _STOP_CHECK_EVERY == 0 and not bool(unfinished.any()):
                    break
        self.batches += 1
        return seq[:, width : width + done], logprobs[:, :done]

    def _processors(self, params: GenerationParams, width: int, eos_ids: Sequence[int]) -> Any:
        """transformers' own logits processors for `params`, in `generate()`'s order (None when there are none)."""
        from transformers.generation import logits_process as lp

        chain: list[Any] = []
        if params.repetition_penalty != 1.0:
            chain.append(lp.RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty))
        if params.min_new_tokens > 0:
            chain.append(
                lp.MinNewTokensLengthLogitsProcessor(width, params.min_new_tokens, list(eos_ids), device=self.device)
            )
        if params.do_sample:
            if params.temperature != 1.0:
                chain.append(lp.TemperatureLogitsWarper(params.temperature))
            if params.top_k != 0:
                chain.append(lp.TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=1))
            if params.top_p < 1.0:
                chain.append(lp.TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))
        return lp.LogitsProcessorList(chain) if chain else None

    # ------------------------------------------------------------------ static buffers
    def _load_prefill(self, cache: Any, attention: torch.Tensor, rows: int, needed: int) -> _Buffers:
        """Copy the prefill's KV into the static buffers (grown if this batch needs more rows or positions)."""
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        width = layers[0][0].shape[2]
        buffers = self._buffers
        if buffers is None or buffers.rows < rows or buffers.length < needed:
            want = (_bucket(rows), needed)
            size = (max(want[0], buffers.rows), max(want[1], buffers.length)) if buffers is not None else want
            if size[0] * size[1] > 2 * want[0] * want[1]:
                # Growing both ways would keep the most rows ever seen times the longest cache ever seen (a batch
                # of 128 short captions, then one long answer: 21 GB at the real size): take this batch's size.
                size = want
            buffers = self._allocate(*size)
        for (k, v), bk, bv in zip(layers, buffers.keys, buffers.values, strict=True):
            bk[:rows, :, :width].copy_(k)
            bv[:rows, :, :width].copy_(v)
        buffers.valid.zero_()
        buffers.valid[:rows, :width] = attention.bool()
        buffers.pos.zero_()
        buffers.pos[:rows, 0] = attention.sum(dim=1)
        buffers.slot.fill_(width)
        return buffers

    def _allocate(self, rows: int, length: int) -> _Buffers:
        import torch

        self._buffers = None
        self._graphs.clear()  # captured against the old buffers
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        dec = self.decoder
        attn = dec.layers[0].self_attn
        heads, head_dim = attn.num_heads, attn.head_dim
        dtype = attn.k_proj.weight.dtype if hasattr(attn.k_proj, "weight") else torch.float32
        if not dtype.is_floating_point:  # int8-quantised linears keep float activations
            dtype = torch.float32
        dev = torch.device(self.device)
        shape = (rows, heads, length, head_dim)
        self._buffers = _Buffers(
            rows=rows,
            length=length,
            keys=[torch.zeros(shape, dtype=dtype, device=dev) for _ in dec.layers],
            values=[torch.zeros(shape, dtype=dtype, device=dev) for _ in dec.layers],
            ids=torch.zeros((rows, 1), dtype=torch.long, device=dev),
            pos=torch.zeros((rows, 1), dtype=torch.long, device=dev),
            slot=torch.zeros(1, dtype=torch.long, device=dev),
            valid=torch.zeros((rows, length), dtype=torch.bool, device=dev),
            logits=torch.zeros((rows, self.lm.config.vocab_size), dtype=torch.float32, device=dev),
        )
        logger.info("decoding buffers: %d rows x %d positions", rows, length)
        return self._buffers

    # ------------------------------------------------------------------ the step
    def _step(self, buffers: _Buffers, rows: int, length: int) -> None:
        """One decoding step for the first `rows` rows over the first `length` cache slots: a graph replay on
        CUDA, the eager step elsewhere."""
        size = _bucket(rows)
        if not self.use_graphs:
            self._forward(buffers, size, length)
            return
        graph = self._graphs.get((size, length))
        if graph is None:
            import torch

            try:
                graph = self._capture(buffers, size, length)
            except torch.cuda.OutOfMemoryError:
                raise  # the service frees its caches and fails this batch; the next one captures again
            except Exception as exc:  # an operation capture does not allow: serve on without graphs
                self.use_graphs = False
                self._graphs.clear()
                self.graph_error = f"{type(exc).__name__}: {exc}"[:500]
                logger.warning("could not capture the decoding step as a CUDA graph; decoding without graphs: %s", exc)
                self._forward(buffers, size, length)
                return
        graph.replay()

    def _capture(self, buffers: _Buffers, size: int, length: int) -> Any:
        """Record the step for `size` rows as a CUDA graph (warm-up runs first, on a side stream, as PyTorch asks)."""
        import torch

        saved = (buffers.slot.clone(), buffers.pos.clone(), buffers.valid.clone())
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    buffers.slot.fill_(length - 1)  # a slot no row has reached: nothing real is overwritten
                    self._forward(buffers, size, length)
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA work (a second model, an embedding call) must not break capture.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._forward(buffers, size, length)
        finally:
            # Put the batch's state back after the warm-up steps (the keys they wrote sit in the last slot, which a
            # real step overwrites before reading it).
            buffers.slot.copy_(saved[0])
            buffers.pos.copy_(saved[1])
            buffers.valid.copy_(saved[2])
        self._graphs[size, length] = graph
        self.captured += 1
        logger.info("captured the decoding step for %d rows (%d positions) as a CUDA graph", size, length)
        return graph

    def _forward(self, b: _Buffers, rows: int, length: int) -> None:
        """OPT's decoder for one token per row, reading and writing only `b` (so it can be replayed as a graph).

        The same computation as transformers' `OPTDecoder` in eval mode (pre- or post-layer-norm, optional
        projections), with the new token's key and value written to cache slot `b.slot` and the slot marked valid;
        attention reads the first `length` slots (views of the buffers: their strides stay those of the buffers).
        """
        import torch.nn.functional as F

        dec = self.decoder
        ids, pos, valid = b.ids[:rows], b.pos[:rows], b.valid[:rows, :length]
        hidden = dec.embed_tokens(ids)
        if dec.project_in is not None:
            hidden = dec.project_in(hidden)
        offset = getattr(dec.embed_positions, "offset", 2)
        hidden = hidden + F.embedding(pos + offset, dec.embed_positions.weight).to(hidden.dtype)
        valid.index_fill_(1, b.slot, True)
        mask = valid[:, None, None, :]
        for layer, keys, values in zip(dec.layers, b.keys, b.values, strict=True):
            attn = layer.self_attn
            pre = layer.do_layer_norm_before
            residual = hidden
            x = layer.self_attn_layer_norm(hidden) if pre else hidden
            q = (attn.q_proj(x) * attn.scaling).view(rows, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(rows, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(rows, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
            cached_k, cached_v = keys[:rows, :, :length], values[:rows, :, :length]
            cached_k.index_copy_(2, b.slot, k.to(keys.dtype))
            cached_v.index_copy_(2, b.slot, v.to(values.dtype))
            o = F.scaled_dot_product_attention(q, cached_k, cached_v, attn_mask=mask, scale=1.0)
            hidden = residual + attn.out_proj(o.transpose(1, 2).reshape(rows, 1, -1))
            if not pre:
                hidden = layer.self_attn_layer_norm(hidden)
            residual = hidden
            x = layer.final_layer_norm(hidden) if pre else hidden
            hidden = residual + layer.fc2(layer.activation_fn(layer.fc1(x)))
            if not pre:
                hidden = layer.final_layer_norm(hidden)
        if dec.final_layer_norm is not None:
            hidden = dec.final_layer_norm(hidden)
        if dec.project_out is not None:
            hidden = dec.project_out(hidden)
        b.logits[:rows].copy_(self.lm.lm_head(hidden)[:, 0])
        b.slot.add_(1)
        pos.add_(1)
