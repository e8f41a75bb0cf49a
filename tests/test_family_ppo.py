"""One real PPO step per task family (`rl.trainer.train` with the family's config, its own
backend and reward pool, a tiny random policy) whose sampled texts become scripted,
well-formed answers before they reach the pool, so rewards must be valid and non-trivial
(tests/family_fixtures.py has the data, servers and configs)."""

import math

import family_fixtures as ff
import pytest
from family_fixtures import FAMILIES, doc_index, family_config, key_text, scripted

from deepretrieval_jax import metrics
from deepretrieval_jax.data import tasks
from deepretrieval_jax.rl import rollout, trainer


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from ff.make_env(tmp_path_factory)


@pytest.fixture
def family_env(env, monkeypatch):
    return ff.prepare(env, monkeypatch)


# One task per registered family (tasks.FAMILIES) and the dense BEIR backend; SQuAD stands for
# the evidence family (its data comes from the SQuAD json converter).
PPO_TASKS = ["scifact", "scifact_dense", "msmarco_health", "pubmed", "ctgov", "squad", "bird"]


def test_every_family_has_a_ppo_step():
    covered = {tasks.get_task(t).family for t in PPO_TASKS}
    assert covered == set(tasks.FAMILIES), set(tasks.FAMILIES) - covered


@pytest.mark.parametrize("task", PPO_TASKS)
def test_one_ppo_step_per_family(task, family_env, monkeypatch):
    """A real PPO step; the sampled texts become scripted answers before the trainer's pool."""
    env = family_env
    cfg = family_config(task, env)
    original = rollout.reward_requests

    def scripted_requests(spec, exs, completions, row_start, n, search_opts):
        inputs = [exs[(row_start + j) // n].input for j in range(len(completions))]
        texts = [scripted(spec, task, doc_index(spec, key_text(spec, x))) for x in inputs]
        return original(spec, exs, texts, row_start, n, search_opts)

    monkeypatch.setattr(rollout, "reward_requests", scripted_requests)
    if task == "scifact":  # BEIR validation: the train-k reward and NDCG@10, both logged
        cfg.train.val_every = 1
    workdir = env["root"] / "runs" / task
    result = trainer.train(cfg, workdir)
    m = result.last_metrics
    assert result.step == 1 and m["reward/invalid_fraction"] == 0.0, m
    assert m["reward/format_ok"] == 1.0 and m["reward/mean"] == pytest.approx(FAMILIES[task][2])
    assert all(map(math.isfinite, (m["ppo/policy_loss"], m["ppo/grad_norm_actor"])))
    if task == "scifact":
        (val,) = [r for r in metrics.read_jsonl(workdir / metrics.JSONL_NAME) if "val/n" in r
                  or "val/reward/mean" in r]  # fmt: skip
        assert val["val/reward/mean"] == pytest.approx(1.1)  # 0.1 + NDCG@50 (train k)
        assert val["val/retrieval/ndcg@10"] == pytest.approx(1.0)  # the original's val metric
        assert val["val/retrieval/ndcg"] == pytest.approx(1.0)
