"""A null model: the real runtime's loading and preprocessing with batch methods that return at once.

Used by B3 to measure what each layer (service, LangChain tool, MCP) adds per call when the model costs
nothing; `benchmarks/_null_server.py` serves it over MCP stdio/HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence

from blip_tools.params import GenerationParams
from blip_tools.results import GeneratedText
from blip_tools.runtime import Blip2Runtime, GenerationItem


class NullRuntime(Blip2Runtime):
    """`Blip2Runtime` whose `generate` skips the model (images are still decoded and preprocessed)."""

    def generate(
        self, items: Sequence[GenerationItem], params: GenerationParams
    ) -> list[list[GeneratedText] | BaseException]:
        text = GeneratedText(text="a null caption", mean_logprob=-1.0, confidence=0.3679)
        return [[text.model_copy() for _ in range(params.num_return_sequences)] for _ in items]
