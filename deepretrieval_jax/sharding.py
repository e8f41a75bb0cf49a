"""Device mesh and logical-axis sharding rules.

The model names every parameter axis (`vocab, embed, q_heads, kv_heads, head_dim, mlp, layers`)
and every main activation axis (`act_batch, act_len, act_embed, act_heads, act_kv_heads, act_mlp,
act_vocab`). A rules table maps each logical name to mesh axes of a `(data, fsdp, tensor)` mesh:

- TRAIN_RULES: weights FSDP-sharded over `fsdp` on their embed axis and tensor-parallel over
  `tensor` on heads / mlp / vocab; batch over `(data, fsdp)`.
- SAMPLER_RULES: no FSDP on weights (no all-gather per decode step), tensor-parallel as above;
  batch over `(data, fsdp)`.

A dimension whose size is not divisible by its mesh axes is replicated instead (e.g. the 2 kv
heads of Qwen2.5-3B on a tensor axis of 4), so every preset fits every mesh.
Activation constraints only act inside `mesh_rules(mesh, rules)`; outside it they are no-ops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]

_ACT_RULES: Rules = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
TRAIN_RULES: Rules = _ACT_RULES + (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("lora_rank", None),  # LoRA adapters: sharded like their kernel on the other axes
)
SAMPLER_RULES: Rules = _ACT_RULES + (
    ("vocab", "tensor"),
    ("embed", None),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("lora_rank", None),  # LoRA adapters: sharded like their kernel on the other axes
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 (= all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ValueError(f"MeshConfig sizes must be positive or a single -1, got {sizes}")


def _as_mesh_config(mesh_config) -> MeshConfig:
    if mesh_config is None:
        return MeshConfig()
    if isinstance(mesh_config, MeshConfig):
        return mesh_config
    get = (
        mesh_config.get if hasattr(mesh_config, "get") else lambda k, d: getattr(mesh_config, k, d)
    )
    unknown = set(mesh_config) - set(MESH_AXES) if isinstance(mesh_config, dict) else set()
    if unknown:
        raise ValueError(f"mesh config: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
    return MeshConfig(**{axis: int(get(axis, MeshConfig.__dataclass_fields__[axis].default))
                         for axis in MESH_AXES})  # fmt: skip


def make_mesh(mesh_config=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (default: all). Accepts a MeshConfig,
    a dict or a ConfigDict with those keys."""
    cfg = _as_mesh_config(mesh_config)
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {sizes}: {len(devices)} devices not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh (data, fsdp, tensor)={tuple(sizes)} needs {math.prod(sizes)} devices, "
            f"have {len(devices)}"
        )
    device_array = np.asarray(devices, dtype=object).reshape(sizes)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(device_array, MESH_AXES, axis_types=auto)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules: Rules):
    """Activate `mesh` and logical `rules`: trace jitted model calls inside this context."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Replicate any dimension its mesh axes do not divide evenly."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def sharding_for_names(names, shape, mesh: Mesh, rules: Rules) -> NamedSharding:
    """NamedSharding for one array with logical axis `names` (None entries = unsharded)."""
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    return NamedSharding(mesh, _fit_spec(spec, tuple(shape), mesh))


def shardings_for(boxed_tree, mesh: Mesh, rules: Rules):
    """Tree of NamedShardings (matching the unboxed tree) for a tree of `nn.Partitioned` leaves,
    e.g. `jax.eval_shape(model.init, ...)["params"]`. Unboxed leaves are replicated."""

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            return sharding_for_names(leaf.names, leaf.value.shape, mesh, rules)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def abstract_params(model: nn.Module, rng=None):
    """Boxed abstract params (shapes, dtypes, logical names) of a model taking
    `(tokens, positions, mask)`; nothing is allocated."""
    dummy = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return jax.eval_shape(lambda r, t: model.init(r, t, t, t)["params"], rng, dummy)


def param_shardings(model: nn.Module, mesh: Mesh, rules: Rules):
    """NamedShardings for the (unboxed) params tree of `model`."""
    return shardings_for(abstract_params(model), mesh, rules)


def init_sharded(model: nn.Module, mesh: Mesh, rules: Rules, rng: jax.Array):
    """Initialise `model`'s params directly into their shardings (no single-device copy).

    Returns a plain (unboxed) params pytree whose leaves are sharded jax.Arrays.
    """
    shardings = param_shardings(model, mesh, rules)

    def init(r):
        dummy = jnp.zeros((1, 1), jnp.int32)
        return nn.meta.unbox(model.init(r, dummy, dummy, dummy)["params"])

    with mesh_rules(mesh, rules):
        return jax.jit(init, out_shardings=shardings)(rng)


def reshard(params, model: nn.Module, mesh: Mesh, rules: Rules):
    """Move a params tree device-to-device onto `rules` (e.g. TRAIN_RULES -> SAMPLER_RULES)."""
    return jax.device_put(params, param_shardings(model, mesh, rules))


def cache_shardings(cache, mesh: Mesh, rules: Rules):
    """NamedShardings for a `KVCache` (k, v, mask_BxS, index) under `rules`."""
    from deepretrieval_jax.models import CACHE_KV_AXES, CACHE_MASK_AXES

    kv = sharding_for_names(CACHE_KV_AXES, cache.k.shape, mesh, rules)
    mask = sharding_for_names(CACHE_MASK_AXES, cache.mask_BxS.shape, mesh, rules)
    return type(cache)(k=kv, v=kv, mask_BxS=mask, index=NamedSharding(mesh, PartitionSpec()))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, T, ...] batch array: batch over `act_batch`, the rest replicated."""
    return NamedSharding(
        mesh, nn.logical_to_mesh_axes(("act_batch",) + (None,) * (ndim - 1), rules)
    )


def global_batch(local_arrays, mesh, rules):
    """Host-local [B_local, ...] numpy arrays -> global jax.Arrays sharded over the batch axes."""

    def one(x):
        sh = batch_sharding(mesh, rules, ndim=x.ndim)
        return jax.make_array_from_process_local_data(sh, x)

    return jax.tree.map(one, local_arrays)
