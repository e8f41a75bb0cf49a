"""Multi-turn search agent on SciFact: a pretrained policy searches local BM25 up to twice,
reads the top results, and answers with a final query; reward 0.1 + NDCG@50 of that query.

Launch (the pretrained SmolLM2-135M-Instruct of configs/demo.py, imported to HF format):
    export DEEPRETRIEVAL_DATA_DIR=../shared/data    # holds scifact/ in BEIR layout
    python launch/train.py --config=configs/scifact_agent.py --workdir=workdirs/scifact_agent \\
        --config.model.hf_path=/path/to/smollm2-hf [--config.agent.reward_opts.source=union]
Protocol (docs/tasks.md, "Multi-turn search agent"): the assistant turn is prefilled with
`<search>`; the policy writes a query and `</search>`, the harness inserts
`<information>[1] title: text ...</information>` (top 3, 300 characters each) and the policy
searches again or writes `<answer>final query</answer>` (a stop string). Inserted tokens are
masked out of every loss term. `configs/scifact_agent.py:one_turn` is the one-turn case of the
same machinery (max_turns=1, the turn prefilled with `<answer>`: one query, no search before
it); `--config.agent.max_turns=1` alone cannot answer, since every rollout starts with a search.
Expected (measured once, seed 0, docs/benchmarks.md "Multi-turn agent"; 4 claims x 4 samples
per step, one core, `train.cpu_budget_minutes=15`, `train.cpu_budget_stop="nearest"`): 4 steps
(19.7 CPU min: 2-7 min a step), then greedy on the first 100 test claims NDCG@10 0.044,
Recall@100 0.080, 82% format errors (the answer turn imitates the information block and never
closes `</answer>`); the model completes this protocol zero-shot on ~3% of claims, so GRPO has
little signal. The `one_turn` variant at the same budget: 17 steps (15.9 CPU min), NDCG@10
0.712, Recall@100 0.953, 0% format errors. Peak memory 8.7 GB (one_turn 4.8 GB).
"""

import ml_collections

from configs import common

SYSTEM = "You search a library of scientific abstracts."
# No literal placeholder inside the tags: SmolLM2-135M copies one ("<search>query</search>")
# verbatim; an example query it may copy at worst still retrieves (docs/benchmarks.md).
INSTRUCTION = (
    "Find abstracts that support or refute the claim. Search with <search>...</search>, e.g. "
    "<search>vitamin D supplementation fracture risk</search>; results come back in "
    "<information>...</information>. You may search up to twice, then give your best final "
    "search query as <answer>...</answer>."
)
ONE_TURN_INSTRUCTION = (
    "Find abstracts that support or refute the claim. Give your best search query as "
    "<answer>query</answer>."
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.config_args(arg, ("one_turn",), "configs/scifact_agent.py")
    cfg = common.base_config()
    cfg.mesh = common.mesh_config(data=-1)  # pure data parallel over the CPU devices
    cfg.model.preset = ""  # the shape comes from model.hf_path's config.json
    cfg.model.hf_path = ""  # HF checkpoint dir of a pretrained instruct model (required)
    cfg.model.overrides = ml_collections.ConfigDict(dict(dtype="float32", remat=False))
    cfg.data.task = "scifact_no_reason"  # SciFact claims, local BM25 over the abstracts
    cfg.data.data_dir = ""  # "" = $DEEPRETRIEVAL_DATA_DIR (holds scifact/)
    cfg.data.max_prompt_len = 192  # tokens (the longer instruction than configs/demo.py)
    cfg.data.prompt_buckets = (128, 192)  # a batch is padded to the smaller one when it fits
    cfg.data.num_val_examples = 64  # greedy validation claims
    cfg.data.prompt.system = SYSTEM
    cfg.data.prompt.instruction = INSTRUCTION
    cfg.data.prompt.output_format = ""  # the instruction states the protocol
    cfg.data.prompt.note = ""
    cfg.data.prompt.input_header = "Claim:"
    cfg.data.prompt.assistant_prefix = "<search>"  # every rollout starts with a search
    cfg.agent = common.agent_config()
    cfg.agent.max_turns = 3  # two searches, then the answer
    cfg.agent.reward_task = "agent_ndcg"
    cfg.agent.reward_opts = ml_collections.ConfigDict(
        dict(
            source="final",  # NDCG of the final answer as a query ("union": of every search)
            k=50,  # NDCG cutoff and results per search (DeepRetrieval's SciFact k)
            shown=3,  # = agent.docs_per_search: what the overlap metric compares
            bad_turn=-0.2,  # per blank or rejected search
            search_cost=0.0,  # per search run
        )
    )
    # The buffer holds every turn and inserted block: 3 x 64 generated + 2 x 193 inserted.
    cfg.sampling.max_new_tokens = 3 * 64 + 2 * 193  # token columns per row (578)
    cfg.sampling.stop = ("</answer>",)  # the answer ends the rollout (</search> pauses it)
    cfg.sampling.temperature = 0.7
    cfg.sampling.n = 4  # GRPO groups
    cfg.ppo.advantage_estimator = "grpo"
    cfg.ppo.kl_in_reward = False
    cfg.ppo.kl_coef = 0.0
    cfg.ppo.entropy_coef = 0.0
    cfg.ppo.actor_lr = 5e-6
    cfg.ppo.mini_batch_size = 16  # two optimiser updates per step
    # Rows per forward/backward slice: the peak memory. Without remat a 770-token row's
    # saved activations and logits take ~4 GB here (micro-batches of 4: over 17 GB, killed).
    cfg.ppo.micro_batch_size = 1
    # PPO's old log-probs from the (fp32) sampler, as configs/demo.py: recomputing them costs
    # one more forward pass per step (run micro_batch_size rows at a time, like the update).
    cfg.ppo.recompute_logprobs = False
    cfg.train.prompts_per_step = 8  # x n=4 samples = 32 rows per step
    cfg.reward.pool.concurrency = 2  # two cores
    # The rollout's searches and the reward's re-run of them share this cache (in memory +
    # WORKDIR/reward_cache.sqlite): the reward costs no second search.
    cfg.reward.pool.cache_mode = "read_write"
    cfg.reward.search_opts = ml_collections.ConfigDict(dict(k1=1.2, b=0.75))
    cfg.train.num_steps = 30  # RL steps
    cfg.train.val_every = 10
    cfg.train.checkpoint_every = 10
    cfg.train.max_to_keep = 1
    cfg.train.async_checkpoint = False
    if "one_turn" in args:  # one query, graded as the final answer: no search, no block
        cfg.agent.max_turns = 1
        cfg.data.prompt.instruction = ONE_TURN_INSTRUCTION
        cfg.data.prompt.assistant_prefix = "<answer>"
        cfg.sampling.max_new_tokens = 64  # = agent.max_turn_tokens: one turn, no blocks
    return cfg
