"""Starting from any HF checkpoint: shape from config.json, tokenizer from the directory, prompt
pieces from config, stop strings + the harness's answer closing in training and evaluation."""

import logging
import string

import numpy as np
import pytest
import tiny_models
import trainer_fixtures as fx

from configs import common
from deepretrieval_jax import eval as eval_lib
from deepretrieval_jax import hf_io, metrics
from deepretrieval_jax.data import task_data, tasks
from deepretrieval_jax.rewards.parsing import parse_completion
from deepretrieval_jax.rl import policy_init, run_tokenizer, trainer

PREFIX = '<answer>{"query": "'
# Single characters: the tiny random policy emits one within a few tokens, so rows stop early
# (its other ids decode to no bytes).
STOPS = tuple(string.ascii_letters + string.digits)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return tiny_models.save_tiny_policy(tmp_path_factory.mktemp("policy"))


def _config(policy_dir, num_steps=2):
    fx.register_task()
    cfg = common.base_config()
    cfg.mesh = common.mesh_config(data=-1)
    cfg.model.preset = ""  # the shape comes from config.json
    cfg.model.hf_path = str(policy_dir)
    cfg.model.overrides.dtype = "float32"
    cfg.model.overrides.remat = False
    cfg.data.task = fx.TASK
    cfg.data.prompt_buckets = (96, 128)  # the tiny tokenizer has one token per character
    cfg.data.max_prompt_len = 128
    cfg.data.prompt.assistant_prefix = PREFIX
    cfg.data.prompt.answer_suffix = '"}</answer>'
    cfg.sampling.stop = STOPS
    cfg.sampling.max_new_tokens = 24
    cfg.sampling.n = 2
    cfg.ppo.advantage_estimator = "grpo"
    cfg.ppo.kl_in_reward = False
    cfg.ppo.recompute_logprobs = False
    cfg.ppo.mini_batch_size = 8
    cfg.train.prompts_per_step = 8
    return fx.short_run(cfg, num_steps)


def test_model_shape_and_tokenizer_come_from_hf_path(policy_dir):
    cfg = _config(policy_dir)
    model_cfg = policy_init.model_config(cfg)
    assert model_cfg == hf_io.config_from_checkpoint(policy_dir, dtype="float32", remat=False)
    assert run_tokenizer.tokenizer_name(cfg) == str(policy_dir)
    tok = run_tokenizer.load_tokenizer(cfg, model_cfg)
    assert tok.vocab_size <= model_cfg.vocab_size and tok.eos_ids


def test_empty_preset_needs_an_hf_path():
    cfg = common.base_config()
    cfg.model.preset = ""
    with pytest.raises(ValueError, match="model.hf_path"):
        policy_init.model_config(cfg)
    cfg.model.hf_path = "/no/such/checkpoint"
    with pytest.raises(ValueError, match="config.model.hf_path"):
        policy_init.model_config(cfg)


def test_the_offline_qwen_tokenizer_is_the_default_without_files():
    assert run_tokenizer.tokenizer_name(common.base_config()) == "qwen2.5"


def test_prompt_fields_from_config_replace_only_what_is_set():
    cfg = common.base_config()
    cfg.data.task = "scifact_no_reason"
    cfg.data.prompt.instruction = "Find papers."
    spec, task = task_data.task_spec(cfg), tasks.get_task("scifact_no_reason")
    assert spec.instruction == "Find papers."
    # Each field is its own placeholder: setting one must not set the others.
    assert spec.system == task.system and spec.assistant_prefix == task.assistant_prefix
    assert cfg.data.prompt.system is None


def test_finish_completion_cuts_after_the_stop_string_and_closes_the_answer():
    spec = tasks.get_task("scifact_no_reason").replace(
        assistant_prefix=PREFIX, answer_suffix="</answer>"
    )
    text = tasks.finish_completion(spec, 'aspirin colon cancer"}\n\nmore', True, ('"}',))
    assert text == 'aspirin colon cancer"}</answer>'
    parsed = parse_completion(text, PREFIX, reasoning=False, key="query")
    assert parsed.ok and parsed.value == "aspirin colon cancer"
    assert tasks.finish_completion(spec, "cut off at max tok", False, ('"}',)) == (
        "cut off at max tok"
    )


def test_random_init_of_a_large_model_is_announced(caplog):
    from deepretrieval_jax.models import ModelConfig

    with caplog.at_level(logging.WARNING):
        policy_init.warn_random_init(ModelConfig.preset("qwen2.5-0.5b"))
    assert "RANDOM INIT" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        policy_init.warn_random_init(ModelConfig.tiny())
    assert "RANDOM INIT" not in caplog.text


def test_training_and_eval_use_stop_strings_and_close_answers(policy_dir, tmp_path):
    """Rows stop on one of STOPS; the harness closes the JSON, so the reward sees well-formed
    answers (format ok), which a random policy never writes by itself."""
    cfg = _config(policy_dir)
    ex = fx.examples()
    result = trainer.train(cfg, tmp_path / "run", train_examples=ex, val_examples=ex,
                           backend=fx.backend())  # fmt: skip
    assert result.step == 2
    # Without the stop strings and the closing (before this path existed) both rates were 0.
    assert result.last_metrics["reward/format_ok"] >= 0.75, result.last_metrics
    val = metrics.read_jsonl(tmp_path / "run" / metrics.JSONL_NAME)[-1]
    assert val["val/reward/format_ok"] >= 0.75, val

    generate = eval_lib.policy_generate_fn(
        policy_init.model_config(cfg),
        hf_io.load_params(policy_dir, policy_init.model_config(cfg))[1],
        run_tokenizer.load_tokenizer(cfg, None),
        eval_lib.DecodeSpec(max_new_tokens=24),
        prompt_buckets=(128,),
        stop=STOPS,
        spec=task_data.task_spec(cfg),
    )
    from deepretrieval_jax.data import render

    prompts = [render.render_prompt(task_data.task_spec(cfg), e.input, run_tokenizer.load_tokenizer(cfg, None))
               for e in ex]  # fmt: skip
    texts = generate(prompts)
    assert all(t.endswith('"}</answer>') for t in texts), texts
    ok = [parse_completion(t, PREFIX, reasoning=False, key="query").ok for t in texts]
    assert np.mean(ok) >= 0.75, texts


def test_eval_can_use_the_whole_completion_as_the_query(tmp_path):
    fx.register_task()
    spec = tasks.get_task(fx.TASK)
    ex = fx.examples()
    docs = [d.split()[:4] for d in fx.DOCS]
    report = eval_lib.evaluate(
        spec, ex, fx.backend(), method="policy",
        generate_fn=lambda prompts: [" ".join(docs[i % len(docs)]) for i in range(len(prompts))],
        tokenizer=tiny_models_tokenizer(tmp_path), query_from="completion",
        max_prompt_tokens=10_000,
    )  # fmt: skip
    agg = report.aggregates
    assert agg["counts"]["ok"] == len(ex) and report.settings["query_from"] == "completion"
    assert agg["metrics"]["ndcg@10"] == pytest.approx(1.0)  # each query is its document's start


def tiny_models_tokenizer(tmp_path):
    from deepretrieval_jax.tokenizer import Tokenizer

    tiny_models.save_tiny_tokenizer(tmp_path / "tok")
    return Tokenizer.from_dir(tmp_path / "tok")
