"""The tests' tiny policy: a randomly initialised 2-layer Qwen2-architecture model on SciFact.

Not a product config (the main job is configs/demo.py with a pretrained model): the trainer,
sweep and config tests shrink it further. A random-init model cannot write a query, so the
SFT stage teaches it the answer format from the claims themselves (completion =
`<answer>{"query": "<claim>"}</answer>`); the model sees a compact vocabulary of the ~4.1k
tokenizer ids the SciFact texts use (`config.model.compact_vocab`).
    python launch/train.py --config=tests/tiny_config.py --workdir=/tmp/tiny
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
    cfg.model.compact_vocab = True  # ~4.1k ids the SciFact texts use (full vocab: ~20x slower)
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
    cfg.sft.num_steps = 400  # cold start (150: the model does not learn to copy the claim)
    cfg.sft.batch_size = 16
    cfg.sft.lr = 3e-3
    cfg.sft.warmup_steps = 10
    cfg.sft.max_len = 320  # prompt bucket + completion
    return cfg
