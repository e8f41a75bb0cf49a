"""Local BM25 over a BEIR-layout corpus (bm25s, Lucene scoring) with Boolean queries.

Invariants:
- Documents are `title + "\\n" + text`; the analyzer (lower case, regex tokens, stopwords,
  PyStemmer stemming) is the same for documents, queries and phrases.
- Scoring is bm25s `method="lucene"` (Lucene >= 8: idf = ln(1 + (N - df + .5) / (df + .5)),
  tf part tf / (tf + k1 (1 - b + b dl / avgdl)), dl = analysed tokens after stopwords).
- The index is built once, saved, and memory-mapped on load (`BM25Index.load(dir, mmap=True)`);
  it is read-only afterwards, so concurrent searches in threads are safe. `save` writes
  `manifest.json` (sha256 and size of every file); `load` verifies it, so a zeroed, truncated
  or swapped file is a `DataFileError` naming the file, never silently wrong results. Any
  file that fails to load is a `DataFileError` naming it. (An index saved before manifests
  existed loads unverified, with a warning.)
- Query semantics (`search/query_syntax.py`): a query without an operator (AND, OR, NOT, upper
  case), field tag or truncation is bag-of-words BM25 over the whole corpus, parentheses and
  quotes ignored (documents with score 0 are not returned).
  Otherwise the Boolean expression selects the candidate set (AND = intersection, OR = union,
  NOT = difference, phrase = the analysed terms consecutive in the analysed document,
  stopwords removed; a word that analyses to several tokens, e.g. "covid-19", is a phrase;
  a word that analyses to nothing, e.g. a stopword, is dropped from its clause) and candidates
  are ranked by the BM25 score of the query's positive (not negated) terms, ties by corpus order.
  Malformed Boolean falls back to bag-of-words over the same words (`malformed="fallback"`,
  default) or raises `QueryRejected` (`malformed="reject"`).
- PubMed syntax (`search/fields.py`): `[ti]`/`[ab]` match the title (text before the first
  newline) / the rest, `[tiab]`/`[tw]`/`[all]` anywhere; `word*` is a prefix search over the
  vocabulary, capped at `max_prefix_terms`. A field the corpus lacks (`[pt]`, `[mh]`, ...)
  raises `QueryRejected` (`unsupported="reject"`, default) or is searched as plain text and
  counted in `BM25Index.ignored` (`unsupported="ignore"`); never silently.
- Date filter (`mindate`/`maxdate`, YYYY[/MM[/DD]]): applies when the corpus metadata has
  dates (`date`, `pub_date`, `pubdate` or `year`); documents without a date are then excluded.
  On a corpus without dates it raises a non-retryable `BackendError` (a data/config problem,
  not the policy's; `unsupported="reject"`) or is ignored and counted (`"ignore"`).
- `BM25Backend.search` runs the (CPU-bound) search in a worker thread; empty and oversize
  queries raise `QueryRejected`; failures are exceptions, never an empty list.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import bm25s
import numpy as np
import Stemmer

from deepretrieval_jax.search import fields
from deepretrieval_jax.search import query_syntax as qs
from deepretrieval_jax.search.base import (
    BackendError,
    DataFileError,
    QueryRejected,
    SearchBackend,
    check_query,
)
from deepretrieval_jax.search.manifest import verify_manifest, write_manifest

# bm25s sets its own logger to DEBUG when imported ("Building index from tokens" per index).
logging.getLogger("bm25s").setLevel(logging.WARNING)

# Lucene's classic English stopword set (EnglishAnalyzer / Anserini default).
LUCENE_STOPWORDS = (
    "a an and are as at be but by for if in into is it no not of on or such that the their "
    "then there these they this to was will with"
).split()


@dataclasses.dataclass(frozen=True)
class BM25Config:
    k1: float = 0.9
    b: float = 0.4
    stopwords: str = "lucene"  # "lucene" (33 words), "en_plus" (bm25s' 179 words) or "none".
    stemmer: str | None = "english"  # PyStemmer algorithm; None for no stemming.
    token_pattern: str = r"(?u)\b\w+\b"
    default_operator: str = "AND"  # Between adjacent operands of a Boolean query.
    malformed: str = "fallback"  # "fallback" (bag-of-words) or "reject" (QueryRejected).
    top_k: int = 1000
    max_query_chars: int = 4000
    unsupported: str = "reject"  # Syntax the corpus cannot honour: "reject" or "ignore" (counted).
    max_prefix_terms: int = 600  # Vocabulary terms a truncated word expands to (PubMed: 600).

    def __post_init__(self):
        if self.stopwords not in ("lucene", "en_plus", "none"):
            raise ValueError(f"stopwords must be lucene|en_plus|none, got {self.stopwords!r}")
        if self.malformed not in ("fallback", "reject"):
            raise ValueError(f"malformed must be fallback|reject, got {self.malformed!r}")
        if self.unsupported not in ("reject", "ignore"):
            raise ValueError(f"unsupported must be reject|ignore, got {self.unsupported!r}")
        if self.default_operator not in ("AND", "OR"):
            raise ValueError(f"default_operator must be AND|OR, got {self.default_operator!r}")


_QUERY_TIME = (
    "default_operator",
    "malformed",
    "top_k",
    "max_query_chars",
    "unsupported",
    "max_prefix_terms",
)


class Analyzer:
    """text -> analysed tokens (lower case, regex, stopwords removed, stemmed)."""

    def __init__(self, config: BM25Config):
        self.pattern = re.compile(config.token_pattern)
        sw = {"lucene": LUCENE_STOPWORDS, "en_plus": bm25s.stopwords.STOPWORDS_EN_PLUS, "none": ()}
        self.stopwords = frozenset(sw[config.stopwords])
        self.stemmer = Stemmer.Stemmer(config.stemmer) if config.stemmer else None
        self._stems: dict[str, str] = {}

    def __call__(self, text: str) -> list[str]:
        words = [w for w in self.pattern.findall(text.lower()) if w not in self.stopwords]
        if self.stemmer is None:
            return words
        stems = self._stems
        missing = [w for w in set(words) if w not in stems]
        if missing:
            stems.update(zip(missing, self.stemmer.stemWords(missing), strict=True))
        return [stems[w] for w in words]


def parse_date(value: Any, upper: bool = False) -> int:
    """YYYY[/-MM[/-DD]] (or an int year) -> YYYYMMDD int; 0 when absent or unparseable."""
    m = re.match(r"^\s*(\d{4})(?:[/-](\d{1,2}))?(?:[/-](\d{1,2}))?", str(value or ""))
    if not m:
        return 0
    month = int(m.group(2) or (12 if upper else 1))
    day = int(m.group(3) or (31 if upper else 1))
    return int(m.group(1)) * 10000 + month * 100 + day


def read_beir_corpus(corpus_dir: str) -> Iterable[tuple[str, str, int]]:
    """Yields (doc_id, title + "\\n" + text, date as YYYYMMDD or 0) from corpus.jsonl."""
    path = os.path.join(corpus_dir, "corpus.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: expected a BEIR corpus.jsonl with _id, title, text")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                doc_id = str(doc["_id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{line_no}: not a JSON object with '_id'") from None
            meta = doc.get("metadata") or {}
            date = next((meta[k] for k in ("date", "pub_date", "pubdate", "year") if k in meta), 0)
            yield doc_id, f"{doc.get('title') or ''}\n{doc.get('text') or ''}", parse_date(date)


class BM25Index:
    """A bm25s index plus what Boolean queries need (postings via the CSC matrix, positions)."""

    def __init__(
        self, retriever, doc_ids, tokens, offsets, dates, config: BM25Config, title_lens=None
    ):
        self.retriever = retriever
        self.doc_ids = list(doc_ids)
        self.tokens = tokens  # int32 [total analysed tokens], documents concatenated.
        self.offsets = offsets  # int64 [num_docs + 1]
        self.dates = dates if dates is not None and np.any(dates) else None  # int32 YYYYMMDD
        self.config = config
        self.analyzer = Analyzer(config)
        self.vocab: dict[str, int] = retriever.vocab_dict
        self.num_docs = len(self.doc_ids)
        # int32 [num_docs]: analysed title tokens leading each document (None: not recorded).
        self.title_lens = None if title_lens is None else np.asarray(title_lens, np.int32)
        self.ignored: collections.Counter = collections.Counter()  # syntax not honoured
        self._lock = threading.Lock()
        self._terms: list[str] | None = None  # sorted vocabulary, for prefix searches

    @classmethod
    def build(cls, docs: Iterable[tuple], config: BM25Config | None = None) -> BM25Index:
        """Indexes (doc_id, text) or (doc_id, text, date) tuples."""
        config = config or BM25Config()
        analyzer = Analyzer(config)
        doc_ids, analysed, dates, title_lens = [], [], [], []
        for doc in docs:
            doc_ids.append(doc[0])
            analysed.append(analyzer(doc[1]))
            dates.append(doc[2] if len(doc) > 2 else 0)
            title, newline, _ = doc[1].partition("\n")
            title_lens.append(len(analyzer(title)) if newline else 0)
        if not doc_ids:
            raise ValueError("cannot build a BM25 index over an empty corpus")
        if len(set(doc_ids)) != len(doc_ids):
            raise ValueError("document ids are not unique")
        retriever = bm25s.BM25(k1=config.k1, b=config.b, method="lucene")
        retriever.index(analysed, show_progress=False)
        vocab = retriever.vocab_dict
        lengths = np.array([len(a) for a in analysed], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.fromiter((vocab[t] for a in analysed for t in a), np.int32, int(offsets[-1]))
        dates = np.array(dates, np.int32)
        return cls(retriever, doc_ids, tokens, offsets, dates, config, title_lens)

    @classmethod
    def from_beir(cls, corpus_dir: str, config: BM25Config | None = None) -> BM25Index:
        return cls.build(read_beir_corpus(corpus_dir), config)

    @classmethod
    def load_or_build(
        cls, corpus_dir: str, index_dir: str, config: BM25Config | None = None
    ) -> BM25Index:
        """Loads the index saved in `index_dir` (memory-mapped), else builds it from the BEIR
        corpus and saves it there. A saved index with other k1/b/analyzer settings is an error."""
        config = config or BM25Config()
        if not os.path.exists(os.path.join(index_dir, "analyzer.json")):
            cls.from_beir(corpus_dir, config).save(index_dir)
        index = cls.load(index_dir, mmap=True)
        saved, wanted = dataclasses.asdict(index.config), dataclasses.asdict(config)
        differ = [
            k for k in ("k1", "b", "stopwords", "stemmer", "token_pattern") if saved[k] != wanted[k]
        ]
        if differ:
            raise ValueError(
                f"{index_dir} holds an index built with other settings ({', '.join(differ)}); "
                "use another index_dir or delete it"
            )
        overrides = {k: wanted[k] for k in _QUERY_TIME}
        return cls.load(index_dir, mmap=True, verify=False, **overrides)  # Verified just above.

    def save(self, index_dir: str) -> None:
        os.makedirs(index_dir, exist_ok=True)
        self.retriever.save(index_dir, show_progress=False)
        np.save(os.path.join(index_dir, "doc_tokens.npy"), np.asarray(self.tokens))
        np.save(os.path.join(index_dir, "doc_offsets.npy"), np.asarray(self.offsets))
        dates = self.dates if self.dates is not None else np.zeros(self.num_docs, np.int32)
        np.save(os.path.join(index_dir, "doc_dates.npy"), dates)
        if self.title_lens is not None:
            np.save(os.path.join(index_dir, "doc_title_lens.npy"), self.title_lens)
        with open(os.path.join(index_dir, "doc_ids.json"), "w", encoding="utf-8") as f:
            json.dump(self.doc_ids, f)
        with open(os.path.join(index_dir, "analyzer.json"), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self.config), f, indent=1)
        write_manifest(index_dir)

    @classmethod
    def load(
        cls, index_dir: str, mmap: bool = True, *, verify: bool = True, **overrides: Any
    ) -> BM25Index:
        """Loads a saved index (memory-mapped by default), checking its manifest unless
        `verify=False`. `overrides` change query-time options (default_operator, malformed,
        top_k, max_query_chars), never the analyzer."""
        path = os.path.join(index_dir, "analyzer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: not a saved BM25Index directory")
        if verify:
            verify_manifest(index_dir)
        where = path
        try:
            with open(path, encoding="utf-8") as f:
                config = BM25Config(**{**json.load(f), **overrides})
            where = f"{index_dir} (bm25s files)"
            retriever = bm25s.BM25.load(index_dir, mmap=mmap, show_progress=False, verbosity=0)
            mode = "r" if mmap else None
            where = os.path.join(index_dir, "doc_ids.json")
            with open(where, encoding="utf-8") as f:
                doc_ids = json.load(f)
            arrays = {}
            for name in ("doc_tokens", "doc_offsets", "doc_dates", "doc_title_lens"):
                where = os.path.join(index_dir, f"{name}.npy")
                if name == "doc_title_lens" and not os.path.exists(where):
                    continue  # saved before titles were recorded: no [ti]/[ab] fields
                arrays[name] = np.load(where, mmap_mode=mode)
        except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
            raise DataFileError(f"{where}: cannot load the BM25 index: {exc}") from None
        tokens, offsets = arrays["doc_tokens"], arrays["doc_offsets"]
        if len(offsets) != len(doc_ids) + 1 or int(offsets[-1]) != len(tokens):
            raise DataFileError(
                f"{index_dir}: doc_offsets.npy, doc_tokens.npy and doc_ids.json disagree"
            )
        titles = arrays.get("doc_title_lens")
        titles = None if titles is None else np.array(titles)
        dates = np.array(arrays["doc_dates"])
        return cls(retriever, doc_ids, tokens, offsets, dates, config, titles)

    # Query side.

    def token_ids(self, text: str) -> list[int]:
        """Analysed query tokens as vocabulary ids; unknown tokens get -1."""
        return [self.vocab.get(t, -1) for t in self.analyzer(text)]

    def scores(self, ids: list[int]) -> np.ndarray:
        known = [int(i) for i in ids if i >= 0]
        if not known:
            return np.zeros(self.num_docs, np.float32)
        return self.retriever.get_scores_from_ids(known)

    def postings(self, token_id: int) -> np.ndarray:
        mask = np.zeros(self.num_docs, bool)
        if token_id >= 0:
            indptr = self.retriever.scores["indptr"]
            mask[self.retriever.scores["indices"][indptr[token_id] : indptr[token_id + 1]]] = True
        return mask

    def phrase(self, ids: list[int], field: str | None = None) -> np.ndarray:
        """Documents holding the tokens `ids` consecutively (inside `field` when given)."""
        return fields.phrase_mask(self, ids, field)

    def count_ignored(self, what: str) -> None:
        with self._lock:
            self.ignored[what] += 1

    def _match(self, node, positive: list[int], negated: bool = False) -> np.ndarray | None:
        """Candidate mask for `node`; None when the node holds no searchable term."""
        if isinstance(node, (qs.Term, qs.Phrase)):
            text, tag, prefix = qs.split_field(node.text)
            field = fields.field_of(self, tag)
            if prefix and isinstance(node, qs.Term):
                ids = fields.prefix_ids(self, text)
                if not negated:
                    positive.extend(ids)
                if not ids:
                    return np.zeros(self.num_docs, bool)  # nothing starts so: no match
                return np.logical_or.reduce([self.phrase([i], field) for i in ids])
            ids = self.token_ids(text)
            if not negated:
                positive.extend(ids)
            if not ids:
                return None
            return self.phrase(ids, field)
        if isinstance(node, qs.Not):
            mask = self._match(node.child, positive, not negated)
            return None if mask is None else ~mask
        masks = [m for c in node.children if (m := self._match(c, positive, negated)) is not None]
        if not masks:
            return None
        op = np.logical_and if isinstance(node, qs.And) else np.logical_or
        return op.reduce(masks)

    def _date_mask(self, mindate, maxdate) -> np.ndarray | None:
        if not (mindate or maxdate):
            return None
        if self.dates is None:
            if self.config.unsupported == "reject":
                raise BackendError(
                    f"date filter mindate={mindate!r} maxdate={maxdate!r} on a corpus without "
                    "dates (metadata date/pub_date/pubdate/year); add dates or set "
                    "unsupported='ignore'",
                    retryable=False,
                )
            self.count_ignored("date_filter")
            return None
        low = parse_date(mindate) if mindate else 0
        high = parse_date(maxdate, upper=True) if maxdate else 99999999
        return (self.dates > 0) & (self.dates >= low) & (self.dates <= high)

    def _rank(self, scores, mask, top_k) -> list[str]:
        cand = np.flatnonzero(mask)
        if len(cand) > top_k:
            part = np.argpartition(-scores[cand], top_k - 1)[:top_k]
            threshold = scores[cand[part]].min()
            cand = cand[scores[cand] >= threshold]  # Keep ties so the sort below is exact.
        order = np.lexsort((cand, -scores[cand]))[:top_k]
        return [self.doc_ids[i] for i in cand[order]]

    def search(self, query: str, top_k: int | None = None, mindate=None, maxdate=None) -> list[str]:
        """Ranked doc ids for `query`. See the module docstring for the semantics."""
        check_query(query, self.config.max_query_chars)
        top_k = self.config.top_k if top_k is None else top_k
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        dates = self._date_mask(mindate, maxdate)
        tree = None
        if qs.is_boolean(query):
            try:
                tree = qs.parse(query, self.config.default_operator)
            except qs.MalformedQuery as exc:
                if self.config.malformed == "reject":
                    raise QueryRejected(f"malformed Boolean query: {exc}") from None
            if tree is None:
                query = qs.bag_of_words(query)
        if tree is None:  # Bag-of-words.
            ids = self.token_ids(qs.bag_of_words(query))
            scores = self.scores(ids)
            mask = scores > 0
        else:
            positive: list[int] = []
            mask = self._match(tree, positive)
            if mask is None:
                return []
            scores = self.scores(list(dict.fromkeys(positive)))
        if dates is not None:
            mask = mask & dates
        return self._rank(scores, mask, min(top_k, self.num_docs))

    def search_many(self, queries: list[str], top_k: int = 10, n_threads: int = 0) -> list[list]:
        """Bag-of-words batch retrieval through bm25s (benchmarks; Boolean syntax ignored)."""
        ids = [[int(i) for i in self.token_ids(qs.bag_of_words(q)) if i >= 0] for q in queries]
        k = min(top_k, self.num_docs)
        results: list[list] = [[] for _ in queries]
        todo = [i for i, q in enumerate(ids) if q]
        if todo:
            docs, scores = self.retriever.retrieve(
                [ids[i] for i in todo], k=k, show_progress=False, n_threads=n_threads
            )
            for row, i in enumerate(todo):
                keep = scores[row] > 0
                results[i] = [self.doc_ids[d] for d in docs[row][keep]]
        return results


class BM25Backend(SearchBackend):
    """Async wrapper: `await BM25Backend(index_dir=...).search(query, top_k=...)`."""

    name = "bm25"

    def __init__(
        self, index: BM25Index | None = None, *, index_dir: str | None = None, **overrides
    ):
        if (index is None) == (index_dir is None):
            raise ValueError("give exactly one of `index` or `index_dir`")
        self.index, self.index_dir, self.overrides = index, index_dir, overrides

    def __repr__(self):
        return f"BM25Backend(index_dir={self.index_dir!r})"

    async def open(self) -> None:
        if self.index is None:
            self.index = await asyncio.to_thread(
                BM25Index.load, self.index_dir, True, **self.overrides
            )

    def cache_params(self, **opts: Any) -> Mapping[str, Any]:
        cfg = self.index.config if self.index else None
        return {
            "k1": cfg and cfg.k1,
            "b": cfg and cfg.b,
            "default_operator": cfg and cfg.default_operator,
            **dict(sorted(opts.items())),
        }

    async def search(self, query: str, **opts: Any) -> list[str]:
        if self.index is None:
            raise RuntimeError("BM25Backend: call open() (or use `async with`) before searching")
        return await asyncio.to_thread(self.index.search, query, **opts)
