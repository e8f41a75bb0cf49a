"""One factory for every search backend: `make_backend(kind, ...)` from plain arguments.

Kinds and what they read:
  bm25    `corpus_dir` (BEIR corpus.jsonl); index options = `BM25Config` fields (k1, b, ...).
  dense   `corpus_dir`; options = `DenseConfig` fields, `model` naming the encoder (see
          `dense.resolve_model_dir`: a local directory, "minilm", or a Hub name already in the
          local Hugging Face cache). Corpus embeddings are cached under `cache_dir`.
  pubmed  `api_key`, `rate_per_s` (None: E-utilities' 3/s without a key, 10/s with one);
          options = other `PubMedConfig` fields (`base_url` "" = the public service).
  ctgov   `rate_per_s` (None: the backend default); options = `CTGovConfig` fields.
  sql     `corpus_dir` = the database root (or None: every search names `db_path`); options =
          `SQLConfig` fields (timeout_s, max_rows, ...).
`rate_per_s` only applies to the HTTP kinds; an API key only to PubMed (an error elsewhere).

Embedding cache (dense): `<cache_dir>/dense/<corpus name>-<key>/`, key = sha256 of the corpus
file's real path, size and mtime and of the encoder directory, so an edited corpus or another
encoder never reads stale vectors. Written to a temporary directory and renamed into place, so
an interrupted build leaves nothing half-written; a concurrent build of the same key keeps the
first one renamed. No cache_dir: embeddings are computed in memory on every build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Mapping
from typing import Any

from deepretrieval_jax.search.base import SearchBackend

KINDS = ("bm25", "dense", "pubmed", "ctgov", "sql")


def make_backend(
    kind: str,
    *,
    corpus_dir: str | os.PathLike | None = None,
    index_opts: Mapping[str, Any] | None = None,
    api_key: str | None = None,
    rate_per_s: float | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> SearchBackend:
    """A new (unopened) backend of `kind`; see the module docstring for each kind's inputs."""
    if kind not in KINDS:
        raise ValueError(f"unknown search backend {kind!r}; expected one of {', '.join(KINDS)}")
    opts = dict(index_opts or {})
    if not opts.get("base_url", True):  # "": the HTTP engine's public address
        del opts["base_url"]
    if api_key is not None and kind != "pubmed":
        raise ValueError(f"backend {kind!r} takes no API key (only 'pubmed' does)")
    if kind == "bm25":
        from deepretrieval_jax.search.bm25 import BM25Backend, BM25Config, BM25Index

        config = _config(BM25Config, kind, opts)
        return BM25Backend(BM25Index.from_beir(_beir_dir(kind, corpus_dir), config))
    if kind == "dense":
        return _dense(corpus_dir, opts, cache_dir)
    if kind == "pubmed":
        from deepretrieval_jax.search.pubmed import PubMedBackend, PubMedConfig

        opts = {**opts, "api_key": api_key, "rate_per_s": rate_per_s or None}
        return PubMedBackend(_config(PubMedConfig, kind, opts))
    if kind == "ctgov":
        from deepretrieval_jax.search.ctgov import CTGovBackend, CTGovConfig

        if rate_per_s:
            opts["rate_per_s"] = rate_per_s
        return CTGovBackend(_config(CTGovConfig, kind, opts))
    from deepretrieval_jax.search.sql import SQLBackend, SQLConfig

    root = str(corpus_dir) if corpus_dir is not None else None
    return SQLBackend(_config(SQLConfig, kind, {**opts, "db_root": root}))


def _config(cls, kind: str, opts: Mapping[str, Any]):
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(opts) - set(fields))
    if unknown:
        raise ValueError(
            f"backend {kind!r}: unknown index option(s) {', '.join(unknown)}; "
            f"expected some of {', '.join(fields)}"
        )
    return cls(**opts)


def _beir_dir(kind: str, corpus_dir) -> str:
    if corpus_dir is None:
        raise ValueError(f"backend {kind!r} needs corpus_dir (a BEIR directory with corpus.jsonl)")
    if not os.path.isfile(os.path.join(corpus_dir, "corpus.jsonl")):
        raise FileNotFoundError(f"{corpus_dir}: not a BEIR corpus directory (no corpus.jsonl)")
    return str(corpus_dir)


def _dense(corpus_dir, opts: dict[str, Any], cache_dir) -> SearchBackend:
    from deepretrieval_jax.search.dense import (
        DenseBackend,
        DenseConfig,
        DenseIndex,
        resolve_model_dir,
    )

    corpus_dir = _beir_dir("dense", corpus_dir)
    if "model" in opts and "model_dir" in opts:
        raise ValueError("backend 'dense': give `model` or `model_dir`, not both")
    model = opts.pop("model", opts.pop("model_dir", None))
    config = _config(DenseConfig, "dense", {**opts, "model_dir": resolve_model_dir(model)})
    if cache_dir is None:
        return DenseBackend(DenseIndex.from_beir(corpus_dir, config))
    index_dir = _dense_cache_dir(corpus_dir, config.model_dir, cache_dir)
    encoder = None
    if not os.path.isfile(os.path.join(index_dir, "dense.json")):
        index = DenseIndex.from_beir(corpus_dir, config)
        encoder = index.encoder
        tmp = f"{index_dir}.tmp-{os.getpid()}"
        index.save(tmp)
        try:
            os.replace(tmp, index_dir)
        except OSError:  # another process renamed its copy first: keep that one
            shutil.rmtree(tmp, ignore_errors=True)
    query_time = {k: v for k, v in dataclasses.asdict(config).items() if k != "model_dir"}
    return DenseBackend(DenseIndex.load(index_dir, True, encoder, **query_time))


def _dense_cache_dir(corpus_dir: str, model_dir: str, cache_dir) -> str:
    corpus = os.path.realpath(os.path.join(corpus_dir, "corpus.jsonl"))
    st = os.stat(corpus)
    key = f"{corpus}\0{st.st_size}\0{st.st_mtime_ns}\0{os.path.realpath(model_dir)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = os.path.basename(os.path.dirname(corpus)) or "corpus"
    os.makedirs(os.path.join(cache_dir, "dense"), exist_ok=True)
    return os.path.join(cache_dir, "dense", f"{name}-{digest}")
