"""ClinicalTrials.gov trial search (PICO -> NCT ids, Recall@3000 ladder).

Launch:
    python launch/train.py --config=configs/ctgov.py --workdir=/tmp/ctgov \
        --config.model.hf_path=/ckpt/Qwen2.5-3B-Instruct --config.data.data_dir=/data
Same PPO recipe as PubMed; ClinicalTrials.gov API v2 needs no key. Expected: Recall@3000 ~63%
after ~1,250 steps (original, reasoning variant; 53% without reasoning).
"""

import ml_collections

from configs import common, pubmed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.config_args(arg, ("no_reason",), "configs/ctgov.py")
    cfg = pubmed.get_config()
    cfg.data.task = "ctgov_no_reason" if args else "ctgov"
    cfg.reward.api_key_env = ""  # the v2 API has no key
    cfg.reward.rate_per_s = 5.0  # be polite to the public API
    return cfg
