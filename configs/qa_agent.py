"""Evidence-seeking QA agent (Search-R1 style): search BM25 passages, read, answer the question;
reward 0.1 + exact match (+ 0.5 x F1, + 0.2 when a shown passage holds a gold answer).

Launch (SQuAD over its own paragraphs; NQ / TriviaQA: --config.data.task=nq with the DPR
Wikipedia corpus, see docs/tasks.md "Evidence seeking"):
    python -m deepretrieval_jax.data.corpus --format=squad_json --out=/data/squad_paragraphs \\
        download:squad/train download:squad/dev
    python launch/train.py --config=configs/qa_agent.py --workdir=/runs/qa_agent \\
        --config.model.hf_path=/ckpt/Qwen2.5-3B-Instruct --config.data.data_dir=/data
Protocol: as configs/scifact_agent.py, but the answer is the short answer text; the task's
labels are its answer strings. Expected: not measured (a GPU/TPU recipe; a 135M model does
not answer open questions).
"""

import ml_collections

from configs import common

SYSTEM = "You answer questions by searching Wikipedia."
INSTRUCTION = (
    "Answer the question. Search with <search>query</search>; results come back in "
    "<information>...</information>. Search as often as you need (up to three times), then "
    "give a short answer as <answer>answer</answer>."
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    common.config_args(arg, (), "configs/qa_agent.py")
    cfg = common.base_config()
    cfg.model.preset = ""  # the shape comes from model.hf_path's config.json
    cfg.model.hf_path = ""  # HF checkpoint dir of a pretrained instruct model (required)
    cfg.data.task = "squad_no_reason"  # questions + answer strings (evidence family)
    cfg.data.corpus = "squad_paragraphs"  # BM25 over SQuAD's paragraphs (built above)
    cfg.data.max_prompt_len = 256  # tokens
    cfg.data.prompt_buckets = (128, 256)
    cfg.data.prompt.system = SYSTEM
    cfg.data.prompt.instruction = INSTRUCTION
    cfg.data.prompt.output_format = ""  # the instruction states the protocol
    cfg.data.prompt.note = ""
    cfg.data.prompt.input_header = "Question:"
    cfg.data.prompt.assistant_prefix = ""  # the policy chooses: search or answer at once
    cfg.agent = common.agent_config()
    cfg.agent.max_turns = 4  # three searches, then the answer
    cfg.agent.docs_per_search = 3
    cfg.agent.info_max_tokens = 256  # three 100-word passages
    cfg.agent.max_turn_tokens = 128  # room to reason before a search or the answer
    cfg.agent.reward_task = "agent_qa"
    cfg.agent.reward_opts = ml_collections.ConfigDict(
        dict(
            em=1.0,  # exact match weight (SQuAD normalisation)
            f1=0.5,  # token F1 weight
            retrieval=0.2,  # a shown passage contains a gold answer
            k=20,  # results per search (the first docs_per_search are shown)
            shown=3,  # = agent.docs_per_search
            bad_turn=-0.2,  # per blank or rejected search
            search_cost=0.0,  # per search run
        )
    )
    cfg.sampling.max_new_tokens = 4 * 128 + 3 * 257  # every turn and inserted block (1283)
    cfg.sampling.stop = ("</answer>",)  # the answer ends the rollout (</search> pauses it)
    cfg.sampling.temperature = 1.0
    cfg.sampling.n = 5  # GRPO groups (Search-R1)
    cfg.ppo.advantage_estimator = "grpo"
    cfg.ppo.kl_in_reward = False
    cfg.ppo.kl_loss_coef = 0.001  # KL as a loss term (Search-R1 / GRPO)
    cfg.ppo.actor_lr = 1e-6
    cfg.ppo.mini_batch_size = 64
    cfg.train.prompts_per_step = 64  # x n=5 = 320 rows per step
    cfg.reward.pool.cache_mode = "read_write"  # the reward re-runs the rollout's searches
    cfg.reward.search_opts = ml_collections.ConfigDict(dict(k1=0.9, b=0.4))
    return cfg
