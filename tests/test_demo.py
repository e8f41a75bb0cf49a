"""The demo's learning statistics and the generated configuration reference."""

import math

import numpy as np
import pytest

from deepretrieval_jax import config_doc, demo


def test_learning_stats_matches_numpy():
    rewards = np.r_[np.linspace(-1.0, 0.0, 10), np.linspace(0.0, 0.5, 10)]
    stats = demo.learning_stats(rewards)
    first, last = rewards[:4], rewards[-4:]
    se = math.sqrt(first.var(ddof=1) / 4 + last.var(ddof=1) / 4)
    assert stats["window"] == 4
    assert stats["difference"] == pytest.approx(last.mean() - first.mean())
    assert stats["noise_se"] == pytest.approx(se)
    assert stats["z"] == pytest.approx((last.mean() - first.mean()) / se)


def test_learning_stats_needs_two_windows():
    with pytest.raises(ValueError, match="too few"):
        demo.learning_stats([0.1, 0.2, 0.3])


def test_configuration_reference_is_up_to_date():
    # If this fails after a config change: python -m deepretrieval_jax.config_doc
    text = config_doc.render()
    assert config_doc.DEFAULT_OUT.read_text(encoding="utf-8") == text
    comments = config_doc.field_comments(config_doc.COMMON.read_text(encoding="utf-8"))
    assert comments["ppo.clip_low"].startswith("policy ratio clip below")
    assert comments["reward.pool.cache_mode"].startswith('"off"')
