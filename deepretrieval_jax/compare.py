"""Run comparison: a table of final/best metrics (markdown + CSV) and overlaid curves (PNG).

Reads each run's `metrics.jsonl` (the `metrics.MetricsWriter` format: one JSON object per line,
`{"step": int, "time": float, "<key>": float | null, ...}`; validation records carry `val/*`
keys) and, when present, the `sweep_point.json` that `launch/sweep.py` writes (point name and
swept values, shown as columns). A path given is either a run workdir (holds metrics.jsonl) or a
sweep root (its sub-directories holding metrics.jsonl are the runs).

Table columns per run: the swept overrides, the last step, the selection metric (default
`val/reward/mean`) at the end and at its best (and that step), every other `val/retrieval/*`
metric at the end, the train reward (last value and mean of the last 10 steps), the KL to the
reference at the end, and the median step time. Rows are sorted best first.

Paths go through `etils.epath` (`workdir.as_path`), like the trainer's workdirs: runs and the
output directory may be gs:// URLs (tested with an in-memory fsspec filesystem standing in for
GCS, tests/test_workdir.py).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import statistics
from collections.abc import Sequence

from etils import epath

from deepretrieval_jax import metrics
from deepretrieval_jax.workdir import as_path

DEFAULT_METRIC = "val/reward/mean"
CURVE_KEYS = ("val/reward/mean", "reward/mean", "kl/mean")
TABLE_NAME, CSV_NAME, PLOT_NAME = "comparison.md", "comparison.csv", "comparison.png"
LAST_N = 10  # train reward: mean over this many last logged steps (less noisy than one step)


def find_runs(paths: Sequence[str | os.PathLike]) -> list[epath.Path]:
    """Run workdirs named by `paths` (a workdir itself, or a sweep root's sub-directories)."""
    runs: list[epath.Path] = []
    for path in map(as_path, paths):
        if (path / metrics.JSONL_NAME).is_file():
            runs.append(path)
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such run directory")
        found = sorted(p for p in path.iterdir() if (p / metrics.JSONL_NAME).is_file())
        if not found:
            raise FileNotFoundError(
                f"{path}: neither a run ({metrics.JSONL_NAME} inside) nor a sweep root "
                f"(sub-directories holding {metrics.JSONL_NAME})"
            )
        runs += found
    if not runs:
        raise ValueError("no runs to compare")
    return runs


def _point(workdir: epath.Path) -> dict:
    path = workdir / "sweep_point.json"  # sweep.POINT_FILE (not imported: keeps this light)
    if not path.is_file():
        return {"name": workdir.name, "swept": {}}
    return json.loads(path.read_text())


def _last(records, key) -> float | None:
    values = metrics.series(records, key)[1]
    return values[-1] if values else None


def summarize(
    workdir: str | os.PathLike, metric: str = DEFAULT_METRIC, higher_is_better: bool = True
) -> dict:
    """One table row (an ordered dict of column -> value; None where a run lacks the key)."""
    workdir = as_path(workdir)
    records = metrics.read_jsonl(workdir / metrics.JSONL_NAME)
    if not records:
        raise ValueError(f"{workdir / metrics.JSONL_NAME}: no metric records")
    point = _point(workdir)
    row: dict = {"run": point["name"]}
    row.update(point.get("swept", point.get("overrides", {})))
    row["steps"] = max(int(r.get("step", 0)) for r in records)
    steps, values = metrics.series(records, metric)
    row[f"{metric} final"] = values[-1] if values else None
    if values:
        pick = max if higher_is_better else min
        best = pick(range(len(values)), key=lambda i: values[i])
        row[f"{metric} best"], row["best step"] = values[best], steps[best]
    else:
        row[f"{metric} best"], row["best step"] = None, None
    keys = sorted({k for r in records for k in r if k.startswith("val/retrieval/")} - {metric})
    row.update({f"{k} final": _last(records, k) for k in keys})
    rewards = metrics.series(records, "reward/mean")[1]
    row["reward final"] = rewards[-1] if rewards else None
    row[f"reward last-{LAST_N} mean"] = statistics.fmean(rewards[-LAST_N:]) if rewards else None
    row["KL final"] = _last(records, "kl/mean")
    step_s = metrics.series(records, "time/step_s")[1]
    row["step s (median)"] = statistics.median(step_s) if step_s else None
    return row


def table(
    workdirs: Sequence[str | os.PathLike],
    metric: str = DEFAULT_METRIC,
    higher_is_better: bool = True,
) -> tuple[list[str], list[dict]]:
    """(columns, rows) for the runs, best `metric` first (runs without it last)."""
    rows = [summarize(w, metric, higher_is_better) for w in workdirs]
    if rows and all(r[f"{metric} final"] is None for r in rows):
        known = sorted(
            {k for w in workdirs for r in metrics.read_jsonl(as_path(w) / metrics.JSONL_NAME)
             for k in r} - {"step", "time"}
        )  # fmt: skip
        close = difflib.get_close_matches(metric, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
        raise ValueError(f"--metric {metric!r}: no run logged it; {hint}")
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    best = f"{metric} best"
    sign = -1 if higher_is_better else 1
    rows.sort(key=lambda r: (r[best] is None, sign * r[best] if r[best] is not None else 0))
    return columns, rows


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(columns: Sequence[str], rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_text(row.get(c)).replace("|", "\\|") or "-" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(columns: Sequence[str], rows: Sequence[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:  # full precision in the CSV
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return out.getvalue()


def plot_curves(
    workdirs: Sequence[epath.Path], out: str | os.PathLike, keys: Sequence[str] = CURVE_KEYS
) -> epath.Path | None:
    """One panel per metric key with every run overlaid; None if no run has any of the keys."""
    curves = {}
    for w in workdirs:
        records = metrics.read_jsonl(w / metrics.JSONL_NAME)
        curves[_point(w)["name"]] = {k: metrics.series(records, k) for k in keys}
    keys = [k for k in keys if any(c[k][0] for c in curves.values())]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), dpi=110, squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for name, series in curves.items():
            steps, values = series[key]
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=name)
        ax.set_title(key)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()  # matplotlib writes local files only; epath writes anywhere
    fig.savefig(buffer, format="png")
    plt.close(fig)
    out = as_path(out)
    out.write_bytes(buffer.getvalue())
    return out


def compare(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    metric: str = DEFAULT_METRIC,
    higher_is_better: bool = True,
    curve_keys: Sequence[str] = CURVE_KEYS,
) -> dict[str, epath.Path]:
    """Writes OUT/comparison.{md,csv,png}; returns their paths (no "png" without curves)."""
    runs = find_runs(paths)
    columns, rows = table(runs, metric, higher_is_better)
    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"md": out_dir / TABLE_NAME, "csv": out_dir / CSV_NAME}
    written["md"].write_text(to_markdown(columns, rows))
    written["csv"].write_text(to_csv(columns, rows))
    png = plot_curves(runs, out_dir / PLOT_NAME, curve_keys)
    if png is not None:
        written["png"] = png
    return written
