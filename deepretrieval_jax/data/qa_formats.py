"""Evidence-seeking (NQ, TriviaQA, SQuAD) source formats -> `Example` records and passages.

- SQuAD v1.1 / v2.0 json (`data[].paragraphs[].qas[]`): each answerable question -> input the
  question, label its unique answer texts (v2's unanswerable questions, `is_impossible` or no
  answers, are skipped: nothing can be found for them). `squad_passages` yields the paragraphs
  as passages (id `<file stem>-<article>-<paragraph>`, title the article's), so SQuAD can be
  run over its own paragraphs as well as over DPR Wikipedia.
- DPR question files: `*.csv` qas (`question<TAB>answers`, answers a Python/JSON list, no
  header; `nq-test.csv`, `trivia-dev.csv`, ...) and the retriever json (`nq-train.json`,
  `trivia-dev.json`: a list of objects with `question` and `answers`).
- `write_beir_corpus(passages, out_dir)`: (id, title, text) -> `out_dir/corpus.jsonl`, written
  to a temporary name and renamed, so an interrupted write leaves nothing behind.

Every malformed record raises `DataFormatError` naming the file, line (or item) and field.
"""

from __future__ import annotations

import ast
import csv
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from deepretrieval_jax.data.records import DataFormatError, Example

PathLike = str | os.PathLike


def _load_json(path: PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, e.lineno, None, f"invalid JSON ({e.msg})") from None


def _answers(value: Any, path: PathLike, where: Any, field: str = "answers") -> list[str]:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise DataFormatError(path, where, field, "expected a list of strings")
    return list(dict.fromkeys(a for a in value if a.strip()))


# --- SQuAD ---------------------------------------------------------------------------------------


def _squad_articles(path: PathLike) -> list[dict]:
    doc = _load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataFormatError(path, None, "data", "expected SQuAD json: {'data': [articles]}")
    return doc["data"]


def read_squad_json(path: PathLike) -> list[Example]:
    """SQuAD v1.1 / v2.0 json -> one Example per answerable question (see module doc)."""
    out = []
    for a, article in enumerate(_squad_articles(path)):
        for p, paragraph in enumerate(article.get("paragraphs") or []):
            for q, qa in enumerate(paragraph.get("qas") or []):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                if not isinstance(qa, dict) or not isinstance(qa.get("question"), str):
                    raise DataFormatError(path, None, f"{where}.question", "missing")
                if qa.get("is_impossible"):
                    continue
                raw = qa.get("answers")
                if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
                    raise DataFormatError(path, None, f"{where}.answers", "expected a list")
                texts = [x.get("text") for x in raw]
                answers = _answers(texts, path, None, f"{where}.answers[].text")
                if not answers:
                    continue
                ex_id = str(qa.get("id") or f"{Path(path).stem}-{a}-{p}-{q}")
                meta = {"source": str(path), "title": str(article.get("title") or "")}
                out.append(Example(ex_id, qa["question"], answers, {}, meta))
    return out


def squad_passages(path: PathLike) -> Iterator[tuple[str, str, str]]:
    """(passage id, article title, paragraph text) for every paragraph of a SQuAD json."""
    stem = Path(path).stem
    for a, article in enumerate(_squad_articles(path)):
        title = str(article.get("title") or "").replace("_", " ")
        for p, paragraph in enumerate(article.get("paragraphs") or []):
            if not isinstance(paragraph.get("context"), str):
                raise DataFormatError(path, None, f"data[{a}].paragraphs[{p}].context", "missing")
            yield f"{stem}-{a}-{p}", title, paragraph["context"]


# --- DPR question files --------------------------------------------------------------------------


def read_dpr_qas_csv(path: PathLike, id_prefix: str = "") -> list[Example]:
    """DPR's qas files: `question<TAB>answers` per line (answers a Python or JSON list)."""
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for line, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row:
                continue
            if len(row) != 2:
                raise DataFormatError(path, line, None, f"expected 2 columns, got {len(row)}")
            try:
                value = ast.literal_eval(row[1])
            except (ValueError, SyntaxError):
                raise DataFormatError(path, line, "answers", "not a list literal") from None
            answers = _answers(value, path, line)
            if not answers:
                raise DataFormatError(path, line, "answers", "empty list")
            meta = {"source": str(path), "line": line}
            out.append(Example(f"{id_prefix}{line - 1}", row[0], answers, {}, meta))
    return out


def read_dpr_retriever_json(path: PathLike, id_prefix: str = "") -> list[Example]:
    """DPR's retriever json (`nq-train.json`, ...): a list of {question, answers, ...}."""
    items = _load_json(path)
    if not isinstance(items, list):
        raise DataFormatError(path, None, None, "expected a JSON list of questions")
    out = []
    for i, item in enumerate(items):
        where = f"item {i}"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise DataFormatError(path, None, f"{where}.question", "missing or not a string")
        answers = _answers(item.get("answers"), path, None, f"{where}.answers")
        if not answers:
            raise DataFormatError(path, None, f"{where}.answers", "empty list")
        meta = {"source": str(path), "index": i}
        out.append(Example(f"{id_prefix}{i}", item["question"], answers, {}, meta))
    return out


# --- Corpus --------------------------------------------------------------------------------------


def write_beir_corpus(passages: Iterable[tuple[str, str, str]], out_dir: PathLike) -> int:
    """(id, title, text) -> `out_dir/corpus.jsonl` (BEIR layout); returns the passage count.

    Repeated ids are an error (a corpus built from several files must not collide).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "corpus.jsonl.part"
    seen: set[str] = set()
    try:
        with open(tmp, "w", encoding="utf-8") as w:
            for doc_id, title, text in passages:
                if doc_id in seen:
                    raise DataFormatError(out_dir, None, "_id", f"repeated passage id {doc_id!r}")
                seen.add(doc_id)
                w.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out / "corpus.jsonl")
    return len(seen)
