"""The decoder trunk, the causal LM (policy / reference) and the value model (critic), plus
the KV cache the sampler drives.

Shape legend: B batch, T tokens in this call, S cache slots, L layers, K kv heads, Hd head_dim,
D embed_dim, V vocab. Parameter tree (Linen, plain dicts after unboxing):

    transformer/embedder/embedding            [V, D]
    transformer/layers_{i}/input_norm/scale   [D]
    transformer/layers_{i}/attn/{q,k,v}_kernel [D, H|K, Hd]  ({q,k,v}_bias [H|K, Hd] if qkv_bias)
    transformer/layers_{i}/attn/o_kernel      [H, Hd, D]
    transformer/layers_{i}/post_attn_norm/scale [D]
    transformer/layers_{i}/mlp/{gate,up}_kernel [D, F], down_kernel [F, D]
    transformer/final_norm/scale              [D]
    lm_head/kernel [D, V]   (CausalLM, untied only)   value_head/{kernel [D], bias []} (ValueModel)

Layers are a Python loop (one `layers_{i}` subtree each), not `nn.scan`: the HF name table maps
one tensor to one leaf, and compile time stays modest (Qwen2.5-3B, 36 layers, bf16 forward at
B=8, T=256: 2 s trace + 10 s XLA compile on a shared 2-core CPU), paid once per run.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from deepretrieval_jax.models import lora
from deepretrieval_jax.models.config import DTYPES, ModelConfig
from deepretrieval_jax.models.layers import DecoderLayer, RMSNorm, param_with_axes

# Logical axis names of the cache arrays, for sharding them like the activations they hold.
CACHE_KV_AXES = ("layers", "act_batch", "act_len", "act_kv_heads", None)
CACHE_MASK_AXES = ("act_batch", "act_len")


@flax.struct.dataclass
class KVCache:
    """Per-layer keys and values of every token written so far.

    k, v:     [L, B, S, K, Hd] in the compute dtype (or `init_cache`'s dtype)
    mask_BxS: bool, slot holds a real (non-padding) token
    index:    int32 scalar, the next slot to write
    """

    k: jax.Array
    v: jax.Array
    mask_BxS: jax.Array
    index: jax.Array


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache with `max_len` slots per row."""
    if batch <= 0 or max_len <= 0:
        raise ValueError(f"init_cache: batch and max_len must be positive, got {batch}, {max_len}")
    dtype = DTYPES.get(dtype, dtype) if dtype is not None else config.compute_dtype
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask_BxS=jnp.zeros((batch, max_len), jnp.bool_),
        index=jnp.zeros((), jnp.int32),
    )


class Embedder(nn.Module):
    """Token embedding; `attend` is the tied LM head (hidden @ embedding.T)."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embedding = param_with_axes(
            self,
            "embedding",
            nn.initializers.normal(0.02),
            (cfg.vocab_size, cfg.embed_dim),
            ("vocab", "embed"),
            cfg.params_dtype,
        )

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        # Gather from an explicitly replicated table: a gather from a vocab-sharded table makes
        # XLA fall back to an involuntary full rematerialisation (same all-gather, more copies).
        table_VxD = nn.with_logical_constraint(self.embedding, (None, None))
        return jnp.take(table_VxD, tokens_BxT, axis=0).astype(self.config.compute_dtype)

    def attend(self, x_BxTxD: jax.Array) -> jax.Array:
        emb_VxD = self.embedding.astype(self.config.compute_dtype)
        return jnp.einsum("btd,vd->btv", x_BxTxD, emb_VxD, preferred_element_type=jnp.float32)


class Transformer(nn.Module):
    """Embedding, decoder layers and final norm -> hidden states [B, T, D]."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
        self.embedder = Embedder(cfg)
        self.layers = [layer_cls(cfg, i, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg)

    def __call__(self, tokens_BxT, positions_BxT, mask_BxT, cache: KVCache | None = None):
        B, T = tokens_BxT.shape
        valid_BxT = jnp.asarray(mask_BxT).astype(jnp.bool_)
        if cache is None:
            causal_TxT = jnp.tril(jnp.ones((T, T), jnp.bool_))
            # A query always sees its own slot: padding rows stay finite and causal.
            mask_BxTxS = (valid_BxT[:, None, :] | jnp.eye(T, dtype=jnp.bool_)) & causal_TxT[None]
            cache_kv = None
        else:
            S = cache.mask_BxS.shape[1]
            if cache.mask_BxS.shape[0] != B or T > S:
                raise ValueError(
                    f"KVCache holds {cache.mask_BxS.shape} (batch, slots); got tokens {(B, T)}"
                )
            slot_mask_BxS = jax.lax.dynamic_update_slice(
                cache.mask_BxS, valid_BxT, (0, cache.index)
            )
            query_slot_T = cache.index + jnp.arange(T)
            slot_S = jnp.arange(S)
            causal_TxS = slot_S[None, :] <= query_slot_T[:, None]
            own_TxS = slot_S[None, :] == query_slot_T[:, None]
            mask_BxTxS = (slot_mask_BxS[:, None, :] | own_TxS) & causal_TxS[None]
            cache_kv = (cache.k, cache.v, cache.index)

        x_BxTxD = self.embedder(tokens_BxT)
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("act_batch", "act_len", "act_embed"))
        for layer in self.layers:
            x_BxTxD, cache_kv = layer(x_BxTxD, positions_BxT, mask_BxTxS, cache_kv)
        hidden_BxTxD = self.final_norm(x_BxTxD)

        new_cache = None
        if cache is not None:
            k, v, _ = cache_kv
            k = nn.with_logical_constraint(k, CACHE_KV_AXES)
            v = nn.with_logical_constraint(v, CACHE_KV_AXES)
            new_cache = KVCache(k=k, v=v, mask_BxS=slot_mask_BxS, index=cache.index + T)
        return hidden_BxTxD, new_cache


