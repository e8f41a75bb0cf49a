"""Evaluation reports: JSON with per-example records and aggregates, a markdown table, and PNG
plots (per-query metric histograms; policy-vs-baseline scatter) drawn with matplotlib's Agg
backend, so no display is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from deepretrieval_jax.eval import EvalReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    lines = [head, sep, row]
    if "agent" in agg:  # the multi-turn agent's per-turn statistics
        from deepretrieval_jax.agent.evaluate import summary_line

        lines += ["", summary_line(agg["agent"])]
    return "\n".join(lines) + "\n"


def plot_histograms(report: EvalReport, path: str | os.PathLike) -> None:
    """Per-query histogram of each metric (PNG, matplotlib Agg backend)."""
    plt = _pyplot()
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


def plot_comparison(
    policy: EvalReport, baseline: EvalReport, path: str | os.PathLike, metric: str | None = None
) -> None:
    """Per-query scatter of `metric` (default: the task's first), policy against baseline.

    Only examples scored in both reports are drawn; points above the diagonal are queries the
    policy improved.
    """
    metric = metric or next(iter(policy.aggregates["metrics"]))
    base = {r.id: r.metrics[metric] for r in baseline.records if r.status != "backend_error"}
    pairs = [
        (base[r.id], r.metrics[metric])
        for r in policy.records
        if r.status != "backend_error" and r.id in base
    ]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    if pairs:
        xs, ys = zip(*pairs, strict=True)
        ax.scatter(xs, ys, s=10, alpha=0.6)
    ax.plot([0, 1], [0, 1], color="gray", lw=1)
    better = sum(y > x for x, y in pairs)
    worse = sum(y < x for x, y in pairs)
    ax.set_title(f"{policy.task}/{policy.split} {metric}: {better} better, {worse} worse")
    ax.set_xlabel(f"{baseline.method} {metric}")
    ax.set_ylabel(f"{policy.method} {metric}")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
