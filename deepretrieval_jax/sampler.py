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
`sampling`; the string's tokens are kept) or at the token limit. Multi-turn rollouts
(`deepretrieval_jax/agent/`) reuse the same pieces: `prefill` and `decode` run the loop up to a
tool stop string (a row then waits, `FinishReason.TOOL_CALL`), the agent writes the
environment's tokens onto the cache and `decode` resumes; a finished row feeds its cache slots
with mask 0, so a resumed row's cache holds exactly its real tokens. Later columns hold `pad_id`
with mask 0. Log-probs are recorded under the raw model distribution (temperature 1, no
truncation; PPO's old log-probs) and under the distribution actually sampled from (0 for
greedy: a point mass).

`Sampler` wraps `sample` for a training run: it left-pads prompts to a length bucket and the
batch to the mesh's data-parallel size, reshards the trainer's params onto the sampler's
shardings device-to-device, and counts traces, so a run compiles a small bounded number of
times. Row order of the output: prompt-major (rows b*n .. b*n+n-1 belong to prompt b).
"""

from __future__ import annotations

import contextlib
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
    MAX_TOKENS = 2  # the buffer, the call's limit or the per-turn limit
    TOOL_CALL = 3  # a `tool_stop` string: the row waits for the environment (multi-turn)


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
    # Multi-turn only: stop strings after which a row waits for the environment (e.g.
    # "</search>"), and the tokens one turn may generate (0 = no per-turn limit).
    tool_stop: tuple[str, ...] = ()
    max_turn_tokens: int = 0

    def __post_init__(self):
        # Lists from a ConfigDict become tuples so the config stays hashable.
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "tool_stop", tuple(self.tool_stop))
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
        if any(not s for s in self.stop + self.tool_stop):
            raise ValueError("SamplingConfig.stop: stop strings must be non-empty")
        if self.max_turn_tokens < 0:
            raise ValueError(
                f"SamplingConfig.max_turn_tokens must be >= 0, got {self.max_turn_tokens}"
            )

    @property
    def all_stops(self) -> tuple[str, ...]:
        return self.stop + self.tool_stop


@flax.struct.dataclass
class SampleOutput:
    """Completions of Bn = B * n rows, prompt-major."""

    tokens_BnxL: jax.Array  # int32, pad_id after the row finished
    mask_BnxL: jax.Array  # bool, real tokens: generated (EOS, stop tokens) or environment-inserted
    lengths_Bn: jax.Array  # int32, number of generated tokens
    finish_reason_Bn: jax.Array  # int32, a FinishReason
    logprobs_BnxL: jax.Array  # float32, log p(token) under the raw model (T=1, no truncation)
    sampling_logprobs_BnxL: jax.Array  # float32, under the sampling distribution (0 greedy)
    # bool, tokens the policy generated: mask_BnxL less the environment's (multi-turn); the
    # actions of RL. Single turn: equal to mask_BnxL.
    generated_BnxL: jax.Array | None = None


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
class LoopState:
    """The decode loop's state. Invariant: buffer column c lives in cache slot T + c, and the
    token at column step - 1 (`last_Bn`, if `written_Bn`) is not in the cache yet."""

    step: jax.Array  # int32 scalar, the column the next token goes to
    cache: Any
    logits_BnxV: jax.Array  # next-token logits of every row
    positions_Bn: jax.Array  # position of the next token
    tokens_BnxL: jax.Array
    mask_BnxL: jax.Array  # bool, a real token (generated, or inserted by the environment)
    generated_BnxL: jax.Array  # bool, a token the policy generated (an action)
    logprobs_BnxL: jax.Array
    sampling_logprobs_BnxL: jax.Array
    done_Bn: jax.Array  # bool, not decoding: finished, or waiting for the environment
    waiting_Bn: jax.Array  # bool, stopped on a tool stop string (done_Bn too)
    last_Bn: jax.Array  # int32, the token at column step - 1
    written_Bn: jax.Array  # bool, that token is real (fed to the cache with mask 1)
    lengths_Bn: jax.Array  # int32, tokens generated so far (the finishing token included)
    turn_tokens_Bn: jax.Array  # int32, tokens generated in the current turn
    reason_Bn: jax.Array
    byte_tail_BnxR: jax.Array  # last bytes of each completion, for stop strings
    idle_steps: jax.Array  # int32 scalar, sum over decode steps of the rows not decoding
    decode_steps: jax.Array  # int32 scalar, decode steps (one token column each)
    rng: jax.Array


_LoopState = LoopState


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


def _record(state: LoopState, config: SamplingConfig, token_bytes: TokenBytes | None) -> LoopState:
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
    is_tool_B = jnp.zeros_like(live_B)
    byte_tail = state.byte_tail_BnxR
    if config.stop:
        hit_B, new_tail = sampling.match_stop_bytes(byte_tail, tokens_B, token_bytes, config.stop)
        is_stop_B = hit_B & live_B & ~is_eos_B
    if config.tool_stop:
        hit_B, new_tail = sampling.match_stop_bytes(
            byte_tail, tokens_B, token_bytes, config.tool_stop
        )
        is_tool_B = hit_B & live_B & ~is_eos_B & ~is_stop_B
    if config.all_stops:
        byte_tail = new_tail  # the same for either set: the tail's width is the union's
    turn_tokens_B = state.turn_tokens_Bn + live_B.astype(jnp.int32)
    ended_B = is_eos_B | is_stop_B | is_tool_B
    is_turn_limit_B = jnp.zeros_like(live_B)
    if config.max_turn_tokens:
        is_turn_limit_B = live_B & ~ended_B & (turn_tokens_B >= config.max_turn_tokens)
    reason_B = jnp.where(is_eos_B, int(FinishReason.EOS), state.reason_Bn)
    reason_B = jnp.where(is_stop_B, int(FinishReason.STOP_STRING), reason_B)
    reason_B = jnp.where(is_tool_B, int(FinishReason.TOOL_CALL), reason_B)
    reason_B = jnp.where(is_turn_limit_B, int(FinishReason.MAX_TOKENS), reason_B)
    return state.replace(
        step=state.step + 1,
        tokens_BnxL=column(state.tokens_BnxL, tokens_B),
        mask_BnxL=column(state.mask_BnxL, live_B),
        generated_BnxL=column(state.generated_BnxL, live_B),
        logprobs_BnxL=column(state.logprobs_BnxL, jnp.where(live_B, raw_lp_B, zero)),
        sampling_logprobs_BnxL=column(
            state.sampling_logprobs_BnxL, jnp.where(live_B, samp_lp_B, zero)
        ),
        done_Bn=state.done_Bn | ended_B | is_turn_limit_B,
        waiting_Bn=state.waiting_Bn | is_tool_B,
        last_Bn=tokens_B,
        written_Bn=live_B,
        lengths_Bn=state.lengths_Bn + live_B.astype(jnp.int32),
        turn_tokens_Bn=turn_tokens_B,
        reason_Bn=reason_B,
        byte_tail_BnxR=byte_tail,
    )


def prefill(
    params,
    prompt_tokens_BxT: jax.Array,
    prompt_mask_BxT: jax.Array,
    rng: jax.Array,
    *,
    model_fns: ModelFns,
    config: SamplingConfig,
    token_bytes: TokenBytes | None = None,
) -> LoopState:
    """Prefill the prompts into a cache of T + L slots and record each row's first token."""
    if config.all_stops and token_bytes is None:
        raise ValueError("sample: SamplingConfig.stop is set, so token_bytes must be given")
    B, T = prompt_tokens_BxT.shape
    n, L = config.n, config.max_new_tokens
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

    false_Bn, zero_Bn = jnp.zeros((Bn,), jnp.bool_), jnp.zeros((Bn,), jnp.int32)
    state = LoopState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        logits_BnxV=logits_BxV,
        positions_Bn=prompt_lengths_B.astype(jnp.int32),
        tokens_BnxL=jnp.full((Bn, L), config.pad_id, jnp.int32),
        mask_BnxL=jnp.zeros((Bn, L), jnp.bool_),
        generated_BnxL=jnp.zeros((Bn, L), jnp.bool_),
        logprobs_BnxL=jnp.zeros((Bn, L), jnp.float32),
        sampling_logprobs_BnxL=jnp.zeros((Bn, L), jnp.float32),
        done_Bn=false_Bn,
        waiting_Bn=false_Bn,
        last_Bn=zero_Bn,
        written_Bn=false_Bn,
        lengths_Bn=zero_Bn,
        turn_tokens_Bn=zero_Bn,
        reason_Bn=jnp.full((Bn,), int(FinishReason.MAX_TOKENS), jnp.int32),
        byte_tail_BnxR=(
            sampling.init_byte_tail(Bn, config.all_stops)
            if config.all_stops
            else jnp.zeros((Bn, 1), jnp.int32)
        ),
        idle_steps=jnp.zeros((), jnp.int32),
        decode_steps=jnp.ones((), jnp.int32),
        rng=rng,
    )
    return _record(state, config, token_bytes)


