"""LoRA (Hu et al. 2021) on the decoder's projections: adapters, split/merge, PEFT export.

A targeted projection y = x W becomes y = x W + (alpha / r) (x A) B with A [in..., r] and
B [r, out...] (the kernel's own input/output axes, so A @ B has W's shape). `ModelConfig.lora_rank`
> 0 makes `model.init` create `{t}_lora_a` / `{t}_lora_b` next to `{t}_kernel` for every target t
in `lora_targets` (q, k, v, o, gate, up, down); B starts at 0, so a fresh adapter is exactly the
base model. A params tree WITHOUT the adapter leaves runs the plain base model (the module skips
a missing adapter), which is how the frozen base serves as the PPO reference with no second copy.

Adapter params carry logical axis names: A's input axes and B's output axes are the kernel's
(`embed`, `q_heads`/`kv_heads`, `head_dim`, `mlp`), the rank axis is `lora_rank` (replicated in
`sharding.TRAIN_RULES` / `SAMPLER_RULES`), so adapters shard like the weights they adapt.

Tree helpers work on nested dicts of any leaves (arrays, ShapeDtypeStructs, boxed params):
`split` -> (trainable, frozen), `combine` (deep merge), `merge` (W + scale A B, adapters
dropped: the plain model HF export writes), `save_peft` (an adapter directory `peft` loads).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from deepretrieval_jax.models.config import LORA_TARGETS as TARGETS

_MARK = "_lora_"
# Trainable subtrees besides the adapters: a shared critic's value head.
_TRAINABLE_KEYS = ("value_head",)
# target -> (HF module under model.layers.{i}, Flax module under transformer/layers_{i})
_HF_MODULES = {
    "q": ("self_attn.q_proj", "attn"), "k": ("self_attn.k_proj", "attn"),
    "v": ("self_attn.v_proj", "attn"), "o": ("self_attn.o_proj", "attn"),
    "gate": ("mlp.gate_proj", "mlp"), "up": ("mlp.up_proj", "mlp"), "down": ("mlp.down_proj", "mlp"),
}  # fmt: skip


def scale(config) -> float:
    """alpha / r, the factor on (x A) B."""
    return config.lora_alpha / config.lora_rank


def base_config(config):
    """The same model without adapters (e.g. the critic, which trains fully)."""
    return config.replace(lora_rank=0) if config.lora_rank else config


def _a_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)  # PEFT's default (kaiming-uniform, a = sqrt(5)) bound
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def delta(module: nn.Module, target: str, x, in_shape, out_shape, in_names, out_names):
    """(alpha / r) (x A) B for `target` of `module`, or 0 when the target has no adapter.

    `x` ends in `in_shape`; the result ends in `out_shape`. Called inside a compact module.
    """
    cfg = module.config
    a_name, b_name = f"{target}{_MARK}a", f"{target}{_MARK}b"
    if not cfg.lora_rank or target not in cfg.lora_targets:
        return 0.0
    if not (module.is_initializing() or module.has_variable("params", a_name)):
        return 0.0  # base-only params: the frozen base model (reference policy)
    r, dtype, pdtype = cfg.lora_rank, cfg.compute_dtype, cfg.params_dtype
    a = module.param(
        a_name,
        nn.with_logical_partitioning(_a_init(int(np.prod(in_shape))), (*in_names, "lora_rank")),
        (*in_shape, r),
        pdtype,
    )
    b = module.param(
        b_name,
        nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", *out_names)),
        (r, *out_shape),
        pdtype,
    )
    h = jnp.tensordot(x, a.astype(dtype), axes=len(in_shape))
    return jnp.tensordot(h, b.astype(dtype), axes=1) * jnp.asarray(scale(cfg), dtype)


# ------------------------------------------------------------------------- tree helpers
def _is_trainable(key: str) -> bool:
    return _MARK in key or key in _TRAINABLE_KEYS


def has_adapters(params) -> bool:
    """Whether any leaf of `params` is a LoRA adapter."""
    if not isinstance(params, dict):
        return False
    return any(_MARK in k or has_adapters(v) for k, v in params.items())


def is_adapter_tree(params) -> bool:
    """True iff `params` holds adapters and nothing else frozen (the LoRA TrainState's actor)."""
    trainable, frozen = split(params)
    return has_adapters(trainable) and not frozen


def split(params) -> tuple[dict, dict]:
    """(trainable, frozen): adapters (and a shared critic's value head) vs the base weights.
    Empty subtrees are left out of both."""
    trainable, frozen = {}, {}
    for k, v in params.items():
        if _is_trainable(k):
            trainable[k] = v
        elif isinstance(v, dict):
            t, f = split(v)
            if t:
                trainable[k] = t
            if f:
                frozen[k] = f
        else:
            frozen[k] = v
    return trainable, frozen


def combine(base, extra) -> dict:
    """Deep merge of two nested dicts; `extra`'s leaves win."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = combine(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge(params, config) -> dict:
    """The plain model's params: every adapted kernel W + (alpha / r) A B, adapters removed.
    Jit-able; a tree without adapters is returned as is."""

    def walk(tree):
        out = {}
        for k, v in tree.items():
            if _MARK in k:
                continue
            out[k] = walk(v) if isinstance(v, dict) else v
        for t in TARGETS:
            a, b = tree.get(f"{t}{_MARK}a"), tree.get(f"{t}{_MARK}b")
            if a is not None:
                w = out[f"{t}_kernel"]
                ab = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
                out[f"{t}_kernel"] = (w.astype(jnp.float32) + scale(config) * ab).astype(w.dtype)
        return out

    return walk(params)


# --------------------------------------------------------------------------- PEFT export
def save_peft(params, config, out_dir: str | os.PathLike, base_model: str = "") -> Path:
    """Write the adapters of `params` as a PEFT LoRA directory (adapter_config.json +
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained(hf_base, out_dir)` loads.

    PEFT layout: lora_A.weight [r, in], lora_B.weight [out, r] of nn.Linear modules, scaling
    lora_alpha / r; our A [in..., r] and B [r, out...] flatten to those (heads then head_dim,
    the order `hf_io` uses for q/k/v/o).
    """
    from safetensors.numpy import save_file

    if not config.lora_rank:
        raise ValueError("save_peft: ModelConfig.lora_rank is 0 (no adapters to write)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(config.num_layers):
        layer = params["transformer"][f"layers_{i}"]
        for t in config.lora_targets:
            hf_module, flax_module = _HF_MODULES[t]
            sub = layer[flax_module]
            if f"{t}{_MARK}a" not in sub:
                raise ValueError(f"save_peft: layers_{i}/{flax_module} has no {t} adapter")
            a = np.asarray(jax.device_get(sub[f"{t}{_MARK}a"]), np.float32)
            b = np.asarray(jax.device_get(sub[f"{t}{_MARK}b"]), np.float32)
            prefix = f"base_model.model.model.layers.{i}.{hf_module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(
                a.reshape(-1, config.lora_rank).T
            )
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(
                b.reshape(config.lora_rank, -1).T
            )
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(_HF_MODULES[t][0].split(".")[1] for t in config.lora_targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    return out
