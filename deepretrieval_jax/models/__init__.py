"""Qwen2/Qwen2.5 and Llama 3.x decoders in Flax Linen: config presets, LM, critic, KV cache."""

from deepretrieval_jax.models.config import PRESETS, ModelConfig, RopeScaling
from deepretrieval_jax.models.transformer import (
    CACHE_KV_AXES,
    CACHE_MASK_AXES,
    CausalLM,
    KVCache,
    Transformer,
    ValueModel,
    init_cache,
)

__all__ = [
    "CACHE_KV_AXES",
    "CACHE_MASK_AXES",
    "PRESETS",
    "CausalLM",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "ValueModel",
    "init_cache",
]
