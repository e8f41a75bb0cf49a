"""Checkpoints: orbax CheckpointManager wrapper for sharded state plus JSON host metadata.

Layout (`directory` is a local path or a cloud URL such as gs://bucket/run):
`<directory>/<step>/state` (the pytree of arrays, OCDBT) and `<directory>/<step>/metadata`
(a JSON dict: config, data-iterator state, ...).

Invariants:
- Saves are asynchronous by default: `save` returns once arrays are copied off the devices;
  writing happens in the background. Call `wait_until_finished()` before reading a checkpoint
  back in the same process, and `close()` before exit.
- A step is *finalised* when orbax has renamed its temporary directory
  (`<step>.orbax-checkpoint-tmp-*`) into place and the step contains orbax's commit marker
  (`commit_success.txt`). Only finalised steps are listed, restored or counted as latest, so a
  crash mid-save never leaves a corrupt "latest" checkpoint. Opening a manager deletes leftover
  temporary directories (in the background; `wait_until_finished` waits for it) and renames
  step directories without the marker to `<step>.unfinished-<n>`, so later saves are not skipped.
- Keeps the last `max_to_keep` finalised steps. How often to save is the caller's decision.
- Multi-host: every process calls `save` and `restore`; orbax writes shared files from the
  primary process only.
- Restoring onto a target tree (leaves: `jax.ShapeDtypeStruct` with `.sharding`, or arrays)
  reshards to the target's shardings, including a mesh of a different shape than at save time.
  The tree structure and shapes are checked against the checkpoint first; a mismatch raises
  `CheckpointMismatch` (a `CheckpointError`) naming the step directory and the offending key.
  Without a target, arrays come back as host NumPy arrays (nested dicts for custom pytree nodes).
- Resuming (`restore_latest`): a corrupt newest step is skipped with a warning and set aside,
  and the previous good step restored; errors are one message, not orbax's exception chain.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import linen as nn

from deepretrieval_jax import sharding
from deepretrieval_jax.models import CausalLM, ModelConfig

CHECKPOINT_DIR = "checkpoints"  # a run's CheckpointManager directory inside its workdir
STATE, METADATA = "state", "metadata"
_COMMIT_MARKER = "commit_success.txt"


class CheckpointError(ValueError):
    """A checkpoint cannot be restored as asked: corrupt files or a tree/shape mismatch.

    Raised without orbax's exception chain (its message already holds the cause): a corrupt
    array store otherwise prints one traceback per array and buries the message."""


class CheckpointMismatch(CheckpointError):
    """The target's tree or shapes differ from the checkpoint's (not a corrupt file)."""


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat(tree) -> dict[str, Any]:
    """Leaves keyed by their path, e.g. "actor_params/layers_0/kernel"."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(e) for e in path): leaf for path, leaf in leaves}


def _abstract(leaf):
    """A restore target leaf: arrays become ShapeDtypeStructs keeping their sharding."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    leaf = np.asarray(leaf)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)


def _check_matches(
    step_dir: epath.Path, saved_tree, target, prefix: str = "", partial=False
) -> None:
    """Raises CheckpointError if target's keys (all of them unless `partial`) or shapes differ
    from the saved tree's."""
    saved, wanted = _flat(saved_tree), _flat(target)
    extra = sorted(set(saved) - set(wanted))
    if extra and not partial:
        raise CheckpointMismatch(
            f"{step_dir}: key {prefix + extra[0]!r} is in the checkpoint but not in the target "
            f"({len(extra)} such keys)"
        )
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise CheckpointMismatch(
            f"{step_dir}: key {prefix + missing[0]!r} of the target is not in the checkpoint "
            f"({len(missing)} missing; the checkpoint has e.g. {sorted(saved)[:5]})"
        )
    for key, leaf in wanted.items():
        saved_shape = tuple(getattr(saved[key], "shape", None) or ())
        if saved_shape != tuple(leaf.shape):
            raise CheckpointMismatch(
                f"{step_dir}: key {prefix + key!r} has shape {saved_shape} in the checkpoint, "
                f"the target expects {tuple(leaf.shape)}"
            )


