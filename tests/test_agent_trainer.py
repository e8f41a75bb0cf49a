"""The trainer runs the multi-turn agent end to end: a scripted rollout policy searches once,
reads the inserted results and answers; the reward is positive and PPO updates the tiny model
on the generated tokens only."""

import numpy as np
import pytest
import tiny_models
import trainer_fixtures as fx

from deepretrieval_jax.rl import trainer

SEARCH, ANSWER = fx.AGENT_SEARCH, fx.AGENT_ANSWER
scripted_fns, agent_config = fx.agent_sampler_fns, fx.tiny_agent_config


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return tiny_models.save_tiny_policy(tmp_path_factory.mktemp("policy"))


def test_agent_trains_end_to_end_with_searches_between_turns(policy_dir, tmp_path):
    ex = fx.examples()
    docs = {f"d{i}": ("", t) for i, t in enumerate(fx.DOCS)}
    result = trainer.train(
        agent_config(policy_dir), tmp_path / "run", train_examples=ex, val_examples=ex,
        backend=fx.backend(), agent_kw=dict(documents=docs, sampler_fns=scripted_fns()),
    )  # fmt: skip
    m = result.last_metrics
    assert result.step == 2
    assert m["reward/format_ok"] == 1.0 and m["reward/invalid_fraction"] == 0.0
    assert m["agent/searches_per_answer"] == 1.0 and m["agent/answered_fraction"] == 1.0
    assert m["agent/turns_mean"] == 2.0 and 0.0 <= m["agent/idle_fraction"] < 1.0
    # "aspirin colorectal cancer" ranks d1 (claim q1) first: 0.1 + NDCG > 0 for it at least;
    # a claim none of whose documents is in the top 5 scores 0.
    assert 0.1 < m["reward/mean"] < 1.1 and m["reward/bucket/agent_ndcg/ndcg>0"] > 0
    # Only the generated tokens are actions: the inserted block is not in the response.
    assert m["ppo/response_len_mean"] == len(SEARCH) + len(ANSWER)  # one token per character
    assert m["agent/inserted_tokens_mean"] > 31  # the block's tags alone are 31 tokens
    assert np.isfinite(m["ppo/grad_norm_actor"]) and m["ppo/grad_norm_actor"] > 0


def test_one_turn_with_a_search_prefix_is_rejected(policy_dir, tmp_path):
    cfg = agent_config(policy_dir)
    cfg.agent.max_turns = 1
    cfg.data.prompt.assistant_prefix = "<search>"
    ex = fx.examples()
    with pytest.raises(ValueError, match="max_turns=1"):
        trainer.train(cfg, tmp_path / "run", train_examples=ex, val_examples=ex,
                      backend=fx.backend())  # fmt: skip
