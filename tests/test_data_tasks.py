"""Task registry, prompt rendering (golden strings), length policy, original-query baseline."""

import pytest

from deepretrieval_jax.data import render, tasks
from deepretrieval_jax.data.records import Example
from deepretrieval_jax.rewards.tasks import make_task
from deepretrieval_jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.qwen25()


PICO = {"P": "Adults with asthma", "I": "Inhaled steroids", "C": "Placebo", "O": "Exacerbations"}

# Golden prompts. If a prompt text changes on purpose, print render.render_prompt(...) for the
# task and paste it here after checking it by eye.
GOLDEN_SCIFACT = (
    "<|im_start|>system\nYou are a helpful assistant. You first think about the reasoning process"
    " in the mind and then provide the user with the answer.<|im_end|>\n<|im_start|>user\n"
    "You are a query generating expert. Given a scientific claim, your task is to create query "
    "terms to retrieve documents that support or refute the claim.\n\nShow your work in <think> "
    "</think> tags. Your final response must be in JSON format within <answer> </answer> tags. "
    'For example,\n<think>\n[thinking process]\n</think>\n<answer>\n{\n    "query": "...."\n}\n'
    "</answer>.\nNote: The query should use Boolean operators (AND, OR) and parentheses for "
    "grouping terms appropriately.\n\nHere's the scientific claim:\nAspirin reduces fever."
    "<|im_end|>\n<|im_start|>assistant\n<think>\n"
)

GOLDEN_PUBMED_TAIL = (
    "User: The research is defined by the following PICO:\nP: Adults with asthma\n"
    "I: Inhaled steroids\nC: Placebo\nO: Exacerbations<|im_end|>\n<|im_start|>assistant\n<think>\n"
)

GOLDEN_BIRD_NO_REASON_USER = (
    "You are a SQL query writing expert. Your task is to write the SQL query for the user query "
    "to retrieve data from a database.\n\nDatabase Schema:\nCREATE TABLE t (a INT)\n"
    "External Knowledge: a is age\n\nNote: Using valid SQLite and understanding External "
    "Knowledge, answer the following questions for the tables provided above.\n\nYour final "
    "response must be in JSON format within <answer> </answer>. For example,\n<answer>\n{\n    "
    '"sql": "SELECT ... (in one line)"\n}\n</answer>.\n\nHere\'s the user query:\nHow old?'
)


def test_every_family_and_variant_is_registered():
    names = tasks.list_tasks()
    specs = [tasks.get_task(n) for n in names]
    assert {s.family for s in specs} == set(tasks.FAMILIES)
    for ds in ("pubmed", "ctgov", "nq", "triviaqa", "squad", "bird", "spider"):
        assert {ds, ds + "_no_reason"} <= set(names)
    for ds in ("scifact", "nfcorpus", "fever", "hotpotqa", "fiqa", "msmarco_beir"):
        assert {ds, ds + "_no_reason", ds + "_dense", ds + "_dense_no_reason"} <= set(names)
    for dom in ("health", "science", "tech"):
        assert f"msmarco_{dom}_dense_no_reason" in names
    for s in specs:
        assert s.assistant_prefix == ("<think>\n" if s.reasoning else s.assistant_prefix)
        assert "<think>" not in s.assistant_prefix or s.reasoning


def test_reward_tasks_resolve_with_matching_variant():
    for name in tasks.list_tasks():
        spec = tasks.get_task(name)
        reward = make_task(spec.reward_task, dict(spec.reward_opts))
        assert reward.config.reasoning == spec.reasoning, name
        assert reward.answer_key == spec.answer_key, name


def test_task_specific_settings_from_the_reference():
    assert tasks.get_task("scifact").backend_opts == {"k1": 1.2, "b": 0.75, "top_k": 100}
    assert tasks.get_task("nq").backend_opts["k1"] == 0.9
    assert tasks.get_task("pubmed").eval_metrics == ("recall@3000",)
    assert tasks.get_task("nq").eval_metrics == ("hit@1", "hit@5", "hit@20", "hit@50", "hit@100")
    assert tasks.get_task("fever_dense").eval_metrics == ("ndcg@10", "recall@100")
    assert tasks.get_task("spider").eval_metrics == ("execution_accuracy",)
    assert tasks.get_task("scifact_dense").note == ""  # Boolean syntax means nothing to dense


