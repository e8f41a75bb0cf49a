"""Tests for rewards/tasks.py: every ladder value of every family, config overrides, fuzzing."""

import asyncio
import math
from collections.abc import Mapping

import ml_collections
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepretrieval_jax.rewards import tasks as T
from deepretrieval_jax.search.base import BackendError, QueryRejected


def answer(value, key="query", think=True):
    body = f'<answer>{{"{key}": "{value}"}}</answer>'
    return f"<think>\nplan\n</think>\n{body}" if think else body


GOOD = answer("a AND b")
LABEL = [f"L{i}" for i in range(20)]  # recall = hits / 20, so 14 hits is exactly 0.7


def retrieved_with_hits(n_hits):
    return [f"L{i}" for i in range(n_hits)] + [f"X{i}" for i in range(50)]


@pytest.mark.parametrize("name", ["pubmed", "ctgov"])
@pytest.mark.parametrize(
    "hits, answer_reward, bucket",
    [
        (20, 5.0, ">=0.7"),
        (14, 5.0, ">=0.7"),  # exactly 0.7
        (13, 4.0, ">=0.5"),
        (10, 4.0, ">=0.5"),
        (9, 3.0, ">=0.4"),
        (8, 3.0, ">=0.4"),
        (7, 1.0, ">=0.3"),
        (6, 1.0, ">=0.3"),
        (5, 0.5, ">=0.1"),
        (2, 0.5, ">=0.1"),
        (1, 0.1, ">=0.05"),  # exactly 0.05
        (0, -3.5, "else"),
    ],
)
def test_recall_ladder_table(name, hits, answer_reward, bucket):
    result = T.make_task(name).score(GOOD, LABEL, retrieved_with_hits(hits))
    assert result.reward == pytest.approx(1.0 + answer_reward)
    assert (result.bucket, result.valid, result.format_ok, result.answer_ok) == (
        bucket,
        True,
        True,
        True,
    )
    assert result.metrics["recall"] == pytest.approx(hits / 20)


@pytest.mark.parametrize(
    "x, expected",
    [
        (0.7, 5.0),
        (0.6999999999, 4.0),
        (math.nextafter(0.7, 0), 4.0),
        (0.5, 4.0),
        (0.4999999, 3.0),
        (0.4, 3.0),
        (0.3, 1.0),
        (0.1, 0.5),
        (0.05, 0.1),
        (0.0499999, -3.5),
        (float("nan"), -3.5),
        (None, -3.5),
    ],
)
def test_recall_ladder_boundaries(x, expected):
    assert T.RECALL_LADDER(x)[0] == expected


def test_recall_dedupes_and_long_cutoff():
    task = T.make_task("pubmed")
    dup = ["L0"] * 5000 + [f"L{i}" for i in range(20)]  # de-duplicated: all 20 within top 3000
    assert task.score(GOOD, LABEL + LABEL, dup).metrics["recall"] == 1.0
    beyond = [f"X{i}" for i in range(3000)] + LABEL  # relevant ids past rank 3000 do not count
    assert task.score(GOOD, LABEL, beyond).reward == pytest.approx(1.0 - 3.5)


@pytest.mark.parametrize(
    "completion, outcome, reward, bucket, valid",
    [
        ("no tags", None, -4.0, "format_bad", True),
        ('<answer>{"query": "x"}</answer>', None, -4.0, "format_bad", True),  # no think tags
        (answer(""), None, -3.0, "answer_bad", True),  # empty query: penalty, not +1
        (answer("   "), None, -3.0, "answer_bad", True),
        ('<think>t</think><answer>["query"]</answer>', None, -3.0, "answer_bad", True),
        ("<think>t</think><answer>42</answer>", None, -3.0, "answer_bad", True),
        ("<think>t</think><answer>not json</answer>", None, -3.0, "answer_bad", True),
        (answer("x", key="sql"), None, -3.0, "answer_bad", True),
        (GOOD, QueryRejected("too long"), -3.0, "answer_bad", True),
        (GOOD, BackendError("HTTP 503"), 0.0, "invalid", False),
    ],
)
def test_recall_penalties_and_invalid(completion, outcome, reward, bucket, valid):
    result = T.make_task("pubmed").score(completion, LABEL, outcome)
    assert (result.reward, result.bucket, result.valid) == (pytest.approx(reward), bucket, valid)
    assert result.error is not None


def test_prompt_suffix_and_no_reasoning():
    generated = 'plan</think><answer>{"query": "q"}</answer>'
    task = T.make_task("pubmed")
    assert task.score(generated, LABEL, LABEL, prompt_suffix="<think>\n").reward == 6.0
    assert task.score(generated, LABEL, LABEL).reward == -4.0  # opening tag missing
    direct = T.make_task("pubmed", {"reasoning": False})
    assert direct.score(answer("q", think=False), LABEL, LABEL).reward == 6.0


