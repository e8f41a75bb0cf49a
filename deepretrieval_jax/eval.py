"""Evaluation of a policy or of the "original query" baseline on one task split.

Flow: queries (the input itself for the baseline; parsed from the policy's completions
otherwise) -> the task's search backend (asyncio, bounded concurrency) -> per-example metrics
(from `rewards.retrieval_metrics`) -> aggregates -> JSON + markdown + PNG (`eval_report`).
`run(config, workdir)` is the config-driven path behind `launch/eval.py`. A config with an
`agent` section evaluates the multi-turn search agent: rollouts through the training's
`AgentSampler`, the final answer as the query, per-turn statistics in `aggregates["agent"]`
(`agent/evaluate.py`).

Every example ends in exactly one status, and the rates are reported separately:
  ok             the query ran; metrics computed.
  format_error   the completion's tags or JSON payload are broken (policy's fault): metrics 0.
  rejected       the backend refused the query (`QueryRejected`, e.g. empty or SQL that does
                 not run; policy's fault): metrics 0.
  backend_error  infrastructure failed (`BackendError`, or a missing passage text): excluded
                 from the metric means, never counted as 0.
Aggregates: `metrics` averages over ok + format_error + rejected (errors of the policy count as
0); `metrics_ok_only` averages over ok only. Decoding settings are recorded in the output.

Metric names: `recall@K`, `ndcg@K`, `hit@K` (evidence: a passage among the top K contains an
answer, DPR matching), `execution_accuracy` (SQL result rows equal as sets).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from deepretrieval_jax import progress
from deepretrieval_jax import workdir as workdir_lib
from deepretrieval_jax.data.records import Example
from deepretrieval_jax.data.render import original_query, prepare_prompts
from deepretrieval_jax.data.tasks import TaskSpec
from deepretrieval_jax.rewards import retrieval_metrics as rm
from deepretrieval_jax.rewards.parsing import parse_completion
from deepretrieval_jax.search import query_syntax
from deepretrieval_jax.search.base import BackendError, QueryRejected, SearchBackend

STATUSES = ("ok", "format_error", "rejected", "backend_error")
GenerateFn = Callable[[list[str]], list[str]]  # rendered prompts -> completions


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Decoding of the policy; recorded in every report. temperature 0 = greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_new_tokens: int = 500

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError(f"invalid decoding settings: {self}")


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    id: str
    status: str  # one of STATUSES
    query: str | None
    metrics: dict  # metric name -> value; empty for backend_error
    error: str | None = None
    top_ids: tuple = ()  # first 10 retrieved ids (for inspection)
    completion: str | None = None
    turns: dict | None = None  # multi-turn agent: turns, searches, queries, result_overlap


def example_metrics(
    spec: TaskSpec, results: Any, label: Any, passages: Mapping | None = None
) -> dict[str, float]:
    """The task's eval metrics for one example's backend results."""
    out: dict[str, float] = {}
    rank = None
    if spec.family == "evidence":
        if passages is None:
            raise LookupError(f"{spec.name}: evidence metrics need the passage texts")
        k_max = max(int(m.split("@")[1]) for m in spec.eval_metrics)
        rank = rm.first_hit_rank(results, lambda i: passages[i], list(label), k_max)
    for name in spec.eval_metrics:
        if name == "execution_accuracy":
            predicted, gold = results
            out[name] = float(rm.execution_match(predicted, gold))
            continue
        kind, k = name.split("@")
        k = int(k)
        if kind == "recall":
            out[name] = rm.recall_at_k(results, list(label), k)
        elif kind == "ndcg":
            out[name] = rm.ndcg_at_k(results, rm.graded_labels(label), k)
        elif kind == "hit":
            out[name] = float(rank is not None and rank <= k)
        else:
            raise ValueError(f"{spec.name}: unknown eval metric {name!r}")
    return out


async def _gold_rows(backend, label, opts):
    """Rows of the gold SQL (the backend's cached `gold` when it has one); a failing gold query
    is bad data, not the policy's fault."""
    if not isinstance(label, str):
        return label
    if hasattr(backend, "gold"):
        return await backend.gold(label, **opts)
    try:
        return await backend.search(label, **opts)
    except QueryRejected as e:
        raise BackendError(f"gold SQL failed: {e}", retryable=False) from None


async def _run_one(spec, backend, ex, query, opts, passages, sem) -> EvalRecord:
    async with sem:
        try:
            results = await backend.search(query, **opts)
            if spec.family == "sql":
                results = (results, await _gold_rows(backend, ex.label, opts))
            metrics = example_metrics(spec, results, ex.label, passages)
        except QueryRejected as e:
            zeros = dict.fromkeys(spec.eval_metrics, 0.0)
            return EvalRecord(ex.id, "rejected", query, zeros, f"QueryRejected: {e}")
        except (BackendError, LookupError) as e:
            return EvalRecord(ex.id, "backend_error", query, {}, f"{type(e).__name__}: {e}")
    top = results[0] if spec.family == "sql" else results
    return EvalRecord(ex.id, "ok", query, metrics, None, tuple(map(str, list(top)[:10])))


async def run_queries(
    spec: TaskSpec,
    examples: Sequence[Example],
    queries: Sequence[str | None],
    backend: SearchBackend,
    *,
    search_opts: Mapping[str, Any] | None = None,
    concurrency: int = 8,
    passages: Mapping | None = None,
    errors: Sequence[str | None] | None = None,
) -> list[EvalRecord]:
    """Runs every non-None query; a None query is a format error (reason from `errors`)."""
    sem = asyncio.Semaphore(concurrency)
    base = {**spec.search_opts(), **(search_opts or {})}
    tasks, out = [], [None] * len(examples)
    for i, (ex, q) in enumerate(zip(examples, queries, strict=True)):
        if q is None:
            zeros = dict.fromkeys(spec.eval_metrics, 0.0)
            err = errors[i] if errors else "no query"
            out[i] = EvalRecord(ex.id, "format_error", None, zeros, err)
            continue
        opts = {**base, **ex.search_opts}
        tasks.append((i, _run_one(spec, backend, ex, q, opts, passages, sem)))
    bar = progress.bar(len(tasks), "eval: search", unit="query")

    async def counted(task):
        record = await task
        bar.update(1)
        return record

    await backend.open()
    try:
        done = await asyncio.gather(*(counted(t) for _, t in tasks))
    finally:
        await backend.close()
        bar.close()
    for (i, _), rec in zip(tasks, done, strict=True):
        out[i] = rec
    return out


def aggregate(spec: TaskSpec, records: Sequence[EvalRecord]) -> dict:
    """Counts and rates per status, and the metric means (see the module docstring)."""
    n = len(records)
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    scored = [r for r in records if r.status != "backend_error"]
    ok = [r for r in records if r.status == "ok"]

    def means(rs):
        return {
            m: (statistics.fmean(r.metrics[m] for r in rs) if rs else None)
            for m in spec.eval_metrics
        }

    return {
        "num_examples": n,
        "counts": counts,
        "rates": {f"{s}_rate": (counts[s] / n if n else 0.0) for s in STATUSES},
        "metrics": means(scored),
        "metrics_ok_only": means(ok),
    }


@dataclasses.dataclass
class EvalReport:
    task: str
    split: str
    method: str  # "original_query" | "policy"
    decode: dict | None
    aggregates: dict
    records: list[EvalRecord]
    settings: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "split": self.split,
            "method": self.method,
            "decode": self.decode,
            "settings": self.settings,
            "aggregates": self.aggregates,
            "records": [dataclasses.asdict(r) for r in self.records],
        }