def _restore_args(leaf: jax.ShapeDtypeStruct) -> ocp.RestoreArgs:
    """Onto the leaf's sharding when it has one, else as a host NumPy array."""
    if leaf.sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
    return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype)


def _restore_tree(step_dir: epath.Path, target, key: str | None = None):
    """Restores the saved state (or its top-level `key`) onto `target` (None: all, as NumPy)."""
    saved_tree = _saved_tree(step_dir)
    if key is not None:
        if not isinstance(saved_tree, Mapping) or key not in saved_tree:
            keys = sorted(saved_tree) if isinstance(saved_tree, Mapping) else type(saved_tree)
            raise CheckpointMismatch(f"{step_dir}: no key {key!r} in the saved state (has {keys})")
    if target is None:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved_tree)
    else:
        target = jax.tree.map(_abstract, target)
        if key is None:
            _check_matches(step_dir, saved_tree, target)
        else:
            _check_matches(step_dir, saved_tree[key], target, prefix=key + "/", partial=True)
            target = {key: target}
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=jax.tree.map(_restore_args, target),
        partial_restore=key is not None,
    )
    handler = ocp.PyTreeCheckpointHandler()  # directly, as in `_saved_tree`
    try:
        restored = handler.restore(step_dir / STATE, args=args)
    except Exception as e:
        raise CheckpointError(f"{step_dir}: cannot restore: {type(e).__name__}: {e}") from None
    finally:
        handler.close()
    return restored if key is None else restored[key]


def _as_path(directory: str | os.PathLike) -> epath.Path:
    """Local paths made absolute; cloud URLs (gs://...) as they are."""
    if "://" in str(directory):
        return epath.Path(directory)
    return epath.Path(directory).expanduser().absolute()


def _finalised_steps(directory: epath.Path) -> list[int]:
    """Steps whose directory orbax renamed into place and marked committed, ascending."""
    if not directory.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in directory.iterdir()
        if p.name.isdigit() and (p / _COMMIT_MARKER).exists()
    )


def _set_aside_unfinished(directory: epath.Path) -> None:
    """Renames step directories without the commit marker to `<step>.unfinished-<n>`.

    On local disks orbax trusts the rename alone, so such a directory would count as its latest
    step and make it skip saving every lower step. The primary process renames; all wait.
    """
    if ocp.multihost.is_primary_host(0) and directory.is_dir():
        for p in directory.iterdir():
            if p.name.isdigit() and p.is_dir() and not (p / _COMMIT_MARKER).exists():
                n = sum(1 for q in directory.iterdir() if q.name.startswith(p.name + ".unfinished"))
                p.rename(directory / f"{p.name}.unfinished-{n}")
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes("deepretrieval_jax_set_aside_unfinished")


def _resolve(directory: epath.Path, step: int | None) -> epath.Path:
    """The directory of a finalised step; FileNotFoundError saying what exists."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory does not exist")
    steps = _finalised_steps(directory)
    if not steps:
        raise FileNotFoundError(f"{directory}: no finalised checkpoint in the directory")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise FileNotFoundError(
            f"{directory}: no finalised checkpoint for step {step} (have {steps})"
        )
    return directory / str(step)


def _saved_tree(step_dir: epath.Path):
    """Metadata tree (shapes, dtypes) of a step's saved state."""
    # The item's handler reads `<step>/state` directly. A standalone Checkpointer would also
    # look for its own `_CHECKPOINT_METADATA` inside the item directory, which a
    # CheckpointManager writes one level up (`<step>/`), and warn "Metadata file does not exist"
    # on every restore.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        metadata = handler.metadata(step_dir / STATE)
        error = "missing or corrupt files" if metadata is None else None
    except Exception as e:
        metadata, error = None, f"{type(e).__name__}: {e}"
    finally:
        handler.close()
    if error:
        raise CheckpointError(f"{step_dir / STATE}: unreadable checkpoint metadata: {error}")
    return metadata.tree


