"""Batched, jitted autoregressive sampling from a causal LM, entirely on device.

Shape legend: B prompts, n samples per prompt, Bn = B * n rows of output, T prompt length (a
bucket), L = max_new_tokens, V vocabulary.

The sampler knows the model only through `ModelFns` callbacks (the flax lm1b sampler's idea):
`apply(params, tokens_BxT, positions_BxT, mask_BxT, cache) -> (logits, cache)` and
`init_cache(batch, max_len) -> cache`. One call of the jitted `sample`:
  1. prefills the left-padded prompts once at batch B into a preallocated cache of T + L slots;
  2. repeats the cache rows n times (GRPO groups share one prefill);
  3. samples the first token from the prefill's last logits, then decodes one token per step
     in `lax.while_loop` until every row has finished or L tokens exist; no host round trip.
A row finishes on an EOS id (kept, masked in), on a stop string (exact byte match, see
`sampling`; the string's tokens are kept) or at the token limit. Later columns hold `pad_id`
with mask 0. Log-probs are recorded under the raw model distribution (temperature 1, no
truncation; PPO's old log-probs) and under the distribution actually sampled from (0 for
greedy: a point mass).

`Sampler` wraps `sample` for a training run: it left-pads prompts to a length bucket and the
batch to the mesh's data-parallel size, reshards the trainer's params onto the sampler's
shardings device-to-device, and counts traces, so a run compiles a small bounded number of
times. Row order of the output: prompt-major (rows b*n .. b*n+n-1 belong to prompt b).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepretrieval_jax import sampling
from deepretrieval_jax.sampling import TokenBytes

QWEN25_EOS_IDS = (151643, 151645)  # <|endoftext|>, <|im_end|>


class FinishReason(enum.IntEnum):
    EOS = 0
    STOP_STRING = 1
    MAX_TOKENS = 2


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens and when to stop. Frozen and hashable: a static argument to jit."""

    method: str = "sample"  # "greedy" (argmax) | "sample" (from the processed distribution)
    temperature: float = 1.0  # divides the logits; > 0
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 = off
    max_new_tokens: int = 128  # completion buffer length L (per-call limits may be lower)
    n: int = 1  # samples per prompt
    eos_ids: tuple[int, ...] = QWEN25_EOS_IDS  # ids that end a row (the id is kept)
    stop: tuple[str, ...] = ()  # stop strings, matched exactly on bytes (needs TokenBytes)
    pad_id: int = QWEN25_EOS_IDS[0]  # written after a row has finished (mask 0)

    def __post_init__(self):
        # Lists from a ConfigDict become tuples so the config stays hashable.
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.method not in ("greedy", "sample"):
            raise ValueError(
                f"SamplingConfig.method must be 'greedy' or 'sample', got {self.method!r}"
            )
        if not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"SamplingConfig.min_p must be in [0, 1), got {self.min_p}")
        if self.max_new_tokens <= 0 or self.n <= 0:
            raise ValueError(
                f"SamplingConfig.max_new_tokens and n must be positive, "
                f"got {self.max_new_tokens}, {self.n}"
            )
        if any(not s for s in self.stop):
            raise ValueError("SamplingConfig.stop: stop strings must be non-empty")


@flax.struct.dataclass
class SampleOutput:
    """Completions of Bn = B * n rows, prompt-major."""

    tokens_BnxL: jax.Array  # int32, pad_id after the row finished
    mask_BnxL: jax.Array  # bool, True for generated tokens (EOS and stop tokens included)
    lengths_Bn: jax.Array  # int32, number of generated tokens
    finish_reason_Bn: jax.Array  # int32, a FinishReason
    logprobs_BnxL: jax.Array  # float32, log p(token) under the raw model (T=1, no truncation)
    sampling_logprobs_BnxL: jax.Array  # float32, under the sampling distribution (0 greedy)


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """The sampler's view of a model.

    apply(params, tokens_BxT, positions_BxT, mask_BxT, cache) -> (logits_BxT'xV, cache): writes
      the T tokens into cache slots [index, index + T); only the last position's logits are
      read, so an implementation may return T' = 1.
    init_cache(batch, max_len) -> cache, an empty cache (its dtype is the callback's choice).
    repeat_cache(cache, n) -> cache with every row repeated n times (jnp.repeat order); if None
      the sampler prefills the n-times-repeated prompts instead.
    """

    apply: Callable[..., tuple[jax.Array, Any]]
    init_cache: Callable[[int, int], Any]
    repeat_cache: Callable[[Any, int], Any] | None = None


