"""PubMed field tags and truncation over a local `BM25Index` (used by `BM25Index._match`).

- Fields: a document's title is its text before the first newline (BEIR: title + "\\n" +
  text), recorded at build time as `index.title_lens` (analysed title tokens per document).
  `[ti]`/`[title]` match inside the title, `[ab]`/`[abstract]` in the rest, `[tiab]`, `[tw]`,
  `[all]` anywhere. A field the corpus lacks (`[pt]`, `[mh]`, ..., or any field of an index
  saved without titles) raises `QueryRejected` when `config.unsupported == "reject"`, else it
  is searched as plain text and counted in `index.ignored` ("field[<tag>]").
- Truncation: `word*` -> the vocabulary terms starting with the lower-cased word or its stem,
  the first `config.max_prefix_terms` in alphabetical order (PubMed caps truncation too);
  a capped expansion is counted as "prefix_capped".
Pure functions of the (read-only) index; thread-safe except the counters, which the index
guards with its lock.
"""

from __future__ import annotations

import bisect

import numpy as np

from deepretrieval_jax.search import query_syntax as qs
from deepretrieval_jax.search.base import QueryRejected


def phrase_mask(index, ids: list[int], field: str | None = None) -> np.ndarray:
    """bool [num_docs]: documents holding tokens `ids` consecutively (inside `field`)."""
    mask = np.logical_and.reduce([index.postings(i) for i in ids])
    if len(ids) == 1 and field is None:
        return mask
    for d in np.flatnonzero(mask):
        doc = np.asarray(index.tokens[index.offsets[d] : index.offsets[d + 1]])
        if field is not None:
            cut = int(index.title_lens[d])
            doc = doc[:cut] if field == "title" else doc[cut:]
        n = len(doc) - len(ids) + 1
        hit = (
            n > 0 and np.logical_and.reduce([doc[j : j + n] == t for j, t in enumerate(ids)]).any()
        )
        mask[d] = bool(hit)
    return mask


def field_of(index, tag: str | None) -> str | None:
    """The field a tag restricts to ("title" | "abstract") or None (the whole document)."""
    name = None if tag is None else qs.field_name(tag)
    if tag is None or name in ("tiab", "all"):
        return None
    if name in ("title", "abstract") and index.title_lens is not None:
        return name
    if index.config.unsupported == "reject":
        have = "title and abstract" if index.title_lens is not None else "one text field"
        raise QueryRejected(f"field tag [{tag}] is not supported: this corpus has {have}")
    index.count_ignored(f"field[{tag}]")
    return None


def prefix_ids(index, prefix: str) -> list[int]:
    """Vocabulary ids of the analysed terms starting with `prefix` (lower-cased or stemmed)."""
    if index._terms is None:
        index._terms = sorted(index.vocab)
    terms = index._terms
    found: set[str] = set()
    for start in {prefix.lower(), *index.analyzer(prefix)[:1]}:
        i = bisect.bisect_left(terms, start)
        while i < len(terms) and terms[i].startswith(start):
            found.add(terms[i])
            i += 1
    cap = index.config.max_prefix_terms
    if len(found) > cap:
        index.count_ignored("prefix_capped")
    return [index.vocab[t] for t in sorted(found)[:cap]]
