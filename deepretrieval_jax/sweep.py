"""Hyper-parameter sweeps: declare, validate, lay out and launch `--config.a.b=v` override sets.

A sweep is a list of `Point`s, each an ordered set of (dotted config path, value) overrides with
a readable name (`actor_lr=1e-06,kl_coef=0.001`). Build it in a sweep file (or next to the
experiment in its config file) with big_vision/xmanager-hyper style helpers:

    def get_sweep(arg=None):
        return sweep.product([
            sweep.sweep("config.ppo.actor_lr", [1e-6, 3e-6]),
            sweep.zip(sweep.sweep("config.ppo.kl_coef", [0.001, 0.01]),
                      sweep.sweep("config.ppo.entropy_coef", [0.0, 0.001])),
            sweep.fixed("config.train.num_steps", 200),   # same for every point, not in names
        ])

Invariants:
- Nothing starts before every point validates: `resolve_points` applies each point's overrides
  to a locked copy of the base config (unknown field or wrong Python type -> `SweepError`), then
  parses them as the exact command-line flags `launch/train.py` will receive (so the config saved
  in the point's workdir is the config the trainer sees), then runs `config.validate`.
- Workdir layout: `ROOT/<point name>/` holds `config.json` (the fully resolved config),
  `sweep_point.json` (name, overrides, command) and, for local runs, `train.log`;
  `ROOT/sweep.json` lists every point.
- A point is finished when its workdir holds a finalised checkpoint (a `checkpoints/<step>/`
  directory with orbax's commit marker, what `checkpoint.CheckpointManager` counts) at step
  >= the config's total steps (`train.num_steps`): the trainer always checkpoints its last step.
  Re-running a sweep skips finished points and re-launches the others with the same workdir,
  which makes the trainer resume from its latest checkpoint.
- Local runs: at most `parallel` processes at once, each pinned to its own slot of
  `gpus_per_run` GPUs (CUDA_VISIBLE_DEVICES) and `cpus_per_run` cores (taskset). Ctrl-C sends
  SIGTERM to the running points (the trainer checkpoints and stops) and waits for them.
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib.util
import itertools
import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_DIR = "checkpoints"  # rl.setup.CHECKPOINT_DIR (not imported: it pulls in JAX)
COMMIT_MARKER = "commit_success.txt"  # orbax's marker of a finalised step
POINT_FILE, CONFIG_FILE, LOG_FILE, SWEEP_FILE = (
    "sweep_point.json",
    "config.json",
    "train.log",
    "sweep.json",
)


class SweepError(ValueError):
    """A sweep that cannot run: empty, malformed, or a point the base config rejects."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: ordered (dotted path, value) overrides; `labels` make its name."""

    overrides: tuple[tuple[str, Any], ...]
    # (key, formatted value) pairs shown in the name; key "" marks a hand-given name.
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        if not self.labels:
            return "base"
        short = [k.rsplit(".", 1)[-1] for k, _ in self.labels if k]
        parts = []
        for key, value in self.labels:
            leaf = key.rsplit(".", 1)[-1]
            parts.append(value if not key else f"{leaf if short.count(leaf) == 1 else key}={value}")
        return ",".join(parts)

    @property
    def dirname(self) -> str:
        """The name with characters unsafe in paths and shells replaced by `_`."""
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", self.name)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.overrides)


def _path(path: str) -> str:
    if not isinstance(path, str) or not path.strip(". "):
        raise SweepError(f"a sweep path must be a dotted config path string, got {path!r}")
    return path[len("config.") :] if path.startswith("config.") else path


def format_value(value: Any) -> str:
    """A value as `--config.a.b=<text>` text (floats by repr: 1e-06, tuples as (a, b))."""
    if isinstance(value, (list, tuple)):
        inner = ", ".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def sweep(
    path: str, values: Iterable[Any], name: str | None = None, hidden: bool = False
) -> list[Point]:
    """One point per value of `path` (`config.` prefix optional).

    `name` replaces the key in point names; `hidden` leaves it out of them (e.g. the checkpoint
    path zipped with a model preset that already names the point).
    """
    path, values = _path(path), list(values)
    if not values:
        raise SweepError(f"sweep({path!r}): empty list of values")
    key = name or path
    return [Point(((path, v),), () if hidden else ((key, format_value(v)),)) for v in values]


def fixed(path: str, value: Any) -> list[Point]:
    """A one-point sweep setting `path` for every point it is combined with (not in names)."""
    return [Point(((_path(path), value),))]


def named(name: str, overrides: dict[str, Any]) -> list[Point]:
    """A single hand-named point (e.g. a baseline) from a {path: value} dict."""
    return [Point(tuple((_path(k), v) for k, v in overrides.items()), (("", name),))]


