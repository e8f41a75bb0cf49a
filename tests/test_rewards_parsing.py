"""Tests for rewards/parsing.py and rewards/retrieval_metrics.py."""

import math
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepretrieval_jax.rewards import retrieval_metrics as rm
from deepretrieval_jax.rewards.parsing import (
    MAX_RESPONSE_CHARS,
    _unfence,
    check_tags,
    extract_payload,
    last_answer_span,
    parse_completion,
)

GOOD = '<think>\nreason</think>\n<answer>{"query": "a AND b"}</answer>'


@pytest.mark.parametrize(
    "completion, suffix, reasoning, tags_ok",
    [
        (GOOD, "", True, True),
        (GOOD[len("<think>") :], "<think>", True, True),  # Opening tag supplied by the prompt.
        (GOOD, "<think>", True, False),  # Two <think>: one from the prompt, one generated.
        ("</think><answer>{}</answer>", "", True, False),  # No <think> anywhere.
        ('<answer>{"query": "x"}</answer>', "", False, True),  # No-reasoning variant.
        ('<answer>{"query": "x"}</answer>', "", True, False),
        ("<think></think><answer></answer><answer></answer>", "", True, False),
        ("<think></think></answer>x<answer>", "", True, False),  # Out of order.
        ("<answer></think><think></answer>", "", True, False),
        ('</answer><answer>{"query": "x"}', "", False, False),
        ("Assistant: <think>a</think><answer>{}</answer>", "", True, True),  # Header optional.
    ],
)
def test_tag_rules(completion, suffix, reasoning, tags_ok):
    assert check_tags(completion, suffix, reasoning) is tags_ok


@pytest.mark.parametrize(
    "answer, value, error",
    [
        ('{"query": "a OR b"}', "a OR b", None),
        ('  {"query": "  padded  "} ', "padded", None),
        ('```json\n{"query": "fenced"}\n```', "fenced", None),
        ('Here it is: {"query": "prose"} done', "prose", None),
        ('{"sql": "SELECT 1"}', None, "no 'query' key"),
        ('{"query": ""}', None, "empty"),
        ('{"query": "  \\n "}', None, "empty"),
        ('{"query": 7}', None, "not a string"),
        ('{"query": null}', None, "not a string"),
        ('["query"]', None, "list"),
        ('"query"', None, "str"),
        ("42", None, "int"),
        ("1e999", None, "float"),
        ("null", None, "NoneType"),
        ("not json", None, "not valid JSON"),
        ("", None, "not valid JSON"),
        ("[" * 100_000, None, "not valid JSON"),  # Deep nesting never raises.
        ("9" * 10_000, None, "not valid JSON"),  # Over Python's int-digits limit.
    ],
)
def test_payload(answer, value, error):
    got_value, got_error = extract_payload(answer)
    assert got_value == value
    if error is None:
        assert got_error is None
    else:
        assert error in got_error


def test_last_answer_wins_and_sql_key():
    text = '<answer>{"query": "first"}</answer> more <answer>{"query": "last"}</answer>'
    assert parse_completion(text, reasoning=False).value == "last"
    sql = '<think>t</think><answer>\n{"sql": "SELECT * FROM t"}\n</answer>'
    parsed = parse_completion(sql, key="sql")
    assert parsed.ok and parsed.value == "SELECT * FROM t"


def test_answer_opened_by_the_prompt():
    parsed = parse_completion('{"query": "x"}\n</answer>', "<answer>\n", reasoning=False)
    assert parsed.ok and parsed.value == "x"
    parsed = parse_completion('<answer>{"query": "x"}</answer>', "<answer>\n", reasoning=False)
    assert not parsed.tags_ok  # two opening tags


def test_parse_reports_reason():
    parsed = parse_completion("no tags at all")
    assert (parsed.tags_ok, parsed.value, parsed.ok) == (False, None, False)
    assert "no <answer>" in parsed.error
    wrong_tags = parse_completion('<answer>{"query": "x"}</answer>')  # reasoning: needs <think>
    assert wrong_tags.value == "x" and not wrong_tags.ok and "tag" in wrong_tags.error


_TAGS = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "{", "}", '"query"', ":"])
_TEXT = st.lists(st.one_of(_TAGS, st.text(max_size=12)), max_size=14).map("".join)


@settings(max_examples=400, deadline=None)
@given(_TEXT, st.sampled_from(["", "<think>\n", "<answer>"]), st.booleans())
def test_parser_never_raises(text, suffix, reasoning):
    parsed = parse_completion(text, suffix, reasoning=reasoning)
    assert parsed.ok == (parsed.tags_ok and parsed.value is not None)
    if parsed.value is not None:
        assert parsed.value.strip() == parsed.value and parsed.value
    assert (parsed.error is None) == parsed.ok


# The regular expressions the scanner replaced: an independent reference for what it finds.
_REF_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_REF_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)
_PIECES = st.sampled_from(["<answer>", "</answer>", "```", "json", " ", "\n", "{", "}", "x"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.text(max_size=4)), max_size=16).map("".join))
def test_scanner_matches_the_reference_regexes(text):
    matches = _REF_ANSWER.findall(text)
    assert last_answer_span(text) == (matches[-1] if matches else None)
    stripped = text.strip()
    fenced = _REF_FENCE.match(stripped)
    assert _unfence(stripped) == (fenced.group(1).strip() if fenced else stripped)


