"""Every task family's reward path on well-formed answers: data built with the documented
converters, the trainer's reward pool built from the family's config exactly as
`launch/train.py` builds it (`rl.trainer._Run._make_pool`), and `eval.run` as `launch/eval.py`
runs it, with scripted answers in place of a policy's (tests/family_fixtures.py). The PPO step
of each family: tests/test_family_ppo.py.
"""

import types

import family_fixtures as ff
import pytest
from family_fixtures import (
    FAMILIES,
    N,
    doc_index,
    family_config,
    key_text,
    reward_requests,
    scripted,
)

from configs import eval_scifact
from deepretrieval_jax import eval as eval_lib
from deepretrieval_jax.data import task_data
from deepretrieval_jax.rl import policy_init, run_tokenizer, trainer


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from ff.make_env(tmp_path_factory)


@pytest.fixture
def family_env(env, monkeypatch):
    return ff.prepare(env, monkeypatch)


@pytest.mark.parametrize("task", list(FAMILIES))
def test_reward_path_scores_well_formed_answers(task, family_env, monkeypatch):
    """The trainer's pool (`_Run._make_pool`, as `launch/train.py` builds it) and `eval.run`
    (as `launch/eval.py` runs it) on scripted, well-formed answers."""
    env = family_env
    cfg = family_config(task, env)
    spec = task_data.task_spec(cfg)
    examples = list(task_data.load_examples(cfg, spec, cfg.data.train_split))
    assert len(examples) == N
    run = types.SimpleNamespace(cfg=cfg, spec=spec, workdir=env["root"] / "pools" / task)
    run.workdir.mkdir(parents=True)
    pool = trainer._Run._make_pool(run, None)
    try:
        results = pool.submit(reward_requests(cfg, spec, task, examples)).result()
    finally:
        pool.close()
    assert all(r.valid and r.format_ok and r.answer_ok for r in results), results[0]
    assert [r.reward for r in results] == pytest.approx([FAMILIES[task][2]] * N)

    cfg.eval = eval_scifact.eval_config("policy")
    cfg.eval.split = "test"
    test_examples = list(task_data.load_examples(cfg, spec, "test"))
    keys = [key_text(spec, ex.input) for ex in test_examples]

    def policy(cfg_, decode):  # the policy's decoding, scripted
        tokenizer = run_tokenizer.load_tokenizer(cfg_, policy_init.model_config(cfg_))

        def generate(prompts):
            found = [next(k for k in keys if k in p) for p in prompts]
            return [scripted(spec, task, doc_index(spec, k)) for k in found]

        return generate, tokenizer

    monkeypatch.setattr(eval_lib, "_policy", policy)
    report = eval_lib.run(cfg, env["root"] / "eval" / task)
    assert report.aggregates["counts"]["ok"] == N, report.aggregates
    metric, value = FAMILIES[task][3]
    assert report.aggregates["metrics"][metric] == pytest.approx(value)
