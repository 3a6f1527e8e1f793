"""`Blip2Embeddings` with a LangChain vector store: a text query ranks images; image and text sides agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore

from blip_tools.errors import InvalidImage, InvalidInput
from blip_tools.langchain import Blip2Embeddings


def _images(image_dir: Path) -> list[str]:
    return sorted(str(p) for p in image_dir.glob("*.png"))


def test_text_query_ranks_images_in_a_vector_store(service: Any, image_dir: Path) -> None:
    paths = _images(image_dir)
    store = InMemoryVectorStore(Blip2Embeddings(service=service, image_documents=True))
    store.add_documents([Document(page_content=p, metadata={"source": p}) for p in paths])

    query = "a photo of a red car"
    hits = store.similarity_search_with_score(query, k=len(paths))
    assert sorted(doc.metadata["source"] for doc, _ in hits) == paths
    scores = [score for _, score in hits]
    assert scores == sorted(scores, reverse=True)

    # The ranking is the cosine between the text vector and each image vector, computed by the service.
    text_vec = np.array(service.embed_texts([query])[0].vector)
    image_vecs = {r.image.source: np.array(r.vector) for r in service.embed_images(paths)}
    for doc, score in hits:
        assert score == pytest.approx(float(image_vecs[doc.metadata["source"]] @ text_vec), abs=1e-5)

    # An image query finds that image first, with a cosine of 1.
    own = Blip2Embeddings(service=service).embed_image([paths[3]])[0]
    best, best_score = store.similarity_search_with_score_by_vector(own, k=1)[0]
    assert best.metadata["source"] == paths[3]
    assert best_score == pytest.approx(1.0, abs=1e-4)


async def test_async_and_sync_sides_agree(service: Any, image_dir: Path) -> None:
    emb = Blip2Embeddings(service=service, chunk_size=2)  # chunking exercised: 5 images in 3 calls
    paths = _images(image_dir)[:5]
    sync_images = emb.embed_image(paths)
    assert np.allclose(await emb.aembed_image(paths), sync_images, atol=1e-5)
    assert np.allclose(
        emb.embed_documents(["a cat", "a dog"]), await emb.aembed_documents(["a cat", "a dog"]), atol=1e-5
    )
    assert np.allclose(emb.embed_query("a cat"), await emb.aembed_query("a cat"), atol=1e-5)
    # Text and image vectors share one normalised space.
    assert len(sync_images[0]) == len(emb.embed_query("a cat"))
    assert np.linalg.norm(sync_images, axis=1) == pytest.approx([1.0] * 5, abs=1e-4)
    as_docs = Blip2Embeddings(service=service, image_documents=True)
    assert np.allclose(await as_docs.aembed_documents(paths), sync_images, atol=1e-5)


def test_unreadable_image_raises_the_project_error(service: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(InvalidImage):
        Blip2Embeddings(service=service).embed_image([str(bad)])


async def test_one_string_for_a_list_is_an_error_not_a_vector_per_character(service: Any, image_dir: Path) -> None:
    emb = Blip2Embeddings(service=service)
    as_images = Blip2Embeddings(service=service, image_documents=True)
    for call in (emb.embed_documents, emb.embed_texts):
        with pytest.raises(InvalidInput, match=r"texts must be a list of strings, got str \(embed_query embeds one"):
            call("a red house")  # type: ignore[arg-type]  # was: 11 vectors, one per character
    with pytest.raises(InvalidInput, match="uris must be a list of strings, got str"):
        as_images.embed_documents(_images(image_dir)[0])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="texts must be a list of strings, got str"):
        await emb.aembed_documents("a red house")  # type: ignore[arg-type]
    assert len(emb.embed_documents(t for t in ["a", "b"])) == 2  # type: ignore[arg-type]  # any iterable of strings
