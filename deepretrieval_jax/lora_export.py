"""Export a LoRA PPO run: its adapters (orbax checkpoint) on its base weights, as a merged HF
checkpoint and/or a PEFT adapter directory.

A LoRA run's checkpoints hold the adapters (`actor_params`) and their optimiser state only; the
frozen base is the run's `model.hf_path` / `model.init_checkpoint` (or its seeded random init),
so exporting needs both. `merged_policy_params` returns the plain model (W + alpha / r A B), what
`hf_io.save_params` writes and `transformers` loads; `models.lora.save_peft` writes the adapters
for `peft.PeftModel.from_pretrained(base, dir)`.
"""

from __future__ import annotations

import os

import jax
from flax import linen as nn

from deepretrieval_jax import checkpoint, sharding
from deepretrieval_jax.models import CausalLM, ModelConfig, lora


def restore_adapters(directory: str | os.PathLike, model_config: ModelConfig, *, step=None,
                     key: str = "actor_params", mesh=None, rules=None):  # fmt: skip
    """The adapters saved under `key` (a LoRA TrainState's actor), sharded like the model's."""
    if not model_config.lora_rank:
        raise ValueError(
            "restore_adapters: model_config.lora_rank is 0; give the run's LoRA config"
        )
    path = checkpoint._as_path(directory)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    module = CausalLM(model_config)
    adapters, _ = lora.split(nn.meta.unbox(sharding.abstract_params(module)))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, adapters)
    else:
        all_sh = sharding.param_shardings(module, mesh, rules or sharding.TRAIN_RULES)
        shardings, _ = lora.split(all_sh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), adapters, shardings
    )
    return checkpoint.restore_params(path, target, step, key)


def merged_policy_params(directory, model_config: ModelConfig, base_params, *, step=None,
                         key: str = "actor_params", merge: bool = True, mesh=None):  # fmt: skip
    """Base + the checkpoint's adapters; merged into plain params unless `merge=False`."""
    adapters = restore_adapters(directory, model_config, step=step, key=key, mesh=mesh)
    params = lora.combine(base_params, adapters)
    return jax.jit(lora.merge, static_argnums=1)(params, model_config) if merge else params


def export(checkpoint_dir, out_dir, config: ModelConfig, base_dir, peft_dir=None, *, step=None,
           key: str = "actor_params", **save_kw):  # fmt: skip
    """launch/export_hf.py for a LoRA run: merged HF checkpoint in `out_dir` (+ PEFT adapters in
    `peft_dir`). `base_dir`: an HF directory or a checkpoint directory of the base weights."""
    from deepretrieval_jax import hf_io

    if not base_dir:
        raise ValueError("a LoRA export (lora_rank > 0) needs the base weights' directory")
    mesh = sharding.make_mesh()
    base_cfg = lora.base_config(config)
    if os.path.isfile(os.path.join(base_dir, hf_io.CONFIG_FILE)):  # an HF directory
        _, base = hf_io.load_params(base_dir, base_cfg, mesh=mesh)
    else:
        base = checkpoint.restore_policy_params(base_dir, base_cfg, mesh=mesh)
    params = merged_policy_params(
        checkpoint_dir, config, base, step=step, key=key, merge=False, mesh=mesh
    )
    if peft_dir:
        lora.save_peft(params, config, peft_dir, base_model=str(base_dir))
    return hf_io.save_params(lora.merge(params, config), base_cfg, out_dir, **save_kw)
