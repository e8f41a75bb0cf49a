"""Rewards (no JAX): completion parsing, task reward ladders, and the asyncio reward pool.

from deepretrieval_jax.rewards import PoolConfig, RewardPool, RewardRequest, make_tasks
"""

from deepretrieval_jax.rewards import agent  # noqa: F401  (registers agent_qa, agent_ndcg)
from deepretrieval_jax.rewards.cache import CacheMode, ReplayMiss, ResultCache
from deepretrieval_jax.rewards.parsing import ParsedAnswer, parse_completion
from deepretrieval_jax.rewards.pool import (
    PendingBatch,
    PoolConfig,
    RewardBatchError,
    RewardPool,
    RewardRequest,
)
from deepretrieval_jax.rewards.tasks import (
    REGISTRY,
    Ladder,
    RewardResult,
    TaskReward,
    make_task,
    make_tasks,
)

__all__ = [
    "REGISTRY",
    "CacheMode",
    "Ladder",
    "ParsedAnswer",
    "PendingBatch",
    "PoolConfig",
    "ReplayMiss",
    "ResultCache",
    "RewardBatchError",
    "RewardPool",
    "RewardRequest",
    "RewardResult",
    "TaskReward",
    "make_task",
    "make_tasks",
    "parse_completion",
]
