"""Converters from the formats DeepRetrieval used into `Example` records.

- raw PubMed / ClinicalTrials.gov jsonl: `id, pico{P,I,C,O}, publication_pmids | trial_nctids,
  pub_date "YYYY/MM/DD"` -> input PICO dict, label ids, meta pub_date, and for PubMed
  search_opts {"maxdate": pub_date} (the original searched trials without a date cutoff).
- DeepRetrieval's preprocessed (verl) parquet: `input, label?, pub_date?, data_source, prompt,
  reward_model.ground_truth.target, extra_info{split,index}` -> the PICO is parsed back from
  `input` (`P: ...\\nI: ...`), or the text after the input header of the prompt otherwise.
- DPR-style question/answers jsonl: `{"question", "answers": [...]}` -> label answer strings.
- BEIR: `corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv` -> label {doc_id: grade}.
- BIRD / Spider json + sqlite databases -> input {question, schema, evidence}, label gold SQL,
  search_opts {"db_id", "db_path"}.

Every malformed line raises `DataFormatError` naming the file, line and field.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deepretrieval_jax.data.records import DataFormatError, Example
from deepretrieval_jax.data.tasks import PICO_KEYS

PathLike = str | os.PathLike


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line; bad JSON names the line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, lineno, None, f"invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataFormatError(path, lineno, None, "expected a JSON object")
            yield lineno, obj


def _require(obj: dict, field: str, path: PathLike, line: int | None, kind=None) -> Any:
    if field not in obj or obj[field] is None:
        raise DataFormatError(path, line, field, "missing")
    value = obj[field]
    if kind is not None and not isinstance(value, kind):
        raise DataFormatError(path, line, field, f"expected {kind}, got {type(value).__name__}")
    return value


def _id_list(value: Any, path: PathLike, line: int | None, field: str) -> list[str]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise DataFormatError(path, line, field, f"expected a list, got {type(value).__name__}")
    # Duplicate labels would lower recall (reference 7.8): keep the first occurrence.
    return list(dict.fromkeys(str(v) for v in value))


def _pico(value: Any, path: PathLike, line: int | None) -> dict:
    if not isinstance(value, dict):
        raise DataFormatError(path, line, "pico", "expected an object with keys P, I, C, O")
    missing = [k for k in PICO_KEYS if k not in value]
    if missing:
        raise DataFormatError(path, line, "pico", f"missing keys {missing}")
    return {k: str(value[k] or "") for k in PICO_KEYS}


# --- PubMed / ClinicalTrials.gov -----------------------------------------------------------------


def read_pico_jsonl(path: PathLike, label_field: str | None = None) -> list[Example]:
    """Raw DeepRetrieval search-engine jsonl (`publication_pmids` or `trial_nctids` labels)."""
    out = []
    for line, obj in iter_jsonl(path):
        field = label_field
        if field is None:
            field = next((f for f in ("publication_pmids", "trial_nctids") if f in obj), None)
            if field is None:
                raise DataFormatError(path, line, "publication_pmids|trial_nctids", "missing")
        ex_id = str(_require(obj, "id", path, line))
        opts, meta = {}, {"source": str(path), "line": line}
        if obj.get("pub_date"):
            meta["pub_date"] = _pub_date(obj["pub_date"], path, line)
            if field == "publication_pmids":  # PubMed searches stop at the review's date
                opts["maxdate"] = meta["pub_date"]
        out.append(
            Example(
                id=ex_id,
                input=_pico(_require(obj, "pico", path, line), path, line),
                label=_id_list(_require(obj, field, path, line), path, line, field),
                search_opts=opts,
                meta=meta,
            )
        )
    return out


_DATE = re.compile(r"^\d{4}/\d{2}/\d{2}$")


def _pub_date(value: Any, path: PathLike, line: int | None) -> str:
    value = str(value)
    if not _DATE.match(value):
        raise DataFormatError(path, line, "pub_date", f"expected YYYY/MM/DD, got {value!r}")
    return value


_PICO_LINE = re.compile(r"^([PICO]):\s?(.*)$")


def parse_pico_text(text: str) -> dict | None:
    """`P: ...\\nI: ...\\nC: ...\\nO: ...` -> dict, or None if it is not in that form."""
    found: dict[str, str] = {}
    key = None
    for raw in text.strip("\n").split("\n"):
        m = _PICO_LINE.match(raw)
        if m and m.group(1) not in found:
            key = m.group(1)
            found[key] = m.group(2)
        elif key is not None:  # a continuation line of a multi-line field
            found[key] += "\n" + raw
        else:
            return None
    return found if set(found) == set(PICO_KEYS) else None


def read_verl_parquet(path: PathLike) -> list[Example]:
    """DeepRetrieval's preprocessed parquet (`data_source`, `prompt`, `reward_model`, ...)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    out = []
    for i, row in enumerate(rows):
        line = i + 1  # row number, reported like a line
        rm = _require(row, "reward_model", path, line, dict)
        gt = _require(rm, "ground_truth", path, line, dict)
        target = _require(gt, "target", path, line)
        source = str(_require(row, "data_source", path, line))
        if isinstance(target, str):
            label: Any = target  # gold SQL
        elif "score" in gt and gt["score"] is not None:  # BEIR: graded relevance
            ids, scores = list(target), list(gt["score"])
            if len(ids) != len(scores):
                raise DataFormatError(
                    path, line, "reward_model.ground_truth.score", "length != target"
                )
            label = _grades(ids, scores, path, line)
        else:
            label = _id_list(target, path, line, "reward_model.ground_truth.target")
        text = row.get("input")
        if text is None:
            text = _input_from_prompt(row, path, line)
        pico = parse_pico_text(text)
        extra = row.get("extra_info") or {}
        split, index = extra.get("split", ""), extra.get("index", i)
        meta = {"source": str(path), "row": i, "data_source": source, "split": split}
        opts = {}
        if row.get("pub_date"):
            meta["pub_date"] = _pub_date(row["pub_date"], path, line)
            if source.startswith("pubmed"):  # PubMed searches stop at the review's date
                opts["maxdate"] = meta["pub_date"]
        out.append(
            Example(
                id=f"{source}-{split}-{index}",
                input=pico if pico is not None else text,
                label=label,
                search_opts=opts,
                meta=meta,
            )
        )
    return out


