"""The prompt protocol a policy was trained with, so that serving prompts it as training did.

A policy answers well only when it is prompted as in training: the task's prompt pieces with the
run's `config.data.prompt` overrides (system, instruction, output_format, note, input_header,
assistant_prefix, answer_suffix) and the run's stop strings (`config.sampling.stop`, after which
the harness closes the answer with `answer_suffix`). The main job, for one, trains
`scifact_no_reason` with a short prompt, a prefilled `<answer>{"query": "` and the stop string
`"}`; the task's default prompt gives a format error on every answer.

`find(policy_path)` reads the protocol from
- `POLICY/deepretrieval_protocol.json`, which the HF export writes next to the weights
  (`export.export_run`, the main job's `WORKDIR/hf`), else
- the run's `config.json` (written at start by every entry point) when the policy is a run's
  workdir or a directory inside it (`WORKDIR/hf`, `WORKDIR/checkpoints`).
`resolve(task, protocol)` gives the `TaskSpec` and stop strings to serve a task with. No JAX.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

from absl import logging

from deepretrieval_jax import workdir
from deepretrieval_jax.data.tasks import TaskSpec, get_task

PROTOCOL_FILE = "deepretrieval_protocol.json"
RUN_CONFIG_FILE = workdir.RUN_CONFIG_FILE


@dataclasses.dataclass(frozen=True)
class Protocol:
    task: str  # config.data.task
    prompt: dict  # the config.data.prompt pieces the run set (None = the task's own)
    corpus: str  # config.data.corpus ("" = the task's)
    stop: tuple[str, ...]  # config.sampling.stop
    source: str  # the file it was read from

    @classmethod
    def from_run_config(cls, config: Mapping, source: str) -> Protocol:
        """From a resolved experiment config (the "config" of WORKDIR/config.json)."""
        data = config.get("data", {})
        if not data.get("task"):
            raise ValueError(f"{source}: no data.task in the run config")
        prompt = {k: v for k, v in (data.get("prompt") or {}).items() if v is not None}
        stop = tuple(config.get("sampling", {}).get("stop", ()) or ())
        return cls(data["task"], prompt, data.get("corpus", "") or "", stop, source)

    def to_json(self) -> dict:
        return {"task": self.task, "prompt": self.prompt, "corpus": self.corpus,
                "stop": list(self.stop)}  # fmt: skip

    def spec(self) -> TaskSpec:
        overrides = dict(self.prompt)
        if self.corpus:
            overrides["corpus"] = self.corpus
        try:
            return get_task(self.task, **overrides)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{self.source}: {e}") from None


def write(out_dir: str | os.PathLike, config: Mapping) -> Path:
    """Writes OUT_DIR/deepretrieval_protocol.json from a resolved experiment config."""
    protocol = Protocol.from_run_config(config, "the run config")
    path = Path(out_dir) / PROTOCOL_FILE
    path.write_text(json.dumps(protocol.to_json(), indent=2) + "\n")
    return path


def find(policy_path: str | os.PathLike) -> Protocol | None:
    """The protocol of the policy at `policy_path` (see the module docstring), or None."""
    path = Path(policy_path).expanduser()
    if (path / PROTOCOL_FILE).is_file():
        source = str(path / PROTOCOL_FILE)
        try:
            saved = json.loads((path / PROTOCOL_FILE).read_text())
            return Protocol(saved["task"], dict(saved.get("prompt") or {}),
                            saved.get("corpus", ""), tuple(saved.get("stop", ())), source)  # fmt: skip
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{source}: not a prompt protocol ({type(e).__name__}: {e})") from None
    for run_dir in (path, path.parent):
        record = workdir.read_run_record(run_dir / RUN_CONFIG_FILE)
        config = record["config"] if record else None
        if config is not None and config.get("data", {}).get("task"):
            return Protocol.from_run_config(config, str(run_dir / RUN_CONFIG_FILE))
    return None


def resolve(task: str | None, protocol: Protocol | None) -> tuple[TaskSpec, tuple[str, ...]]:
    """(TaskSpec, stop strings) to serve `task` with (None: the protocol's task).

    The trained protocol applies to the task it was trained on; another task gets its own
    default prompt and no stop strings (with a warning: the policy never saw that prompt).
    """
    if task is None:
        if protocol is None:
            raise ValueError(
                "no task given and the policy has no prompt protocol "
                f"({PROTOCOL_FILE} or its run's {RUN_CONFIG_FILE}); give the task"
            )
        return protocol.spec(), protocol.stop
    if protocol is not None and task == protocol.task:
        return protocol.spec(), protocol.stop
    if protocol is not None:
        logging.warning(
            "the policy was trained on task %s (%s); task %s is served with its default prompt",
            protocol.task, protocol.source, task,
        )  # fmt: skip
    return get_task(task), ()
