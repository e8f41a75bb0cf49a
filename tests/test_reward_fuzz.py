"""Fuzz (issue 14): random and hostile completions through every task family's reward path.

Each example is one completion, scored through the real `RewardPool` by one task of each
family (RecallTask, EvidenceTask and NdcgTask over a real BM25 index, SqlTask over a real
sqlite database). Invariants checked per completion:
- scoring never fails as infrastructure: every result is valid (a broken completion, a
  malformed Boolean query or a runaway SQL query is the policy's fault, scored as such);
- the whole batch finishes within `BATCH_BOUND_S` (the SQL time limit is 0.2 s) and parsing
  alone within `PARSE_BOUND_S` of CPU time, whatever the text (hostile fences, thousands of tags, deep
  nesting, printf bombs).
Generated text includes lone surrogates: a query holding one is the policy's fault (rejected),
never an infrastructure failure.
"""

import json
import sqlite3
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from search_fakes import DOCS, write_beir

from deepretrieval_jax.rewards import PoolConfig, RewardPool, RewardRequest, make_tasks
from deepretrieval_jax.rewards.parsing import parse_completion
from deepretrieval_jax.search.bm25 import BM25Backend, BM25Index
from deepretrieval_jax.search.sql import SQLBackend, SQLConfig

BATCH_BOUND_S = 3.0  # Generous for a loaded 2-core CI machine; typical batches take ~10 ms.
# Catches super-linear parsing (the old pattern took 2.3 s at 2,048 spaces, 17.5 s at 4,096)
# in CPU seconds of the parsing thread; benchmarks/hostile_inputs.py measures the real figure.
PARSE_BOUND_S = 1.0

RUNAWAY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
_HOSTILE = [
    "```" + " " * 4096,  # Unclosed fence over whitespace (cubic under the old regex).
    "<answer>" * 3000,
    "(" * 1200,
    "(" * 400 + "aspirin AND heart",
    "NOT " * 900,
    "[" * 2000,
    '"' * 501,
    "printf('%.*c', 200000000, 'x')",
    RUNAWAY,
    "zeroblob(100000000)",
    "\\u00e9\\n\\t",
]
_WORDS = ["aspirin", "heart", "stroke", "AND", "OR", "NOT", "(", ")", '"', "*", "[tiab]", " "]
_SQL = ["SELECT ", "name ", "FROM people ", "WHERE ", "age > 30", ", ", "*", "'", ";", "("]


_TEXT = st.text(max_size=40) | st.sampled_from(["aspirin\ud800", "\udfff(", "x\ud83d"])
_QUERY = st.lists(
    st.one_of(st.sampled_from(_WORDS + _SQL + _HOSTILE), _TEXT), min_size=1, max_size=12
).map("".join)


@st.composite
def completions(draw) -> str:
    query = draw(_QUERY)
    payload = draw(
        st.sampled_from(  # Well-formed payloads weighted up, so most samples reach a backend.
            [
                *[json.dumps({"query": query, "sql": query})] * 4,
                "```json\n" + json.dumps({"query": query, "sql": query}) + "\n```",
                query,
                '{"query": ' + query,
                "[" * 5000,
            ]
        )
    )
    parts = draw(
        st.lists(
            st.one_of(
                st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "```", "{"]),
                st.sampled_from(_HOSTILE),
                _TEXT,
            ),
            max_size=4,
        )
    )
    head = draw(st.sampled_from(["<think>reason</think>"] * 4 + ["", "<think>"]))
    tail = "".join(parts)
    return draw(
        st.sampled_from(
            [
                *[f"{head}<answer>{payload}</answer>"] * 4,
                f"{head}<answer>{payload}</answer>{tail}",
                f"{tail}{head}<answer>{payload}",
                f"{head}{tail}<answer>{payload}</answer>",
            ]
        )
    )


def _answer(payload: str) -> str:
    return f"<think>t</think><answer>{payload}</answer>"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    db = root / "shop.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, age INTEGER);"
        "INSERT INTO people VALUES (1, 'ann', 31), (2, 'bob', 45), (3, 'cy', 31);"
    )
    conn.commit()
    conn.close()
    index = BM25Index.from_beir(write_beir(root / "corpus"))
    backends = {"bm25": BM25Backend(index), "sql": SQLBackend(SQLConfig(timeout_s=0.2))}
    passages = {d: f"{title}\n{text}" for d, (title, text, _) in DOCS.items()}
    tasks = make_tasks(
        {
            "pubmed": {"backend": "bm25", "k": 5},  # RecallTask over the local index.
            "nq": {"backend": "bm25", "k": 5},  # EvidenceTask.
            "scifact": {"k": 5},  # NdcgTask.
            "bird": None,  # SqlTask.
        },
        passages=passages,
    )
    config = PoolConfig(batch_timeout_s=30.0, max_invalid_fraction=1.0, cache_mode="off")
    with RewardPool(backends, tasks, config) as p:
        p.db = str(db)
        yield p


def _requests(pool, completion):
    return [
        RewardRequest("pubmed", completion, ["d1", "d4"]),
        RewardRequest("nq", completion, ["aspirin"]),
        RewardRequest("scifact", completion, {"d1": 1}),
        RewardRequest("bird", completion, "SELECT name FROM people", {"db_path": pool.db}),
    ]


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(completion=completions())
@example(completion=_answer("```" + " " * 4096 + "x"))  # The defects issue 14 found, always run.
@example(completion="<answer>" * 20_000)
@example(completion=_answer(json.dumps({"query": "(" * 400 + "a AND b", "sql": "x"})))
@example(completion=_answer(json.dumps({"query": "NOT " * 995 + "x", "sql": "x"})))
@example(completion=_answer(json.dumps({"sql": " || ".join(["printf('%.*c', 2e8, 'x')"] * 9)})))
@example(completion=_answer(json.dumps({"sql": RUNAWAY})))  # Runaway CTE: 0.2 s limit.
def test_random_completions_are_scored_as_policy_outcomes_within_bounds(pool, completion):
    # CPU time of this thread, not wall time: a starved CI worker waits without spending it,
    # while super-linear parsing spends it (it failed once at 1.47 s wall under CI load).
    start = time.thread_time()
    for key in ("query", "sql"):
        parse_completion(completion, key=key)
    assert time.thread_time() - start < PARSE_BOUND_S
    start = time.perf_counter()
    results = pool.score(_requests(pool, completion), timeout=60)
    elapsed = time.perf_counter() - start
    assert elapsed < BATCH_BOUND_S, (elapsed, completion[:200])
    for r in results:
        assert r.valid, (r.error, completion[:200])


def test_the_fuzzed_paths_reach_a_graded_answer(pool):
    """The strategy's well-formed branch really reaches grading in every family."""
    good = '<think>t</think><answer>{"query": "aspirin stroke", "sql": "SELECT name FROM people"}'
    results = pool.score(_requests(pool, good + "</answer>"))
    assert [r.answer_ok for r in results] == [True] * 4
    assert results[0].metrics["recall"] == 1.0 and results[3].bucket == "match"
    hostile = pool.score(_requests(pool, good.replace("aspirin stroke", "NOT " * 900 + "x")))
    assert all(r.valid for r in hostile)