def evaluate(
    spec: TaskSpec,
    examples: Sequence[Example],
    backend: SearchBackend,
    *,
    split: str = "test",
    method: str = "original_query",
    generate_fn: GenerateFn | None = None,
    tokenizer: Any = None,
    decode: DecodeSpec = DecodeSpec(),
    max_prompt_tokens: int = 500,
    length_policy: str = "drop",
    search_opts: Mapping[str, Any] | None = None,
    concurrency: int = 8,
    passages: Mapping | None = None,
    query_from: str = "answer",
    agent_stats: Callable[[list[str]], tuple[list[dict], dict]] | None = None,
) -> EvalReport:
    """Evaluates `method` ("original_query" or "policy" with `generate_fn` and `tokenizer`).

    `query_from` (policy): "answer" parses the task's answer format; "completion" uses the whole
    completion text as a bag-of-words query (prompt-only baselines such as HyDE, where the policy
    writes a pseudo-document); an empty completion is a format error.
    `agent_stats` (policy, multi-turn agent): the completions are transcripts
    (`agent.protocol`), the final answer is the query, and `agent_stats(transcripts)` gives each
    record's `turns` and `aggregates["agent"]` (`agent.evaluate.AgentGenerate.statistics`).
    """
    if query_from not in ("answer", "completion"):
        raise ValueError(f"query_from must be 'answer' or 'completion', got {query_from!r}")
    if agent_stats is not None and query_from != "answer":
        raise ValueError("the multi-turn agent's query is its final answer (query_from='answer')")
    settings: dict[str, Any] = {
        "backend": spec.backend,
        "index_opts": spec.index_opts(),
        "search_opts": {**spec.search_opts(), **(search_opts or {})},
    }
    completions: list[str | None] = [None] * len(examples)
    if method == "original_query":
        queries = [original_query(spec, ex.input) for ex in examples]
        if spec.backend == "bm25":
            # The input is plain text: a claim's "(IL-6)" is not Boolean syntax for our BM25.
            # Bag-of-words is also how the original's Pyserini baseline read it.
            queries = [query_syntax.bag_of_words(q) for q in queries]
        errors = None
        decode_rec = None
    elif method == "policy":
        if generate_fn is None or tokenizer is None:
            raise ValueError("method='policy' needs generate_fn and tokenizer")
        prompts, stats = prepare_prompts(
            spec, examples, tokenizer, max_prompt_tokens, length_policy
        )
        settings["prompts"] = {**dataclasses.asdict(stats), "max_prompt_tokens": max_prompt_tokens,
                               "length_policy": length_policy}  # fmt: skip
        examples = [p.example for p in prompts]
        completions = list(generate_fn([p.text for p in prompts]))
        if len(completions) != len(prompts):
            raise ValueError(f"generate_fn returned {len(completions)} for {len(prompts)} prompts")
        if agent_stats is not None:  # transcripts: searches, information blocks, the answer
            from deepretrieval_jax.agent.protocol import parse_transcript

            transcripts = [parse_transcript(c, spec.assistant_prefix) for c in completions]
            queries = [t.answer for t in transcripts]
            errors = [t.error for t in transcripts]
        elif query_from == "completion":
            queries = [query_syntax.bag_of_words(c).strip() or None for c in completions]
            errors = [None if q else "empty completion" for q in queries]
        else:
            parsed = [
                parse_completion(
                    c, spec.assistant_prefix, reasoning=spec.reasoning, key=spec.answer_key
                )
                for c in completions
            ]
            queries = [p.value if p.ok else None for p in parsed]
            errors = [p.error for p in parsed]
        settings["query_from"] = query_from
        decode_rec = dataclasses.asdict(decode)
    else:
        raise ValueError(f"method must be 'original_query' or 'policy', got {method!r}")
    records = asyncio.run(
        run_queries(
            spec, examples, queries, backend, search_opts=search_opts,
            concurrency=concurrency, passages=passages, errors=errors,
        )
    )  # fmt: skip
    if method == "policy":
        records = [
            dataclasses.replace(r, completion=c) for r, c in zip(records, completions, strict=True)
        ]
    aggregates = aggregate(spec, records)
    if method == "policy" and agent_stats is not None:
        rows, aggregates["agent"] = agent_stats(completions)
        records = [dataclasses.replace(r, turns=t) for r, t in zip(records, rows, strict=True)]
    return EvalReport(spec.name, split, method, decode_rec, aggregates, records, settings)


