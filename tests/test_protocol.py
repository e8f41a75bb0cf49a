"""serving/protocol.py: a policy is served with the prompt protocol its run was trained with."""

import asyncio
import json
import logging

import pytest
from tiny_models import save_tiny_tokenizer

from configs import demo
from deepretrieval_jax.data.tasks import get_task
from deepretrieval_jax.serving import protocol, rewrite
from deepretrieval_jax.serving.policy import Completion
from deepretrieval_jax.tokenizer import Tokenizer

DEMO_PROMPT = {"system": demo.SYSTEM, "instruction": demo.INSTRUCTION,
               "output_format": demo.OUTPUT_FORMAT, "note": "", "input_header": "Claim:",
               "assistant_prefix": demo.PREFIX, "answer_suffix": "</answer>"}  # fmt: skip


def _demo_workdir(root):
    """The main job's layout: WORKDIR/config.json (as launch/demo.py writes it) + WORKDIR/hf."""
    config = {"data": {"task": "scifact_no_reason", "corpus": "",
                       "prompt": {**DEMO_PROMPT, "reasoning": None}},
              "sampling": {"stop": ['"}'], "temperature": 0.7}}  # fmt: skip
    (root / "hf").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"entry": "x:run", "config": config}))
    (root / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))  # a model's
    return root


def test_the_run_config_next_to_an_export_gives_the_protocol(tmp_path):
    work = _demo_workdir(tmp_path / "demo")
    for where in (work / "hf", work):
        found = protocol.find(where)
        assert found.task == "scifact_no_reason" and found.stop == ('"}',)
        assert found.source == str(work / "config.json")
    spec = found.spec()
    assert spec.system == demo.SYSTEM and spec.assistant_prefix == demo.PREFIX
    assert spec.input_header == "Claim:" and spec.answer_suffix == "</answer>"
    assert spec.system != get_task("scifact_no_reason").system
    assert protocol.find(tmp_path / "elsewhere") is None


def test_the_export_file_wins_and_round_trips(tmp_path):
    work = _demo_workdir(tmp_path / "demo")
    cfg = {"data": {"task": "scifact", "prompt": {"system": "S", "note": None}, "corpus": "c"},
           "sampling": {"stop": []}}  # fmt: skip
    path = protocol.write(work / "hf", cfg)
    found = protocol.find(work / "hf")
    assert found.source == str(path)
    assert (found.task, found.prompt, found.corpus, found.stop) == (
        "scifact",
        {"system": "S"},
        "c",
        (),
    )
    assert found.spec().corpus == "c"
    path.write_text("{}")
    with pytest.raises(ValueError, match="deepretrieval_protocol.json: not a prompt protocol"):
        protocol.find(work / "hf")


def test_resolve_uses_the_protocol_only_for_its_own_task(tmp_path, caplog):
    found = protocol.find(_demo_workdir(tmp_path / "demo"))
    spec, stop = protocol.resolve(None, found)
    assert spec.system == demo.SYSTEM and stop == ('"}',)
    assert protocol.resolve("scifact_no_reason", found)[0] == spec
    with caplog.at_level(logging.WARNING):
        other, stop = protocol.resolve("scifact", found)
    assert other == get_task("scifact") and stop == ()
    assert "trained on task scifact_no_reason" in caplog.text
    with pytest.raises(ValueError, match="no task given and the policy has no prompt protocol"):
        protocol.resolve(None, None)


class _ScriptedPolicy:
    """The Policy interface rewrite_batch uses; generate returns a fixed completion."""

    max_batch, max_prompt_tokens = 4, 4096

    def __init__(self, tokenizer, text):
        self.tokenizer, self.text, self.calls = tokenizer, text, []

    def encode(self, prompt):
        return self.tokenizer.encode(prompt)

    def generate(self, rows, settings, limits):
        self.calls.append((rows, settings))
        return [Completion(self.text, "stop", len(r), 5) for r in rows]


def test_rewrite_prompts_and_closes_answers_as_the_run_did(tmp_path):
    save_tiny_tokenizer(tmp_path / "tok")
    tok = Tokenizer.from_dir(tmp_path / "tok")
    spec, stop = protocol.resolve(None, protocol.find(_demo_workdir(tmp_path / "demo") / "hf"))
    policy = _ScriptedPolicy(tok, 'vitamin D fracture risk"}')  # stopped at the run's '"}'
    from deepretrieval_jax.serving.policy import GenSettings

    items = [("0", "Vitamin D lowers fracture risk.")]
    (rec,) = asyncio.run(rewrite.rewrite_batch(policy, spec, items, GenSettings(), 8, stop=stop))
    assert rec["query"] == "vitamin D fracture risk" and rec["error"] is None
    assert rec["completion"] == 'vitamin D fracture risk"}</answer>'
    ((rows, used),) = policy.calls
    assert used.stop == ('"}', "</answer>")
    prompt = tok.decode(rows[0])
    assert demo.SYSTEM in prompt and prompt.endswith(demo.PREFIX) and "Claim:" in prompt
    # The task's default protocol for the same answer: no prefill, so no query.
    (plain,) = asyncio.run(rewrite.rewrite_batch(
        policy, get_task("scifact_no_reason"), items, GenSettings(), 8))  # fmt: skip
    assert plain["query"] is None and plain["error"]