class CausalLM(nn.Module):
    """Decoder with an LM head: (tokens, positions, mask, cache) -> (logits float32, cache)."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.transformer = Transformer(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = LMHead(cfg)

    def hidden_states(self, tokens_BxT, positions_BxT, mask_BxT, cache=None):
        """Final-norm hidden states [B, T, D] and the updated cache."""
        return self.transformer(tokens_BxT, positions_BxT, mask_BxT, cache)

    def lm_logits(self, hidden_BxTxD):
        """Logits [B, T, V] of final-norm hidden states (tied embedding or the LM head)."""
        if self.config.tie_embeddings:
            logits_BxTxV = self.transformer.embedder.attend(hidden_BxTxD)
        else:
            logits_BxTxV = self.lm_head(hidden_BxTxD)
        return nn.with_logical_constraint(logits_BxTxV, ("act_batch", "act_len", "act_vocab"))

    def __call__(self, tokens_BxT, positions_BxT, mask_BxT, cache=None):
        hidden_BxTxD, cache = self.transformer(tokens_BxT, positions_BxT, mask_BxT, cache)
        return self.lm_logits(hidden_BxTxD), cache


class LMHead(nn.Module):
    """Untied output projection [D, V]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.config
        w_DxV = param_with_axes(
            self,
            "kernel",
            nn.initializers.normal(0.02),
            (cfg.embed_dim, cfg.vocab_size),
            ("embed", "vocab"),
            cfg.params_dtype,
        )
        return jnp.einsum(
            "btd,dv->btv", x_BxTxD, w_DxV.astype(cfg.compute_dtype),
            preferred_element_type=jnp.float32,
        )  # fmt: skip


class ValueModel(nn.Module):
    """The same trunk with a scalar head: -> (values_BxT float32, cache). The critic."""

    config: ModelConfig

    def setup(self):
        # The critic trains fully: no LoRA adapters on its trunk (models/lora.py).
        self.transformer = Transformer(lora.base_config(self.config))
        self.value_head = ValueHead(self.config)

    def __call__(self, tokens_BxT, positions_BxT, mask_BxT, cache=None):
        hidden_BxTxD, cache = self.transformer(tokens_BxT, positions_BxT, mask_BxT, cache)
        return self.value_head(hidden_BxTxD), cache


class ValueHead(nn.Module):
    """values = hidden . kernel + bias, in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden_BxTxD: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(1.0 / cfg.embed_dim**0.5)
        w_D = param_with_axes(self, "kernel", init, (cfg.embed_dim,), ("embed",), jnp.float32)
        b = param_with_axes(self, "bias", nn.initializers.zeros, (), (), jnp.float32)
        return jnp.einsum("btd,d->bt", hidden_BxTxD.astype(jnp.float32), w_D) + b
