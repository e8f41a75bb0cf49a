"""Run directories, local or remote (gs://, s3://, ...), through one path type: `etils.epath`.

Checkpoints go straight to the workdir (orbax writes gs:// itself). Files that are appended to
or written by libraries that only know local files (metrics.jsonl, TensorBoard event files,
samples, plots, eval reports, HF exports) are written into a local *staging* directory and
copied to the workdir by `Mirror.push`: object stores have no append, and tensorboardX,
matplotlib and safetensors write local files. For a local workdir the staging directory is the
workdir itself and `push` does nothing.

Invariants:
- `Mirror.pull(names)` copies those files/directories from the workdir into the staging
  directory once, at start (a resumed run continues its metrics and TensorBoard files).
- `Mirror.push()` copies every staged file whose size or modification time changed since the
  last push; callers push at most every few seconds while running and always at the end. A
  crash loses at most what was written since the last push.
- The staging directory is a fresh temporary directory per `Mirror`, removed by `close()`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from etils import epath

RUN_CONFIG_FILE = "config.json"  # WORKDIR/config.json, written by runtime.write_run_config


def read_run_record(path: str | os.PathLike) -> dict | None:
    """The run record at `path` (a WORKDIR/config.json: {"entry", "argv", "time", "config"};
    what tells it apart is the "config" mapping), or None when there is no file or it is
    another kind of config.json (a Hugging Face model's). Invalid JSON is a ValueError naming the file. Local paths and URLs (gs://...)."""
    path = as_path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(record, dict) and isinstance(record.get("config"), dict):
        return record
    return None


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """Local paths with `~` expanded and made absolute; URLs (gs://...) as they are."""
    if is_remote(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.expanduser(os.fspath(path))).absolute()


def copy_tree(src: epath.Path, dst: epath.Path, names: Iterable[str] | None = None) -> int:
    """Copies files under `src` (or only `names` in it) to `dst`; returns the files copied."""
    copied = 0
    for name in names if names is not None else [p.name for p in src.iterdir()]:
        s, d = src / name, dst / name
        if s.is_dir():
            d.mkdir(parents=True, exist_ok=True)
            copied += copy_tree(s, d)
        elif s.exists():
            d.parent.mkdir(parents=True, exist_ok=True)
            d.write_bytes(s.read_bytes())
            copied += 1
    return copied


class Mirror:
    """A local directory that stands for `workdir` (see the module docstring)."""

    def __init__(self, workdir: str | os.PathLike):
        self.remote = as_path(workdir)
        self._tmp = None
        if is_remote(workdir):
            self._tmp = tempfile.mkdtemp(prefix="deepretrieval_stage_")
            self.local = Path(self._tmp)
        else:
            self.local = Path(self.remote)
        self.local.mkdir(parents=True, exist_ok=True)
        self._pushed: dict[Path, tuple[int, int]] = {}

    @property
    def staged(self) -> bool:
        return self._tmp is not None

    def pull(self, names: Iterable[str]) -> None:
        """Copies `names` (files or directories) from the workdir, where they exist."""
        if self.staged and self.remote.exists():
            copy_tree(self.remote, epath.Path(self.local), names)
            self._pushed = {p: self._stamp(p) for p in self._files()}

    def push(self) -> int:
        """Copies changed staged files to the workdir; returns how many."""
        if not self.staged:
            return 0
        count = 0
        for p in self._files():
            stamp = self._stamp(p)
            if self._pushed.get(p) != stamp:
                target = self.remote / str(p.relative_to(self.local))
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(p.read_bytes())
                self._pushed[p] = stamp
                count += 1
        return count

    def close(self) -> None:
        """Pushes, then removes the staging directory."""
        self.push()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _files(self) -> list[Path]:
        return sorted(p for p in self.local.rglob("*") if p.is_file())

    @staticmethod
    def _stamp(p: Path) -> tuple[int, int]:
        st = p.stat()
        return st.st_size, st.st_mtime_ns
