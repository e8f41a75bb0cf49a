"""The policy's model config and starting params, from an experiment config.

`model_config(cfg)` turns `config.model` (a preset, or model.hf_path's config.json, plus
overrides and LoRA) into a `ModelConfig`; `load_policy_params` gives the starting params (an SFT
checkpoint, a HF checkpoint, or a random init, loudly when the model is large), created directly
in their shardings. Errors name the config field.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from deepretrieval_jax import checkpoint, models, sharding
from deepretrieval_jax.config import as_dict
from deepretrieval_jax.models import lora as lora_lib

RANDOM_INIT_WARN_PARAMS = 100e6  # a random init above this size is almost surely a mistake


def model_config(cfg) -> models.ModelConfig:
    """`config.model.preset` (or, when it is "", model.hf_path's config.json) + overrides
    (and `config.model.lora`)."""
    overrides = as_dict(cfg.model.overrides)
    lora = cfg.model.get("lora")
    if lora is not None:
        overrides.update(
            lora_rank=lora.rank, lora_alpha=lora.alpha, lora_targets=tuple(lora.targets)
        )
    if not cfg.model.preset:
        if not cfg.model.hf_path:
            raise ValueError(
                "config.model: preset is empty, so model.hf_path must name a HF checkpoint "
                "directory whose config.json gives the model's shape"
            )
        from deepretrieval_jax import hf_io  # noqa: PLC0415

        try:
            path = hf_io.resolve_checkpoint_dir(Path(cfg.model.hf_path).expanduser())
            return hf_io.config_from_checkpoint(path, **overrides)
        except (TypeError, ValueError, OSError) as e:
            raise ValueError(f"config.model.hf_path: {e}") from e
    try:
        return models.ModelConfig.preset(cfg.model.preset, **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model: {e}") from e


def init_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(actor, critic, train state) keys of a run with `config.seed`: a LoRA run's randomly
    initialised base is re-created from the actor key when its adapters are evaluated."""
    k_actor, k_critic, k_state = jax.random.split(jax.random.key(seed), 3)
    return k_actor, k_critic, k_state


def init_params(module: nn.Module, mesh, rules, rng) -> dict:
    """Random params created directly in their shardings."""
    return sharding.init_sharded(module, mesh, rules, rng)


def load_policy_params(cfg, module: nn.Module, mesh, rules, rng) -> dict:
    """The policy's starting params: an SFT checkpoint, a HF checkpoint, or random init.

    `config.model.init_checkpoint` is a CheckpointManager directory whose state holds the
    params under "params" (what `rl.sft` writes). With LoRA these are the base weights only
    (the adapters start fresh in `rl.state.init_train_state`).
    """
    if getattr(module.config, "lora_rank", 0) and isinstance(module, models.CausalLM):
        module = models.CausalLM(lora_lib.base_config(module.config))
    shardings = sharding.param_shardings(module, mesh, rules)
    if cfg.model.init_checkpoint:
        path = Path(cfg.model.init_checkpoint).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"config.model.init_checkpoint: {path} is not a directory")
        abstract = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            nn.meta.unbox(sharding.abstract_params(module)),
            shardings,
        )
        logging.info("Policy params from checkpoint %s", path)
        return checkpoint.restore_params(path, abstract, key="params")
    if cfg.model.hf_path:
        from deepretrieval_jax import hf_io  # noqa: PLC0415  (heavy: torch-free safetensors)

        logging.info("Policy params from HF checkpoint %s", cfg.model.hf_path)
        _, params = hf_io.load_params(cfg.model.hf_path, module.config, shardings=shardings)
        return params
    warn_random_init(module.config)
    logging.info("Policy params: random init (seed %d)", cfg.seed)
    return init_params(module, mesh, rules, rng)


def warn_random_init(model_cfg: models.ModelConfig) -> None:
    """Says loudly when a large model is about to start from random weights."""
    abstract = nn.meta.unbox(sharding.abstract_params(models.CausalLM(model_cfg)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    if n > RANDOM_INIT_WARN_PARAMS:
        logging.warning(
            "\n%s\nRANDOM INIT of a %.0fM-parameter model: no config.model.hf_path or "
            "init_checkpoint is set, so the policy starts from random weights. Set "
            "--config.model.hf_path=DIR (or launch/import_gguf.py a GGUF file) to start from a "
            "pretrained model.\n%s",
            "!" * 78,
            n / 1e6,
            "!" * 78,
        )


def param_count(params) -> int:
    return int(sum(jnp.size(x) for x in jax.tree.leaves(params)))
