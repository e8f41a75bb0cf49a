"""PubMed publication search: the original DeepRetrieval recipe (Qwen2.5-3B-Instruct, PPO).

Launch (one GPU host, 8 devices; on a TPU pod slice use launch/tpu_pod.sh with the same flags):
    python launch/train.py --config=configs/pubmed.py --workdir=/tmp/pubmed \
        --config.model.hf_path=/ckpt/Qwen2.5-3B-Instruct --config.data.data_dir=/data
Needs NCBI_API_KEY in the environment (10 requests/s; 3/s without it, slower rewards).
Expected: ~1,250 steps (10 epochs of the training set); the original took ~115 s/step on
2xA100 and reached Recall@3000 = 65% on the test set (reasoning variant; 51.9% without).
Variants: get_config("no_reason") trains the no-reasoning prompt.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.config_args(arg, ("no_reason",), "configs/pubmed.py")
    cfg = common.base_config()
    cfg.model.preset = "qwen2.5-3b"  # Qwen2.5-3B-Instruct dimensions
    cfg.data.task = "pubmed_no_reason" if args else "pubmed"
    cfg.data.max_prompt_len = 500  # original max_prompt_length
    cfg.sampling.max_new_tokens = 500  # original max_response_length
    cfg.sampling.temperature = 1.0  # original rollout temperature (top-p 1.0)
    cfg.reward.pool.concurrency = 10  # NCBI allows 10 requests/s with a key
    cfg.reward.rate_per_s = 10.0  # token bucket: never exceed NCBI's limit (429s otherwise)
    cfg.reward.api_key_env = "NCBI_API_KEY"  # E-utilities key
    cfg.reward.pool.cache_mode = "record"  # live search, every result cached for replay
    cfg.train.num_steps = 1250  # 10 epochs at 64 prompts/step
    cfg.reward.search_opts = ml_collections.ConfigDict(
        dict(
            base_url=""
        )  # search service address (E-utilities; CT.gov in configs/ctgov.py); "" = public
    )
    return cfg