@pytest.mark.parametrize(
    "answer",
    [
        "```" + " " * 4096 + "x",  # Unclosed fence: cubic under the old fence regex.
        "```json" + " \n" * 4096 + "{}" + " " * 4096,
    ],
)
def test_parse_is_linear_on_hostile_fences(answer):
    start = time.thread_time()  # CPU time of this thread: immune to a starved CI worker
    parsed = parse_completion(f"<think>t</think><answer>{answer}</answer>")
    assert time.thread_time() - start < 0.1
    assert parsed.value is None and parsed.tags_ok


def test_parse_is_linear_on_many_unclosed_answer_tags():
    """20,000 `<answer>` without a close: quadratic (14 s) under the old findall."""
    start = time.thread_time()  # CPU time of this thread: immune to a starved CI worker
    parsed = parse_completion("<answer>" * 20_000 + '{"query": "x"}')
    assert time.thread_time() - start < 0.1
    assert parsed.value is None


def test_overlong_response_is_a_format_failure():
    parsed = parse_completion(" " * MAX_RESPONSE_CHARS + '<answer>{"query": "x"}</answer>', "")
    assert (parsed.tags_ok, parsed.value) == (False, None)
    assert "longer than" in parsed.error


# Metrics -------------------------------------------------------------------------------------


def test_recall_dedupes_both_sides():
    assert rm.recall_at_k(["1", "1", "2", "3"], ["1", "2", "2", "4"], k=3) == pytest.approx(2 / 3)
    # Duplicates do not push relevant ids out of the top-k window.
    assert rm.recall_at_k(["1", "1", "1", "2"], ["2"], k=2) == 1.0
    assert rm.recall_at_k(["1", 2], [1, "2"], k=10) == 1.0  # ids compare as strings
    assert rm.recall_at_k(["1"], [], k=10) == 0.0


def test_ndcg_hand_computed_graded():
    # Retrieved d3, d1, d9, d2 with grades d1=3, d2=2, d3=1 (d9 non-relevant), k=4.
    grades = rm.graded_labels({"d3": 1, "d1": 3, "d2": 2})
    dcg = 1 / math.log2(2) + 3 / math.log2(3) + 0 + 2 / math.log2(5)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert rm.ndcg_at_k(["d3", "d1", "d9", "d2"], grades, 4) == pytest.approx(dcg / idcg)
    assert dcg / idcg == pytest.approx(0.78838, abs=1e-5)  # (1 + 1.89279 + 0.86135) / 4.76186
    # k=1: only the top document counts against the best grade.
    assert rm.ndcg_at_k(["d3", "d1"], grades, 1) == pytest.approx(1 / 3)
    assert rm.ndcg_at_k(["d1", "d2", "d3"], grades, 10) == pytest.approx(1.0)
    assert rm.ndcg_at_k(["x"], grades, 10) == 0.0


def test_graded_label_forms_agree():
    forms = [{"a": 2, "b": 1}, [("a", 2), ("b", 1)], [["a", 2], ["b", 1], ["a", 0]]]
    for form in forms:
        assert rm.graded_labels(form) == {"a": 2.0, "b": 1.0}
    assert rm.graded_labels(["a", "b", "a"]) == {"a": 1.0, "b": 1.0}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from("abcdefgh"), max_size=20),
    st.dictionaries(st.sampled_from("abcdefgh"), st.integers(-1, 3), min_size=1),
    st.integers(1, 12),
)
def test_ndcg_never_exceeds_one(retrieved, grades, k):
    """Duplicate ids and unsorted graded labels can never push NDCG past 1."""
    value = rm.ndcg_at_k(retrieved, rm.graded_labels(grades), k)
    assert 0.0 <= value <= 1.0 + 1e-12
    perfect = sorted((d for d in grades if grades[d] > 0), key=lambda d: -grades[d])
    if perfect:
        assert rm.ndcg_at_k(perfect + retrieved, rm.graded_labels(grades), k) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "text, answers, expected",
    [
        ("The capital is Paris, France.", ["paris"], True),
        ("Pariser Platz in Berlin", ["Paris"], False),  # token, not substring, match
        ("born in 1961 in Honolulu", ["1961"], True),
        ("Café de Flore", ["cafe de flore", "x"], False),  # DPR keeps accents (NFD marks)
        ("Café de Flore", ["Café de Flore"], True),
        ("U.S. Army", ["U.S."], True),
        ("the New York Times", ["york times"], True),
        ("the New York Times", ["times york"], False),
        ("anything", [""], False),  # an empty answer never matches
        ("anything", ["   "], False),
    ],
)
def test_dpr_answer_match(text, answers, expected):
    assert rm.has_answer(text, answers) is expected


def test_first_hit_rank_dedupes_and_caps():
    texts = {"a": "nothing", "b": "the Eiffel Tower", "c": "eiffel tower again"}
    assert rm.first_hit_rank(["a", "a", "b", "c"], texts.get, ["Eiffel Tower"]) == 2
    assert rm.first_hit_rank(["a", "b"], texts.get, ["Eiffel Tower"], max_rank=1) is None
    assert rm.first_hit_rank(["a"], texts.get, ["missing"]) is None


def test_execution_match_sets():
    assert rm.execution_match([(1, "a"), (2, "b")], [[2, "b"], [1, "a"], [1, "a"]])
    assert not rm.execution_match([(1,)], [(1,), (2,)])
    assert rm.execution_match([], [])
    assert rm.execution_match([({"x": [1]},)], [({"x": [1]},)])  # unhashable values
