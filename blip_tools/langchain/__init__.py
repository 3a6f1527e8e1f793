"""LangChain integration: typed tools, a toolkit sharing one service, embeddings and an image loader.

```python
from blip_tools.langchain import Blip2Toolkit

tools = Blip2Toolkit().get_tools()  # caption_image, caption_images, answer_question, ...
```
"""

from __future__ import annotations

from ._base import Blip2BaseTool, format_tool_validation_error, map_blip_errors, to_tool_exception
from .collection_tools import IndexImagesTool, LocateInImageTool, SearchImagesTool
from .embeddings import Blip2Embeddings
from .loader import Blip2ImageLoader
from .toolkit import TOOL_CLASSES, Blip2Toolkit
from .tools import (
    AnswerQuestionTool,
    CaptionImagesTool,
    CaptionImageTool,
    EmbedImageTool,
    EmbedTextTool,
    ImageError,
    ScoreImageTextTool,
)

__all__ = [
    "TOOL_CLASSES",
    "AnswerQuestionTool",
    "Blip2BaseTool",
    "Blip2Embeddings",
    "Blip2ImageLoader",
    "Blip2Toolkit",
    "CaptionImageTool",
    "CaptionImagesTool",
    "EmbedImageTool",
    "EmbedTextTool",
    "ImageError",
    "IndexImagesTool",
    "LocateInImageTool",
    "ScoreImageTextTool",
    "SearchImagesTool",
    "format_tool_validation_error",
    "map_blip_errors",
    "to_tool_exception",
]
