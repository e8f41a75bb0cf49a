"""Optional Weights & Biases logging (`config.logging.wandb`), off by default.

`pip install -e .[wandb]`, then `--config.logging.wandb.enabled=True` (and `project`, `entity`,
`name`, `mode`). `MetricsWriter` sends every scalar record and sample texts to the W&B run as
well, on the writing process only. Invariants:
- One W&B run per workdir: its id is kept in WORKDIR/wandb_run_id, so a resumed training run
  continues the same W&B run (`resume="allow"`), with steps after the checkpoint rewritten.
- The run's config is the resolved experiment config (WORKDIR/config.json when the launcher
  wrote it); W&B's own files go under WORKDIR/wandb/.
- `mode="offline"` writes the run locally with no network (`wandb sync` uploads it later);
  `mode="disabled"` turns every call into a no-op. Logging failures are W&B's own (its client
  retries in the background); nothing here retries.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deepretrieval_jax.workdir import RUN_CONFIG_FILE, read_run_record

RUN_ID_FILE = "wandb_run_id"
MODES = ("online", "offline", "disabled")


def _run_id(workdir: Path) -> str:
    path = workdir / RUN_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def _run_config(workdir: Path) -> dict[str, Any]:
    record = read_run_record(workdir / RUN_CONFIG_FILE) or {}
    return {**record.get("config", {}), "argv": record.get("argv", [])}


class WandbLogger:
    """A W&B run for one workdir (see the module docstring)."""

    def __init__(self, workdir: str | os.PathLike, settings: Mapping[str, Any]):
        mode = settings.get("mode", "online")
        if mode not in MODES:
            raise ValueError(f"config.logging.wandb.mode must be one of {MODES}, got {mode!r}")
        try:
            import wandb
        except ImportError:
            raise ImportError(
                "config.logging.wandb.enabled needs the wandb package: pip install -e .[wandb]"
            ) from None
        self._wandb = wandb
        workdir = Path(workdir)
        self.run = wandb.init(
            project=settings.get("project") or "deepretrieval_jax",
            entity=settings.get("entity") or None,
            name=settings.get("name") or workdir.name,
            tags=list(settings.get("tags") or ()),
            id=_run_id(workdir),
            resume="allow",
            dir=str(workdir),
            mode=mode,
            config=_run_config(workdir),
        )

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=int(step))

    def log_texts(self, step: int, name: str, texts: Sequence[str]) -> None:
        table = self._wandb.Table(columns=["text"], data=[[t] for t in texts])
        self.run.log({name: table}, step=int(step))

    def finish(self) -> None:
        self.run.finish()
