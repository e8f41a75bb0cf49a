"""Greedy evaluation of the CPU demo's policy (configs/demo.py) against the original query.

Launch (after launch/train.py --config=configs/demo.py --workdir=/tmp/demo):
    export DEEPRETRIEVAL_DATA_DIR=../shared/data
    python launch/eval.py --config=configs/eval_demo.py --workdir=/tmp/demo \
        --config.eval.checkpoint_dir=/tmp/demo/checkpoints
Expected: about a minute on 2 CPU cores for the 300 SciFact test claims; writes
WORKDIR/eval/scifact_no_reason_test_{policy,original_query}.{json,md,png} and the per-claim
scatter scifact_no_reason_test_policy_vs_original_query.png. Without a checkpoint the policy
is randomly initialised and nearly every completion is a format error (reported as such).
"""

import ml_collections

from configs import common, demo, eval_scifact


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    common.config_args(arg, (), "configs/eval_demo.py")
    cfg = demo.get_config()
    cfg.eval = eval_scifact.eval_config("policy")
    cfg.eval.batch_size = 32  # prompts per sampler call (one prompt bucket: one compilation)
    # Eval metrics need the top 100 (Recall@100); the demo trains on NDCG@50.
    cfg.reward.search_opts = ml_collections.ConfigDict(dict(k1=1.2, b=0.75, top_k=100))
    return cfg