# --- Policy decoding ----------------------------------------------------------------------------


def left_pad(codec, texts: Sequence[str]):
    """(tokens, mask) int32 numpy: the encoded texts left-padded with `codec.pad_id`."""
    import numpy as np

    rows = [codec.encode(t) for t in texts]
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), int(codec.pad_id), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        tokens[b, width - len(r) :], mask[b, width - len(r) :] = r, 1
    return tokens, mask


def policy_generate_fn(
    model_config,
    params,
    tokenizer,
    decode: DecodeSpec,
    *,
    batch_size: int = 16,
    prompt_buckets: Sequence[int] = (128, 256, 512),
    mesh=None,
    stop: Sequence[str] = (),
    spec: TaskSpec | None = None,
) -> GenerateFn:
    """A `GenerateFn` decoding with the project's jitted sampler (greedy when temperature 0).

    `stop`: stop strings (as in training); with `spec`, a completion that ended on one is
    closed by `data.tasks.finish_completion` (the task's `answer_suffix`).

    `tokenizer`: the policy's `Tokenizer` (text <-> model ids). Batches of `batch_size` prompts
    are left-padded (the sampler rounds up to a bucket); batch i draws its
    key from `jax.random.fold_in(key(decode.seed), i)`, so a run is reproducible from the
    recorded seed. The end-of-sequence token that finished a row is not part of its text.
    """
    import jax
    import numpy as np

    from deepretrieval_jax import sampler as sampler_lib
    from deepretrieval_jax.data.tasks import finish_completion
    from deepretrieval_jax.sampling import token_bytes_from_tokenizer

    greedy = decode.temperature == 0
    eos = tuple(int(i) for i in tokenizer.eos_ids)
    stop = tuple(stop)
    token_bytes = None
    if stop:
        token_bytes = token_bytes_from_tokenizer(tokenizer, model_config.vocab_size)
    config = sampler_lib.SamplingConfig(
        method="greedy" if greedy else "sample",
        temperature=1.0 if greedy else decode.temperature,
        top_k=decode.top_k,
        top_p=decode.top_p,
        max_new_tokens=decode.max_new_tokens,
        eos_ids=eos,
        pad_id=int(tokenizer.pad_id),
        stop=stop,
    )
    sampler = sampler_lib.Sampler(
        sampler_lib.causal_lm_fns(model_config), config, mesh=mesh,
        prompt_buckets=prompt_buckets, token_bytes=token_bytes,
    )  # fmt: skip
    key = jax.random.key(decode.seed)

    def generate(prompts: list[str]) -> list[str]:
        out: list[str] = []
        bar = progress.bar(len(prompts), "eval: generate", unit="prompt")
        for i in range(0, len(prompts), batch_size):
            tokens, mask = left_pad(tokenizer, prompts[i : i + batch_size])
            res = sampler(params, tokens, mask, jax.random.fold_in(key, i // batch_size))
            rows, lengths = np.asarray(res.tokens_BnxL), np.asarray(res.lengths_Bn)
            reasons = np.asarray(res.finish_reason_Bn)
            for row, n, reason in zip(rows, lengths, reasons, strict=True):
                ids = row[:n]
                if n and int(ids[-1]) in eos:
                    ids = ids[:-1]
                text = tokenizer.decode(ids)
                if spec is not None:
                    stopped = int(reason) == sampler_lib.FinishReason.STOP_STRING
                    text = finish_completion(spec, text, stopped, stop)
                out.append(text)
            bar.update(len(tokens))
        bar.close()
        return out

    return generate


# --- Config-driven run (launch/eval.py) ---------------------------------------------------------


def policy_params(cfg):
    """(model config, tokenizer, params, mesh) of the policy in config.eval.checkpoint_dir (a
    training run's CheckpointManager dir) or else model.hf_path / model.init_checkpoint
    (`rl.policy_init`); a LoRA run's adapters come merged onto its base (a plain model)."""
    import jax

    from deepretrieval_jax import checkpoint, models, sharding
    from deepretrieval_jax.rl import policy_init, run_tokenizer

    model_cfg = policy_init.model_config(cfg)
    tokenizer = run_tokenizer.load_tokenizer(cfg, model_cfg)
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.SAMPLER_RULES
    module = models.CausalLM(model_cfg)
    step = None if cfg.eval.step < 0 else cfg.eval.step
    if cfg.eval.checkpoint_dir and model_cfg.lora_rank:  # a LoRA run: its adapters on its base
        from deepretrieval_jax import lora_export
        from deepretrieval_jax.models import lora

        k_actor = policy_init.init_keys(cfg.seed)[0]  # the run's base when it was random
        base = policy_init.load_policy_params(cfg, module, mesh, rules, k_actor)
        params = lora_export.merged_policy_params(
            cfg.eval.checkpoint_dir, model_cfg, base, step=step,
            key=cfg.eval.checkpoint_key or "actor_params", mesh=mesh,
        )  # fmt: skip
        model_cfg = lora.base_config(model_cfg)  # merged: a plain model
    elif cfg.eval.checkpoint_dir:
        params = checkpoint.restore_policy_params(
            cfg.eval.checkpoint_dir,
            model_cfg,
            step=step,
            key=cfg.eval.checkpoint_key or None,
            mesh=mesh,
            rules=rules,
        )
    else:
        params = policy_init.load_policy_params(cfg, module, mesh, rules, jax.random.key(cfg.seed))
    return model_cfg, tokenizer, params, mesh


def _policy(cfg, decode: DecodeSpec):
    """(generate_fn, tokenizer) of the single-turn policy (`policy_params`)."""
    from deepretrieval_jax.data import task_data

    model_cfg, tokenizer, params, mesh = policy_params(cfg)
    generate = policy_generate_fn(
        model_cfg, params, tokenizer, decode, batch_size=cfg.eval.batch_size,
        prompt_buckets=tuple(cfg.data.prompt_buckets), mesh=mesh,
        stop=tuple(cfg.sampling.stop), spec=task_data.task_spec(cfg),
    )  # fmt: skip
    return generate, tokenizer


def run(cfg, workdir: str | os.PathLike) -> EvalReport:
    """Evaluates `config.eval.method` on `config.eval.split` of `config.data.task`; writes the
    JSON, markdown and PNG report under `workdir/eval/` and returns it."""
    from absl import logging

    from deepretrieval_jax import eval_report
    from deepretrieval_jax.agent import harness
    from deepretrieval_jax.agent.evaluate import agent_policy
    from deepretrieval_jax.config import resolve_data_dir
    from deepretrieval_jax.data import backends, task_data

    e = cfg.eval
    spec = task_data.task_spec(cfg)
    data_dir = resolve_data_dir(cfg.data.data_dir)
    examples = list(task_data.load_examples(cfg, spec, e.split))
    if e.num_examples > 0:
        examples = examples[: e.num_examples]
    index_overrides, search_opts = backends.split_search_opts(spec, cfg.reward.search_opts)
    backend = backends.task_backend(spec, data_dir, index_overrides)
    decode = DecodeSpec(e.temperature, e.top_p, e.top_k, e.seed, cfg.sampling.max_new_tokens)
    kwargs: dict[str, Any] = {}
    if spec.family == "evidence":  # answer matching reads the passages' texts
        kwargs["passages"] = backends.task_passages(spec, data_dir)
    agent = harness.agent_config(cfg) if e.method == "policy" else None
    if agent is not None:  # multi-turn: the final answer is the query, plus turn statistics
        if agent.reward_task != "agent_ndcg":
            raise ValueError(
                f"config.agent.reward_task={agent.reward_task!r}: the eval CLI scores the "
                "agent's final answer as a query (BEIR tasks, agent_ndcg); QA answers are "
                "graded by the reward (agent_qa), not here"
            )
        kwargs["generate_fn"], kwargs["tokenizer"], kwargs["agent_stats"] = agent_policy(
            cfg, decode, agent, spec, backend, search_opts, data_dir
        )
    elif e.method == "policy":
        kwargs["generate_fn"], kwargs["tokenizer"] = _policy(cfg, decode)
    logging.info(
        "Evaluating %s on %s/%s (%d examples)", e.method, spec.name, e.split, len(examples)
    )
    report = evaluate(
        spec, examples, backend, split=e.split, method=e.method, decode=decode,
        max_prompt_tokens=cfg.data.max_prompt_len, length_policy=e.length_policy,
        search_opts=search_opts, concurrency=e.concurrency,
        query_from=e.get("query_from", "answer"), **kwargs,
    )  # fmt: skip
    if agent is not None:
        report.settings["agent"] = dataclasses.asdict(agent)
    if index_overrides:
        report.settings["index_opts"] = {**spec.index_opts(), **index_overrides}
    mirror = workdir_lib.Mirror(workdir)  # reports are local files, copied to a gs:// workdir
    out_dir = mirror.local / "eval"
    paths = eval_report.write_report(report, out_dir)
    if spec.family == "sql" and e.get("compare_baseline", False):
        logging.info(
            "%s: SQL has no 'original query' baseline; compare_baseline skipped", spec.name
        )
    elif e.method == "policy" and e.get("compare_baseline", False):
        if spec.backend in ("pubmed", "ctgov"):
            # An HTTP client's rate limiter belongs to the event loop it first ran on, and each
            # evaluate() runs its own loop: the baseline gets a client of its own.
            backend = backends.task_backend(spec, data_dir, index_overrides)
        baseline = evaluate(
            spec, examples, backend, split=e.split, search_opts=search_opts,
            concurrency=e.concurrency, passages=kwargs.get("passages"),
        )  # fmt: skip
        eval_report.write_report(baseline, out_dir)
        scatter = out_dir / f"{spec.name}_{e.split}_policy_vs_original_query.png"
        eval_report.plot_comparison(report, baseline, scatter)
        logging.info("Baseline:\n%s", eval_report.markdown_table(baseline))
    mirror.close()
    shown = mirror.remote / "eval" / paths["json"].name
    logging.info("Report: %s\n%s", shown, eval_report.markdown_table(report))
    return report
