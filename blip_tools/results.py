"""Typed results every interface returns (pydantic, JSON-serialisable)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class GeneratedText(BaseModel):
    """One generated text with its confidence."""

    text: str = Field(description="The generated text (control characters stripped, length capped).")
    mean_logprob: float = Field(description="Mean token log-probability (<= 0; closer to 0 is surer).")
    confidence: float = Field(description="exp(mean_logprob): the geometric-mean token probability, in [0, 1].")
    itm_probability: float | None = Field(
        default=None, description="Image-text match probability from the retrieval model, when it is loaded."
    )


class ImageInfo(BaseModel):
    """What was read: a short description of the source, the decoded size and a content hash."""

    source: str = Field(description="Where the image came from (path, 'data URI', 'base64', URL host...).")
    width: int
    height: int
    sha256: str = Field(description="Hash of the decoded RGB pixels; equal pixels give equal hashes.")


class Timing(BaseModel):
    """Where the time went for one request, in milliseconds."""

    queue_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0
    batch_size: int = 1


class CaptionResult(BaseModel):
    """A caption (or several) for one image."""

    caption: str = Field(description="The best caption (the first of `captions`).")
    captions: list[GeneratedText] = Field(description="All returned texts, best first.")
    prompt: str | None = Field(default=None, description="The prompt prefix, for prompted captioning.")
    image: ImageInfo
    timing: Timing = Field(default_factory=Timing)


class AnswerResult(BaseModel):
    """An answer (or several) to a question about one image."""

    answer: str = Field(description="The best answer (the first of `answers`).")
    answers: list[GeneratedText]
    question: str
    image: ImageInfo
    timing: Timing = Field(default_factory=Timing)


class EmbeddingResult(BaseModel):
    """One L2-normalised vector in the shared image/text space."""

    kind: str = Field(description="'image' or 'text'.")
    vector: list[float]
    dim: int
    model: str
    image: ImageInfo | None = None
    text: str | None = None
    query_vectors: list[list[float]] | None = Field(
        default=None, description="Image only, on request: one normalised vector per Q-Former query token."
    )


class TextScore(BaseModel):
    """How well one text matches the image."""

    text: str
    itc: float = Field(description="Contrastive cosine similarity (max over query tokens), in [-1, 1].")
    itm_probability: float = Field(description="Image-text matching head's probability that the text fits, in [0, 1].")


class ScoreResult(BaseModel):
    """Scores of several texts against one image, in the order given, plus the best match."""

    scores: list[TextScore]
    best: str = Field(description="The text with the highest ITM probability.")
    image: ImageInfo
    timing: Timing = Field(default_factory=Timing)


class TaskStats(BaseModel):
    """Counters for one task (caption, answer, embed_image, ...)."""

    requests: int = 0
    batches: int = 0
    errors: int = 0


class ServiceStats(BaseModel):
    """A snapshot of the service's counters."""

    requests: int = Field(description="Requests accepted into the queue.")
    batches: int = Field(description="Forward passes (batches) run.")
    batch_size_histogram: dict[int, int] = Field(description="Batch size -> number of batches of that size.")
    queue_depth: int
    rejected: int = Field(
        description="Requests refused with Overloaded at submit (a batch call that backs off and submits again counts "
        "each refusal)."
    )
    cancelled: int
    expired: int = Field(description="Requests dropped after their deadline.")
    errors: int = Field(description="Requests that failed.")
    completed: int
    retries: int = Field(description="Batches split and retried after a failure or out-of-memory.")
    cache_hits: int = Field(description="Image-feature cache hits.")
    cache_misses: int
    prefix_cache_hits: int = Field(default=0, description="Rows whose image-prefix KV came from its cache.")
    prefix_cache_misses: int = Field(default=0, description="Rows that looked in the image-prefix KV cache in vain.")
    graph_batches: int = Field(default=0, description="Batches decoded by the CUDA-graph loop (BLIP_CUDA_GRAPHS).")
    graphs_captured: int = Field(default=0, description="Decoding steps captured as CUDA graphs (one per bucket).")
    graph_error: str | None = Field(default=None, description="Why a capture failed (decoding then runs without).")
    per_task: dict[str, TaskStats] = Field(default_factory=dict)
    models_loaded: int = Field(default=0, description="Checkpoints this process has loaded.")
    model_load_s: float = 0.0
    uptime_s: float = 0.0


class ModelInfo(BaseModel):
    """What the service runs on and what it can do."""

    model: str
    retrieval_model: str
    retrieval_loaded: bool
    device: str
    dtype: str
    capabilities: list[str]
    limits: dict[str, float | int | bool]
    num_query_tokens: int | None = None
