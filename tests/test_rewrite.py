"""launch/rewrite.py and the rewrite pieces: inputs, interpretation, policy loading, limits.

The CLI runs as a real subprocess on a tiny HF policy directory and a tiny BM25 corpus that
the test writes; its JSON lines are checked field by field.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_models import save_tiny_policy, write_tiny_scifact

from deepretrieval_jax.data.tasks import get_task
from deepretrieval_jax.serving import policy as policy_lib
from deepretrieval_jax.serving import rewrite

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("rewrite_policy"))


def test_cli_json_output_on_the_tiny_model(policy_dir, tmp_path):
    data = write_tiny_scifact(tmp_path / "data")
    stdin = 'Vitamin D reduces fractures\n\n{"id": "q7", "input": "aspirin and heart attack"}\n'
    cmd = [
        sys.executable, str(ROOT / "launch" / "rewrite.py"), f"--policy={policy_dir}",
        "--task=scifact", f"--data_dir={data}", "--input_file=-", "--format=json",
        "--fallback=original", "--max_new_tokens=6", "--max_input_tokens=1024", "--top_k=2",
        "--batch_size=2",
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in records] == ["0", "q7"]
    for rec, top in zip(records, ("d1", "d2"), strict=True):
        assert rec["task"] == "scifact" and isinstance(rec["completion"], str)
        assert rec["query"] is None and rec["error"], "a random tiny model writes no answer"
        assert rec["query_source"] == "original" and rec["search_error"] is None
        assert rec["searched_query"] == rec["input"]
        assert 1 <= len(rec["results"]) <= 2 and rec["results"][0]["id"] == top
        assert rec["results"][0]["rank"] == 1 and rec["results"][0]["title"]
        assert rec["finish_reason"] in ("stop", "length")
        assert 0 < rec["usage"]["completion_tokens"] <= 6 and rec["usage"]["prompt_tokens"] > 100
        assert "reasoning" in rec
    assert records[1]["results"][0]["title"] == "Aspirin"


def test_pico_inputs_in_every_accepted_form():
    spec = get_task("pubmed")
    want = {"P": "adults", "I": "aspirin", "C": "", "O": "stroke"}
    forms = [
        {"P": "adults", "I": "aspirin", "O": "stroke"},
        {"population": " adults ", "Intervention": "aspirin", "outcome": "stroke"},
        '{"p": "adults", "i": "aspirin", "o": "stroke"}',
        "P: adults\nI: aspirin\nO: stroke\n",
    ]
    assert all(rewrite.parse_input(spec, f) == want for f in forms)
    for bad, match in [
        ("just words", "every field is empty"),
        ({"X": "1"}, "unknown key"),
        ({"P": 3}, "must be a string"),
        ("{broken", "not valid JSON"),
        (["P"], "must be an object"),
    ]:
        with pytest.raises(rewrite.InputError, match=match):
            rewrite.parse_input(spec, bad)
    assert rewrite.parse_input(get_task("bird"), "how many?") == {
        "schema": "",
        "question": "how many?",
    }
    with pytest.raises(rewrite.InputError):
        rewrite.parse_input(get_task("bird"), {"question": "q", "table": "t"})
    with pytest.raises(rewrite.InputError):
        rewrite.parse_input(get_task("scifact"), "   ")


def test_interpret_extracts_query_and_reasoning():
    completion = 'compare drugs\n</think>\n<answer>{"query": "(aspirin) AND stroke"}</answer>'
    info = rewrite.interpret(get_task("pubmed"), completion)
    assert info == rewrite.Interpretation("(aspirin) AND stroke", "compare drugs", None)
    direct = rewrite.interpret(get_task("pubmed_no_reason"), '<answer>{"query": "a OR b"}</answer>')
    assert direct == rewrite.Interpretation("a OR b", None, None)
    broken = rewrite.interpret(get_task("scifact"), "no tags at all")
    assert broken.query is None and "answer" in broken.error


def test_read_inputs_and_text_format():
    lines = ["plain text", '"a json string"', '{"id": "x", "input": {"P": "p"}}', "{oops", ""]
    assert rewrite.read_inputs(lines) == [
        ("0", "plain text"), ("1", "a json string"), ("x", {"P": "p"}), ("3", "{oops"),
    ]  # fmt: skip
    rec = {"id": "7", "task": "scifact", "query": "a AND b", "reasoning": "r", "error": None,
           "completion": "...", "query_source": "policy", "search_error": None,
           "results": [{"rank": 1, "id": "d1", "title": "T"}]}  # fmt: skip
    text = rewrite.format_text(rec)
    assert "query: a AND b" in text and "reasoning: r" in text and "1. d1  T" in text


def test_orbax_checkpoint_loads_like_the_hf_directory(policy_dir, tmp_path):
    from deepretrieval_jax.checkpoint import CheckpointManager

    hf = policy_lib.load_policy(policy_dir)
    with CheckpointManager(tmp_path / "run" / "checkpoints", async_save=False) as mgr:
        mgr.save(3, {"actor_params": hf.params, "step": np.int32(3)})
    with pytest.raises(ValueError, match="give exactly one of model"):
        policy_lib.load_policy(tmp_path / "run")
    kw = dict(config_json=policy_dir / "config.json", tokenizer=str(policy_dir))
    with pytest.raises(ValueError, match="no 'critic'"):
        policy_lib.load_policy(tmp_path / "run", params_key="critic", **kw)
    orbax = policy_lib.load_policy(tmp_path / "run", **kw)  # a run's workdir
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), hf.params, orbax.params)
    assert all(jax.tree.leaves(same)) and orbax.model_config == hf.model_config


def test_an_sft_checkpoint_loads_without_a_params_key(policy_dir, tmp_path):
    from deepretrieval_jax.checkpoint import CheckpointManager

    hf = policy_lib.load_policy(policy_dir)
    with CheckpointManager(tmp_path / "sft" / "checkpoints", async_save=False) as mgr:
        mgr.save(2, {"params": hf.params, "opt_state": {"mu": np.zeros(3)}, "step": np.int32(2)})
    kw = dict(config_json=policy_dir / "config.json", tokenizer=str(policy_dir))
    sft = policy_lib.load_policy(tmp_path / "sft", **kw)  # as docs/serving.md says: detected
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), hf.params, sft.params)
    assert all(jax.tree.leaves(same))


def test_sql_rewrites_run_on_the_named_database(tmp_path):
    import asyncio
    import sqlite3

    db = tmp_path / "spider" / "shop" / "shop.sqlite"
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as conn:
        conn.executescript(
            "CREATE TABLE item (id INT, price REAL); INSERT INTO item VALUES (1, 9);"
        )
    spec = get_task("spider")
    inp = rewrite.parse_input(spec, {"question": "ids?", "db_id": "shop"})
    searcher = rewrite.Searcher(spec, str(tmp_path))
    completion = 'x</think><answer>{"sql": "SELECT id FROM item"}</answer>'
    rec = asyncio.run(rewrite.finish(spec, inp, completion, searcher, top_k=5))
    assert rec["query"] == "SELECT id FROM item" and rec["search_error"] is None
    assert rec["results"] == [{"rank": 1, "row": [1]}]
    missing = rewrite.parse_input(spec, {"question": "ids?", "db_id": "nope"})
    rec = asyncio.run(rewrite.finish(spec, missing, completion, searcher, top_k=5))
    assert rec["results"] == [] and "not found" in rec["search_error"]


def test_a_compact_vocabulary_export_is_served_through_its_vocab_map(tmp_path):
    """An older CPU demo export (the since removed compact vocabulary): a small model
    vocabulary + vocab_map.json (Qwen2.5 ids)."""
    from tiny_models import random_params

    from deepretrieval_jax import hf_io
    from deepretrieval_jax.models import CausalLM, ModelConfig
    from deepretrieval_jax.tokenizer import Tokenizer

    qwen = Tokenizer.qwen25()
    text = 'Vitamin D lowers fracture risk. <answer>{"query": "x"}</answer>'
    ids = sorted({qwen.pad_id, *qwen.eos_ids, *qwen.encode(text)})
    config = ModelConfig.tiny(vocab_size=128)
    hf_io.save_params(random_params(CausalLM(config), config, scale=0.5), config, tmp_path)
    (tmp_path / "vocab_map.json").write_text(json.dumps({"tokenizer": "qwen2.5", "ids": ids}))
    policy = policy_lib.load_policy(tmp_path, max_new_tokens=6, prompt_buckets=(64,))
    assert policy.num_ids == len(ids) and max(policy.encode(text)) < len(ids)
    assert policy.decode(policy.encode(text)) == text
    assert set(policy.eos_ids) == {ids.index(i) for i in qwen.eos_ids}
    out = policy.generate([policy.encode(text)], policy_lib.GenSettings(stop=("x",)), [6])[0]
    assert out.text and 1 <= out.completion_tokens <= 6