class CheckpointManager:
    """Saves and restores `(state pytree, JSON metadata)` per step under one directory."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = _as_path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"{self.directory}: checkpoint path is not a directory")
        _set_aside_unfinished(self.directory)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE, METADATA)
        )

    def all_steps(self) -> list[int]:
        """Finalised steps, ascending."""
        return _finalised_steps(self.directory)

    def latest_step(self) -> int | None:
        """The newest finalised step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(
        self, step: int, state, metadata: Mapping[str, Any] | None = None, force: bool = False
    ) -> bool:
        """Starts saving `state` (a pytree of arrays) and `metadata` (JSON) as `step`.

        Returns whether a save was started (orbax skips steps not newer than the latest one
        unless `force`).
        """
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata)
        except TypeError as e:
            raise CheckpointError(f"{self.directory}: metadata of step {step}: {e}") from e
        args = ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(state), METADATA: ocp.args.JsonSave(metadata)}
        )
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int | None = None, target=None) -> tuple[Any, dict]:
        """Restores `(state, metadata)` of `step` (default: the latest finalised step).

        Args:
            step: which step; None for the latest finalised one.
            target: pytree matching the saved state whose leaves are `jax.ShapeDtypeStruct`
                (with `.sharding` to restore onto devices) or arrays; None restores host NumPy
                arrays with the saved structure.
        """
        step_dir = _resolve(self.directory, step)
        state = _restore_tree(step_dir, target)
        self._manager.reload()  # steps another process finalised since we opened
        args = ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()})
        try:
            metadata = self._manager.restore(int(step_dir.name), args=args)[METADATA]
        except Exception as e:
            raise CheckpointError(
                f"{step_dir / METADATA}: cannot restore: {type(e).__name__}: {e}"
            ) from None
        return state, dict(metadata or {})

    def restore_latest(self, target=None) -> tuple[int, Any, dict]:
        """Restores `(step, state, metadata)` of the newest finalised step that restores.

        A step whose files are corrupt (`CheckpointError`) is skipped with a warning and the
        previous one tried; once one restores, the corrupt newer steps are renamed to
        `<step>.corrupt-<n>` so that later saves of those step numbers are not skipped. A target
        that does not match (`CheckpointMismatch`) is raised at once: older steps would not
        match either. If no step restores, one `CheckpointError` lists every step's error.
        """
        corrupt: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                state, metadata = self.restore(step, target)
            except CheckpointMismatch:
                raise
            except CheckpointError as e:
                logging.warning(
                    "Checkpoint step %d is corrupt; trying the previous one: %s", step, e
                )
                corrupt.append((step, str(e)))
                continue
            if corrupt:
                self._set_aside_corrupt([s for s, _ in corrupt])
                logging.warning(
                    "Resuming from step %d, not from the corrupt newer step(s) %s",
                    step, [s for s, _ in corrupt],
                )  # fmt: skip
            return step, state, metadata
        if not corrupt:
            raise FileNotFoundError(f"{self.directory}: no finalised checkpoint in the directory")
        details = "; ".join(f"step {s}: {e}" for s, e in corrupt)
        raise CheckpointError(f"{self.directory}: no checkpoint step restores ({details})")

    def _set_aside_corrupt(self, steps: list[int]) -> None:
        if ocp.multihost.is_primary_host(0):
            for step in steps:
                path = self.directory / str(step)
                n = sum(1 for q in self.directory.iterdir() if q.name.startswith(f"{step}.corrupt"))
                path.rename(self.directory / f"{step}.corrupt-{n}")
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("deepretrieval_jax_set_aside_corrupt")
        self._manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until pending asynchronous saves (and the cleanup of leftover temporary
        directories started on open) are finished."""
        self._manager.wait_until_finished()
        # orbax deletes leftover temporary directories in the background and awaits that only
        # in save(); await it here too so that close() leaves the directory settled.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources."""
        self.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def restore_params(
    directory: str | os.PathLike, target, step: int | None = None, key: str | None = None
):
    """Restores one params tree onto `target`'s shardings, reading nothing else.

    Args:
        directory: a CheckpointManager directory.
        target: pytree of `jax.ShapeDtypeStruct` (or arrays) shaped like the params.
        step: which step; None for the latest finalised one.
        key: top-level key of the saved state holding the params (e.g. "actor_params");
            None when the saved state is the params tree itself.
    """
    return _restore_tree(_resolve(_as_path(directory), step), target, key)


