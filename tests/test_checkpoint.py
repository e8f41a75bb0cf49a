"""Tests for deepretrieval_jax.checkpoint: real orbax checkpoints on disk, 8 fake CPU devices."""

import shutil
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_models import random_params

from deepretrieval_jax.checkpoint import (
    CheckpointError,
    CheckpointManager,
    restore_params,
    restore_policy_params,
    saved_structure,
)
from deepretrieval_jax.models import CausalLM, ModelConfig
from deepretrieval_jax.sharding import make_mesh


def mesh(shape):
    return Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp"))


def make_state(m, seed=0):
    """A train-state-like tree: sharded, replicated, bf16 and scalar leaves."""
    rng = np.random.default_rng(seed)
    embed = rng.standard_normal((16, 8)).astype(np.float32)
    kernel = rng.standard_normal((8, 24)).astype(np.float32)
    return {
        "actor_params": {
            "embed": jax.device_put(embed, NamedSharding(m, P("data", "fsdp"))),
            "layers": [
                {"kernel": jax.device_put(kernel, NamedSharding(m, P(None, ("data", "fsdp"))))},
                {"scale": jnp.asarray(rng.standard_normal(8), jnp.bfloat16)},
            ],
        },
        "opt_state": {"mu": jax.device_put(2 * embed, NamedSharding(m, P("fsdp", None)))},
        "step": jnp.int32(seed),
    }


def abstract(state, m, spec_fn):
    """ShapeDtypeStruct target on mesh `m`; spec_fn(leaf) gives each leaf's PartitionSpec."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(m, spec_fn(x))),
        state,
    )


def spec_first_axis(x):
    return P("data") if x.ndim == 2 else P()


def assert_same_values(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_identical_with_metadata(tmp_path):
    m = mesh((2, 4))
    state = make_state(m, seed=7)
    meta = {"config": {"lr": 1e-6, "model": "tiny"}, "data": {"epoch": 1, "index": 42}}
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        assert mgr.save(7, state, meta)
        mgr.wait_until_finished()
        assert mgr.latest_step() == 7 and mgr.all_steps() == [7]
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        restored, restored_meta = mgr.restore(target=target)
    assert restored_meta == meta
    assert_same_values(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


@flax.struct.dataclass
class TrainState:
    params: dict
    step: jax.Array


def test_struct_dataclass_state_round_trips(tmp_path):
    state = TrainState(make_state(mesh((2, 4)))["actor_params"], jnp.int32(9))
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(9, state)
    target = abstract(state, mesh((4, 2)), spec_first_axis)
    restored, _ = CheckpointManager(tmp_path).restore(target=target)
    assert isinstance(restored, TrainState)
    assert_same_values(restored, state)
    as_dicts, _ = CheckpointManager(tmp_path).restore()
    assert sorted(as_dicts) == ["params", "step"] and int(as_dicts["step"]) == 9


@pytest.mark.parametrize("shape", [(4, 2), (8, 1)])
def test_restore_onto_another_mesh_shape(tmp_path, shape):
    state = make_state(mesh((2, 4)), seed=1)
    with CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(1, state)
    new_mesh = mesh(shape)
    target = abstract(state, new_mesh, spec_first_axis)
    restored, meta = CheckpointManager(tmp_path).restore(target=target)
    assert meta == {}
    assert_same_values(restored, state)
    embed = restored["actor_params"]["embed"]
    assert embed.sharding == NamedSharding(new_mesh, P("data"))
    assert embed.addressable_shards[0].data.shape == (16 // shape[0], 8)


def test_restore_without_target_gives_numpy(tmp_path):
    state = make_state(mesh((2, 4)), seed=2)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(2, state, {"k": [1, 2]})
    restored, meta = CheckpointManager(tmp_path).restore()
    assert meta == {"k": [1, 2]}
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(restored))
    assert_same_values(restored, state)


def test_keeps_last_n_and_restores_a_given_step(tmp_path):
    m = mesh((2, 4))
    with CheckpointManager(tmp_path, max_to_keep=2) as mgr:
        for step in range(1, 5):
            mgr.save(step, make_state(m, seed=step), {"step": step})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
    restored, meta = CheckpointManager(tmp_path).restore(step=3)
    assert meta == {"step": 3}
    assert_same_values(restored, jax.device_get(make_state(m, seed=3)))


def test_unfinished_saves_are_ignored(tmp_path):
    m = mesh((2, 4))
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(4, make_state(m, seed=4), {"step": 4})
    # A save that crashed before orbax renamed its temporary directory into place ...
    shutil.copytree(tmp_path / "4", tmp_path / "5.orbax-checkpoint-tmp-1700000000")
    # ... and a step directory that never got its commit marker, with a truncated array file.
    shutil.copytree(tmp_path / "4", tmp_path / "6")
    (tmp_path / "6" / "commit_success.txt").unlink()
    for f in (tmp_path / "6" / "state" / "d").iterdir():
        f.write_bytes(b"")
    mgr = CheckpointManager(tmp_path)
    assert mgr.all_steps() == [4] and mgr.latest_step() == 4
    restored, meta = mgr.restore()
    assert meta == {"step": 4}
    assert_same_values(restored, jax.device_get(make_state(m, seed=4)))
    with pytest.raises(
        FileNotFoundError, match=r"no finalised checkpoint for step 6 \(have \[4\]\)"
    ):
        mgr.restore(step=6)
    assert mgr.save(5, make_state(m, seed=5))  # not skipped because of the bogus step 6
    mgr.close()
    assert mgr.all_steps() == [4, 5]
    assert not (tmp_path / "5.orbax-checkpoint-tmp-1700000000").exists()  # cleaned on open
    assert (tmp_path / "6.unfinished-0").is_dir()  # set aside, not deleted


def test_process_killed_mid_save_leaves_a_restorable_latest(tmp_path):
    """A real crash: the process exits while an async save of step 2 is in flight."""
    script = textwrap.dedent(
        f"""
        import os
        import numpy as np
        from deepretrieval_jax.checkpoint import CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r})
        mgr.save(1, {{"w": np.full((256, 1024), 1.0, np.float32)}}, {{"step": 1}})
        mgr.wait_until_finished()
        mgr.save(2, {{"w": np.full((4096, 4096), 2.0, np.float32)}}, {{"step": 2}})
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    mgr = CheckpointManager(tmp_path)
    step = mgr.latest_step()
    assert step in (1, 2)
    restored, meta = mgr.restore()
    assert meta == {"step": step}
    assert (restored["w"] == float(step)).all()
    mgr.close()