@flax.struct.dataclass
class _LoopState:
    step: jax.Array  # int32 scalar, the column the next token goes to
    cache: Any
    logits_BnxV: jax.Array  # next-token logits of every row
    positions_Bn: jax.Array  # position of the next token
    tokens_BnxL: jax.Array
    logprobs_BnxL: jax.Array
    sampling_logprobs_BnxL: jax.Array
    done_Bn: jax.Array
    lengths_Bn: jax.Array  # int32, tokens generated so far (the finishing token included)
    reason_Bn: jax.Array
    byte_tail_BnxR: jax.Array  # last bytes of each completion, for stop strings
    rng: jax.Array


def _choose(logits_BxV: jax.Array, rng: jax.Array, config: SamplingConfig):
    """Next tokens and their log-probs under the raw and the sampling distributions."""
    raw_logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    if config.method == "greedy":
        tokens_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        sampling_lp_B = jnp.zeros(tokens_B.shape, jnp.float32)
    else:
        processed_BxV = sampling.process_logits(
            logits_BxV, config.temperature, config.top_k, config.top_p, config.min_p
        )
        tokens_B = jax.random.categorical(rng, processed_BxV, axis=-1).astype(jnp.int32)
        sampling_logp_BxV = jax.nn.log_softmax(processed_BxV, axis=-1)
        sampling_lp_B = jnp.take_along_axis(sampling_logp_BxV, tokens_B[:, None], axis=-1)[:, 0]
    raw_lp_B = jnp.take_along_axis(raw_logp_BxV, tokens_B[:, None], axis=-1)[:, 0]
    return tokens_B, raw_lp_B, sampling_lp_B


