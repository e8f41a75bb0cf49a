"""Converters on small fixture files in each original format (written by the tests)."""

import json
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepretrieval_jax.data import converters as C
from deepretrieval_jax.data.records import DataFormatError, Example

PICO = {"P": "Adults", "I": "Drug A", "C": "Placebo", "O": "Mortality"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_raw_pubmed_and_ctgov_jsonl(tmp_path):
    pub = write_jsonl(
        tmp_path / "pubmed.jsonl",
        [
            {"id": "MLSEP1", "origin": {"pmid": "9"}, "pico": PICO,
             "publication_pmids": ["1", "2", "1"], "pub_date": "2019/02/13"},
        ],
    )  # fmt: skip
    (ex,) = C.read_pico_jsonl(pub)
    assert ex.id == "MLSEP1" and ex.input == PICO
    assert ex.label == ["1", "2"]  # duplicates dropped, first order kept
    assert ex.search_opts == {"maxdate": "2019/02/13"}
    ct = write_jsonl(
        tmp_path / "ct.jsonl",
        [{"id": "T1", "pico": PICO, "trial_nctids": ["NCT0001"], "pub_date": "2015/01/01"}],
    )
    (ex,) = C.read_pico_jsonl(ct)
    assert ex.label == ["NCT0001"] and ex.meta["pub_date"] == "2015/01/01"
    assert ex.search_opts == {}  # trial search had no date cutoff


@pytest.mark.parametrize(
    "line, field",
    [
        ({"id": "x", "pico": {"P": "a"}, "publication_pmids": []}, "pico"),
        ({"id": "x", "pico": PICO}, "publication_pmids|trial_nctids"),
        ({"id": "x", "pico": PICO, "publication_pmids": "12"}, "publication_pmids"),
        ({"id": "x", "pico": PICO, "publication_pmids": [], "pub_date": "2019-01-01"}, "pub_date"),
    ],
)
def test_raw_jsonl_errors_name_file_line_and_field(tmp_path, line, field):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"id": "ok", "pico": PICO, "trial_nctids": []}, line]
    )
    with pytest.raises(DataFormatError, match=f"bad.jsonl, line 2: field '{field}'") as info:
        C.read_pico_jsonl(path)
    assert (info.value.line, info.value.field) == (2, field)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": 1}\n{oops\n')
    with pytest.raises(DataFormatError, match="x.jsonl, line 2: invalid JSON"):
        list(C.iter_jsonl(path))


def _verl_row(prompt_text, target, index, *, inp=None, pub_date=None, score=None):
    row = {
        "data_source": "pubmed",
        "prompt": [{"content": prompt_text, "role": "user"}],
        "ability": "literature_mining",
        "reward_model": {"ground_truth": {"target": target}, "style": "rule"},
        "extra_info": {"index": index, "split": "test"},
    }
    if inp is not None:
        row["input"] = inp
    if pub_date is not None:
        row["pub_date"] = pub_date
    if score is not None:
        row["reward_model"]["ground_truth"]["score"] = score
    return row


def test_verl_parquet_with_input_column(tmp_path):
    pico_text = "P: Adults\nI: Drug A\nC: Placebo\nO: Mortality\n"
    rows = [_verl_row("<|im_start|>...", ["11", "12"], 7, inp=pico_text, pub_date="2010/12/08")]
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (ex,) = C.read_verl_parquet(path)
    assert ex == Example(
        "pubmed-test-7",
        PICO,
        ["11", "12"],
        {"maxdate": "2010/12/08"},
        {"source": str(path), "row": 0, "data_source": "pubmed", "split": "test",
         "pub_date": "2010/12/08"},
    )  # fmt: skip


def test_verl_parquet_recovers_input_from_prompt_and_graded_labels(tmp_path):
    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Here's the scientific claim:\nVitamin D prevents flu.\nAssistant: Let me think step by "
        "step. \n<think>\n"
    )
    rows = [_verl_row(prompt, ["d1", "d2"], 0, score=[2, 1])]
    path = tmp_path / "beir.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (ex,) = C.read_verl_parquet(path)
    assert ex.input == "Vitamin D prevents flu." and ex.label == {"d1": 2, "d2": 1}
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([_verl_row("no header here", ["d"], 0)]), bad)
    with pytest.raises(DataFormatError, match="bad.parquet, line 1: field 'prompt'"):
        C.read_verl_parquet(bad)


def test_verl_parquet_keeps_fractional_grades_and_the_first_of_a_repeated_id(tmp_path):
    rows = [_verl_row("<|im_start|>", ["d1", "d2", "d1"], 0, inp="claim", score=[0.5, 2, 1])]
    path = tmp_path / "graded.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (ex,) = C.read_verl_parquet(path)
    assert ex.label == {"d1": 0.5, "d2": 2}
    assert isinstance(ex.label["d2"], int)  # integral grades stay ints in the stored JSON


def test_parse_pico_text():
    assert C.parse_pico_text("P: a\nI: b\nC: c\nO: d\n") == {"P": "a", "I": "b", "C": "c", "O": "d"}
    assert C.parse_pico_text("P: a\nmore\nI: b\nC: \nO: d")["P"] == "a\nmore"
    assert C.parse_pico_text("A claim about P: values") is None


