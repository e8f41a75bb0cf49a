"""Training metrics: a JSONL log, TensorBoard event files, a console progress bar and a PNG.

One `MetricsWriter` per run. Only the writing process (JAX process 0 by default) touches the
filesystem; on every other process each method is a no-op, so callers need no `if` around it.

Files under `workdir`:
    metrics.jsonl     one JSON object per `write` call: {"step": int, "time": float, **scalars};
                      non-finite scalars are stored as null (JSON has no NaN)
    tb/               TensorBoard event files (tensorboardX, no TensorFlow needed)
    reward_curve.png  reward vs step, rewritten by `close()` and by the CLI:
                          python -m deepretrieval_jax.metrics plot --workdir W

A run resumed from step s opens the writer with `start_step=s`: records of steps > s (written
after the checkpoint the run resumes from) are dropped, so the log reads like one straight run.
A remote workdir (gs://...) gets these files through `workdir.Mirror`: written locally, copied
every `SYNC_S` seconds and at `close()`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

JSONL_NAME = "metrics.jsonl"
SAMPLES_NAME = "samples.jsonl"
SYNC_S = 30.0  # a remote workdir gets the staged files at most this often (and at close)
PLOT_NAME = "reward_curve.png"
# Keys the progress bar shows when present, in this order.
PROGRESS_KEYS = ("reward/mean", "val/reward/mean", "kl/mean", "sft/loss", "time/step_s")
# Keys the reward plot draws when present (train reward, validation reward, per-task means).
PLOT_KEYS = ("reward/mean", "val/reward/mean")
# TensorBoard keeps only [-/\w.] in a tag and maps everything else to "_", so "ndcg=0" and
# "ndcg>0" would share one chart; these characters get names instead, others their code point.
_TAG_NAMES = {"=": "_eq_", ">": "_gt_", "<": "_lt_", "!": "_not_", "@": "_at_", "%": "_pct_",
              "+": "_plus_", " ": "_", "*": "_x_", ":": "_"}  # fmt: skip
_TAG_SAFE = re.compile(r"[-/\w.]")


def tensorboard_tag(key: str) -> str:
    """A metric key as a TensorBoard tag that no other key maps to ("ndcg>0" -> "ndcg_gt_0")."""
    return "".join(
        c if _TAG_SAFE.fullmatch(c) else _TAG_NAMES.get(c, f"_u{ord(c):04x}_") for c in key
    )


def _process_index() -> int:
    import jax  # Lazy: the plotting CLI must not pay for JAX start-up.

    return jax.process_index()


def _scalar(value) -> float | None:
    """A JSON-safe float: arrays of size one and numpy scalars become float, NaN/inf -> None."""
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Writes scalar metrics to JSONL + TensorBoard and drives a tqdm bar (process 0 only).

    Args:
      workdir: run directory (created if missing).
      total_steps: length of the progress bar (None: open-ended).
      start_step: the step the run starts (or resumes) from; later records already in the
        JSONL are dropped.
      enabled: write anything at all; default: `jax.process_index() == 0`.
      tensorboard: also write TensorBoard event files.
      progress: show a progress bar on the console (`progress.bar`: tqdm on a terminal).
      desc: the bar's label.
      wandb: `config.logging.wandb`; when its `enabled` is true, records also go to a Weights &
        Biases run (`wandb_logger.WandbLogger`).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        total_steps: int | None = None,
        start_step: int = 0,
        enabled: bool | None = None,
        tensorboard: bool = True,
        progress: bool = True,
        desc: str = "train",
        wandb: Mapping | None = None,
    ):
        self.enabled = (_process_index() == 0) if enabled is None else bool(enabled)
        self.workdir = Path(workdir)  # where files are written: the staging dir of a gs:// one
        self._jsonl = None
        self._tb = None
        self._bar = None
        self._wandb = None
        self._mirror = None
        if not self.enabled:
            return
        from deepretrieval_jax import workdir as workdir_lib

        self._mirror = workdir_lib.Mirror(workdir)
        self._mirror.pull([JSONL_NAME, SAMPLES_NAME, "tb", "wandb_run_id", "config.json"])
        self._last_push = time.monotonic()
        self.workdir = self._mirror.local
        path = self.workdir / JSONL_NAME
        if path.exists():
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= start_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            # The suffix keeps a resumed run's event file apart from the first one's even when
            # both start within the same second (tensorboardX names files by time and host).
            self._tb = SummaryWriter(
                logdir=str(self.workdir / "tb"),
                purge_step=start_step + 1,
                filename_suffix=f".from{start_step}",
            )
        if progress:  # a tqdm bar on a terminal, occasional plain lines in a log file
            from deepretrieval_jax import progress as progress_lib

            self._bar = progress_lib.bar(total_steps, desc, unit="step", initial=start_step)
        if wandb is not None and wandb.get("enabled", False):
            from deepretrieval_jax.wandb_logger import WandbLogger

            self._wandb = WandbLogger(self.workdir, wandb)

    def write(self, step: int, scalars: Mapping[str, float], advance: bool = True) -> None:
        """Logs one record; `advance` moves the progress bar to `step`."""
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: _scalar(v) for k, v in sorted(scalars.items())})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and value is not None:
                    self._tb.add_scalar(tensorboard_tag(key), value, int(step))
        if self._wandb is not None:
            self._wandb.log(step, {k: v for k, v in record.items() if k not in ("step", "time")})
        if self._bar is not None and advance:
            self._bar.update(max(0, int(step) - self._bar.n))
            shown = {k: f"{record[k]:.4g}" for k in PROGRESS_KEYS if record.get(k) is not None}
            self._bar.set_postfix(shown, refresh=True)
        if time.monotonic() - self._last_push >= SYNC_S:  # a gs:// workdir: copy the files
            if self._tb is not None:
                self._tb.flush()
            self._mirror.push()
            self._last_push = time.monotonic()

    def write_texts(self, step: int, name: str, texts: Sequence[str]) -> None:
        """Logs sample completions (TensorBoard text and a `samples.jsonl` line)."""
        if not self.enabled:
            return
        with open(self.workdir / SAMPLES_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), "name": name, "texts": list(texts)}) + "\n")
        if self._tb is not None:
            self._tb.add_text(tensorboard_tag(name), "\n\n---\n\n".join(texts), int(step))
        if self._wandb is not None:
            self._wandb.log_texts(step, name, texts)

    def log(self, message: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def plot(self) -> Path | None:
        """Writes `reward_curve.png` from the JSONL; returns its path (None if nothing to plot)."""
        if not self.enabled:
            return None
        if self._jsonl is not None:
            self._jsonl.flush()
        return plot_rewards(self.workdir)

    def close(self) -> None:
        """Flushes everything and writes the reward plot."""
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        plot_rewards(self.workdir)
        self._mirror.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics JSONL (a local path or a gs:// URL); a torn last line (killed
    writer) is skipped."""
    from etils import epath

    records = []
    with epath.Path(path).open("r", encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def series(records: Iterable[Mapping], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one key, the last record winning when a step repeats."""
    by_step = {}
    for r in records:
        if r.get(key) is not None:
            by_step[int(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_rewards(workdir: str | os.PathLike, keys: Sequence[str] | None = None) -> Path | None:
    """Draws reward curves (train, validation, per-task) from `workdir/metrics.jsonl`."""
    workdir = Path(workdir)
    path = workdir / JSONL_NAME
    if not path.exists():
        return None
    records = read_jsonl(path)
    if keys is None:
        names = sorted({k for r in records for k in r})
        per_task = [k for k in names if k.startswith("reward/task/") and k.endswith("/mean")]
        per_task = per_task if len(per_task) > 1 else []  # one task: the same as reward/mean
        keys = [k for k in PLOT_KEYS if k in names] + per_task
    curves = [(k, *series(records, k)) for k in keys]
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, steps, values in curves:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=key)
    ax.set_xlabel("PPO step")
    ax.set_ylabel("reward")
    ax.set_title(f"Reward: {workdir.name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = workdir / PLOT_NAME
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deepretrieval_jax.metrics")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plot", help="write WORKDIR/reward_curve.png from WORKDIR/metrics.jsonl")
    p.add_argument("--workdir", required=True)
    p.add_argument("--keys", nargs="*", default=None, help="metric keys to draw")
    args = parser.parse_args(argv)
    out = plot_rewards(args.workdir, args.keys)
    if out is None:
        raise SystemExit(f"No reward metrics to plot in {Path(args.workdir) / JSONL_NAME}")
    print(out)


if __name__ == "__main__":
    main()
