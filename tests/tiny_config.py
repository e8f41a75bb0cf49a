"""The tests' tiny policy: a randomly initialised 2-layer Qwen2-architecture model on SciFact.

Not a product config (the main job is configs/demo.py with a pretrained model): the trainer,
sweep and config tests shrink it further. The model speaks a tiny byte-level tokenizer
(`tiny_models.save_tiny_tokenizer`: one id per printable character, 100 ids in the tiny preset's
256-row vocabulary), so its LM head costs nothing and no data is needed to size it; prompts are
short (one token per character). A random-init model cannot write a query, so the SFT stage
teaches it the answer format from the claims themselves (completion =
`<answer>{"query": "<claim>"}</answer>`).
    python launch/train.py --config=tests/tiny_config.py --workdir=/tmp/tiny
"""

import os
import sys
import tempfile
from pathlib import Path

import ml_collections

from configs import common

TOKENIZER_VERSION = 1  # bump when tiny_models.save_tiny_tokenizer changes


def tokenizer_dir() -> str:
    """The tiny tokenizer's directory, written once per user into the temp directory."""
    path = (
        Path(tempfile.gettempdir())
        / f"deepretrieval_tiny_tokenizer_{os.getuid()}_v{TOKENIZER_VERSION}"
    )
    if not (path / "tokenizer.json").is_file():
        here = str(Path(__file__).resolve().parent)  # launch/*.py --config=tests/... too
        if here not in sys.path:
            sys.path.insert(0, here)
        from tiny_models import save_tiny_tokenizer

        staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
        save_tiny_tokenizer(staging)
        try:
            staging.rename(path)  # atomic: a concurrent writer's copy is identical
        except OSError:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return str(path)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    cfg = common.base_config()
    cfg.mesh = common.mesh_config(data=-1)  # pure data parallel over the CPU devices
    cfg.model.preset = "tiny"  # Qwen2 architecture (GQA, q/k/v bias, tied head), vocab 256
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
    cfg.tokenizer.name = tokenizer_dir()  # byte-level, one id per character
    cfg.data.task = "scifact_no_reason"  # short completions: <answer>{"query": ...}</answer>
    cfg.data.prompt.system = "Write a search query."  # short prompts: a token per character
    cfg.data.prompt.instruction = ""
    cfg.data.prompt.output_format = ""
    cfg.data.prompt.note = ""
    cfg.data.prompt.input_header = "Claim:"
    cfg.data.data_dir = ""  # "" = $DEEPRETRIEVAL_DATA_DIR (holds scifact/)
    cfg.data.max_prompt_len = 384  # tokens (= characters)
    cfg.data.prompt_buckets = (256, 384)  # a batch is padded to the smaller one when it fits
    cfg.data.num_val_examples = 32  # greedy validation claims
    cfg.sampling.temperature = 1.0
    cfg.sampling.max_new_tokens = 192  # a claim-length query in the answer JSON (characters)
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
    cfg.sft.num_steps = 400  # cold start: the model learns to copy the claim
    cfg.sft.batch_size = 16
    cfg.sft.lr = 3e-3
    cfg.sft.warmup_steps = 10
    cfg.sft.max_len = 640  # prompt bucket + completion
    return cfg
