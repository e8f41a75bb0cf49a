"""The eval CLI on the multi-turn agent: `eval.run` with a config.agent section rolls out through
`AgentSampler` (a scripted policy that searches twice then answers, or answers at once), scores
the final answer as the query and reports per-turn statistics (JSON aggregates, records, the
printed table)."""

import json

import ml_collections
import pytest
import tiny_models
import trainer_fixtures as fx

from configs import common, eval_scifact
from deepretrieval_jax import eval as ev
from deepretrieval_jax import eval_report
from deepretrieval_jax import sampler as sampler_lib
from deepretrieval_jax.agent.evaluate import turn_aggregates

SEARCHING = ["<search>aspirin colorectal</search>", "<search>aspirin cancer</search>",
             "<answer>aspirin colorectal cancer</answer>"]  # fmt: skip
DIRECT = ["<answer>statins cholesterol</answer>"]


def scripted_fns():
    """Rows whose prompt holds "Z" answer at once; the others search twice, then answer."""
    return tiny_models.scripted_agent_fns([SEARCHING, DIRECT], marker="Z")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return tiny_models.save_tiny_policy(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """fx.DOCS as a BEIR scifact/ dir; claims q0..q3 (q2, q3 hold "Z": they answer at once)."""
    root = tmp_path_factory.mktemp("data")
    beir = root / "scifact"
    (beir / "qrels").mkdir(parents=True)
    with open(beir / "corpus.jsonl", "w") as f:
        for i, text in enumerate(fx.DOCS):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    claims = {"q0": "aspirin", "q1": "colorectal", "q2": "Z statins", "q3": "Z lipids"}
    with open(beir / "queries.jsonl", "w") as f:
        for i, text in claims.items():
            f.write(json.dumps({"_id": i, "text": text}) + "\n")
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq0\td1\t1\nq1\td4\t1\nq2\td2\t1\nq3\td0\t1\n"
    )
    return root


def eval_config(policy_dir, data_dir, max_turns):
    fx.register_task()
    cfg = common.base_config()
    cfg.mesh = common.mesh_config(data=-1)  # 8 fake devices: the batch is padded to 8 rows
    cfg.model.preset = ""
    cfg.model.hf_path = str(policy_dir)
    cfg.model.overrides.dtype = "float32"
    cfg.model.overrides.remat = False
    cfg.data.task = fx.TASK
    cfg.data.data_dir = str(data_dir)
    cfg.data.prompt_buckets = (64, 128)
    cfg.data.max_prompt_len = 128
    cfg.data.prompt.assistant_prefix = ""
    cfg.agent = common.agent_config()
    cfg.agent.max_turns = max_turns
    cfg.agent.docs_per_search = 2
    cfg.agent.doc_chars = 20
    cfg.agent.info_max_tokens = 64
    cfg.agent.max_turn_tokens = 48
    cfg.sampling.stop = ("</answer>",)
    cfg.sampling.max_new_tokens = 3 * 48 + 2 * 65
    cfg.reward.search_opts = ml_collections.ConfigDict(dict(k1=1.2, b=0.75, top_k=10))
    cfg.eval = eval_scifact.eval_config("policy")
    cfg.eval.batch_size = 3  # two batches: rows accumulate across sampler calls
    cfg.eval.compare_baseline = False
    cfg.logging.progress = False
    return cfg


@pytest.fixture()
def scripted(monkeypatch):
    monkeypatch.setattr(sampler_lib, "causal_lm_fns", lambda *a, **k: scripted_fns())


def test_eval_cli_reports_per_turn_statistics(policy_dir, data_dir, tmp_path, scripted):
    report = ev.run(eval_config(policy_dir, data_dir, max_turns=3), tmp_path / "work")
    by_id = {r.id: r for r in report.records}
    # Searching rows: two searches, three turns, the final answer is the scored query.
    for i in ("q0", "q1"):
        r = by_id[i]
        assert r.status == "ok" and r.query == "aspirin colorectal cancer"
        assert r.turns["turns"] == 3 and r.turns["searches"] == 2
        assert r.turns["queries"] == ["aspirin colorectal", "aspirin cancer"]
        assert "<information>" in r.completion and r.completion.endswith("</answer>")
    assert by_id["q0"].metrics["ndcg@10"] == 1.0  # d1 ranks first for the answer
    # BM25 top 2 shown: {d1} for "aspirin colorectal", {d1, d4} for "aspirin cancer" -> 1/3.
    assert by_id["q0"].turns["result_overlap"] == pytest.approx(1 / 3)
    for i in ("q2", "q3"):
        r = by_id[i]
        assert r.status == "ok" and r.query == "statins cholesterol"
        assert r.turns == {"turns": 1, "searches": 0, "queries": [], "answered": True,
                           "result_overlap": None}  # fmt: skip
    agent = report.aggregates["agent"]
    assert agent["rows"] == 4 and agent["answered_fraction"] == 1.0
    assert agent["searches_per_answer"] == 1.0 and agent["searches_mean"] == 1.0
    assert agent["turns_used"] == {"1": 2, "3": 2} and agent["turns_mean"] == 2.0
    assert agent["result_overlap_mean"] == pytest.approx(1 / 3) and agent["rows_with_overlap"] == 2
    assert 0.0 < agent["idle_fraction"] < 1.0  # answering rows idle while the others search
    # Two insertions in batch 1; batch 2's padding rows (8 - 1, no "Z") wait once to be ended.
    assert agent["round_trips"] == 2 + 1
    assert agent["inserted_tokens_mean"] > 31  # two blocks per searching row; tags alone 31
    assert report.settings["agent"]["max_turns"] == 3
    saved = json.loads(next((tmp_path / "work" / "eval").glob("*_policy.json")).read_text())
    assert saved["aggregates"]["agent"] == agent and saved["records"][0]["turns"]["turns"] == 3
    table = eval_report.markdown_table(report)
    assert "agent: answered 1.000, searches per answer 1.00, turns used {1: 2, 3: 2}" in table
    assert "result overlap 0.333 (2 rows)" in table


def test_eval_cli_counts_rows_out_of_turns_as_format_errors(
    policy_dir, data_dir, tmp_path, scripted
):
    report = ev.run(eval_config(policy_dir, data_dir, max_turns=2), tmp_path / "work")
    by_id = {r.id: r for r in report.records}
    # The searching rows still search in their last turn: no answer, a format error (metrics 0).
    assert by_id["q0"].status == "format_error" and by_id["q0"].metrics["ndcg@10"] == 0.0
    assert by_id["q0"].turns["turns"] == 2 and by_id["q0"].turns["searches"] == 2
    assert by_id["q0"].turns["answered"] is False
    agent = report.aggregates["agent"]
    assert agent["answered_fraction"] == 0.5 and agent["searches_per_answer"] == 0.0
    assert agent["turns_used"] == {"1": 2, "2": 2}
    assert report.aggregates["rates"]["format_error_rate"] == 0.5


def test_turn_aggregates_of_no_rows_and_of_unanswered_rows():
    assert turn_aggregates([])["answered_fraction"] == 0.0
    rows = [dict(turns=2, searches=1, answered=False, result_overlap=None)]
    agg = turn_aggregates(rows)
    assert agg["searches_per_answer"] is None and agg["result_overlap_mean"] is None
    assert agg["searches_mean"] == 1.0 and agg["turns_used"] == {"2": 1}