class Passages(Mapping):
    """Passage texts: only `hit` mentions the answer."""

    def __init__(self, hit):
        self.hit = hit

    def __getitem__(self, pid):
        return "Paris is the capital of France." if pid == self.hit else "Nothing relevant here."

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0


@pytest.mark.parametrize(
    "rank, nq_reward, squad_reward, bucket",
    [
        (1, 5.0, 5.0, "<=5"),
        (5, 5.0, 5.0, "<=5"),
        (6, 4.0, 4.0, "<=20"),
        (20, 4.0, 4.0, "<=20"),
        (21, 2.0, 2.0, "<=50"),
        (50, 2.0, 2.0, "<=50"),
        (51, 1.0, 1.0, "<=100"),
        (100, 1.0, 1.0, "<=100"),
        (101, 0.5, 0.5, "<=1000"),
        (1000, 0.5, 0.5, "<=1000"),
        (1001, 0.1, 0.1, "<=3000"),
        (3000, 0.1, 0.1, "<=3000"),
        (3001, -3.5, -2.5, "else"),  # beyond the 3000 cutoff
        (None, -3.5, -2.5, "else"),
    ],
)
def test_evidence_ladder_table(rank, nq_reward, squad_reward, bucket):
    ids = [f"p{i}" for i in range(1, 3002)]
    passages = Passages(f"p{rank}")
    for name, expected in [("nq", nq_reward), ("triviaqa", nq_reward), ("squad", squad_reward)]:
        result = T.make_task(name, passages=passages).score(GOOD, ["paris"], ids)
        assert (result.reward, result.bucket) == (pytest.approx(1.0 + expected), bucket), name
        assert result.metrics["hit@5"] == float(rank is not None and rank <= 5)
        assert result.metrics.get("rank") == (float(rank) if bucket != "else" else None)


@pytest.mark.parametrize("name, total", [("nq", -3.0), ("triviaqa", -3.0), ("squad", -2.0)])
def test_evidence_broken_or_empty_answer_penalty_matches_the_original(name, total):
    """The original's squad.py scores a failed answer -3 (total -2); nq/triviaqa -4 (-3)."""
    task = T.make_task(name, passages={"p": "Paris"})
    for completion, outcome in [
        ("<think>t</think><answer>not json</answer>", None),
        ('<think>t</think><answer>{"query": "  "}</answer>', None),
        (GOOD, QueryRejected("query is empty")),
    ]:
        result = task.score(completion, ["paris"], outcome)
        assert (result.reward, result.valid, result.bucket) == (total, True, "answer_bad")


def test_evidence_texts_from_results_and_missing_passage():
    task = T.make_task("nq")
    pairs = [("a", "nope"), ("a", "Paris!"), ("b", "Paris")]  # repeated id keeps its first text
    assert task.score(GOOD, "Paris", pairs).metrics["rank"] == 2.0
    dicts = [{"id": "a", "text": "in Paris"}]
    assert task.score(GOOD, ["paris"], dicts).bucket == "<=5"
    with pytest.raises(LookupError, match="no passages lookup"):
        task.score(GOOD, ["paris"], ["a"])


NDCG_K = {"scifact": 50, "nfcorpus": 1000, "fever": 1000, "hotpotqa": 3000, "fiqa": 1000}
NDCG_K |= {"msmarco_beir": 1000, "scifact_dense": 1000, "nfcorpus_dense": 100}
NDCG_K |= {"hotpotqa_dense": 1000, "msmarco_health": 10, "msmarco_tech": 10}


@pytest.mark.parametrize("name, k", sorted(NDCG_K.items()))
def test_ndcg_family(name, k):
    task = T.make_task(name)
    assert task.config.k == k and task.search_opts({})["top_k"] == k
    grades = {"d1": 2, "d2": 1}
    perfect = task.score(GOOD, grades, ["d1", "d2"])
    assert (perfect.reward, perfect.bucket) == (pytest.approx(1.1), "ndcg>0")
    assert perfect.metrics["ndcg@10"] == pytest.approx(1.0)
    miss = task.score(GOOD, grades, ["zz"])
    assert (miss.reward, miss.bucket, miss.format_ok) == (0.0, "ndcg=0", True)
    assert task.score("junk", grades, None).reward == -2.0
    assert task.score(answer(" "), grades, None).reward == -2.0  # empty query is format-bad
    assert task.score(GOOD, grades, QueryRejected("x")).reward == -2.0
    beyond = [f"x{i}" for i in range(k)] + ["d1"]
    assert task.score(GOOD, grades, beyond).reward == 0.0  # relevant doc just past k


def test_ndcg_reward_uses_sorted_ideal():
    grades = [("d3", 1), ("d1", 3), ("d2", 2)]  # unsorted graded label
    result = T.make_task("scifact").score(GOOD, grades, ["d3", "d1", "d9", "d2"])
    assert result.metrics["ndcg"] == pytest.approx(0.78838, abs=1e-5)
    assert result.reward == pytest.approx(0.1 + 0.78838, abs=1e-5)


SQL = answer("SELECT a FROM t", key="sql")


