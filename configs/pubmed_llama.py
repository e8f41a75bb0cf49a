"""PubMed publication search with Llama-3.2-3B-Instruct (the original's second policy).

Launch:
    python launch/train.py --config=configs/pubmed_llama.py --workdir=/tmp/pubmed_llama \
        --config.model.hf_path=/ckpt/Llama-3.2-3B-Instruct --config.data.data_dir=/data
Same PPO recipe as configs/pubmed.py (lengths 500/500, lr 1e-6/1e-5, KL 0.001 in the reward).
Expected runtime comparable to the Qwen run (~1,250 steps; ~115 s/step on 2xA100 originally).
"""

import ml_collections

from configs import pubmed


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    cfg = pubmed.get_config(arg)
    cfg.model.preset = "llama3.2-3b"  # Llama-3.2-3B-Instruct dimensions
    cfg.tokenizer.name = ""  # "" = the tokenizer files in model.hf_path
    return cfg
