"""langchain-tests standard suites for every blip-tools tool and for `Blip2Embeddings` (tiny checkpoint)."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import EmbeddingsIntegrationTests, ToolsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests, ToolsUnitTests

from blip_tools.langchain import (
    AnswerQuestionTool,
    Blip2BaseTool,
    Blip2Embeddings,
    CaptionImagesTool,
    CaptionImageTool,
    EmbedImageTool,
    EmbedTextTool,
    ScoreImageTextTool,
)


class _Bound:
    """Gives the standard suites (which build tools from properties) the session service and test image."""

    _service: Any
    _image: str

    @pytest.fixture(autouse=True)
    def _bind(self, service: Any, lc_image: str) -> None:
        self._service = service
        self._image = lc_image


class _ToolCase(_Bound):
    tool_class: type[Blip2BaseTool]

    @property
    def tool_constructor(self) -> type[Blip2BaseTool]:
        return self.tool_class

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"service": self._service}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return self.example(self._image)

    def example(self, image: str) -> dict[str, Any]:
        raise NotImplementedError


class _CaptionImage(_ToolCase):
    tool_class = CaptionImageTool

    def example(self, image: str) -> dict[str, Any]:
        return {"image": image, "max_new_tokens": 8}


class _CaptionImages(_ToolCase):
    tool_class = CaptionImagesTool

    def example(self, image: str) -> dict[str, Any]:
        return {"images": [image, image], "max_new_tokens": 8}


class _AnswerQuestion(_ToolCase):
    tool_class = AnswerQuestionTool

    def example(self, image: str) -> dict[str, Any]:
        return {"image": image, "question": "What is in the picture?", "max_new_tokens": 8}


class _ScoreImageText(_ToolCase):
    tool_class = ScoreImageTextTool

    def example(self, image: str) -> dict[str, Any]:
        return {"image": image, "texts": ["a red car", "a dog on grass"]}


class _EmbedImage(_ToolCase):
    tool_class = EmbedImageTool

    def example(self, image: str) -> dict[str, Any]:
        return {"image": image}


class _EmbedText(_ToolCase):
    tool_class = EmbedTextTool

    def example(self, image: str) -> dict[str, Any]:
        return {"texts": ["a red car", "a dog on grass"]}


class TestCaptionImageUnit(_CaptionImage, ToolsUnitTests):
    pass


class TestCaptionImageIntegration(_CaptionImage, ToolsIntegrationTests):
    pass


class TestCaptionImagesUnit(_CaptionImages, ToolsUnitTests):
    pass


class TestCaptionImagesIntegration(_CaptionImages, ToolsIntegrationTests):
    pass


class TestAnswerQuestionUnit(_AnswerQuestion, ToolsUnitTests):
    pass


class TestAnswerQuestionIntegration(_AnswerQuestion, ToolsIntegrationTests):
    pass


class TestScoreImageTextUnit(_ScoreImageText, ToolsUnitTests):
    pass


class TestScoreImageTextIntegration(_ScoreImageText, ToolsIntegrationTests):
    pass


class TestEmbedImageUnit(_EmbedImage, ToolsUnitTests):
    pass


class TestEmbedImageIntegration(_EmbedImage, ToolsIntegrationTests):
    pass


class TestEmbedTextUnit(_EmbedText, ToolsUnitTests):
    pass


class TestEmbedTextIntegration(_EmbedText, ToolsIntegrationTests):
    pass


class _EmbeddingsCase(_Bound):
    @property
    def embeddings_class(self) -> type[Blip2Embeddings]:
        return Blip2Embeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"service": self._service}


class TestBlip2EmbeddingsUnit(_EmbeddingsCase, EmbeddingsUnitTests):
    pass


class TestBlip2EmbeddingsIntegration(_EmbeddingsCase, EmbeddingsIntegrationTests):
    pass
