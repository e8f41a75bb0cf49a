"""The CPU main job: cold-start SFT, then PPO of a small Qwen2-architecture policy on SciFact.

Launch (2 CPU cores; SciFact in BEIR layout under $DEEPRETRIEVAL_DATA_DIR/scifact):
    export DEEPRETRIEVAL_DATA_DIR=../shared/data
    python launch/sft.py   --config=configs/demo.py --workdir=/tmp/demo_sft
    python launch/train.py --config=configs/demo.py --workdir=/tmp/demo \
        --config.model.init_checkpoint=/tmp/demo_sft/checkpoints
Expected: under ~15 minutes in all on 2 CPU cores. The policy is randomly initialised (no
pretrained weights on CPU), so SFT teaches it the answer format from the claims themselves
(completion = `<answer>{"query": "<claim>"}</answer>`), and PPO rewards it with 0.1 + NDCG@50
from local BM25 (k1=1.2 b=0.75; -2 for a broken format); validation is greedy on SciFact's
test claims. Curves: WORKDIR/reward_curve.png.
Measured with these values (2 shared cores, load ~10): SFT 150 steps 4.2 min (loss 11.9 ->
3.4), PPO 40 steps 4.7 min (~4.5 s/step); train reward -0.88 -> -0.25..-0.6 as the format-ok
rate rose 0.56 -> 0.75-0.88, but NDCG stayed ~0: the 2-layer model does not yet copy the claim
(greedy validation repeats "the"). Needs tuning (more SFT, a wider model) before it shows
retrieval gains.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    cfg = common.base_config()
    cfg.mesh = common.mesh_config(data=-1)  # pure data parallel over the CPU devices
    cfg.model.preset = "tiny"  # Qwen2 architecture (GQA, q/k/v bias, tied head)
    cfg.model.overrides = ml_collections.ConfigDict(
        dict(
            embed_dim=64,  # hidden size
            mlp_dim=192,  # SwiGLU width
            num_layers=2,  # decoder layers
            num_heads=4,  # query heads
            num_kv_heads=2,  # key/value heads (GQA 2:1)
            head_dim=16,  # per-head width
            max_position_embeddings=1024,
            dtype="float32",  # CPU: no bf16 speed-up
            remat=False,
        )
    )
    cfg.model.compact_vocab = True  # ~8k ids the SciFact texts use (full vocab: ~20x slower)
    cfg.data.task = "scifact_no_reason"  # short completions: <answer>{"query": ...}</answer>
    cfg.data.data_dir = ""  # "" = $DEEPRETRIEVAL_DATA_DIR (holds scifact/)
    cfg.data.max_prompt_len = 256  # tokens
    cfg.data.prompt_buckets = (256,)  # one prompt shape: one compilation
    cfg.data.num_val_examples = 32  # greedy validation claims
    cfg.sampling.temperature = 1.0
    cfg.sampling.max_new_tokens = 48  # enough for a claim-length query in the answer JSON
    cfg.train.prompts_per_step = 16  # global prompts per step
    cfg.ppo.mini_batch_size = 8  # two updates per step
    cfg.ppo.actor_lr = 1e-4  # a randomly initialised tiny model needs far larger steps
    cfg.ppo.critic_lr = 1e-3
    cfg.reward.pool.concurrency = 2  # two cores
    cfg.reward.search_opts = ml_collections.ConfigDict(dict(k1=1.2, b=0.75, top_k=50))
    cfg.train.num_steps = 40  # PPO steps
    cfg.train.val_every = 10
    cfg.train.checkpoint_every = 10
    cfg.train.async_checkpoint = False
    cfg.sft.num_steps = 150  # cold start
    cfg.sft.batch_size = 16
    cfg.sft.lr = 3e-3
    cfg.sft.warmup_steps = 10
    cfg.sft.max_len = 320  # prompt bucket + completion
    return cfg
