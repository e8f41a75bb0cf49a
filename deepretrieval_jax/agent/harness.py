"""What the trainer needs to run the multi-turn agent: config, documents, searches, metrics.

- `agent_config(cfg)`: config.agent -> `AgentConfig`, or None when the config has no agent
  section (single-turn tasks are untouched).
- `load_documents(spec, data_dir)`: {doc id: (title, text)} of the task's local corpus, what the
  information blocks show (search backends return ids only).
- `pool_search_fn(pool, task, opts, documents)`: the rollout's searches through the reward pool
  (`RewardPool.search`: the same backend, semaphore, cache and retries as the rewards; with
  the cache on, the reward's re-run of the same queries is free).
- `turn_metrics(stats, transcripts)`: agent/* metrics of one rollout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from deepretrieval_jax.agent import protocol
from deepretrieval_jax.config import to_dataclass

Documents = Mapping[str, tuple[str, str]]


def agent_config(cfg) -> protocol.AgentConfig | None:
    """config.agent as an AgentConfig (None: no agent section, the single-turn task)."""
    section = cfg.get("agent") if hasattr(cfg, "get") else None
    if section is None:
        return None
    return to_dataclass(protocol.AgentConfig, section, "agent")


def load_documents(spec, data_dir: str | os.PathLike | None) -> dict[str, tuple[str, str]]:
    """{doc id: (title, text)} of `spec`'s local corpus (corpus.jsonl)."""
    from deepretrieval_jax.data.backends import corpus_dir
    from deepretrieval_jax.data.converters import iter_beir_corpus

    directory = corpus_dir(spec, data_dir)
    if directory is None:
        raise ValueError(
            f"config.agent: task {spec.name!r} has no local corpus, so its search results "
            "cannot be shown to the policy (the agent needs a BM25 or dense task)"
        )
    return {i: (title, text) for i, title, text in iter_beir_corpus(directory / "corpus.jsonl")}


def pool_search_fn(pool, task, opts: Mapping, documents: Documents):
    """queries -> outcomes for `AgentSampler`: ("ok", [(id, title, text)...]) or an error."""
    opts = task.search_opts(opts)

    def search(queries):
        outcomes = []
        for kind, value in pool.search(task.backend, queries, opts):
            if kind == "ok":
                value = [(str(i), *documents.get(str(i), ("", ""))) for i in value]
            outcomes.append((kind, value))
        return outcomes

    return search


def turn_metrics(stats, transcripts, prompt_suffix: str = "", prefix: str = "") -> dict:
    """Per-turn statistics of one rollout (this process's rows; `prompt_suffix` is the
    assistant prefix the transcripts continue)."""
    parsed = [protocol.parse_transcript(t, prompt_suffix) for t in transcripts]
    answered = [p for p in parsed if p.ok]
    n = max(len(parsed), 1)
    return {
        f"{prefix}agent/searches_mean": float(np.mean(stats.searches_R)) if n else 0.0,
        f"{prefix}agent/searches_per_answer": (
            float(np.mean([len(p.queries) for p in answered])) if answered else 0.0
        ),
        f"{prefix}agent/turns_mean": float(np.mean(stats.turns_R)),
        f"{prefix}agent/answered_fraction": len(answered) / n,
        f"{prefix}agent/idle_fraction": float(stats.idle_fraction),
        f"{prefix}agent/decode_steps": float(stats.decode_steps),
        f"{prefix}agent/inserted_tokens_mean": stats.inserted_tokens / n,
        f"{prefix}agent/round_trips": float(stats.round_trips),
    }
