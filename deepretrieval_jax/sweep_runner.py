"""Runs a validated sweep locally, or writes its launch scripts for a TPU pod slice or SLURM.

`execute` is what launch/sweep.py calls: load the sweep, validate every point (`sweep.plan`),
write the layout, then run or write commands.

Invariants:
- Layout: ROOT/<point name>/ holds `config.json` (the fully resolved config), `sweep_point.json`
  (name, overrides, swept values, command, total steps) and, for local runs, `train.log`
  (appended across resumes); ROOT/sweep.json lists every point with its status at launch time.
- Finished points are skipped (local) or left out of the printed/written commands; the others
  are (re-)launched with the same workdir, so the trainer resumes from its latest checkpoint.
- Local runs: at most `parallel` processes at once, each in a slot with its own
  `gpus_per_run` GPUs (CUDA_VISIBLE_DEVICES) and `cpus_per_run` cores (taskset); a failed point
  does not stop the others (exit code 1 at the end). Ctrl-C sends SIGTERM to the running points
  (the trainer checkpoints and stops), waits for them and re-raises.
- Commands run from the repository root; config and script paths inside it are written
  relative to it (cluster scripts `cd` there first), others absolute.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from deepretrieval_jax.sweep import (
    REPO_ROOT,
    Run,
    SweepError,
    finished_step,
    format_value,
    load_sweep,
    override_flags,
    plan,
    status,
)

POINT_FILE, CONFIG_FILE, LOG_FILE, SWEEP_FILE = (
    "sweep_point.json",
    "config.json",
    "train.log",
    "sweep.json",
)
MODES = ("local", "print", "tpu", "slurm")


def command(
    run: Run,
    config_spec: str,
    extra: Sequence[str] = (),
    script: str = "launch/train.py",
    python: str = "python",
) -> list[str]:
    """The training command of one run (paths as given; run it from the repository root)."""
    return [
        python,
        script,
        f"--config={config_spec}",
        f"--workdir={run.workdir}",
        *override_flags(run.point, extra),
    ]


def write_layout(runs: Sequence[Run], root: str | os.PathLike, log=print) -> None:
    """Writes each point's config.json and sweep_point.json, and ROOT/sweep.json.

    A point that already has checkpoints but whose resolved config changed since the last
    launch gets a warning (it resumes under the new config).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    summary = []
    for run in runs:
        run.workdir.mkdir(parents=True, exist_ok=True)
        config_path, text = run.workdir / CONFIG_FILE, run.config.to_json_best_effort(indent=2)
        if config_path.exists() and config_path.read_text() != text + "\n" and status(run) != "new":
            log(f"[{run.name}] WARNING: its config differs from {config_path} of its checkpoints")
        config_path.write_text(text + "\n")
        info = {
            "name": run.name,
            "overrides": {k: format_value(v) for k, v in run.point.overrides},
            "swept": {k: v for k, v in run.point.labels if k},  # what varies across points
            "command": shlex.join(run.command),
            "total_steps": run.total_steps,
        }
        (run.workdir / POINT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        summary.append({**info, "workdir": str(run.workdir), "status": status(run)})
    (root / SWEEP_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def slot_env(slot: int, gpus_per_run: int = 0) -> dict[str, str]:
    """Environment of a local slot: its own GPUs when `gpus_per_run` > 0."""
    if gpus_per_run <= 0:
        return {}
    ids = range(slot * gpus_per_run, (slot + 1) * gpus_per_run)
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in ids)}


