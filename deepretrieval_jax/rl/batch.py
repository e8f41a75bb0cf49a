"""`RolloutBatch` and the per-token quantities computed from it: log-probs, values, the loss
mask, advantages.

Token alignment (one convention for every per-token array of a `RolloutBatch`): entry t belongs
to token t. `old_logp_BxT[:, t]` / `ref_logp_BxT[:, t]` are log p(token_t | tokens_<t), computed
from the logits at position t - 1; `old_values_BxT[:, t]` is the critic's value read at the same
position t - 1 (the state that emits token t). Position 0 holds 0. Actor and critic therefore share
one mask, `response_mask_BxT` (1 on response tokens), which fixes the reference's one-position
critic shift (bug 7.9).

Rows with `valid_B = False` (reward pool infrastructure failures) are masked out of every loss
and every statistic (whitening, group baselines, KL) and counted in `invalid_count`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp

from deepretrieval_jax import sharding
from deepretrieval_jax.rl import algo, objectives
from deepretrieval_jax.rl.state import PPOConfig

# (params, tokens_BxT, positions_BxT, mask_BxT) -> logits_BxTxV float32 / values_BxT float32
PolicyFn = Callable[..., jax.Array]
ValueFn = Callable[..., jax.Array]


@flax.struct.dataclass
class RolloutBatch:
    """One PPO step's samples. B rows, T = prompt + response length (prompt left-padded)."""

    tokens_BxT: jax.Array  # int32, prompt then response tokens
    mask_BxT: jax.Array  # bool/int, 1 on real tokens (0 on left padding and after EOS)
    positions_BxT: jax.Array  # int32, 0 at each row's first real token
    response_mask_BxT: jax.Array  # bool/int, 1 on generated response tokens (the actions)
    old_logp_BxT: jax.Array  # float32, behaviour-policy log p(token_t | <t); 0 at t = 0
    ref_logp_BxT: jax.Array  # float32, reference-policy log p(token_t | <t) (zeros if unused)
    old_values_BxT: jax.Array  # float32, critic value of the state emitting token t (or zeros)
    scores_B: jax.Array  # float32, scalar reward per row (garbage allowed where not valid)
    valid_B: jax.Array  # bool, False = reward infrastructure failure: excluded, counted
    group_id_B: jax.Array  # int32, prompt index (GRPO/RLOO groups of n samples)


def model_fns(actor_model, critic_model=None) -> tuple[PolicyFn, ValueFn | None]:
    """Adapt Linen `CausalLM` / `ValueModel` to the (params, tokens, positions, mask) callbacks.

    With a `PolicyValueModel` actor and no critic model, `value_fn` reads the actor's value head
    (it takes the actor's params).
    """

    def policy_fn(params, tokens_BxT, positions_BxT, mask_BxT):
        return actor_model.apply({"params": params}, tokens_BxT, positions_BxT, mask_BxT)[0]

    def value_fn(params, tokens_BxT, positions_BxT, mask_BxT):
        return critic_model.apply({"params": params}, tokens_BxT, positions_BxT, mask_BxT)[0]

    if critic_model is None and hasattr(actor_model, "logits_and_values"):
        return policy_fn, lambda *args: policy_value_fn(actor_model)(*args)[1]
    return policy_fn, (None if critic_model is None else value_fn)


def policy_value_fn(actor_model) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """(params, tokens, positions, mask) -> (logits_BxTxV, values_BxT) of a PolicyValueModel."""

    def fn(params, tokens_BxT, positions_BxT, mask_BxT):
        logits, values, _ = actor_model.apply(
            {"params": params}, tokens_BxT, positions_BxT, mask_BxT, method="logits_and_values"
        )
        return logits, values

    return fn


def shift_right(x_BxT):
    """aligned[:, t] = x[:, t - 1]; aligned[:, 0] = 0."""
    return jnp.pad(x_BxT[:, :-1], ((0, 0), (1, 0)))


