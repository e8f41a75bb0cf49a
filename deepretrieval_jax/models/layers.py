"""Decoder building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, decoder layer.

Shape legend: B batch, T query tokens, S key slots (T without a cache, cache length with one),
D embed_dim, H query heads, K kv heads, G = H // K query heads per kv head, Hd head_dim,
F mlp_dim. Parameters carry logical axis names (`embed, q_heads, kv_heads, head_dim, mlp`);
activations are constrained with `act_*` names. Both are mapped to mesh axes by the rules in
`deepretrieval_jax.sharding`; with no rules active the constraints are no-ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from deepretrieval_jax.models import lora
from deepretrieval_jax.models.config import ModelConfig

_NEG_INF = -1e30  # finite, so fully masked query rows give a uniform (finite) softmax


def param_with_axes(module: nn.Module, name: str, init, shape, names, dtype):
    """A parameter boxed with logical axis names (unbox before use)."""
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 as in the HF reference."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.config
        scale_D = param_with_axes(
            self, "scale", nn.initializers.ones, (cfg.embed_dim,), ("embed",), cfg.params_dtype
        )
        x32 = x_BxTxD.astype(jnp.float32)
        var_BxTx1 = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var_BxTx1 + cfg.rms_norm_eps)).astype(cfg.compute_dtype)
        return normed * scale_D.astype(cfg.compute_dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [Hd/2] in float32, with llama3 scaling when configured."""
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BxTxNxHd: jax.Array, positions_BxT: jax.Array, config: ModelConfig) -> jax.Array:
    """Rotary embedding in the HF "rotate half" layout (first half / second half pairs)."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    angles_BxTxHd2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    angles_BxTxHd = jnp.concatenate([angles_BxTxHd2, angles_BxTxHd2], axis=-1)
    cos = jnp.cos(angles_BxTxHd)[:, :, None, :]
    sin = jnp.sin(angles_BxTxHd)[:, :, None, :]
    x = x_BxTxNxHd.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x_BxTxNxHd.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with optional q/k/v bias and an optional KV cache.

    With a cache, the T new keys/values are written into slots [index, index+T) of this layer's
    cache and queries attend over the whole cache; `mask_BxTxS` says which slots each query sees.
    """

    config: ModelConfig
    layer_idx: int = 0

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache_kv=None):
        cfg = self.config
        dtype, pdtype = cfg.compute_dtype, cfg.params_dtype
        D, H, K, Hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nn.initializers.normal(0.02)

        def proj(name, heads, head_axis):
            w = param_with_axes(
                self,
                f"{name}_kernel",
                init,
                (D, heads, Hd),
                ("embed", head_axis, "head_dim"),
                pdtype,
            )
            y = jnp.einsum("btd,dnh->btnh", x_BxTxD, w.astype(dtype))
            y = y + lora.delta(self, name, x_BxTxD, (D,), (heads, Hd), ("embed",),
                               (head_axis, "head_dim"))  # fmt: skip
            if cfg.qkv_bias:
                b = param_with_axes(
                    self, f"{name}_bias", nn.initializers.zeros, (heads, Hd),
                    (head_axis, "head_dim"), pdtype,
                )  # fmt: skip
                y = y + b.astype(dtype)
            return y

        q_BxTxHxHd = proj("q", H, "q_heads")
        k_BxTxKxHd = proj("k", K, "kv_heads")
        v_BxTxKxHd = proj("v", K, "kv_heads")
        q_BxTxHxHd = nn.with_logical_constraint(
            apply_rope(q_BxTxHxHd, positions_BxT, cfg), ("act_batch", "act_len", "act_heads", None)
        )
        k_BxTxKxHd = apply_rope(k_BxTxKxHd, positions_BxT, cfg)

        new_cache_kv = None
        if cache_kv is not None:
            k_LxBxSxKxHd, v_LxBxSxKxHd, index = cache_kv
            start = (self.layer_idx, 0, index, 0, 0)
            k_LxBxSxKxHd = jax.lax.dynamic_update_slice(
                k_LxBxSxKxHd, k_BxTxKxHd[None].astype(k_LxBxSxKxHd.dtype), start
            )
            v_LxBxSxKxHd = jax.lax.dynamic_update_slice(
                v_LxBxSxKxHd, v_BxTxKxHd[None].astype(v_LxBxSxKxHd.dtype), start
            )
            new_cache_kv = (k_LxBxSxKxHd, v_LxBxSxKxHd, index)
            k_BxSxKxHd = k_LxBxSxKxHd[self.layer_idx].astype(dtype)
            v_BxSxKxHd = v_LxBxSxKxHd[self.layer_idx].astype(dtype)
        else:
            k_BxSxKxHd, v_BxSxKxHd = k_BxTxKxHd, v_BxTxKxHd
        k_BxSxKxHd = nn.with_logical_constraint(
            k_BxSxKxHd, ("act_batch", "act_len", "act_kv_heads", None)
        )

        B, T = q_BxTxHxHd.shape[:2]
        q_BxTxKxGxHd = q_BxTxHxHd.reshape(B, T, K, H // K, Hd)
        scores_BxKxGxTxS = jnp.einsum(
            "btkgh,bskh->bkgts", q_BxTxKxGxHd, k_BxSxKxHd, preferred_element_type=jnp.float32
        ) / np.sqrt(Hd).astype(np.float32)
        scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS, _NEG_INF)
        probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(dtype)
        out_BxTxKxGxHd = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxSxKxHd)
        out_BxTxHxHd = out_BxTxKxGxHd.reshape(B, T, H, Hd)

        o_HxHdxD = param_with_axes(
            self, "o_kernel", init, (H, Hd, D), ("q_heads", "head_dim", "embed"), pdtype
        )
        y_BxTxD = jnp.einsum("btnh,nhd->btd", out_BxTxHxHd, o_HxHdxD.astype(dtype))
        y_BxTxD = y_BxTxD + lora.delta(
            self, "o", out_BxTxHxHd, (H, Hd), (D,), ("q_heads", "head_dim"), ("embed",)
        )
        return y_BxTxD, new_cache_kv


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.config
        dtype, pdtype = cfg.compute_dtype, cfg.params_dtype
        D, F = cfg.embed_dim, cfg.mlp_dim
        init = nn.initializers.normal(0.02)
        gate_DxF = param_with_axes(self, "gate_kernel", init, (D, F), ("embed", "mlp"), pdtype)
        up_DxF = param_with_axes(self, "up_kernel", init, (D, F), ("embed", "mlp"), pdtype)
        down_FxD = param_with_axes(self, "down_kernel", init, (F, D), ("mlp", "embed"), pdtype)
        gate_BxTxF = x_BxTxD @ gate_DxF.astype(dtype)
        gate_BxTxF = gate_BxTxF + lora.delta(
            self, "gate", x_BxTxD, (D,), (F,), ("embed",), ("mlp",)
        )
        up_BxTxF = x_BxTxD @ up_DxF.astype(dtype)
        up_BxTxF = up_BxTxF + lora.delta(self, "up", x_BxTxD, (D,), (F,), ("embed",), ("mlp",))
        h_BxTxF = nn.with_logical_constraint(
            jax.nn.silu(gate_BxTxF) * up_BxTxF, ("act_batch", "act_len", "act_mlp")
        )
        y_BxTxD = h_BxTxF @ down_FxD.astype(dtype)
        return y_BxTxD + lora.delta(self, "down", h_BxTxF, (F,), (D,), ("mlp",), ("embed",))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: ModelConfig
    layer_idx: int = 0

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache_kv=None):
        cfg = self.config
        attn_out, cache_kv = Attention(cfg, self.layer_idx, name="attn")(
            RMSNorm(cfg, name="input_norm")(x_BxTxD), positions_BxT, mask_BxTxS, cache_kv
        )
        x_BxTxD = x_BxTxD + attn_out
        x_BxTxD = x_BxTxD + MLP(cfg, name="mlp")(RMSNorm(cfg, name="post_attn_norm")(x_BxTxD))
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("act_batch", "act_len", "act_embed"))
        return x_BxTxD, cache_kv