def _sweeps(args: tuple) -> list[list[Point]]:
    if len(args) == 1 and args[0] and all(isinstance(a, list) for a in args[0]):
        args = tuple(args[0])  # product([s1, s2]) as well as product(s1, s2)
    for i, s in enumerate(args):
        if not isinstance(s, list) or not all(isinstance(p, Point) for p in s):
            raise SweepError(f"argument {i} is not a sweep (a list of Points): {s!r:.80}")
        if not s:
            raise SweepError(f"argument {i} is an empty sweep")
    if not args:
        raise SweepError("no sweeps given")
    return list(args)


def _merge(points: Sequence[Point]) -> Point:
    seen: dict[str, Any] = {}
    for p in points:
        for k, v in p.overrides:
            if k in seen:
                raise SweepError(f"config.{k} is set by two combined sweeps ({seen[k]!r}, {v!r})")
            seen[k] = v
    return Point(tuple(seen.items()), tuple(lab for p in points for lab in p.labels))


def product(*sweeps: list[Point]) -> list[Point]:
    """Cartesian product: every combination, the last sweep varying fastest."""
    return [_merge(combo) for combo in itertools.product(*_sweeps(sweeps))]


def zip(*sweeps: list[Point]) -> list[Point]:  # noqa: A001 - the name the hyper API uses
    """Element-wise combination of sweeps of equal length."""
    sweeps_ = _sweeps(sweeps)
    lengths = [len(s) for s in sweeps_]
    if len(set(lengths)) > 1:
        raise SweepError(f"zip needs sweeps of equal length, got lengths {lengths}")
    return [_merge(combo) for combo in builtins.zip(*sweeps_, strict=True)]


def check_names(points: Sequence[Point]) -> None:
    """Raises if the sweep is empty or two points would share a workdir."""
    if not points:
        raise SweepError("the sweep has no points")
    seen: dict[str, Point] = {}
    for p in points:
        if p.dirname in seen:
            raise SweepError(
                f"two sweep points share the name {p.dirname!r} ({seen[p.dirname].as_dict()} and "
                f"{p.as_dict()}); give one of the sweeps a name= or use named()"
            )
        seen[p.dirname] = p


# ----------------------------------------------------------------------------- loading


def _ensure_repo_on_path() -> None:
    # Config files import `from configs import common`, as launch/train.py allows.
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def _split_spec(spec: str) -> tuple[str, str | None]:
    path, _, arg = spec.partition(":")
    return path, (arg or None)


def load_sweep(spec: str) -> list[Point]:
    """Points from `get_sweep(arg)` in the file `spec` = "path.py[:arg]"."""
    path, arg = _split_spec(spec)
    if not Path(path).is_file():
        raise SweepError(f"sweep file {path!r} does not exist")
    _ensure_repo_on_path()
    module_spec = importlib.util.spec_from_file_location(f"_sweep_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path} defines no get_sweep(arg=None) function")
    points = module.get_sweep(arg) if arg is not None else module.get_sweep()
    if not isinstance(points, list) or not all(isinstance(p, Point) for p in points):
        raise SweepError(
            f"{path}: get_sweep() must return a list of sweep.Point, got {points!r:.80}"
        )
    check_names(points)
    return points


def _parse_flags(config_spec: str, flags_: Sequence[str]):
    """The config `launch/train.py --config=config_spec *flags_` would see."""
    from absl import flags
    from ml_collections import config_flags

    _ensure_repo_on_path()
    argv = ["sweep", f"--config={config_spec}", *flags_]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


def load_config(config_spec: str):
    """The base ConfigDict of "path.py[:arg]"; SweepError if the file is missing."""
    if not Path(_split_spec(config_spec)[0]).is_file():
        raise SweepError(f"config file {_split_spec(config_spec)[0]!r} does not exist")
    return _parse_flags(config_spec, [])


def override_flags(point: Point, extra: Sequence[str] = ()) -> list[str]:
    """`--config.a.b=v` flags of a point, after the `extra` ones ("a.b=v") shared by all."""
    shared = [f"--config.{_path(e.partition('=')[0])}={e.partition('=')[2]}" for e in extra]
    return shared + [f"--config.{k}={format_value(v)}" for k, v in point.overrides]


def _get(cfg, path: str):
    for part in path.split("."):
        cfg = cfg[part]
    return cfg