def test_restore_params_reads_one_subtree_onto_a_new_mesh(tmp_path):
    state = make_state(mesh((2, 4)), seed=3)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(3, state)
    target = abstract(state["actor_params"], mesh((8, 1)), spec_first_axis)
    structure = saved_structure(tmp_path)
    assert sorted(structure) == ["actor_params", "opt_state", "step"]
    assert structure["actor_params"]["embed"] == jax.ShapeDtypeStruct((16, 8), jnp.float32)
    params = restore_params(tmp_path, target, key="actor_params")
    assert_same_values(params, state["actor_params"])
    assert params["embed"].sharding == NamedSharding(mesh((8, 1)), P("data"))
    with pytest.raises(CheckpointError, match=r"no key 'critic_params' in the saved state"):
        restore_params(tmp_path, target, key="critic_params")
    params_dir = tmp_path / "params_only"
    with CheckpointManager(params_dir) as mgr:
        mgr.save(0, state["actor_params"])
    assert_same_values(restore_params(params_dir, target), state["actor_params"])


def test_mismatched_target_names_the_key(tmp_path):
    state = make_state(mesh((2, 4)))
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state)
    mgr = CheckpointManager(tmp_path)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    bad_shape = {**target, "opt_state": {"mu": jax.ShapeDtypeStruct((16, 9), jnp.float32)}}
    with pytest.raises(
        CheckpointError, match=r"1: key 'opt_state/mu' has shape \(16, 8\).*\(16, 9\)"
    ):
        mgr.restore(target=bad_shape)
    extra = {**target, "critic_params": {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}}
    with pytest.raises(CheckpointError, match=r"key 'critic_params/w' of the target is not in"):
        mgr.restore(target=extra)
    fewer = {k: v for k, v in target.items() if k != "opt_state"}
    with pytest.raises(CheckpointError, match=r"key 'opt_state/mu' is in the checkpoint but not"):
        mgr.restore(target=fewer)
    with pytest.raises(CheckpointError, match=r"key 'actor_params/embed' has shape"):
        restore_params(
            tmp_path, {"embed": jax.ShapeDtypeStruct((4,), jnp.float32)}, key="actor_params"
        )
    mgr.close()