def _grades(ids: list, scores: list, path: PathLike, line: int) -> dict[str, float | int]:
    """{doc id: grade}; fractional grades kept, a repeated id keeps its first grade."""
    label: dict[str, float | int] = {}
    for doc, score in zip(ids, scores, strict=True):
        try:
            grade = float(score)
        except (TypeError, ValueError):
            field = "reward_model.ground_truth.score"
            raise DataFormatError(path, line, field, f"not a number: {score!r}") from None
        label.setdefault(str(doc), int(grade) if grade.is_integer() else grade)
    return label


def _input_from_prompt(row: dict, path: PathLike, line: int) -> str:
    """Recovers the input from the hand-written prompt when there is no `input` column."""
    prompt = _require(row, "prompt", path, line)
    if not prompt or "content" not in prompt[0]:
        raise DataFormatError(path, line, "prompt", "expected [{'role', 'content'}, ...]")
    content = prompt[0]["content"]
    m = re.search(r"(?:Here's the [^\n]*:|following PICO:)\n(.*?)\n(?:<\|im_end\|>|Assistant:)",
                  content, re.S)  # fmt: skip
    if not m:
        raise DataFormatError(path, line, "prompt", "no input found after the input header")
    return m.group(1).strip("\n")


# --- Evidence seeking (DPR format) ---------------------------------------------------------------


def read_dpr_qa_jsonl(path: PathLike, id_prefix: str = "") -> list[Example]:
    """DPR-style `{"question", "answers": [...]}` jsonl (NQ, TriviaQA, SQuAD)."""
    out = []
    for line, obj in iter_jsonl(path):
        question = _require(obj, "question", path, line, str)
        answers = _id_list(_require(obj, "answers", path, line), path, line, "answers")
        if not answers:
            raise DataFormatError(path, line, "answers", "empty list")
        ex_id = str(obj.get("id", f"{id_prefix}{line - 1}"))
        out.append(Example(ex_id, question, answers, {}, {"source": str(path), "line": line}))
    return out


# --- BEIR ----------------------------------------------------------------------------------------


