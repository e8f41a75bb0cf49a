"""Evaluation of a policy or of the "original query" baseline on one task split.

Flow: queries (the input itself for the baseline; parsed from the policy's completions
otherwise) -> the task's search backend (asyncio, bounded concurrency) -> per-example metrics
(from `rewards.retrieval_metrics`) -> aggregates -> JSON + markdown + PNG.

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
import json
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

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


async def _run_one(spec, backend, ex, query, opts, passages, sem) -> EvalRecord:
    async with sem:
        try:
            results = await backend.search(query, **opts)
            if spec.family == "sql":
                gold = (
                    await backend.search(ex.label, **opts)
                    if isinstance(ex.label, str)
                    else ex.label
                )
                results = (results, gold)
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
    await backend.open()
    try:
        done = await asyncio.gather(*(t for _, t in tasks))
    finally:
        await backend.close()
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
) -> EvalReport:
    """Evaluates `method` ("original_query" or "policy" with `generate_fn` and `tokenizer`)."""
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
        parsed = [
            parse_completion(
                c, spec.assistant_prefix, reasoning=spec.reasoning, key=spec.answer_key
            )
            for c in completions
        ]
        queries = [p.value if p.ok else None for p in parsed]
        errors = [p.error for p in parsed]
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
    return EvalReport(
        spec.name, split, method, decode_rec, aggregate(spec, records), records, settings
    )


def markdown_table(report: EvalReport) -> str:
    agg = report.aggregates
    names = list(agg["metrics"])
    head = (
        "| task | split | method | n | "
        + " | ".join(names)
        + " | format err | rejected | backend err |"
    )
    sep = "|" + "---|" * (7 + len(names))
    vals = [f"{agg['metrics'][m]:.4f}" if agg["metrics"][m] is not None else "-" for m in names]
    r = agg["rates"]
    row = (
        f"| {report.task} | {report.split} | {report.method} | {agg['num_examples']} | "
        + " | ".join(vals)
        + f" | {r['format_error_rate']:.3f} | {r['rejected_rate']:.3f} | {r['backend_error_rate']:.3f} |"
    )
    return "\n".join([head, sep, row]) + "\n"


def plot_histograms(report: EvalReport, path: str | os.PathLike) -> None:
    """Per-query histogram of each metric (PNG, matplotlib Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.aggregates["metrics"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, m in zip(axes[0], names, strict=True):
        vals = [r.metrics[m] for r in report.records if r.status != "backend_error"]
        ax.hist(vals, bins=20, range=(0, 1), color="tab:blue")
        mean = report.aggregates["metrics"][m]
        ax.set_title(f"{m} (mean {mean:.3f})" if mean is not None else m)
        ax.set_xlabel(m)
        ax.set_ylabel("queries")
    fig.suptitle(f"{report.task} / {report.split} / {report.method}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: EvalReport, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes `<task>_<split>_<method>.{json,md,png}` under out_dir; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{report.task}_{report.split}_{report.method}"
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False))
    paths["md"].write_text(markdown_table(report))
    plot_histograms(report, paths["png"])
    return paths