def test_missing_and_corrupt_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory does not exist"):
        restore_params(tmp_path / "nope", {})
    with pytest.raises(FileNotFoundError, match="no finalised checkpoint in the directory"):
        CheckpointManager(tmp_path / "empty").restore()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file: checkpoint path is not a directory"):
        CheckpointManager(tmp_path / "file")
    ckpt = tmp_path / "ckpt"
    state = make_state(mesh((2, 4)))
    with CheckpointManager(ckpt) as mgr:
        mgr.save(1, state)
        with pytest.raises(CheckpointError, match="metadata of step 2: .*not JSON serializable"):
            mgr.save(2, state, {"bad": object()})
    (ckpt / "1" / "metadata" / "metadata").write_text('{"trunc')  # a torn JSON write
    with pytest.raises(CheckpointError, match=r"ckpt/1/metadata: cannot restore"):
        CheckpointManager(ckpt).restore()
    shutil.rmtree(ckpt / "1" / "state" / "d")  # array data gone
    with pytest.raises(CheckpointError, match=r"ckpt/1/state: unreadable checkpoint metadata"):
        CheckpointManager(ckpt).restore()


def test_restore_policy_params_detects_the_params_key(tmp_path):
    config = ModelConfig.tiny()
    params = random_params(CausalLM(config), config, seed=2)
    for name, state in (
        ("trainer", {"actor_params": params, "step": jnp.int32(1)}),
        ("sft", {"params": params, "step": jnp.int32(1)}),
        ("plain", params),
    ):
        with CheckpointManager(tmp_path / name / "checkpoints") as mgr:
            mgr.save(1, state)
        # A run's workdir is accepted for its checkpoints/ subdirectory.
        for directory in (tmp_path / name, tmp_path / name / "checkpoints"):
            assert_same_values(restore_policy_params(directory, config), params)
    m = make_mesh()
    got = restore_policy_params(tmp_path / "trainer", config, key="actor_params", mesh=m)
    assert_same_values(got, params)
    assert all(x.sharding.mesh.shape == m.shape for x in jax.tree.leaves(got))
    with pytest.raises(CheckpointError, match=r"trainer/checkpoints: the saved state has no 'crit"):
        restore_policy_params(tmp_path / "trainer", config, key="critic_params")


def _zero_array_data(step_dir, where="d"):
    """Zeroes the files of a saved step's `state/<where>` directory, keeping their sizes."""
    for path in (step_dir / "state" / where).iterdir():
        path.write_bytes(bytes(path.stat().st_size))


def test_corrupt_latest_falls_back_to_the_previous_step_with_one_clear_error(tmp_path, caplog):
    """Issue 14: a corrupt latest checkpoint stopped training although step 2 was good, and
    its error came as a chain of orbax tracebacks."""
    import traceback

    states = {s: {"w": jnp.arange(1000.0) + s} for s in (1, 2, 3)}
    target = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32)}
    with CheckpointManager(tmp_path) as mgr:
        for s, state in states.items():
            mgr.save(s, state, {"data": s})
    _zero_array_data(tmp_path / "3", "ocdbt.process_0/d")  # Array chunks only.
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="/3: cannot restore") as err:
        mgr.restore(3, target)
    assert "".join(traceback.format_exception(err.value)).count("Traceback") == 1
    step, state, meta = mgr.restore_latest(target)
    assert (step, meta) == (2, {"data": 2})
    assert_same_values(state, states[2])
    assert "step 3 is corrupt" in caplog.text
    assert mgr.all_steps() == [1, 2] and (tmp_path / "3.corrupt-0").is_dir()
    assert mgr.save(3, states[3], {"data": 3})  # Step 3 is saved again, not skipped.
    mgr.close()
    assert CheckpointManager(tmp_path).restore_latest(target)[0] == 3


def test_all_steps_corrupt_is_one_error_and_a_mismatch_does_not_fall_back(tmp_path):
    m = mesh((2, 4))
    with CheckpointManager(tmp_path) as mgr:
        for s in (1, 2):
            mgr.save(s, make_state(m, seed=s))
    target = abstract(make_state(m), m, spec_first_axis)
    wrong = {**target, "step": jax.ShapeDtypeStruct((3,), jnp.int32)}
    with pytest.raises(CheckpointError, match="has shape"):
        CheckpointManager(tmp_path).restore_latest(wrong)
    for s in (1, 2):
        _zero_array_data(tmp_path / str(s))
    with pytest.raises(CheckpointError, match="no checkpoint step restores .*step 2: .*step 1:"):
        CheckpointManager(tmp_path).restore_latest(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # Nothing set aside.
