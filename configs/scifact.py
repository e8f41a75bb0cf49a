"""BEIR SciFact with local BM25 (k1=1.2, b=0.75 over title + "\\n" + text), NDCG@50 reward.

Launch:
    python launch/train.py --config=configs/scifact.py --workdir=/tmp/scifact \
        --config.model.hf_path=/ckpt/Qwen2.5-3B-Instruct --config.data.data_dir=/data
(`data_dir` holds `scifact/` in BEIR layout.) Local BM25 is deterministic, so runs replay
exactly. Expected: NDCG@10 above the BM25 baseline of the raw claims (0.665) within a few
hundred steps on one 8-GPU host (original chart: ~0.7).

Dense variant (`--config=configs/scifact.py:dense`, also `:dense,no_reason`): task scifact_dense,
exact inner product over bge-base-en-v1.5 embeddings (cached on disk after the first build).
Nothing is downloaded: give the encoder as a local directory with
`--config.reward.search_opts.model=/ckpt/bge-base-en-v1.5` (or a Hub id already in the HF
cache; `minilm` = the packaged all-MiniLM-L6-v2, a fast stand-in).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    cfg = common.base_config()
    cfg.model.preset = "qwen2.5-3b"
    args = common.config_args(arg, ("dense", "no_reason"), "configs/scifact.py")
    dense = "dense" in args
    cfg.data.task = (
        "scifact" + ("_dense" if dense else "") + ("_no_reason" if "no_reason" in args else "")
    )
    cfg.data.max_prompt_len = 500
    cfg.sampling.temperature = 0.6  # original BEIR rollouts
    cfg.sampling.max_new_tokens = 500
    cfg.reward.pool.concurrency = 8  # BM25 queries run in a thread pool
    cfg.reward.search_opts = ml_collections.ConfigDict(
        dict(
            k1=1.2,  # DeepRetrieval's SciFact BM25
            b=0.75,
            top_k=50,  # training NDCG@50
        )
    )
    if dense:
        cfg.reward.search_opts = ml_collections.ConfigDict(
            dict(
                model="BAAI/bge-base-en-v1.5",  # encoder: local dir, cached Hub id or "minilm"
                top_k=1000,  # training NDCG@1000, as the original's dense SciFact
            )
        )
    cfg.train.num_steps = 300  # ~24 epochs of SciFact's 809 training claims at 64/step
    return cfg