def logprobs_and_entropy(policy_fn: PolicyFn, params, batch, with_entropy=True):
    """Token-aligned log p(token_t | <t) and the entropy of that distribution, [B, T] float32."""
    logits_BxTxV = policy_fn(params, batch.tokens_BxT, batch.positions_BxT, batch.mask_BxT)
    return aligned_logp_entropy(logits_BxTxV, batch.tokens_BxT, with_entropy)


def aligned_logp_entropy(logits_BxTxV, tokens_BxT, with_entropy=True):
    """Token-aligned (logp_BxT, entropy_BxT or None) from logits_BxTxV of the same tokens."""
    logits_BxTxV = logits_BxTxV[:, :-1]
    logp_BxT = jnp.pad(algo.logprobs_from_logits(logits_BxTxV, tokens_BxT[:, 1:]), ((0, 0), (1, 0)))
    if not with_entropy:
        return logp_BxT, None
    entropy_BxT = jnp.pad(algo.entropy_from_logits(logits_BxTxV), ((0, 0), (1, 0)))
    return logp_BxT, entropy_BxT


def compute_logprobs(policy_fn: PolicyFn, params, batch) -> jax.Array:
    """Token-aligned log-probs of `batch.tokens_BxT` under `params` (actor or reference)."""
    return logprobs_and_entropy(policy_fn, params, batch, with_entropy=False)[0]


def compute_values(value_fn: ValueFn, params, batch) -> jax.Array:
    """Token-aligned critic values: value of the state that emits token t, [B, T] float32."""
    values_BxT = value_fn(params, batch.tokens_BxT, batch.positions_BxT, batch.mask_BxT)
    return shift_right(values_BxT.astype(jnp.float32))


def loss_mask(batch) -> jax.Array:
    """Valid response tokens: response & real & row valid, [B, T] bool."""
    return (
        jnp.asarray(batch.response_mask_BxT).astype(jnp.bool_)
        & jnp.asarray(batch.mask_BxT).astype(jnp.bool_)
        & jnp.asarray(batch.valid_B).astype(jnp.bool_)[:, None]
    )


