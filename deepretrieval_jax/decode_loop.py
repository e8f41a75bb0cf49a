"""The on-device decode loop of `sampler.py`: its types, prefill, and one token per step.

Shape legend: B prompts, n samples per prompt, Bn = B * n rows of output, T prompt length (a
bucket), L = max_new_tokens, V vocabulary.

The loop knows the model only through `ModelFns` callbacks (the flax lm1b sampler's idea):
`apply(params, tokens_BxT, positions_BxT, mask_BxT, cache) -> (logits, cache)` and
`init_cache(batch, max_len) -> cache`. `prefill` writes the left-padded prompts once at batch B
into a preallocated cache of T + L slots, repeats the cache rows n times (GRPO groups share one
prefill) and records the first token from the prefill's last logits; `decode` then feeds one
token per step in `lax.while_loop` (no host round trip) until every row is done, a column limit,
or (multi-turn) enough rows wait for the environment; `output` packs the buffers.
A row finishes on an EOS id (kept, masked in), on a stop string (exact byte match, see
`sampling`; the string's tokens are kept), at the token limit or at the per-turn limit; on a
`tool_stop` string it waits (`FinishReason.TOOL_CALL`): the multi-turn agent
(`deepretrieval_jax/agent/decode.py`) writes the environment's tokens onto the cache and calls
`decode` again. A row that is not decoding feeds its cache slots with mask 0, so a resumed row's
cache holds exactly its real tokens. Later columns hold `pad_id` with mask 0. Log-probs are
recorded under the raw model distribution (temperature 1, no truncation; PPO's old log-probs)
and under the distribution actually sampled from (0 for greedy: a point mass).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp

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


def choose(logits_BxV: jax.Array, rng: jax.Array, config: SamplingConfig):
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


def record(state: LoopState, config: SamplingConfig, token_bytes: TokenBytes | None) -> LoopState:
    """Pick each live row's next token from state.logits and write it at column state.step."""
    tokens_B, raw_lp_B, samp_lp_B = choose(
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
    return record(state, config, token_bytes)


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
        return record(state, config, token_bytes)

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
