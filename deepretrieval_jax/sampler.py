"""Batched, jitted autoregressive sampling from a causal LM, entirely on device.

Shape legend: B prompts, n samples per prompt, Bn = B * n rows of output, T prompt length (a
bucket), L = max_new_tokens, V vocabulary.

`sample` is one jitted call of the decode loop (`decode_loop.py`: `prefill` of the prompts
into a cache of T + L slots, then one token per step in `lax.while_loop` until every row has
finished or L tokens exist; `output`). The loop's types (`SamplingConfig`, `SampleOutput`,
`ModelFns`, `FinishReason`, `LoopState`) are importable from here, the public API.

`Sampler` wraps `sample` for a training run: it left-pads prompts to a length bucket and the
batch to the mesh's data-parallel size, reshards the trainer's params onto the sampler's
shardings device-to-device, and counts traces, so a run compiles a small bounded number of
times. Row order of the output: prompt-major (rows b*n .. b*n+n-1 belong to prompt b).
`causal_lm_fns` adapts the project's CausalLM (Qwen2, Llama) to `ModelFns`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepretrieval_jax.decode_loop import (  # noqa: F401 (re-exported: the sampler's API)
    QWEN25_EOS_IDS,
    FinishReason,
    LoopState,
    ModelFns,
    SampleOutput,
    SamplingConfig,
    decode,
    output,
    prefill,
)
from deepretrieval_jax.sampling import TokenBytes


def sample(
    params,
    prompt_tokens_BxT: jax.Array,
    prompt_mask_BxT: jax.Array,
    rng: jax.Array,
    *,
    model_fns: ModelFns,
    config: SamplingConfig,
    token_bytes: TokenBytes | None = None,
    max_new_tokens: jax.Array | int | None = None,
) -> SampleOutput:
    """Sample config.n completions for each left-padded prompt. Jit with static model_fns/config.

    Args:
      prompt_tokens_BxT, prompt_mask_BxT: left-padded prompts (mask 1 on real tokens; every row
        needs at least one).
      rng: a PRNG key; ignored by greedy decoding.
      token_bytes: the token byte table; required when config.stop is set.
      max_new_tokens: an optional traced limit in [1, config.max_new_tokens]; changing it
        does not recompile.
    """
    kw = dict(model_fns=model_fns, config=config, token_bytes=token_bytes)
    state = prefill(params, prompt_tokens_BxT, prompt_mask_BxT, rng, **kw)
    return output(decode(params, state, limit=max_new_tokens, **kw))


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length; past the largest, the next multiple of the largest."""
    for b in sorted(buckets):
        if length <= b:
            return b
    top = max(buckets)
    return -(-length // top) * top


DEFAULT_PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


class Sampler:
    """`sample` jitted once per (prompt bucket, batch size), with bucketing and shardings.

    Prompts are left-padded to the next bucket in `prompt_buckets`, and the batch to a multiple
    of the data-parallel size (dummy rows, dropped from the output), so a training run whose
    prompts vary in length compiles at most once per bucket. `trace_count` counts the traces.

    With a mesh, params are resharded device-to-device to `param_shardings` (the sampler's
    rules: no FSDP on weights; default: replicated), the batch is split over `batch_axes`, and
    tracing happens inside the mesh context so the model's logical constraints apply.
    `weights_dtype` (e.g. "bfloat16", the model's compute dtype) casts floating params to it on
    that copy: the model casts every weight to its compute dtype on use, so samples are
    unchanged, while fp32 master weights cost half the bytes per chip and per decode step.
    """

    def __init__(
        self,
        model_fns: ModelFns,
        config: SamplingConfig,
        *,
        token_bytes: TokenBytes | None = None,
        mesh: Mesh | None = None,
        param_shardings=None,
        batch_axes: Sequence[str] = ("data",),
        prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
        weights_dtype: str | None = None,
    ):
        if config.all_stops and token_bytes is None:
            raise ValueError("Sampler: SamplingConfig.stop is set, so token_bytes must be given")
        self.weights_dtype = weights_dtype
        self.config = config
        self.model_fns = model_fns
        self.token_bytes = token_bytes
        self.mesh = mesh
        self.prompt_buckets = tuple(prompt_buckets)
        self.trace_count = 0
        self._batch_multiple = 1
        self._param_shardings = param_shardings
        out_shardings = None
        if mesh is not None:
            batch_axes = tuple(batch_axes)
            self._batch_multiple = int(np.prod([mesh.shape[a] for a in batch_axes]))
            self._batch_sharding = NamedSharding(mesh, PartitionSpec(batch_axes))
            self._replicated = NamedSharding(mesh, PartitionSpec())
            if self._param_shardings is None:
                self._param_shardings = self._replicated
            out_shardings = self._batch_sharding

        def traced(params, tokens_BxT, mask_BxT, rng, limit, token_bytes):
            self.trace_count += 1
            return sample(
                params,
                tokens_BxT,
                mask_BxT,
                rng,
                model_fns=model_fns,
                config=config,
                token_bytes=token_bytes,
                max_new_tokens=limit,
            )

        self._sample = jax.jit(traced, out_shardings=out_shardings)
        if weights_dtype is not None:  # reshard and cast device-to-device, leaf by leaf
            self._cast = LeafwiseCast(weights_dtype, self._param_shardings)

    def prepare(self, params, prompt_tokens_BxT, prompt_mask_BxT, rng, max_new_tokens):
        """Validates and pads a batch, places everything on the mesh; returns
        (B real prompts, params, tokens, mask, rng, limit, token_bytes)."""
        tokens = np.asarray(prompt_tokens_BxT, np.int32)
        mask = np.asarray(prompt_mask_BxT, np.int32)
        B, T = tokens.shape
        if np.any(mask.sum(axis=1) == 0):
            raise ValueError("Sampler: every prompt needs at least one real token")
        if np.any(np.diff(mask, axis=1) < 0):
            raise ValueError("Sampler: prompts must be left-padded (mask 0...0 1...1 per row)")
        T_pad = bucket_length(T, self.prompt_buckets) - T
        B_pad = -B % self._batch_multiple
        tokens = np.pad(tokens, ((0, B_pad), (T_pad, 0)), constant_values=self.config.pad_id)
        mask = np.pad(mask, ((0, B_pad), (T_pad, 0)))
        mask[B:, -1] = 1  # dummy rows hold one real (pad) token
        limit = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not 1 <= limit <= self.config.max_new_tokens:
            raise ValueError(
                f"Sampler: max_new_tokens must be in [1, {self.config.max_new_tokens}] "
                f"(SamplingConfig.max_new_tokens), got {limit}"
            )
        limit = np.int32(limit)
        rng = jax.random.key(0) if rng is None else rng
        token_bytes = self.token_bytes
        if self.mesh is not None:
            # Device-to-device: jax.Arrays move between shardings without visiting the host.
            if self.weights_dtype is None:
                params = jax.device_put(params, self._param_shardings)
            else:
                params = self._cast(params)
            tokens, mask = jax.device_put((tokens, mask), self._batch_sharding)
            rng, limit, token_bytes = jax.device_put((rng, limit, token_bytes), self._replicated)
        elif self.weights_dtype is not None:
            params = self._cast(params)
        return B, params, tokens, mask, rng, limit, token_bytes

    def mesh_context(self):
        """The mesh as a context (the model's logical constraints resolve in it), or a no-op."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def __call__(
        self,
        params,
        prompt_tokens_BxT,
        prompt_mask_BxT,
        rng: jax.Array | None = None,
        max_new_tokens: int | None = None,
    ) -> SampleOutput:
        """Sample for left-padded prompts (host or device arrays); see `sample`."""
        B, *args = self.prepare(params, prompt_tokens_BxT, prompt_mask_BxT, rng, max_new_tokens)
        with self.mesh_context():
            out = self._sample(*args)
        if out.tokens_BnxL.shape[0] != B * self.config.n:
            out = jax.tree.map(lambda x: x[: B * self.config.n], out)
        return out


def cast_leaf(x, dtype):
    """`x` in `dtype` if it is floating point (None: as it is)."""
    if dtype is None or not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    return x.astype(dtype)


def cast_weights(params, dtype):
    """Floating-point leaves of `params` cast to `dtype` (the sampler's copy of the weights)."""
    return jax.tree.map(functools.partial(cast_leaf, dtype=dtype), params)


class LeafwiseCast:
    """The sampler's copy of the weights from the trainer's: one small program per leaf casts
    it to `dtype` and moves it to its sampler sharding (None: where it is), in tree order.

    One program for the whole tree held a second copy of the output as temporaries: XLA:TPU
    all-gathers an FSDP-sharded minor dimension into a transposed buffer and copies it to the
    output's layout, and schedules the gathers together (docs/benchmarks.md, the compiled
    `sampler.reshard`). Leaf by leaf, the peak is the finished leaves plus one leaf's buffers.
    """

    def __init__(self, dtype, shardings=None):
        self.dtype = dtype
        self.shardings = shardings  # a pytree of shardings like params', or one for all
        self._programs = {}

    def program(self, sharding):
        """The jitted cast of one leaf to `sharding` (one per distinct sharding)."""
        if sharding not in self._programs:
            self._programs[sharding] = jax.jit(
                functools.partial(cast_leaf, dtype=self.dtype), out_shardings=sharding
            )
        return self._programs[sharding]

    def leaves_with_shardings(self, params) -> tuple[list, list, Any]:
        """(leaves, their sampler shardings, treedef) of `params`, flattened once."""
        leaves, treedef = jax.tree.flatten(params)
        if self.shardings is None or isinstance(self.shardings, jax.sharding.Sharding):
            return leaves, [self.shardings] * len(leaves), treedef
        return leaves, treedef.flatten_up_to(self.shardings), treedef

    def __call__(self, params):
        leaves, shardings, treedef = self.leaves_with_shardings(params)
        return treedef.unflatten(
            [self.program(s)(x) for x, s in zip(leaves, shardings, strict=True)]
        )


# ------------------------------------------------------------------ the project's CausalLM
def repeat_kv_cache(cache, n: int):
    """Repeat every row of a `models.KVCache` n times (k, v: [L, B, S, K, Hd])."""
    return cache.replace(
        k=jnp.repeat(cache.k, n, axis=1),
        v=jnp.repeat(cache.v, n, axis=1),
        mask_BxS=jnp.repeat(cache.mask_BxS, n, axis=0),
    )


def causal_lm_fns(model_config, cache_dtype: str | None = None, rules=None) -> ModelFns:
    """ModelFns for `models.CausalLM` (Qwen2 and Llama alike).

    Prefill computes the LM head on the last position only (B x V logits instead of B x T x V).
    `cache_dtype` ("bfloat16" for a bf16 cache) defaults to the compute dtype; `rules` are the
    logical axis rules under which the model's activation constraints resolve (sampler rules).
    """
    from flax import linen as nn

    from deepretrieval_jax import models

    model = models.CausalLM(model_config)

    def last_logits(module, tokens_BxT, positions_BxT, mask_BxT, cache):
        hidden_BxTxD, cache = module.hidden_states(tokens_BxT, positions_BxT, mask_BxT, cache)
        hidden_Bx1xD = hidden_BxTxD[:, -1:]
        if module.config.tie_embeddings:
            return module.transformer.embedder.attend(hidden_Bx1xD), cache
        return module.lm_head(hidden_Bx1xD), cache

    def apply(params, tokens_BxT, positions_BxT, mask_BxT, cache):
        with nn.logical_axis_rules(rules or ()):
            logits, cache = model.apply(
                {"params": params}, tokens_BxT, positions_BxT, mask_BxT, cache, method=last_logits
            )
            cache = cache.replace(
                k=nn.with_logical_constraint(cache.k, models.CACHE_KV_AXES),
                v=nn.with_logical_constraint(cache.v, models.CACHE_KV_AXES),
                mask_BxS=nn.with_logical_constraint(cache.mask_BxS, models.CACHE_MASK_AXES),
            )
        return logits, cache

    def init_cache(batch: int, max_len: int):
        return models.init_cache(model_config, batch, max_len, cache_dtype)

    return ModelFns(apply=apply, init_cache=init_cache, repeat_cache=repeat_kv_cache)