def slot_cpus(slot: int, cpus_per_run: int) -> list[int]:
    """The cores of a local slot (wrapping around the cores this process may use)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = cores or list(range(os.cpu_count() or 1))
    return [cores[(slot * cpus_per_run + i) % len(cores)] for i in range(cpus_per_run)]


def run_local(
    runs: Sequence[Run],
    parallel: int = 1,
    gpus_per_run: int = 0,
    cpus_per_run: int = 0,
    log=print,
) -> dict[str, int | None]:
    """Runs unfinished points (`parallel` at once); returns name -> exit code (None: skipped)."""
    if parallel < 1:
        raise SweepError(f"parallel must be >= 1, got {parallel}")
    if cpus_per_run > 0 and not shutil.which("taskset"):
        raise SweepError("cpus_per_run needs the `taskset` command (util-linux)")
    results: dict[str, int | None] = {}
    todo = []
    for run in runs:
        state = status(run)
        if state == "finished":
            log(f"[{run.name}] finished (step {finished_step(run.workdir)}): skipped")
            results[run.name] = None
        else:
            todo.append((run, run.command, state))
    slots: queue.Queue[int] = queue.Queue()
    for i in range(parallel):
        slots.put(i)
    procs: dict[str, subprocess.Popen] = {}
    lock = threading.Lock()

    def one(run: Run, cmd: list[str], state: str, slot: int) -> None:
        try:
            env = {**os.environ, **slot_env(slot, gpus_per_run)}
            if cpus_per_run > 0:
                cmd = ["taskset", "-c", ",".join(map(str, slot_cpus(slot, cpus_per_run))), *cmd]
            log(f"[{run.name}] {state} (slot {slot}): {shlex.join(cmd)}")
            with open(run.workdir / LOG_FILE, "a", encoding="utf-8") as out:
                try:
                    with lock:
                        # Own session: a terminal's Ctrl-C reaches only this process, which
                        # turns it into SIGTERM (the trainer's checkpoint-and-stop signal).
                        procs[run.name] = subprocess.Popen(
                            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                            start_new_session=True,
                        )  # fmt: skip
                    code = procs[run.name].wait()
                except OSError as e:  # the command itself cannot start
                    out.write(f"launch/sweep.py: cannot start {cmd[0]!r}: {e}\n")
                    code = 127
            results[run.name] = code
            log(f"[{run.name}] exit {code}; log: {run.workdir / LOG_FILE}")
        finally:
            slots.put(slot)

    threads = []
    try:
        for run, cmd, state in todo:  # start in sweep order as slots free up
            thread = threading.Thread(target=one, args=(run, cmd, state, slots.get()), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            while thread.is_alive():  # short joins: the main thread keeps seeing SIGINT
                thread.join(0.5)
    except KeyboardInterrupt:
        log("Interrupted: SIGTERM to running points (they checkpoint), waiting for them")
        with lock:
            for p in procs.values():
                if p.poll() is None:
                    p.terminate()
        for thread in threads:
            thread.join()
        raise
    return results


def tpu_script(runs: Sequence[Run], tpu: str, zone: str) -> str:
    """A bash script running the points one after another on a TPU pod slice (tpu_pod.sh)."""
    lines = [
        "#!/usr/bin/env bash",
        "# Generated by launch/sweep.py: the points one after another (a failure moves on).",
        "set -uo pipefail",
        f"cd {shlex.quote(str(REPO_ROOT))}",
    ]
    for run in runs:
        lines.append(f"# {run.name}")
        lines.append(
            f"TPU_NAME={shlex.quote(tpu)} ZONE={shlex.quote(zone)} bash launch/tpu_pod.sh "
            + shlex.join(run.command[1:])
        )
    return "\n".join(lines) + "\n"


def slurm_script(
    runs: Sequence[Run],
    root: str | os.PathLike,
    sbatch_options: Sequence[str] = (),
    max_parallel: int = 0,
) -> str:
    """An sbatch array job: task i runs point i (`#SBATCH` lines from `sbatch_options`)."""
    throttle = f"%{max_parallel}" if max_parallel > 0 else ""
    lines = [
        "#!/usr/bin/env bash",
        "#SBATCH --job-name=sweep",
        f"#SBATCH --array=0-{len(runs) - 1}{throttle}",
        f"#SBATCH --output={Path(root).absolute()}/slurm-%A_%a.out",
        *(f"#SBATCH {opt}" for opt in sbatch_options),
        "# Generated by launch/sweep.py. Submit: sbatch THIS_FILE",
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO_ROOT))}",
        "# The project's environment, as launch/multi_gpu.sh: .venv unless one is active.",
        'if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi',
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for i, run in enumerate(runs):
        lines.append(f"  {i}) exec srun {shlex.join(run.command)} ;;  # {run.name}")
    lines += ['  *) echo "no sweep point $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac"]
    return "\n".join(lines) + "\n"


def _repo_relative(path: str) -> str:
    """`path` relative to the repository root when inside it (commands run from there)."""
    file_path, _, arg = path.partition(":")
    absolute = Path(file_path).absolute()
    try:
        shown = str(absolute.relative_to(REPO_ROOT))
    except ValueError:
        shown = str(absolute)
    return f"{shown}:{arg}" if arg else shown


def execute(
    config_spec: str,
    root: str | os.PathLike,
    sweep_spec: str = "",
    mode: str = "local",
    extra: Sequence[str] = (),
    script: str = "launch/train.py",
    steps_field: str = "train.num_steps",
    parallel: int = 1,
    gpus_per_run: int = 0,
    cpus_per_run: int = 0,
    tpu: str = "",
    zone: str = "",
    sbatch_options: Sequence[str] = (),
    log=print,
) -> int:
    """Expands, validates and lays out a sweep, then runs or writes it; returns an exit code.

    Args:
      config_spec: base experiment config, "configs/x.py[:arg]".
      root: sweep directory; point workdirs are ROOT/<point name>.
      sweep_spec: file with `get_sweep(arg=None)`, "path.py[:arg]"; "" = the config file.
      mode: "local" (run here), "print" (one command per line), "tpu" (write
        ROOT/tpu_sweep.sh for launch/tpu_pod.sh), "slurm" (write ROOT/sweep.sbatch array job).
      extra: "a.b=v" overrides applied to every point (not part of names).
      script: the entry point each point runs (launch/train.py; launch/sft.py for SFT sweeps).
      steps_field: config field holding the total steps (finished = a checkpoint at that step).
    """
    if mode not in MODES:
        raise SweepError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "tpu" and not (tpu and zone):
        raise SweepError("mode 'tpu' needs the TPU name and zone (--tpu_name, --zone)")
    if not Path(script).is_file():
        raise SweepError(f"script {script!r} does not exist")
    points = load_sweep(sweep_spec or config_spec)
    runs = plan(config_spec, points, root, extra, steps_field)
    python = sys.executable if mode == "local" else "python3"
    cfg_shown, script_shown = _repo_relative(config_spec), _repo_relative(script)
    for r in runs:
        r.command = command(r, cfg_shown, extra, script_shown, python)
    write_layout(runs, root, log)
    log(f"Sweep of {len(runs)} points under {Path(root).absolute()}")
    if mode == "local":
        results = run_local(runs, parallel, gpus_per_run, cpus_per_run, log)
        failed = sorted(n for n, code in results.items() if code)
        if failed:
            log(f"{len(failed)} point(s) failed: {failed} (see their {LOG_FILE})")
        return 1 if failed else 0
    todo = []
    for r in runs:
        state = status(r)
        if state == "finished":
            log(f"[{r.name}] finished (step {finished_step(r.workdir)}): left out")
        else:
            todo.append(r)
    if not todo:
        log("Every point is finished.")
        return 0
    if mode == "print":
        for r in todo:
            print(f"# {r.name} ({status(r)})\n{shlex.join(r.command)}")
    elif mode == "tpu":
        out = Path(root) / "tpu_sweep.sh"
        out.write_text(tpu_script(todo, tpu, zone))
        log(f"Wrote {out}; run: bash {out}")
    else:
        out = Path(root) / "sweep.sbatch"
        out.write_text(slurm_script(todo, root, sbatch_options, parallel))
        log(f"Wrote {out}; submit: sbatch {out}")
    return 0
    todo_runs, todo_cmds = [r for r, _ in todo], [c for _, c in todo]
    if mode == "print":
        for r, c in todo:
            print(f"# {r.name} ({status(r)})\n{shlex.join(c)}")
    elif mode == "tpu":
        out = Path(root) / "tpu_sweep.sh"
        out.write_text(tpu_script(todo_runs, todo_cmds, tpu, zone))
        log(f"Wrote {out}; run: bash {out}")
    else:
        out = Path(root) / "sweep.sbatch"
        out.write_text(slurm_script(todo_runs, todo_cmds, root, sbatch_options, parallel))
        log(f"Wrote {out}; submit: sbatch {out}")
    return 0
