"""Evaluation on SciFact: the "original query" baseline (default) or a trained policy.

Baseline (no model; BM25 k1=1.2 b=0.75 over title + "\\n" + text, as DeepRetrieval's SciFact):
    export DEEPRETRIEVAL_DATA_DIR=../shared/data   # holds scifact/ in BEIR layout
    python launch/eval.py --config=configs/eval_scifact.py --workdir=/tmp/eval_scifact
Expected: ~15 s on 2 CPU cores; test split (300 claims) NDCG@10 0.686, Recall@100 0.921.
Policy (greedy unless --config.eval.temperature > 0):
    python launch/eval.py --config=configs/eval_scifact.py:policy --workdir=/tmp/eval_scifact \
        --config.eval.checkpoint_dir=/tmp/scifact/checkpoints   # or --config.model.hf_path=DIR
Writes WORKDIR/eval/scifact_test_<method>.{json,md,png}.
Dense (task scifact_dense; `:dense` or `:policy,dense`), the encoder as a local directory:
    python launch/eval.py --config=configs/eval_scifact.py:dense --workdir=/tmp/eval_dense \
        --config.reward.search_opts.model=/ckpt/bge-base-en-v1.5   # or "minilm" (packaged)
The first run encodes the 5,183 abstracts and caches them under $DEEPRETRIEVAL_CACHE_DIR.
Multi-turn agent (configs/scifact_agent.py; `:agent`, always a policy): rollouts through the
training's AgentSampler, the final answer scored as the query, and per-turn statistics
(searches per answer, turns used, result overlap, answered fraction) in the report:
    python launch/eval.py --config=configs/eval_scifact.py:agent --workdir=/tmp/eval_agent \
        --config.eval.checkpoint_dir=/tmp/scifact_agent/checkpoints --config.model.hf_path=DIR
"""

import ml_collections

from configs import common, scifact, scifact_agent


def eval_config(method: str = "original_query") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            method=method,  # "original_query" (no model) | "policy"
            split="test",  # split of the task to evaluate
            num_examples=-1,  # first N examples only; -1 = the whole split
            checkpoint_dir="",  # orbax CheckpointManager dir of a run; "" = model.hf_path / init
            checkpoint_key="actor_params",  # key of the policy params in the saved state
            step=-1,  # checkpoint step; -1 = latest
            temperature=0.0,  # 0 = greedy; recorded in the report with top_p, top_k, seed
            top_p=1.0,  # nucleus mass (sampling only)
            top_k=0,  # 0 = off (sampling only)
            seed=0,  # decoding RNG seed
            batch_size=16,  # prompts per sampler call
            length_policy="drop",  # over-long prompts: "drop" (counted) | "truncate"
            concurrency=8,  # search requests in flight
            compare_baseline=True,  # policy runs also score the original query + scatter PNG
        )
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.config_args(arg, ("policy", "dense", "agent"), "configs/eval_scifact.py")
    if "agent" in args:
        cfg = scifact_agent.get_config()
        cfg.eval = eval_config("policy")
        cfg.eval.compare_baseline = False  # the baseline: configs/eval_scifact.py alone
        cfg.reward.search_opts = ml_collections.ConfigDict(dict(k1=1.2, b=0.75, top_k=100))
        return cfg
    cfg = scifact.get_config("dense" if "dense" in args else None)
    cfg.eval = eval_config("policy" if "policy" in args else "original_query")
    # Eval metrics need the top 100 (Recall@100); training asked for 50 (BM25).
    if "dense" in args:
        cfg.reward.search_opts.top_k = 100
    else:
        cfg.reward.search_opts = ml_collections.ConfigDict(dict(k1=1.2, b=0.75, top_k=100))
    return cfg
