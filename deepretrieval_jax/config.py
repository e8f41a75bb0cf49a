"""ConfigDict -> frozen dataclasses at module boundaries, with validation.

Configs (`configs/*.py`) are ml_collections ConfigDicts; library code takes frozen dataclasses.
`to_dataclass(cls, cfg, where)` converts one sub-config and names the offending field when a key
is unknown or a value is invalid. The run-manager's own settings (`TrainConfig`, `SFTConfig`,
`DataConfig`) live here; module-owned dataclasses (ModelConfig, PPOConfig, SamplingConfig, ...)
are converted by the same helper where they are used.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DATA_DIR_ENV = "DEEPRETRIEVAL_DATA_DIR"


def as_dict(cfg: Any) -> dict[str, Any]:
    """A plain (recursive) dict from a ConfigDict / FrozenConfigDict / mapping."""
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return {k: as_dict(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}
    raise TypeError(f"expected a ConfigDict or mapping, got {type(cfg).__name__}")


def to_dataclass(cls: type[T], cfg: Any, where: str, **extra: Any) -> T:
    """Builds `cls` from the fields of `cfg`; unknown keys and bad values name `config.<where>`."""
    values = {**as_dict(cfg), **extra}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"config.{where}: unknown field(s) {unknown} for {cls.__name__}; "
            f"expected a subset of {sorted(names)}"
        )
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{where}: {e}") from e


def resolve_data_dir(data_dir: str) -> Path:
    """`data_dir` from config, else $DEEPRETRIEVAL_DATA_DIR; a clear error if neither exists."""
    path = data_dir or os.environ.get(DATA_DIR_ENV, "")
    if not path:
        raise ValueError(f"config.data.data_dir is empty and ${DATA_DIR_ENV} is not set")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"config.data.data_dir: {path} is not a directory")
    return path


def _positive(where: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{where}.{name} must be positive, got {value}")


def _non_negative(where: str, **values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{where}.{name} must be >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The PPO loop's schedule (config.train)."""

    num_steps: int = 1250  # PPO steps
    val_every: int = 50  # validation period in steps, also at the end (0 = never)
    checkpoint_every: int = 50  # checkpoint period in steps (0 = only at the end / SIGTERM)
    max_to_keep: int = 3  # checkpoints kept
    async_checkpoint: bool = True  # background checkpoint writes
    prompts_per_step: int = 64  # global prompts per PPO step
    log_samples: int = 4  # completions logged as text per validation
    cpu_budget_minutes: float = 0.0  # stop at a step boundary once this CPU time is spent (0 = off)
    cpu_budget_stop: str = "after"  # "after": the step crossing the budget | "nearest" boundary

    def __post_init__(self):
        _positive("train", num_steps=self.num_steps, max_to_keep=self.max_to_keep)
        _non_negative("train", cpu_budget_minutes=self.cpu_budget_minutes)
        if self.cpu_budget_stop not in ("after", "nearest"):
            raise ValueError(
                f"train.cpu_budget_stop must be 'after' or 'nearest', got {self.cpu_budget_stop!r}"
            )
        _positive("train", prompts_per_step=self.prompts_per_step)
        _non_negative("train", val_every=self.val_every, checkpoint_every=self.checkpoint_every)
        _non_negative("train", log_samples=self.log_samples)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Cold-start supervised fine-tuning (config.sft)."""

    pairs_path: str = ""  # JSONL of {"prompt", "completion"}; "" = build from the task
    num_steps: int = 0  # optimiser steps; 0 = skip SFT
    batch_size: int = 16  # global sequences per step
    lr: float = 1e-5  # AdamW peak learning rate
    warmup_steps: int = 10  # linear warm-up steps, then constant
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # global-norm clip
    max_len: int = 1024  # prompt + completion tokens; longer pairs are dropped
    checkpoint_every: int = 0  # 0 = only at the end

    def __post_init__(self):
        _non_negative("sft", num_steps=self.num_steps, warmup_steps=self.warmup_steps)
        _positive("sft", batch_size=self.batch_size, lr=self.lr, max_len=self.max_len)
        _non_negative("sft", weight_decay=self.weight_decay, grad_clip=self.grad_clip)
        _non_negative("sft", checkpoint_every=self.checkpoint_every)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Task data and prompt shapes (config.data)."""

    task: str = "pubmed"  # TaskSpec name
    data_dir: str = ""  # "" = $DEEPRETRIEVAL_DATA_DIR
    corpus: str = ""  # corpus directory under data_dir; "" = the task's own
    train_split: str = "train"
    val_split: str = "test"
    max_prompt_len: int = 500  # tokens
    prompt_buckets: tuple[int, ...] = (128, 256, 512)  # left-padded prompt lengths
    shuffle_seed: int = 0
    num_val_examples: int = -1  # -1 = whole split
    prompt: Any = None  # TaskSpec prompt-field replacements (None values = the task's own)

    def __post_init__(self):
        object.__setattr__(self, "prompt_buckets", tuple(sorted(self.prompt_buckets)))
        if self.prompt is not None:
            from deepretrieval_jax.data.tasks import TaskSpec

            fields = {f.name for f in dataclasses.fields(TaskSpec)}
            unknown = sorted(set(dict(self.prompt)) - fields)
            if unknown:
                raise ValueError(f"data.prompt: unknown TaskSpec fields {unknown}")
        _positive("data", max_prompt_len=self.max_prompt_len)
        if not self.prompt_buckets or self.prompt_buckets[-1] < self.max_prompt_len:
            raise ValueError(
                f"data.prompt_buckets {self.prompt_buckets} must include a bucket >= "
                f"data.max_prompt_len ({self.max_prompt_len})"
            )
        if self.num_val_examples == 0 or self.num_val_examples < -1:
            raise ValueError(
                f"data.num_val_examples must be -1 or positive, got {self.num_val_examples}"
            )


