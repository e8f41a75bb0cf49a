"""Shared pieces of the trainer tests: a tiny task, corpus, config; also run as a worker.

`python tests/trainer_fixtures.py WORKDIR NUM_STEPS OUT_JSON [POLICY_DIR]` trains the tiny
config (with POLICY_DIR: the multi-turn agent of `tiny_agent_config`, scripted rollouts) and
writes a digest of the final params and the last metrics to OUT_JSON (the multi-host test runs
it in two processes; JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID join them).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TASK = "tiny_test_beir"
DOCS = [
    "vitamin d deficiency increases fracture risk in elderly women",
    "aspirin reduces the risk of colorectal cancer",
    "statins lower cholesterol and cardiovascular events",
    "exercise improves insulin sensitivity in type 2 diabetes",
    "smoking causes lung cancer and heart disease",
    "sleep deprivation impairs memory consolidation",
    "high salt intake raises blood pressure",
    "breastfeeding lowers infant infection rates",
]


def register_task():
    """A BEIR-family task with a short prompt (keeps the prompt bucket at 96 tokens)."""
    from deepretrieval_jax.data import tasks

    if TASK not in tasks.list_tasks():
        base = tasks.get_task("scifact_no_reason")
        tasks.register_task(
            base.replace(
                name=TASK,
                system="S",
                instruction="Query:",
                output_format="",
                note="",
                input_header="",
            )  # fmt: skip
        )


def examples():
    from deepretrieval_jax.data.records import Example

    return [Example(f"q{i}", " ".join(t.split()[:3]), {f"d{i}": 1}) for i, t in enumerate(DOCS)]


def backend():
    from deepretrieval_jax.search.bm25 import BM25Backend, BM25Config, BM25Index

    docs = [(f"d{i}", t) for i, t in enumerate(DOCS)]
    return BM25Backend(BM25Index.build(docs, BM25Config(k1=1.2, b=0.75)))


def tiny_config(num_steps: int = 3):
    """tests/tiny_config.py shrunk: 1 layer, 8 prompts/step, 6 new tokens, 96-token prompts
    (the tiny tokenizer's ids are characters)."""
    import tiny_config

    from configs import common

    register_task()
    cfg = tiny_config.get_config()
    cfg.data.prompt = common.prompt_config()  # the task's own short prompt
    cfg.model.overrides.num_layers = 1
    cfg.model.overrides.embed_dim = 32
    cfg.model.overrides.mlp_dim = 64
    cfg.data.task = TASK
    cfg.data.prompt_buckets = (96,)
    cfg.data.max_prompt_len = 96
    cfg.data.num_val_examples = -1
    cfg.train.prompts_per_step = 8
    cfg.ppo.mini_batch_size = 4
    cfg.sampling.max_new_tokens = 6
    cfg.train.num_steps = num_steps
    cfg.train.val_every = 0
    cfg.train.checkpoint_every = 1
    cfg.train.async_checkpoint = False
    cfg.logging.progress = False
    return cfg


AGENT_SEARCH = "<search>aspirin colorectal</search>"
AGENT_ANSWER = "<answer>aspirin colorectal cancer</answer>"


def agent_sampler_fns():
    """Rollouts that write AGENT_SEARCH, then AGENT_ANSWER after the information block."""
    import tiny_models

    return tiny_models.scripted_agent_fns([[AGENT_SEARCH, AGENT_ANSWER]])


def tiny_agent_config(policy_dir, num_steps: int = 2):
    """The multi-turn agent on the tiny task: 2 turns, one 20-character document per search."""
    import ml_collections

    from configs import common

    register_task()
    cfg = common.base_config()
    cfg.mesh = common.mesh_config(data=-1)
    cfg.model.preset = ""
    cfg.model.hf_path = str(policy_dir)
    cfg.model.overrides.dtype = "float32"
    cfg.model.overrides.remat = False
    cfg.data.task = TASK
    cfg.data.prompt_buckets = (96, 128)
    cfg.data.max_prompt_len = 128
    cfg.data.prompt.assistant_prefix = ""
    cfg.agent = common.agent_config()
    cfg.agent.max_turns = 2
    cfg.agent.docs_per_search = 1
    cfg.agent.doc_chars = 20
    cfg.agent.info_max_tokens = 64
    cfg.agent.max_turn_tokens = 48
    cfg.agent.reward_opts = ml_collections.ConfigDict(dict(k=5, shown=1))
    cfg.sampling.stop = ("</answer>",)
    cfg.sampling.max_new_tokens = 2 * 48 + 65
    cfg.sampling.n = 2
    cfg.ppo.mini_batch_size = 8
    cfg.reward.pool.cache_mode = "read_write"
    cfg.train.prompts_per_step = 8
    return short_run(cfg, num_steps)


def short_run(cfg, num_steps: int):
    """`cfg` as a test's short run: validation and a synchronous checkpoint at the end only,
    no progress bar."""
    cfg.train.num_steps = num_steps
    cfg.train.val_every = num_steps
    cfg.train.checkpoint_every = num_steps
    cfg.train.async_checkpoint = False
    cfg.logging.progress = False
    return cfg


def params_digest(params) -> str:
    import jax
    import numpy as np

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(params)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def main(workdir: str, num_steps: int, out: str, policy_dir: str = "") -> None:
    from deepretrieval_jax import runtime

    runtime.initialize_distributed()
    import jax
    from jax.experimental import multihost_utils

    from deepretrieval_jax.rl import trainer

    ex = examples()
    if policy_dir:  # the multi-turn agent: scripted rollouts, searches between turns
        cfg = tiny_agent_config(policy_dir, num_steps)
        docs = {f"d{i}": ("", t) for i, t in enumerate(DOCS)}
        agent_kw = dict(documents=docs, sampler_fns=agent_sampler_fns())
    else:
        cfg, agent_kw = tiny_config(num_steps), None
    result = trainer.train(
        cfg, workdir, train_examples=ex, val_examples=ex, backend=backend(), agent_kw=agent_kw
    )
    state = result.state
    # Fully replicate before fetching: every process then digests the same global params.
    params = multihost_utils.process_allgather(state.actor_params, tiled=True)
    critic = (
        None
        if state.critic_params is None
        else multihost_utils.process_allgather(state.critic_params, tiled=True)
    )
    Path(out).write_text(
        json.dumps(
            {
                "process": jax.process_index(),
                "count": jax.process_count(),
                "step": result.step,
                "actor": params_digest(params),
                "critic": None if critic is None else params_digest(critic),
                "metrics": result.last_metrics,
            }
        )
    )


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:5])


def write_beir(root: Path) -> Path:
    """The tiny corpus and claims in BEIR layout under root/scifact (train = test = all)."""
    d = root / "scifact"
    (d / "qrels").mkdir(parents=True, exist_ok=True)
    with open(d / "corpus.jsonl", "w") as f:
        for i, t in enumerate(DOCS):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n")
    with open(d / "queries.jsonl", "w") as f:
        for ex in examples():
            f.write(json.dumps({"_id": ex.id, "text": ex.input}) + "\n")
    for split in ("train", "test"):
        rows = [f"q{i}\td{i}\t1" for i in range(len(DOCS))]
        (d / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n"
        )
    return root