def decode(
    params,
    state: LoopState,
    *,
    model_fns: ModelFns,
    config: SamplingConfig,
    token_bytes: TokenBytes | None = None,
    limit: jax.Array | int | None = None,
    exit_waiting: jax.Array | int | None = None,
) -> LoopState:
    """Decode one token per step until every row is done (finished or waiting), `limit`
    columns are filled, or at least `exit_waiting` rows wait for the environment (None: off).
    Each step feeds the previous token (mask 0 for a row that was not decoding)."""
    L = config.max_new_tokens
    limit = L if limit is None else jnp.minimum(limit, L)

    def cond(state: LoopState) -> jax.Array:
        go = (state.step < limit) & ~jnp.all(state.done_Bn)
        if exit_waiting is not None:
            go = go & (jnp.sum(state.waiting_Bn) < exit_waiting)
        return go

    def body(state: LoopState) -> LoopState:
        last_Bnx1 = state.last_Bn[:, None]
        logits_Bnx1xV, cache = model_fns.apply(
            params,
            last_Bnx1,
            state.positions_Bn[:, None],
            state.written_Bn[:, None].astype(jnp.int32),
            state.cache,
        )
        state = state.replace(
            cache=cache,
            logits_BnxV=logits_Bnx1xV[:, -1].astype(jnp.float32),
            positions_Bn=state.positions_Bn + state.written_Bn.astype(jnp.int32),
            idle_steps=state.idle_steps + jnp.sum(state.done_Bn).astype(jnp.int32),
            decode_steps=state.decode_steps + 1,
        )
        return _record(state, config, token_bytes)

    return jax.lax.while_loop(cond, body, state)


def output(state: LoopState) -> SampleOutput:
    """The SampleOutput of a finished loop (single turn: real tokens are the generated ones)."""
    return SampleOutput(
        tokens_BnxL=state.tokens_BnxL,
        mask_BnxL=state.mask_BnxL,
        lengths_Bn=state.lengths_Bn,
        finish_reason_Bn=state.reason_Bn,
        logprobs_BnxL=state.logprobs_BnxL,
        sampling_logprobs_BnxL=state.sampling_logprobs_BnxL,
        generated_BnxL=state.generated_BnxL,
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
        if weights_dtype is not None:  # reshard and cast in one device-to-device program
            self._cast = jax.jit(
                functools.partial(cast_weights, dtype=weights_dtype),
                out_shardings=self._param_shardings,
            )

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
        return self.mesh if self.mesh is not None else contextlib.nullcontext()

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