def test_dpr_qa_jsonl(tmp_path):
    path = write_jsonl(
        tmp_path / "nq-test.jsonl",
        [{"question": "who wrote hamlet", "answers": ["Shakespeare", "William Shakespeare"]}],
    )
    (ex,) = C.read_dpr_qa_jsonl(path, id_prefix="nq-")
    assert (ex.id, ex.input, ex.label) == (
        "nq-0",
        "who wrote hamlet",
        ["Shakespeare", "William Shakespeare"],
    )
    write_jsonl(path, [{"question": "q", "answers": []}])
    with pytest.raises(DataFormatError, match="line 1: field 'answers': empty list"):
        C.read_dpr_qa_jsonl(path)


def make_beir(root):
    root.mkdir()
    write_jsonl(root / "corpus.jsonl", [
        {"_id": "d1", "title": "Aspirin", "text": "Aspirin reduces fever."},
        {"_id": "d2", "title": "", "text": "Unrelated."},
    ])  # fmt: skip
    write_jsonl(
        root / "queries.jsonl", [{"_id": "q1", "text": "fever drug"}, {"_id": "q2", "text": "x"}]
    )
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\nq2\td2\t0\n"
    )
    return root


def test_beir(tmp_path):
    root = make_beir(tmp_path / "tiny")
    exs = C.read_beir(root, "test")
    assert exs == [
        Example("q1", "fever drug", {"d1": 2}, {}, {"source": str(root)})
    ]  # q2: no positive
    assert list(C.iter_beir_corpus(root / "corpus.jsonl"))[0] == (
        "d1",
        "Aspirin",
        "Aspirin reduces fever.",
    )
    with pytest.raises(FileNotFoundError, match="no qrels for split 'dev'"):
        C.read_beir(root, "dev")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\tbig\n")
    with pytest.raises(DataFormatError, match="test.tsv, line 2: field 'score'"):
        C.read_beir(root, "test")


def make_db(path, ddl):
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path)
    conn.executescript(ddl)
    conn.close()


def test_bird_and_spider_json(tmp_path):
    make_db(tmp_path / "db" / "shop" / "shop.sqlite", "CREATE TABLE item (id INT, price REAL);")
    bird = tmp_path / "dev.json"
    bird.write_text(json.dumps([
        {"question_id": 5, "db_id": "shop", "question": "Max price?", "evidence": "price in USD",
         "SQL": "SELECT MAX(price) FROM item"},
    ]))  # fmt: skip
    (ex,) = C.read_sql_json(bird, tmp_path / "db", "bird")
    assert ex.id == "5" and ex.label == "SELECT MAX(price) FROM item"
    assert ex.input == {
        "question": "Max price?",
        "schema": "CREATE TABLE item (id INT, price REAL)",
        "evidence": "price in USD",
    }
    assert ex.search_opts["db_id"] == "shop" and ex.search_opts["db_path"].endswith("shop.sqlite")
    spider = tmp_path / "spider.json"
    spider.write_text(
        json.dumps([{"db_id": "shop", "question": "All?", "query": "SELECT * FROM item"}])
    )
    (ex,) = C.read_sql_json(spider, tmp_path / "db", "spider")
    assert (ex.id, ex.label, ex.input["evidence"]) == ("spider-0", "SELECT * FROM item", "")
    spider.write_text(json.dumps([{"db_id": "shop", "question": "All?"}]))
    with pytest.raises(DataFormatError, match="field 'item 0.query'"):
        C.read_sql_json(spider, tmp_path / "db", "spider")
    spider.write_text(json.dumps([{"db_id": "nope", "question": "q", "query": "SELECT 1"}]))
    with pytest.raises(FileNotFoundError, match="nope.sqlite"):
        C.read_sql_json(spider, tmp_path / "db", "spider")


def test_example_json_round_trip():
    ex = Example("a", {"question": "q", "schema": "s"}, {"d": 1}, {"db_id": "x"}, {"row": 3})
    assert Example.from_json(ex.to_json()) == ex
    assert Example.from_json(ex.to_json().encode()) == ex


def test_dpr_passages_to_beir(tmp_path):
    import gzip

    src = tmp_path / "psgs.tsv.gz"
    with gzip.open(src, "wt") as f:
        f.write(
            'id\ttext\ttitle\n1\t"Aaron is a prophet"\tAaron\n2\tHamlet by Shakespeare\tHamlet\n'
        )
    assert C.dpr_passages_to_beir(src, tmp_path / "wiki") == 2
    docs = list(C.iter_beir_corpus(tmp_path / "wiki" / "corpus.jsonl"))
    assert docs == [("1", "Aaron", "Aaron is a prophet"), ("2", "Hamlet", "Hamlet by Shakespeare")]
    (tmp_path / "bad.tsv").write_text("id\ttext\ttitle\n1\tonly two\n")
    with pytest.raises(DataFormatError, match="bad.tsv, line 2: expected 3 columns"):
        C.dpr_passages_to_beir(tmp_path / "bad.tsv", tmp_path / "w2")
    assert list((tmp_path / "w2").iterdir()) == []