@pytest.mark.parametrize(
    "name, outcome, reward, bucket",
    [
        ("bird", ([(1,), (2,)], [(2,), (1,)]), 1.1, "match"),
        ("spider", ([(1,)], [(1,)]), 1.1, "match"),
        ("bird", ([(1,)], [(2,)]), 0.4, "mismatch"),
        ("spider", ([(1,)], [(2,)]), 0.0, "mismatch"),
        ("bird", QueryRejected("no such column"), 0.0, "exec_error"),
        ("spider", QueryRejected("syntax error"), 0.0, "exec_error"),
        ("bird", BackendError("locked"), 0.0, "invalid"),
    ],
)
def test_sql_table(name, outcome, reward, bucket):
    result = T.make_task(name).score(SQL, "SELECT a FROM t", outcome)
    assert (result.reward, result.bucket) == (pytest.approx(reward), bucket)
    assert result.valid == (bucket != "invalid")


@pytest.mark.parametrize("completion", ["junk", GOOD, answer("", key="sql"), "<answer>1</answer>"])
def test_sql_format_bad(completion):
    assert T.make_task("bird").score(completion, "SELECT 1", None).reward == -2.0


def test_sql_retrieve_runs_pred_and_gold():
    calls = []

    async def search(query, **opts):
        calls.append((query, opts))
        if query == "BROKEN":
            raise QueryRejected("syntax error")
        return [[1]] if "1" in query else [[2]]

    task = T.make_task("bird")
    got = asyncio.run(task.retrieve("SELECT 1", "SELECT 2", {"db": "x"}, search))
    assert got == ([[1]], [[2]]) and calls == [("SELECT 1", {"db": "x"}), ("SELECT 2", {"db": "x"})]
    with pytest.raises(BackendError, match="gold SQL failed"):
        asyncio.run(task.retrieve("SELECT 1", "BROKEN", {}, search))
    assert asyncio.run(task.retrieve("SELECT 1", [[1]], {}, search)) == ([[1]], [[1]])


def test_config_overrides_and_errors():
    cfg = ml_collections.ConfigDict(
        {"format_ok": 2.0, "ladder": {"steps": [[0.5, 3.0]], "otherwise": -1.0}}
    )
    task = T.make_task("pubmed", cfg)
    assert task.score(GOOD, LABEL, retrieved_with_hits(10)).reward == 5.0
    assert task.score(GOOD, LABEL, retrieved_with_hits(9)).reward == 1.0
    tasks = T.make_tasks({"scifact": None, "bird": {"mismatch": 0.5}})
    assert tasks["bird"].config.mismatch == 0.5 and tasks["scifact"].config.k == 50
    with pytest.raises(ValueError, match="unknown field.*'formatok'"):
        T.make_task("pubmed", {"formatok": 1})
    with pytest.raises(ValueError, match="unknown task 'pubmd'"):
        T.make_task("pubmd")
    with pytest.raises(ValueError, match="monotone"):
        T.make_task("pubmed", {"ladder": {"steps": [[0.1, 1], [0.5, 2]], "otherwise": 0}})
    with pytest.raises(ValueError, match="k must be"):
        T.make_task("scifact", {"k": 0})


@pytest.mark.parametrize(
    "name, label",
    [("pubmed", []), ("pubmed", "12345"), ("nq", []), ("nq", [3]), ("scifact", {"a": 0})],
)
def test_bad_labels_raise(name, label):
    with pytest.raises(ValueError, match=name):
        T.make_task(name).check_label(label)


_TAGS = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", '{"query": ', '{"sql": '])
_TEXT = st.lists(st.one_of(_TAGS, st.text(max_size=10)), max_size=12).map("".join)
_IDS = st.lists(st.sampled_from(["a", "b", "c", "d", 1, 2]), max_size=12)
_OUTCOMES = st.one_of(_IDS, st.just(QueryRejected("r")), st.just(BackendError("b")))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(T.REGISTRY)), _TEXT, _OUTCOMES, st.sampled_from(["", "<think>\n"]))
def test_every_task_reward_is_defined(name, text, outcome, suffix):
    """Any text and any backend outcome give a finite reward, never an exception."""
    task = T.make_task(name, passages={"a": "x y", "b": "answer y", 1: "no", "c": "", "d": "q"})
    label = {"nq": ["answer"], "triviaqa": ["y"], "squad": ["x"]}.get(name, ["a", "c"])
    if isinstance(task, T.SqlTask):
        label = "SELECT 1"
        if isinstance(outcome, list):
            outcome = ([(i,) for i in outcome], [("a",)])
    if isinstance(task, T.EvidenceTask) and isinstance(outcome, list):
        outcome = [i for i in outcome if i != 2]  # every id has a text
    result = task.score(text, label, outcome, prompt_suffix=suffix)
    assert math.isfinite(result.reward)
    assert result.valid == (not (isinstance(outcome, BackendError) and task.parse(text, suffix).ok))
    if not result.valid:
        assert result.reward == 0.0