def resolve_point(base, config_spec: str, point: Point, extra: Sequence[str] = ()):
    """The fully resolved config of one point; SweepError naming the point and field."""
    where = f"sweep point {point.name!r}"
    cfg = base.copy_and_resolve_references()
    cfg.lock()
    for path, value in point.overrides:
        parent, _, leaf = path.rpartition(".")
        try:
            node = _get(cfg, parent) if parent else cfg
            if leaf not in node:
                raise KeyError(f"no field {leaf!r}; fields there: {sorted(node.keys())}")
            setattr(node, leaf, value)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise SweepError(f"{where}: config.{path}={value!r}: {e}") from e
    try:
        resolved = _parse_flags(config_spec, override_flags(point, extra))
    except Exception as e:  # absl/ml_collections raise several types for a bad flag
        raise SweepError(f"{where}: overrides {override_flags(point, extra)}: {e}") from e
    for path, value in point.overrides:
        if _get(resolved, path) != _get(cfg, path):
            raise SweepError(
                f"{where}: config.{path}={value!r} reads back from its flag text "
                f"{format_value(value)!r} as {_get(resolved, path)!r}"
            )
    from deepretrieval_jax import config as config_lib

    try:
        config_lib.validate(resolved)
    except (TypeError, ValueError) as e:
        raise SweepError(f"{where}: {e}") from e
    return resolved


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
    """One point bound to its workdir and resolved config."""

    point: Point
    workdir: Path
    config: Any  # the resolved ConfigDict
    total_steps: int
    command: list[str] = dataclasses.field(default_factory=list)  # set by `execute`

    @property
    def name(self) -> str:
        return self.point.name


def finished_step(workdir: str | os.PathLike) -> int | None:
    """The newest finalised checkpoint step in `workdir/checkpoints`, or None."""
    directory = Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return None
    steps = [
        int(p.name)
        for p in directory.iterdir()
        if p.name.isdigit() and (p / COMMIT_MARKER).exists()
    ]
    return max(steps) if steps else None


def status(run: Run) -> str:
    """ "finished", "resume" (has a checkpoint before the last step) or "new"."""
    step = finished_step(run.workdir)
    if step is None:
        return "new"
    return "finished" if step >= run.total_steps else "resume"


def plan(
    config_spec: str,
    points: Sequence[Point],
    root: str | os.PathLike,
    extra: Sequence[str] = (),
    steps_field: str = "train.num_steps",
) -> list[Run]:
    """Validates every point against the base config (before anything runs) -> Runs."""
    check_names(points)
    shared = {_path(e.partition("=")[0]) for e in extra}
    for e in extra:
        if "=" not in e:
            raise SweepError(f"override {e!r} is not of the form a.b=value")
    swept = shared & {k for p in points for k, _ in p.overrides}
    if swept:
        raise SweepError(f"config.{sorted(swept)[0]} is both a shared override and swept")
    base = load_config(config_spec)
    runs = []
    for p in points:
        cfg = resolve_point(base, config_spec, p, extra)
        try:
            total = int(_get(cfg, steps_field))
        except (KeyError, AttributeError, TypeError) as e:
            raise SweepError(
                f"steps_field {steps_field!r} is not an int field of the config"
            ) from e
        runs.append(Run(p, Path(root).absolute() / p.dirname, cfg, total))
    return runs


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


def write_layout(runs: Sequence[Run], root: str | os.PathLike) -> None:
    """Writes each point's config.json and sweep_point.json, and ROOT/sweep.json."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    summary = []
    for run in runs:
        run.workdir.mkdir(parents=True, exist_ok=True)
        (run.workdir / CONFIG_FILE).write_text(run.config.to_json_best_effort(indent=2) + "\n")
        info = {
            "name": run.name,
            "overrides": {k: format_value(v) for k, v in run.point.overrides},
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
    stopping = threading.Event()

    def one(run: Run, cmd: list[str], state: str) -> None:
        slot = slots.get()
        try:
            if stopping.is_set():
                return
            env = {**os.environ, **slot_env(slot, gpus_per_run)}
            if cpus_per_run > 0:
                cmd = ["taskset", "-c", ",".join(map(str, slot_cpus(slot, cpus_per_run))), *cmd]
            log(f"[{run.name}] {state} (slot {slot}): {shlex.join(cmd)}")
            with open(run.workdir / LOG_FILE, "a", encoding="utf-8") as out:
                with lock:
                    procs[run.name] = subprocess.Popen(
                        cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT
                    )
                code = procs[run.name].wait()
            results[run.name] = code
            log(f"[{run.name}] exit {code}; log: {run.workdir / LOG_FILE}")
        finally:
            slots.put(slot)

    threads = [threading.Thread(target=one, args=item, daemon=True) for item in todo]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        stopping.set()
        log("Interrupted: SIGTERM to running points (they checkpoint), waiting for them")
        with lock:
            for p in procs.values():
                if p.poll() is None:
                    p.terminate()
        for t in threads:
            t.join()
        raise
    return results


def tpu_script(runs: Sequence[Run], tpu: str, zone: str) -> str:
    """A bash script running the points one after another on a TPU pod slice (tpu_pod.sh)."""
    lines = ["#!/usr/bin/env bash", "# Generated by launch/sweep.py: one TPU pod slice job per point.",
             "set -uo pipefail", f"cd {shlex.quote(str(REPO_ROOT))}"]  # fmt: skip
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


MODES = ("local", "print", "tpu", "slurm")


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
    write_layout(runs, root)
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