def validate(cfg: Any, num_processes: int = 1) -> None:
    """Cross-field checks of a whole experiment config (one clear error per problem)."""
    TrainConfig(**as_dict(cfg.train))
    SFTConfig(**as_dict(cfg.sft))
    DataConfig(**as_dict(cfg.data))
    from deepretrieval_jax.rl.state import PPOConfig

    ppo = to_dataclass(PPOConfig, cfg.ppo, "ppo")
    prompts = cfg.train.prompts_per_step
    rows = prompts * cfg.sampling.n
    if rows % ppo.mini_batch_size:
        raise ValueError(
            f"train.prompts_per_step * sampling.n ({prompts} * {cfg.sampling.n}) must be "
            f"divisible by ppo.mini_batch_size ({ppo.mini_batch_size})"
        )
    if prompts % num_processes:
        raise ValueError(
            f"train.prompts_per_step ({prompts}) must be divisible by the number of "
            f"processes ({num_processes}): each host samples an equal share"
        )
    if ppo.advantage_estimator != "gae" and cfg.sampling.n < 2:
        raise ValueError(
            f"ppo.advantage_estimator={ppo.advantage_estimator!r} needs sampling.n >= 2"
        )
    s = cfg.sampling
    if s.get("dynamic_sampling", False) and (s.n < 2 or s.dynamic_oversample < 2):
        raise ValueError(
            "sampling.dynamic_sampling needs sampling.n >= 2 (groups) and "
            f"sampling.dynamic_oversample >= 2, got n={s.n}, oversample={s.dynamic_oversample}"
        )
    if s.get("compute_dtype", "") not in ("", "float32", "bfloat16", "float16"):
        raise ValueError(
            f"sampling.compute_dtype must be '', float32, bfloat16 or float16, got "
            f"{s.compute_dtype!r}"
        )
    if cfg.sampling.max_new_tokens <= 0:
        raise ValueError(
            f"sampling.max_new_tokens must be positive, got {cfg.sampling.max_new_tokens}"
        )
    modes = ("off", "read_write", "record", "replay")
    if cfg.reward.pool.cache_mode not in modes:
        raise ValueError(
            f"reward.pool.cache_mode must be one of {modes}, got {cfg.reward.pool.cache_mode!r}"
        )
    if cfg.sft.num_steps and cfg.sft.batch_size % num_processes:
        raise ValueError(
            f"sft.batch_size ({cfg.sft.batch_size}) must be divisible by the number of "
            f"processes ({num_processes})"
        )