def read_beir_qrels(path: PathLike) -> dict[str, dict[str, int]]:
    """`query-id<TAB>corpus-id<TAB>score` with a header -> {qid: {doc_id: grade}}."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        for lineno, row in enumerate(reader, 1):
            if lineno == 1 and row and row[0] == "query-id":
                continue
            if not row:
                continue
            if len(row) != 3:
                raise DataFormatError(path, lineno, None, f"expected 3 columns, got {len(row)}")
            try:
                grade = int(row[2])
            except ValueError:
                raise DataFormatError(
                    path, lineno, "score", f"not an integer: {row[2]!r}"
                ) from None
            qrels.setdefault(row[0], {})[row[1]] = grade
    return qrels


def read_beir_queries(path: PathLike) -> dict[str, str]:
    return {
        str(_require(o, "_id", path, n)): _require(o, "text", path, n, str)
        for n, o in iter_jsonl(path)
    }


def iter_beir_corpus(path: PathLike) -> Iterator[tuple[str, str, str]]:
    """(doc_id, title, text) per corpus line."""
    for n, o in iter_jsonl(path):
        yield str(_require(o, "_id", path, n)), str(o.get("title") or ""), o.get("text") or ""


def read_beir(beir_dir: PathLike, split: str = "test") -> list[Example]:
    """BEIR queries with qrels for `split`: label {doc_id: grade}, only positive grades kept."""
    beir_dir = Path(beir_dir)
    qrels_path = beir_dir / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        raise FileNotFoundError(f"{qrels_path}: no qrels for split {split!r} in {beir_dir}")
    queries = read_beir_queries(beir_dir / "queries.jsonl")
    out = []
    for qid, rels in read_beir_qrels(qrels_path).items():
        if qid not in queries:
            raise DataFormatError(qrels_path, None, "query-id", f"{qid!r} not in queries.jsonl")
        label = {d: g for d, g in rels.items() if g > 0}
        if label:
            out.append(Example(qid, queries[qid], label, {}, {"source": str(beir_dir)}))
    return out


# --- SQL (BIRD, Spider) --------------------------------------------------------------------------


def sqlite_schema(db_path: PathLike) -> str:
    """The CREATE TABLE statements of a database (read-only), joined by blank lines."""
    if not Path(db_path).exists():
        raise FileNotFoundError(f"{db_path}: sqlite database not found")
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type='table' AND name != 'sqlite_sequence' "
            "AND sql IS NOT NULL ORDER BY rowid"
        ).fetchall()
    finally:
        conn.close()
    return "\n\n".join(r[0].strip() for r in rows)


def read_sql_json(path: PathLike, db_root: PathLike, dataset: str) -> list[Example]:
    """BIRD (`question, db_id, evidence, SQL`) or Spider (`question, db_id, query`) json.

    `db_root/<db_id>/<db_id>.sqlite` must exist; the schema comes from it.
    """
    with open(path, encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, e.lineno, None, f"invalid JSON ({e.msg})") from None
    if not isinstance(items, list):
        raise DataFormatError(path, None, None, "expected a JSON list of examples")
    gold_field = "SQL" if dataset == "bird" else "query"
    schemas: dict[str, str] = {}
    out = []
    for i, item in enumerate(items):
        where = f"item {i}"
        if not isinstance(item, dict):
            raise DataFormatError(path, None, where, "expected an object")
        for field in ("question", "db_id", gold_field):
            if not isinstance(item.get(field), str):
                raise DataFormatError(path, None, f"{where}.{field}", "missing or not a string")
        db_id = item["db_id"]
        db_path = Path(db_root) / db_id / f"{db_id}.sqlite"
        if db_id not in schemas:
            schemas[db_id] = sqlite_schema(db_path)
        out.append(
            Example(
                id=str(item.get("question_id", f"{dataset}-{i}")),
                input={
                    "question": item["question"],
                    "schema": schemas[db_id],
                    "evidence": item.get("evidence", "") or "",
                },
                label=item[gold_field],
                search_opts={"db_id": db_id, "db_path": str(db_path)},
                meta={"source": str(path), "index": i},
            )
        )
    return out


# --- DPR Wikipedia passages -> BEIR corpus ------------------------------------------------------


def dpr_passages_to_beir(tsv_path: PathLike, out_dir: PathLike) -> int:
    """DPR's `psgs_w100.tsv[.gz]` (`id<TAB>text<TAB>title`, header) -> `out_dir/corpus.jsonl`.

    The evidence tasks' BM25 index and answer matching read this BEIR-layout corpus. Returns
    the number of passages written.
    """
    import gzip

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if str(tsv_path).endswith(".gz") else open
    n = 0
    tmp = out / "corpus.jsonl.part"
    try:
        with opener(tsv_path, "rt", encoding="utf-8", newline="") as f, open(tmp, "w") as w:
            for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
                if lineno == 1 and row[:1] == ["id"]:
                    continue
                if len(row) != 3:
                    raise DataFormatError(
                        tsv_path, lineno, None, f"expected 3 columns, got {len(row)}"
                    )
                w.write(json.dumps({"_id": row[0], "title": row[2], "text": row[1]}) + "\n")
                n += 1
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written corpus behind
        raise
    os.replace(tmp, out / "corpus.jsonl")
    return n