def test_get_task_errors_and_overrides():
    with pytest.raises(KeyError, match="unknown task 'scifactt'.*scifact"):
        tasks.get_task("scifactt")
    with pytest.raises(KeyError, match="instructions"):
        tasks.get_task("scifact", instructions="x")
    spec = tasks.get_task("scifact", instruction="Find papers.")
    assert (
        spec.instruction == "Find papers."
        and tasks.get_task("scifact").instruction != spec.instruction
    )
    with pytest.raises(ValueError, match="family"):
        spec.replace(family="nope")


def test_golden_scifact_prompt(tok):
    assert render.render_prompt(tasks.get_task("scifact"), "Aspirin reduces fever.", tok) == (
        GOLDEN_SCIFACT
    )


def test_golden_pubmed_prompt_renders_pico(tok):
    text = render.render_prompt(tasks.get_task("pubmed"), PICO, tok)
    assert text.startswith("<|im_start|>system\nA conversation between User and Assistant.")
    assert text.endswith(GOLDEN_PUBMED_TAIL)
    assert text.count("<|im_start|>") == 3  # system, user, assistant: no hand-written turns


def test_golden_sql_no_reason_user_turn():
    spec = tasks.get_task("bird_no_reason")
    inp = {"question": "How old?", "schema": "CREATE TABLE t (a INT)", "evidence": "a is age"}
    assert render.user_content(spec, inp) == GOLDEN_BIRD_NO_REASON_USER
    assert spec.assistant_prefix == "<answer>\n"


def test_render_rejects_wrong_input_type(tok):
    with pytest.raises(TypeError, match="PICO input must be a dict"):
        render.render_prompt(tasks.get_task("pubmed"), "text", tok)


def test_length_policy_drop_counts_and_truncate_fits(tok):
    spec = tasks.get_task("bird")
    long_schema = "\n".join(f"CREATE TABLE t{i} (a INT, b TEXT)" for i in range(200))
    exs = [
        Example("short", {"question": "q?", "schema": "CREATE TABLE t (a INT)"}, "SELECT 1"),
        Example("long", {"question": "q?", "schema": long_schema}, "SELECT 1"),
    ]
    limit = 400
    kept, stats = render.prepare_prompts(spec, exs, tok, limit, "drop")
    assert [p.example.id for p in kept] == ["short"]
    assert (stats.total, stats.kept, stats.dropped, stats.dropped_ids) == (2, 1, 1, ["long"])
    kept, stats = render.prepare_prompts(spec, exs, tok, limit, "truncate")
    assert [p.example.id for p in kept] == ["short", "long"] and stats.truncated == 1
    long_prompt = kept[1]
    assert long_prompt.truncated and long_prompt.num_tokens <= limit
    assert len(tok.encode(long_prompt.text)) == long_prompt.num_tokens
    assert long_prompt.text.endswith("q?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert long_prompt.num_tokens > limit - 20  # the longest prefix that fits, not much less
    with pytest.raises(ValueError, match="length policy"):
        render.prepare_prompts(spec, exs, tok, limit, "crash")


def test_original_query_baseline():
    assert render.original_query(tasks.get_task("pubmed"), PICO) == (
        "(Adults with asthma) OR (Inhaled steroids) OR (Placebo) OR (Exacerbations)"
    )
    assert render.original_query(tasks.get_task("ctgov"), {**PICO, "C": " "}).count(" OR ") == 2
    assert render.original_query(tasks.get_task("scifact"), "A claim.") == "A claim."
    with pytest.raises(ValueError, match="no 'original query'"):
        render.original_query(tasks.get_task("spider"), {"question": "q"})