def saved_structure(directory: str | os.PathLike, step: int | None = None):
    """The saved state of `step` (default: latest) as a tree of `jax.ShapeDtypeStruct`
    (custom pytree nodes appear as dicts); reads metadata only."""
    step_dir = _resolve(_as_path(directory), step)
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), _saved_tree(step_dir)
    )


# Keys that hold the policy params in this project's checkpoints, tried in order when none is
# given: the RL trainer's train state, then an SFT state.
POLICY_PARAMS_KEYS = ("actor_params", "params")


def restore_policy_params(
    directory: str | os.PathLike,
    model_config: ModelConfig,
    *,
    step: int | None = None,
    key: str | None = None,
    mesh=None,
    rules=None,
):
    """Restores a `CausalLM`'s params from a checkpoint, reading only the params subtree.

    Subtrees a `CausalLM` does not have (a shared critic's `value_head`) are left unread.

    Args:
        directory: a CheckpointManager directory, or a training run's workdir (its
            `checkpoints/` subdirectory is used).
        model_config: the model's shape; the restored tree must match it.
        step: which step; None for the latest finalised one.
        key: the saved state's key holding the params. A saved plain params tree is used as is
            whatever the key; None tries `POLICY_PARAMS_KEYS` in order.
        mesh, rules: shard the params over `mesh` by the logical `rules` (default
            `sharding.TRAIN_RULES`); without a mesh they land on the first local device.

    Raises:
        CheckpointError: the saved state has no such key (or none of `POLICY_PARAMS_KEYS`), or
            its params do not match `model_config`.
    """
    path = _as_path(directory)
    if (path / "checkpoints").is_dir():  # a training run's workdir
        path = path / "checkpoints"
    saved = saved_structure(path, step)
    if "transformer" in saved:  # a plain params tree
        key = None
    else:
        candidates = POLICY_PARAMS_KEYS if key is None else (key,)
        found = [k for k in candidates if k in saved]
        if not found:
            wanted = " or ".join(repr(k) for k in candidates)
            raise CheckpointError(
                f"{path}: the saved state has no {wanted} (keys: {sorted(saved)}); "
                "pass the key that holds the policy params"
            )
        key = found[0]
    if key is not None and any("_lora_" in name for name in _flat(saved[key])):
        raise CheckpointError(
            f"{path}: {key} holds LoRA adapters only; restore them on the run's base weights "
            "with deepretrieval_jax.lora_export (launch/export_hf.py --lora_rank ... --base_dir)"
        )
    module = CausalLM(model_config)
    abstract = nn.meta.unbox(sharding.abstract_params(module))
    extra = sorted(set(saved[key]) - set(abstract)) if key is not None else []
    if extra:  # e.g. a shared critic's value head (rl.state.PolicyValueModel): not read
        logging.info(
            "%s: %s/{%s} is not part of the policy; not restored", path, key, ",".join(extra)
        )
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    else:
        rules = sharding.TRAIN_RULES if rules is None else rules
        shardings = sharding.param_shardings(module, mesh, rules)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return restore_params(path, target, step, key)
