"""Hyper-parameter sweeps: declare and validate sets of `--config.a.b=v` overrides.

A sweep is a list of `Point`s, each an ordered set of (dotted config path, value) overrides with
a readable name (`actor_lr=1e-06,kl_coef=0.001`). Build it in a sweep file (or next to the
experiment in its config file) with big_vision/xmanager-hyper style helpers:

    from deepretrieval_jax import sweep as hyper

    def get_sweep(arg=None):
        return hyper.product([
            hyper.sweep("config.ppo.actor_lr", [1e-6, 3e-6]),
            hyper.zip(hyper.sweep("config.ppo.kl_coef", [0.001, 0.01]),
                      hyper.sweep("config.ppo.entropy_coef", [0.0, 0.001])),
            hyper.fixed("config.train.num_steps", 200),  # every point, not in names
        ])

Invariants:
- Nothing starts before every point validates: `resolve_point` applies each point's overrides
  to a locked copy of the base config (unknown field or wrong Python type -> `SweepError`), then
  parses them as the exact command-line flags `launch/train.py` will receive (so the config saved
  in the point's workdir is the config the trainer sees), then runs `config.validate`.
- A point's workdir is ROOT/<point name> (`Point.dirname`). The point is finished when the
  workdir holds a finalised checkpoint (a `checkpoints/<step>/` directory with orbax's commit
  marker, what `checkpoint.CheckpointManager` counts) at step >= the config's total steps
  (`train.num_steps`): the trainer always checkpoints its last step. Re-launching train with
  the same workdir resumes from the latest checkpoint.

Running, layout and cluster scripts: `deepretrieval_jax.sweep_runner` (and launch/sweep.py).
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib.util
import itertools
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_DIR = "checkpoints"  # checkpoint.CHECKPOINT_DIR (not imported: it pulls in JAX)
COMMIT_MARKER = "commit_success.txt"  # orbax's marker of a finalised step


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
    """The run's state: "finished", "resume" (a checkpoint before the last step) or "new"."""
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
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise SweepError(
                f"steps_field {steps_field!r} is not an int field of the config"
            ) from e
        runs.append(Run(p, Path(root).absolute() / p.dirname, cfg, total))
    return runs