def _record(
    state: _LoopState, config: SamplingConfig, token_bytes: TokenBytes | None
) -> _LoopState:
    """Pick each live row's next token from state.logits and write it at column state.step."""
    tokens_B, raw_lp_B, samp_lp_B = _choose(
        state.logits_BnxV, jax.random.fold_in(state.rng, state.step), config
    )
    live_B = ~state.done_Bn
    tokens_B = jnp.where(live_B, tokens_B, config.pad_id)
    zero = jnp.float32(0.0)
    column = lambda buf, col: jax.lax.dynamic_update_index_in_dim(buf, col, state.step, axis=1)  # noqa: E731

    is_eos_B = jnp.isin(tokens_B, jnp.asarray(config.eos_ids, jnp.int32)) & live_B
    is_stop_B = jnp.zeros_like(live_B)
    byte_tail = state.byte_tail_BnxR
    if config.stop:
        hit_B, byte_tail = sampling.match_stop_bytes(byte_tail, tokens_B, token_bytes, config.stop)
        is_stop_B = hit_B & live_B & ~is_eos_B
    reason_B = jnp.where(is_eos_B, int(FinishReason.EOS), state.reason_Bn)
    reason_B = jnp.where(is_stop_B, int(FinishReason.STOP_STRING), reason_B)
    return state.replace(
        step=state.step + 1,
        tokens_BnxL=column(state.tokens_BnxL, tokens_B),
        logprobs_BnxL=column(state.logprobs_BnxL, jnp.where(live_B, raw_lp_B, zero)),
        sampling_logprobs_BnxL=column(
            state.sampling_logprobs_BnxL, jnp.where(live_B, samp_lp_B, zero)
        ),
        done_Bn=state.done_Bn | is_eos_B | is_stop_B,
        lengths_Bn=state.lengths_Bn + live_B.astype(jnp.int32),
        reason_Bn=reason_B,
        byte_tail_BnxR=byte_tail,
    )


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
    if config.stop and token_bytes is None:
        raise ValueError("sample: SamplingConfig.stop is set, so token_bytes must be given")
    B, T = prompt_tokens_BxT.shape
    n, L = config.n, config.max_new_tokens
    limit = L if max_new_tokens is None else jnp.minimum(max_new_tokens, L)
    prompt_mask_BxT = prompt_mask_BxT.astype(jnp.int32)
    positions_BxT = jnp.maximum(jnp.cumsum(prompt_mask_BxT, axis=1) - 1, 0)
    prompt_lengths_B = jnp.sum(prompt_mask_BxT, axis=1)

    if n > 1 and model_fns.repeat_cache is None:  # no row copy available: prefill every sample
        prompt_tokens_BxT, prompt_mask_BxT, positions_BxT, prompt_lengths_B = (
            jnp.repeat(x, n, axis=0)
            for x in (prompt_tokens_BxT, prompt_mask_BxT, positions_BxT, prompt_lengths_B)
        )
        B, n = B * n, 1
    cache = model_fns.init_cache(B, T + L)
    logits_BxTxV, cache = model_fns.apply(
        params, prompt_tokens_BxT, positions_BxT, prompt_mask_BxT, cache
    )
    logits_BxV = logits_BxTxV[:, -1].astype(jnp.float32)
    if n > 1:
        cache = model_fns.repeat_cache(cache, n)
        logits_BxV = jnp.repeat(logits_BxV, n, axis=0)
        prompt_lengths_B = jnp.repeat(prompt_lengths_B, n, axis=0)
    Bn = B * n

    state = _LoopState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        logits_BnxV=logits_BxV,
        positions_Bn=prompt_lengths_B.astype(jnp.int32),
        tokens_BnxL=jnp.full((Bn, L), config.pad_id, jnp.int32),
        logprobs_BnxL=jnp.zeros((Bn, L), jnp.float32),
        sampling_logprobs_BnxL=jnp.zeros((Bn, L), jnp.float32),
        done_Bn=jnp.zeros((Bn,), jnp.bool_),
        lengths_Bn=jnp.zeros((Bn,), jnp.int32),
        reason_Bn=jnp.full((Bn,), int(FinishReason.MAX_TOKENS), jnp.int32),
        byte_tail_BnxR=(
            sampling.init_byte_tail(Bn, config.stop)
            if config.stop
            else jnp.zeros((Bn, 1), jnp.int32)
        ),
        rng=rng,
    )
    state = _record(state, config, token_bytes)

    def cond(state: _LoopState) -> jax.Array:
        return (state.step < limit) & ~jnp.all(state.done_Bn)

    def body(state: _LoopState) -> _LoopState:
        last_Bnx1 = jax.lax.dynamic_index_in_dim(state.tokens_BnxL, state.step - 1, axis=1)
        logits_Bnx1xV, cache = model_fns.apply(
            params,
            last_Bnx1,
            state.positions_Bn[:, None],
            jnp.ones_like(last_Bnx1),
            state.cache,
        )
        state = state.replace(
            cache=cache,
            logits_BnxV=logits_Bnx1xV[:, -1].astype(jnp.float32),
            positions_Bn=state.positions_Bn + 1,
        )
        return _record(state, config, token_bytes)

    state = jax.lax.while_loop(cond, body, state)

    mask_BnxL = jnp.arange(L)[None, :] < state.lengths_Bn[:, None]
    return SampleOutput(
        tokens_BnxL=state.tokens_BnxL,
        mask_BnxL=mask_BnxL,
        lengths_Bn=state.lengths_Bn,
        finish_reason_Bn=state.reason_Bn,
        logprobs_BnxL=state.logprobs_BnxL,
        sampling_logprobs_BnxL=state.sampling_logprobs_BnxL,
    )


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
        if config.stop and token_bytes is None:
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
        if weights_dtype is not None:  # reshard and cast in one device-to-device program
            self._cast = jax.jit(
                functools.partial(cast_weights, dtype=weights_dtype),
                out_shardings=self._param_shardings,
            )

    def __call__(
        self,
        params,
        prompt_tokens_BxT,
        prompt_mask_BxT,
        rng: jax.Array | None = None,
        max_new_tokens: int | None = None,
    ) -> SampleOutput:
        """Sample for left-padded prompts (host or device arrays); see `sample`."""
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
            with self.mesh:
                out = self._sample(params, tokens, mask, rng, limit, token_bytes)
        else:
            if self.weights_dtype is not None:
                params = self._cast(params)
            out = self._sample(params, tokens, mask, rng, limit, token_bytes)
        if B_pad:
            out = jax.tree.map(lambda x: x[: B * self.config.n], out)
        return out


def cast_weights(params, dtype):
    """Floating-point leaves of `params` cast to `dtype` (the sampler's copy of the weights)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
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
