r"""Retrieval metrics: recall@k, NDCG@k, first answer-bearing rank, SQL execution match.

Conventions (reference doc section 7.6 and 7.8 fixed):
- Retrieved ids and label ids are de-duplicated keeping the first (best) rank before scoring,
  so a repeated id never counts twice and a repeated label never lowers recall.
- Ids are compared as strings (`"123" == 123`), since services answer PMIDs as strings and
  datasets store them as either.
- NDCG uses linear gains (trec_eval / BEIR: gain = grade) and the true ideal ranking: the label
  grades sorted in decreasing order. Grades <= 0 are non-relevant. NDCG is in [0, 1].
- Answer matching is DPR's / pyserini's `has_answers` (string mode): NFD-normalise, tokenise
  with pyserini's `SimpleTokenizer` (the `regex` pattern `[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]`:
  runs of letters, digits and combining marks, or one character that is neither a separator
  nor a control/format character, so a zero-width space or soft hyphen is no token),
  lowercase, and look for the answer's token sequence as a contiguous run of the passage's
  tokens. Deliberate difference: an answer with no tokens never matches (pyserini's matches
  every passage).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import regex


def _key(item: Any) -> str:
    return str(item)


def dedupe(ids: Iterable[Any]) -> list[Any]:
    """Unique ids in first-seen order (string comparison)."""
    seen: set[str] = set()
    out = []
    for item in ids:
        key = _key(item)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def recall_at_k(retrieved: Sequence[Any], relevant: Iterable[Any], k: int) -> float:
    """|top-k unique retrieved ∩ unique relevant| / |unique relevant|; 0.0 if nothing is relevant."""
    rel = {_key(r) for r in relevant}
    if not rel:
        return 0.0
    top = {_key(r) for r in dedupe(retrieved)[:k]}
    return len(top & rel) / len(rel)


def graded_labels(label: Any) -> dict[str, float]:
    """Label -> {id: grade}. Accepts a mapping id->grade, (id, grade) pairs, or plain ids (grade 1).

    Repeated ids keep their first grade.
    """
    out: dict[str, float] = {}
    items = label.items() if isinstance(label, Mapping) else label
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            key, grade = _key(item[0]), float(item[1])
        else:
            key, grade = _key(item), 1.0
        out.setdefault(key, grade)
    return out


def ndcg_at_k(retrieved: Sequence[Any], grades: Mapping[str, float], k: int) -> float:
    """NDCG@k with linear gains and the sorted ideal ranking; `grades` as from `graded_labels`."""
    gains = sorted((g for g in grades.values() if g > 0), reverse=True)[:k]
    if not gains or k <= 0:
        return 0.0
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    dcg = 0.0
    for i, doc in enumerate(dedupe(retrieved)[:k]):
        g = grades.get(_key(doc), 0.0)
        if g > 0:
            dcg += g / math.log2(i + 2)
    return min(1.0, dcg / idcg)


# pyserini / DPR SimpleTokenizer (same flags): letter/digit/mark runs, or one visible char.
_TOKEN_RE = regex.compile(
    r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]", flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
)


def dpr_tokens(text: str) -> list[str]:
    """DPR-style normalised (NFD), lowercased tokens of `text`."""
    return [t.lower() for t in _TOKEN_RE.findall(unicodedata.normalize("NFD", text))]


def _contains(tokens: Sequence[str], sub: Sequence[str]) -> bool:
    n = len(sub)
    if n == 0 or n > len(tokens):
        return False
    first = sub[0]
    for i in range(len(tokens) - n + 1):
        if tokens[i] == first and list(tokens[i : i + n]) == list(sub):
            return True
    return False


def has_answer(text: str, answers: Iterable[str]) -> bool:
    """True if any answer's token sequence occurs contiguously in `text` (DPR string match)."""
    tokens = dpr_tokens(text)
    return any(_contains(tokens, dpr_tokens(a)) for a in answers)


def first_hit_rank(
    retrieved: Sequence[Any],
    text_of: Callable[[Any], str],
    answers: Sequence[str],
    max_rank: int | None = None,
) -> int | None:
    """1-based rank of the first unique passage containing an answer, or None.

    `text_of(item)` returns a retrieved item's passage text.
    """
    answer_tokens = [t for t in (dpr_tokens(a) for a in answers) if t]
    if not answer_tokens:
        return None
    for rank, item in enumerate(dedupe(retrieved)[:max_rank], start=1):
        tokens = dpr_tokens(text_of(item))
        if any(_contains(tokens, a) for a in answer_tokens):
            return rank
    return None


def _hashable(value: Any) -> Hashable:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def execution_match(predicted_rows: Iterable[Any], gold_rows: Iterable[Any]) -> bool:
    """Result rows equal as sets (BIRD/Spider execution accuracy); order and repeats ignored."""
    return {_hashable(r) for r in predicted_rows} == {_hashable(r) for r in gold_rows}
