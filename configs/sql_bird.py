"""BIRD text-to-SQL: execution match against the gold SQL on read-only sqlite, SFT cold start.

Launch (SFT first, then PPO from the SFT checkpoint):
    python launch/sft.py --config=configs/sql_bird.py --workdir=/tmp/bird_sft \
        --config.model.hf_path=/ckpt/Qwen2.5-3B-Instruct --config.data.data_dir=/data
    python launch/train.py --config=configs/sql_bird.py --workdir=/tmp/bird \
        --config.model.hf_path=/ckpt/Qwen2.5-3B-Instruct --config.data.data_dir=/data \
        --config.model.init_checkpoint=/tmp/bird_sft/checkpoints
Expected: execution accuracy ~57% on BIRD dev (original chart) after ~1,000 PPO steps.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.config_args(arg, ("no_reason",), "configs/sql_bird.py")
    cfg = common.base_config()
    cfg.model.preset = "qwen2.5-3b"
    cfg.data.task = "bird_no_reason" if args else "bird"
    cfg.data.max_prompt_len = 2048  # schemas are long
    cfg.data.prompt_buckets = (512, 1024, 2048)
    cfg.data.val_split = "dev"
    cfg.sampling.temperature = 0.6  # original SQL rollouts
    cfg.sampling.max_new_tokens = 500
    cfg.reward.pool.concurrency = 8  # sqlite queries in worker threads
    cfg.reward.pool.request_timeout_s = 30.0  # per-query execution limit
    cfg.sft.pairs_path = "bird/sft_pairs.jsonl"  # teacher think+answer completions (data_dir)
    cfg.sft.num_steps = 500
    cfg.sft.max_len = 3072
    cfg.train.num_steps = 1000
    return cfg
