"""A task's search backend: TaskSpec + data root -> `search.factory.make_backend`.

The one TaskSpec-aware path used by evaluation (`eval.run`), training (`rl.trainer`) and
serving (`serving.rewrite.Searcher`):
- `split_search_opts(spec, opts)`: config.reward.search_opts -> (index overrides, per-search
  options). Index options of another backend (k1/b under a dense task) are dropped, so one
  config serves a task's BM25 and dense variants.
- `corpus_dir(spec, data_dir)`: BM25 / dense read `<data_dir>/<corpus>` if it exists, else, for
  the BEIR sets (`download.BEIR_NAMES`), the BEIR download (`download.beir_dataset_dir`:
  $DEEPRETRIEVAL_DATA_DIR, then the cache); another missing corpus is a FileNotFoundError
  naming the directory. SQL's database root is `<data_dir>/<corpus>`; HTTP engines have none.
- `task_passages(spec, data_dir)`: the passage texts evidence tasks match answers in (the
  same corpus the backend indexes), for training and evaluation alike; None for other tasks.
- `task_backend(...)`: the task's index options (overridable) + the corpus -> a backend; dense
  corpus embeddings are cached under `<cache dir>/indexes` ($DEEPRETRIEVAL_CACHE_DIR).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepretrieval_jax.data import download
from deepretrieval_jax.data.tasks import INDEX_OPTS, TaskSpec
from deepretrieval_jax.search.base import SearchBackend
from deepretrieval_jax.search.factory import make_backend


def split_search_opts(
    spec: TaskSpec, opts: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(index overrides, search options) of `opts` for `spec`'s backend."""
    index = {k: v for k, v in opts.items() if k in spec.index_opts()}
    search = {k: v for k, v in opts.items() if k not in INDEX_OPTS}
    return index, search


def corpus_dir(spec: TaskSpec, data_dir: str | os.PathLike | None) -> Path | None:
    """Where `spec`'s backend reads its corpus (None: no local corpus)."""
    local = Path(data_dir) / spec.corpus if data_dir is not None and spec.corpus else None
    if spec.backend in ("bm25", "dense"):
        if local is not None and local.exists():
            return download.beir_dataset_dir(spec.corpus, local)
        if spec.corpus in download.BEIR_NAMES:
            return download.beir_dataset_dir(spec.corpus)
        env = os.environ.get("DEEPRETRIEVAL_DATA_DIR")
        if env and (Path(env) / spec.corpus / "corpus.jsonl").exists():
            return Path(env) / spec.corpus
        raise FileNotFoundError(
            f"{local or spec.corpus}: task {spec.name!r} needs its corpus (corpus.jsonl) there; "
            "see docs/tasks.md for how to build it"
        )
    return local if spec.backend == "sql" else None


def task_passages(spec: TaskSpec, data_dir: str | os.PathLike | None) -> dict[str, str] | None:
    """{passage id: text} of an evidence task's corpus (answer matching), else None."""
    if spec.family != "evidence":
        return None
    from deepretrieval_jax.data.converters import iter_beir_corpus

    corpus = corpus_dir(spec, data_dir) / "corpus.jsonl"
    return {doc_id: text for doc_id, _, text in iter_beir_corpus(corpus)}


def task_backend(
    spec: TaskSpec,
    data_dir: str | os.PathLike | None = None,
    index_overrides: Mapping[str, Any] | None = None,
    *,
    api_key: str | None = None,
    rate_per_s: float | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> SearchBackend:
    """`spec`'s search backend (not opened) with its index options, `index_overrides` on top.

    Args:
      data_dir: the data root holding `<spec.corpus>/` (None: BEIR download / env / none).
      api_key, rate_per_s: for the HTTP engines (PubMed key; rate None = engine default).
      cache_dir: where dense embeddings are cached (None: `<download cache>/indexes`).
    """
    opts = {**spec.index_opts(), **(index_overrides or {})}
    if cache_dir is None and spec.backend == "dense":
        cache_dir = download.cache_dir() / "indexes"
    return make_backend(
        spec.backend,
        corpus_dir=corpus_dir(spec, data_dir),
        index_opts=opts,
        api_key=api_key,
        rate_per_s=rate_per_s,
        cache_dir=cache_dir,
    )