def compute_advantages(batch: RolloutBatch, cfg: PPOConfig, kl_coef):
    """Advantages and returns of a rollout batch (pure, jit-able).

    Token rewards r_t = -kl_coef * KL_t (if `kl_in_reward`) + score on the last response token;
    with `overlong_buffer_len` > 0 the score includes DAPO's overlong penalty of the row's
    response length (`objectives.overlong_penalty`; score_* metrics report the raw scores).
    gae: (A, R) = GAE(r, old_values), A whitened over valid response tokens if configured.
    grpo / rloo: outcome o_i = sum_t r_t (the score minus the summed in-reward KL), group
    advantage broadcast to the row's response tokens; R = A (no critic).

    Returns:
        (advantages_BxT, returns_BxT, token_rewards_BxT, metrics).
    """
    mask_BxT = loss_mask(batch)
    valid_B = jnp.asarray(batch.valid_B).astype(jnp.bool_)
    response_len_B = jnp.sum(mask_BxT, axis=-1).astype(jnp.float32)
    overlong_B, scores_B = jnp.zeros_like(response_len_B), batch.scores_B
    if cfg.overlong_buffer_len > 0:  # DAPO soft overlong penalty, part of the score
        overlong_B = objectives.overlong_penalty(
            response_len_B, cfg.overlong_max_len, cfg.overlong_buffer_len,
            cfg.overlong_penalty_factor,
        )  # fmt: skip
        scores_B = jnp.where(valid_B, scores_B + overlong_B, scores_B)
    kl_BxT = algo.kl_estimate(batch.old_logp_BxT, batch.ref_logp_BxT, cfg.kl_estimator)
    kl_BxT = jnp.where(mask_BxT & cfg.use_ref, kl_BxT, 0.0)
    in_reward = cfg.kl_in_reward and cfg.use_ref
    rewards_BxT = algo.token_rewards(scores_B, kl_BxT if in_reward else None, mask_BxT, kl_coef)
    if cfg.advantage_estimator == "gae":
        adv_BxT, returns_BxT = algo.gae(
            rewards_BxT, batch.old_values_BxT, mask_BxT, cfg.gamma, cfg.lam
        )
        if cfg.whiten_advantages:
            adv_BxT = algo.masked_whiten(adv_BxT, mask_BxT)
    else:
        outcome_B = jnp.where(valid_B, scores_B, 0.0)
        if in_reward:
            outcome_B = outcome_B - kl_coef * jnp.sum(kl_BxT, axis=-1)
        if cfg.advantage_estimator == "grpo":
            adv_B = algo.grpo_advantages(
                outcome_B, batch.group_id_B, valid_B, cfg.grpo_eps, cfg.grpo_normalize_std
            )
        else:
            adv_B = algo.rloo_advantages(outcome_B, batch.group_id_B, valid_B)
        adv_BxT = jnp.where(mask_BxT, adv_B[:, None], 0.0)
        returns_BxT = adv_BxT
    metrics = {
        "score_mean": algo.masked_mean(batch.scores_B, valid_B),
        "score_max": jnp.where(
            jnp.any(valid_B), jnp.max(jnp.where(valid_B, batch.scores_B, -1e30)), 0.0
        ),
        "score_min": jnp.where(
            jnp.any(valid_B), jnp.min(jnp.where(valid_B, batch.scores_B, 1e30)), 0.0
        ),
        "kl_ref": algo.mean_sequence_kl(kl_BxT, mask_BxT),
        "kl_coef": jnp.asarray(kl_coef, jnp.float32),
        "invalid_count": jnp.sum(~valid_B).astype(jnp.float32),
        "empty_response_count": jnp.sum(valid_B & (response_len_B == 0)).astype(jnp.float32),
        "response_len_mean": algo.masked_mean(response_len_B, valid_B),
        "advantage_mean": algo.masked_mean(adv_BxT, mask_BxT),
        "advantage_std": jnp.sqrt(algo.masked_var(adv_BxT, mask_BxT)),
        "returns_mean": algo.masked_mean(returns_BxT, mask_BxT),
        "token_reward_sum_mean": algo.masked_mean(jnp.sum(rewards_BxT, -1), valid_B),
    }
    if cfg.overlong_buffer_len > 0:
        metrics["overlong_penalty_mean"] = algo.masked_mean(overlong_B, valid_B)
    if cfg.use_critic:
        metrics["explained_variance"] = algo.explained_variance(
            batch.old_values_BxT, returns_BxT, mask_BxT
        )
    return adv_BxT, returns_BxT, rewards_BxT, metrics


def inputs_finite(batch: RolloutBatch, cfg: PPOConfig, adv_BxT, returns_BxT) -> jax.Array:
    """True iff everything the losses read is finite where it is used."""
    mask_BxT = loss_mask(batch)
    valid_B = jnp.asarray(batch.valid_B).astype(jnp.bool_)

    def ok(x, m):
        return jnp.all(jnp.where(m, jnp.isfinite(x), True))

    checks = [
        ok(batch.scores_B, valid_B),
        ok(batch.old_logp_BxT, mask_BxT),
        ok(adv_BxT, mask_BxT),
        ok(returns_BxT, mask_BxT),
    ]
    if cfg.use_ref:
        checks.append(ok(batch.ref_logp_BxT, mask_BxT))
    if cfg.use_critic:
        checks.append(ok(batch.old_values_BxT, mask_BxT))
    return functools.reduce(jnp.logical_and, checks)


def rollout_batch_shardings(mesh, rules=None) -> RolloutBatch:
    """A RolloutBatch of NamedShardings: rows over `act_batch` (data x fsdp), the rest replicated.
    B must be divisible by the data x fsdp size."""
    rules = sharding.TRAIN_RULES if rules is None else rules
    bt, b = sharding.batch_sharding(mesh, rules, 2), sharding.batch_sharding(mesh, rules, 1)
    return RolloutBatch(
        tokens_BxT=bt, mask_BxT=bt, positions_BxT=bt, response_mask_BxT=bt, old_logp_BxT=bt,
        ref_logp_BxT=bt, old_values_BxT=bt, scores_B=b, valid_B=b, group_id_B=b,
    )  # fmt: skip
