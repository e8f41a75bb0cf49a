"""Jitted, sharded PPO / GRPO / RLOO steps over a rollout batch.

Token alignment (one convention for every per-token array of a `RolloutBatch`): entry t belongs
to token t. `old_logp_BxT[:, t]` / `ref_logp_BxT[:, t]` are log p(token_t | tokens_<t), computed
from the logits at position t - 1; `old_values_BxT[:, t]` is the critic's value read at the same
position t - 1 (the state that emits token t). Position 0 holds 0. Actor and critic therefore share
one mask, `response_mask_BxT` (1 on response tokens), which fixes the reference's one-position
critic shift (bug 7.9).

Rows with `valid_B = False` (reward pool infrastructure failures) are masked out of every loss
and every statistic (whitening, group baselines, KL) and counted in `invalid_count`.

Non-finite guard: if any input a loss reads (scores, old/ref log-probs, old values, advantages,
returns) is non-finite on a valid response token, the whole step is skipped before anything
changes. Otherwise each mini-batch whose loss or gradient norm is non-finite is not applied, and
neither is any later mini-batch of the step (earlier ones stay applied: keeping a copy of the
pre-step state would cost a full extra copy of params and optimiser moments). A skipped step
increments `skipped_steps` and `consecutive_skips`; a good step resets the latter.

Public entry points: `ppo_update` (pure; tests call it directly or via `jax.jit`),
`make_jitted(cfg, actor_model, critic_model, mesh)` -> `PPOSteps` with every step jitted with
explicit shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from deepretrieval_jax import sharding
from deepretrieval_jax.rl import algo
from deepretrieval_jax.rl.state import (
    PPOConfig,
    TrainState,
    actor_optimizer,
    check_models,
    critic_optimizer,
    current_lr,
    train_state_shardings,
)

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


def _shift_right(x_BxT):
    """aligned[:, t] = x[:, t - 1]; aligned[:, 0] = 0."""
    return jnp.pad(x_BxT[:, :-1], ((0, 0), (1, 0)))


def logprobs_and_entropy(policy_fn: PolicyFn, params, batch, with_entropy=True):
    """Token-aligned log p(token_t | <t) and the entropy of that distribution, [B, T] float32."""
    logits_BxTxV = policy_fn(params, batch.tokens_BxT, batch.positions_BxT, batch.mask_BxT)
    return _aligned_logp_entropy(logits_BxTxV, batch.tokens_BxT, with_entropy)


def _aligned_logp_entropy(logits_BxTxV, tokens_BxT, with_entropy=True):
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
    return _shift_right(values_BxT.astype(jnp.float32))


def loss_mask(batch) -> jax.Array:
    """Valid response tokens: response & real & row valid, [B, T] bool."""
    return (
        jnp.asarray(batch.response_mask_BxT).astype(jnp.bool_)
        & jnp.asarray(batch.mask_BxT).astype(jnp.bool_)
        & jnp.asarray(batch.valid_B).astype(jnp.bool_)[:, None]
    )


def compute_advantages(batch: RolloutBatch, cfg: PPOConfig, kl_coef):
    """Advantages and returns of a rollout batch (pure, jit-able).

    Token rewards r_t = -kl_coef * KL_t (if `kl_in_reward`) + score on the last response token.
    gae: (A, R) = GAE(r, old_values), A whitened over valid response tokens if configured.
    grpo / rloo: outcome o_i = sum_t r_t (the score minus the summed in-reward KL), group
    advantage broadcast to the row's response tokens; R = A (no critic).

    Returns:
        (advantages_BxT, returns_BxT, token_rewards_BxT, metrics).
    """
    mask_BxT = loss_mask(batch)
    valid_B = jnp.asarray(batch.valid_B).astype(jnp.bool_)
    kl_BxT = algo.kl_estimate(batch.old_logp_BxT, batch.ref_logp_BxT, cfg.kl_estimator)
    kl_BxT = jnp.where(mask_BxT & cfg.use_ref, kl_BxT, 0.0)
    in_reward = cfg.kl_in_reward and cfg.use_ref
    rewards_BxT = algo.token_rewards(
        batch.scores_B, kl_BxT if in_reward else None, mask_BxT, kl_coef
    )
    if cfg.advantage_estimator == "gae":
        adv_BxT, returns_BxT = algo.gae(
            rewards_BxT, batch.old_values_BxT, mask_BxT, cfg.gamma, cfg.lam
        )
        if cfg.whiten_advantages:
            adv_BxT = algo.masked_whiten(adv_BxT, mask_BxT)
    else:
        outcome_B = jnp.where(valid_B, batch.scores_B, 0.0)
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
    response_len_B = jnp.sum(mask_BxT, axis=-1).astype(jnp.float32)
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
    if cfg.use_critic:
        metrics["explained_variance"] = algo.explained_variance(
            batch.old_values_BxT, returns_BxT, mask_BxT
        )
    return adv_BxT, returns_BxT, rewards_BxT, metrics


def _inputs_finite(batch, cfg, adv_BxT, returns_BxT):
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


def _actor_loss(params, mb, cfg: PPOConfig, policy_fn, num_tokens, num_rows):
    """Actor loss of one micro-batch, scaled so that micro-batch losses sum to the mini-batch's.

    L = clipped surrogate - entropy_coef * H + kl_loss_coef * KL(actor || ref)  (KL ADDED)
    """
    logits_BxTxV = policy_fn(params, mb.tokens_BxT, mb.positions_BxT, mb.mask_BxT)
    return _actor_terms(logits_BxTxV, mb, cfg, num_tokens, num_rows)


def _actor_terms(logits_BxTxV, mb, cfg: PPOConfig, num_tokens, num_rows):
    logp_BxT, entropy_BxT = _aligned_logp_entropy(logits_BxTxV, mb.tokens_BxT)
    m = mb.loss_mask_BxT
    agg = dict(agg=cfg.loss_agg, num_tokens=num_tokens, num_rows=num_rows)
    pg_loss, metrics = algo.policy_loss(
        logp_BxT, mb.old_logp_BxT, mb.adv_BxT, m, cfg.clip_low, cfg.clip_high, cfg.dual_clip, **agg
    )
    entropy = algo.aggregate_loss(entropy_BxT, m, **agg)
    loss = pg_loss - cfg.entropy_coef * entropy
    metrics = dict(metrics, entropy_tok=algo.masked_mean(entropy_BxT, m))
    if cfg.kl_loss_coef > 0:
        kl_BxT = algo.kl_estimate(
            logp_BxT, jnp.where(m, mb.ref_logp_BxT, 0.0), cfg.kl_loss_estimator
        )
        kl_loss = algo.aggregate_loss(kl_BxT, m, **agg)
        loss = loss + cfg.kl_loss_coef * kl_loss
        metrics["kl_loss"] = algo.masked_mean(kl_BxT, m)
    # Token-mean metrics weighted by this micro-batch's share of the mini-batch's tokens.
    share = jnp.sum(m) / jnp.maximum(num_tokens, 1.0)
    metrics = {k: v * share for k, v in metrics.items()}
    metrics["policy_loss"] = pg_loss
    return loss, metrics


def _critic_loss(params, mb, cfg: PPOConfig, value_fn, num_tokens, num_rows):
    """Clipped value loss of one micro-batch (same scaling as `_actor_loss`)."""
    values_BxT = value_fn(params, mb.tokens_BxT, mb.positions_BxT, mb.mask_BxT)
    return _critic_terms(values_BxT, mb, cfg, num_tokens, num_rows)


def _critic_terms(raw_values_BxT, mb, cfg: PPOConfig, num_tokens, num_rows):
    values_BxT = _shift_right(raw_values_BxT.astype(jnp.float32))
    m = mb.loss_mask_BxT
    loss, metrics = algo.value_loss(
        values_BxT, mb.old_values_BxT, mb.returns_BxT, m, cfg.value_clip, cfg.loss_agg,
        num_tokens, num_rows,
    )  # fmt: skip
    share = jnp.sum(m) / jnp.maximum(num_tokens, 1.0)
    metrics = {k: v * share for k, v in metrics.items()}
    metrics["value_loss"] = loss
    return loss, metrics


def _shared_loss(params, mb, cfg: PPOConfig, policy_value_fn, num_tokens, num_rows):
    """Shared trunk: actor loss + value_loss_coef * value loss from one forward pass."""
    logits_BxTxV, values_BxT = policy_value_fn(params, mb.tokens_BxT, mb.positions_BxT, mb.mask_BxT)
    a_loss, a_metrics = _actor_terms(logits_BxTxV, mb, cfg, num_tokens, num_rows)
    c_loss, c_metrics = _critic_terms(values_BxT, mb, cfg, num_tokens, num_rows)
    return a_loss + cfg.value_loss_coef * c_loss, {**a_metrics, **c_metrics}


@flax.struct.dataclass
class _MiniBatch:
    """Rows of one mini- or micro-batch, with the per-token targets of the update."""

    tokens_BxT: jax.Array
    mask_BxT: jax.Array
    positions_BxT: jax.Array
    loss_mask_BxT: jax.Array
    old_logp_BxT: jax.Array
    ref_logp_BxT: jax.Array
    old_values_BxT: jax.Array
    adv_BxT: jax.Array
    returns_BxT: jax.Array


def _accumulate(loss_fn, params, micro, num_tokens, num_rows):
    """Sum of gradients (in float32) and metrics over the leading micro-batch axis (lax.scan)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if jax.tree.leaves(micro)[0].shape[0] == 1:  # no accumulation: skip the scan
        first = jax.tree.map(lambda x: x[0], micro)
        (_, metrics), grads = grad_fn(params, first, num_tokens=num_tokens, num_rows=num_rows)
        return grads, metrics

    def body(acc, mb):
        (_, metrics), grads = grad_fn(params, mb, num_tokens=num_tokens, num_rows=num_rows)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, metrics = jax.lax.scan(body, zeros, micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return grads, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)


def _tree_select(pred, new, old):
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def ppo_update(
    state: TrainState,
    batch: RolloutBatch,
    *,
    cfg: PPOConfig,
    policy_fn: PolicyFn,
    value_fn: ValueFn | None = None,
    policy_value_fn: Callable | None = None,
    mesh=None,
    rules=None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One PPO step: advantages, then `ppo_epochs` x mini-batches of actor (and critic) updates,
    each accumulating gradients over micro-batches inside a `lax.scan`.

    Separate critic: `value_fn` on `state.critic_params`. Shared critic: `policy_value_fn`
    ((params, ...) -> (logits, values)) on `state.actor_params`, one loss and one optimiser.

    Returns the new state and scalar float32 metrics (means over the mini-batch updates).
    """
    B = batch.tokens_BxT.shape[0]
    M, mu = cfg.mini_batch_size, cfg.micro_batch
    if B % M:
        raise ValueError(f"rollout batch of {B} rows is not a multiple of mini_batch_size={M}")
    if cfg.separate_critic and (value_fn is None or state.critic_params is None):
        raise ValueError("a separate critic needs value_fn and state.critic_params")
    if cfg.shared_critic and policy_value_fn is None:
        raise ValueError("critic='shared' needs policy_value_fn (see update.policy_value_fn)")
    n_mb, n_micro = B // M, M // mu
    rules = sharding.TRAIN_RULES if rules is None else rules

    def constrain(x, lead=0):
        if mesh is None:
            return x
        names = (None,) * lead + ("act_batch",) + (None,) * (x.ndim - lead - 1)
        return jax.lax.with_sharding_constraint(
            x, sharding.sharding_for_names(names, x.shape, mesh, rules)
        )

    adv_BxT, returns_BxT, _, adv_metrics = compute_advantages(batch, cfg, state.kl_coef)
    inputs_ok = _inputs_finite(batch, cfg, adv_BxT, returns_BxT)
    mask_BxT = loss_mask(batch)
    data = _MiniBatch(
        tokens_BxT=batch.tokens_BxT,
        mask_BxT=batch.mask_BxT,
        positions_BxT=batch.positions_BxT,
        loss_mask_BxT=mask_BxT,
        old_logp_BxT=jnp.where(mask_BxT, batch.old_logp_BxT, 0.0),
        ref_logp_BxT=jnp.where(mask_BxT, batch.ref_logp_BxT, 0.0),
        old_values_BxT=jnp.where(mask_BxT, batch.old_values_BxT, 0.0),
        adv_BxT=jnp.where(mask_BxT, adv_BxT, 0.0),
        returns_BxT=jnp.where(mask_BxT, returns_BxT, 0.0),
    )

    rng, perm_rng = jax.random.split(state.rng)
    if cfg.shuffle:
        keys = jax.random.split(perm_rng, cfg.ppo_epochs)
        order_ExB = jax.vmap(lambda k: jax.random.permutation(k, B))(keys)
    else:
        order_ExB = jnp.tile(jnp.arange(B), (cfg.ppo_epochs, 1))
    order_NxM = order_ExB.reshape(cfg.ppo_epochs * n_mb, M)

    actor_tx = actor_optimizer(cfg)
    critic_tx = critic_optimizer(cfg) if cfg.separate_critic else None
    if cfg.shared_critic:
        actor_loss = functools.partial(_shared_loss, cfg=cfg, policy_value_fn=policy_value_fn)
    else:
        actor_loss = functools.partial(_actor_loss, cfg=cfg, policy_fn=policy_fn)
    critic_loss = functools.partial(_critic_loss, cfg=cfg, value_fn=value_fn)

    def minibatch_step(carry, idx_M):
        actor_p, actor_o, critic_p, critic_o, ok, n_skipped = carry
        mb = jax.tree.map(lambda x: constrain(jnp.take(x, idx_M, axis=0)), data)
        # Micro-batch k takes rows k, k + n_micro, ...: each stays spread over the batch shards.
        micro = jax.tree.map(
            lambda x: constrain(jnp.swapaxes(x.reshape((mu, n_micro) + x.shape[1:]), 0, 1), 1),
            mb,
        )
        num_tokens = jnp.sum(mb.loss_mask_BxT).astype(jnp.float32)
        num_rows = jnp.sum(jnp.any(mb.loss_mask_BxT, axis=-1)).astype(jnp.float32)
        a_grads, a_metrics = _accumulate(actor_loss, actor_p, micro, num_tokens, num_rows)
        a_norm = optax.global_norm(a_grads)
        metrics = dict(
            a_metrics, grad_norm_actor=a_norm, lr_actor=current_lr(cfg, actor_o, cfg.actor_lr)
        )
        finite = ok & jnp.isfinite(a_norm) & jnp.isfinite(a_metrics["policy_loss"])
        if cfg.shared_critic:
            finite = finite & jnp.isfinite(a_metrics["value_loss"])
        if cfg.separate_critic:
            c_grads, c_metrics = _accumulate(critic_loss, critic_p, micro, num_tokens, num_rows)
            c_norm = optax.global_norm(c_grads)
            metrics.update(
                c_metrics,
                grad_norm_critic=c_norm,
                lr_critic=current_lr(cfg, critic_o, cfg.critic_lr),
            )
            finite = finite & jnp.isfinite(c_norm) & jnp.isfinite(c_metrics["value_loss"])
        # A mini-batch without valid response tokens has zero gradients: applying AdamW would
        # still move params (momentum, weight decay), so it is left out (not a skip).
        apply = finite & (num_tokens > 0)
        updates, new_actor_o = actor_tx.update(a_grads, actor_o, actor_p)
        actor_p, actor_o = _tree_select(
            apply, (optax.apply_updates(actor_p, updates), new_actor_o), (actor_p, actor_o)
        )
        if cfg.separate_critic:
            updates, new_critic_o = critic_tx.update(c_grads, critic_o, critic_p)
            critic_p, critic_o = _tree_select(
                apply, (optax.apply_updates(critic_p, updates), new_critic_o), (critic_p, critic_o)
            )
        n_skipped = n_skipped + (~finite).astype(jnp.int32)
        metrics["empty_minibatch"] = (num_tokens == 0).astype(jnp.float32)
        return (actor_p, actor_o, critic_p, critic_o, finite, n_skipped), metrics

    carry = (
        state.actor_params,
        state.actor_opt_state,
        state.critic_params,
        state.critic_opt_state,
        inputs_ok,
        jnp.zeros((), jnp.int32),
    )
    (actor_p, actor_o, critic_p, critic_o, ok, n_skipped), mb_metrics = jax.lax.scan(
        minibatch_step, carry, order_NxM
    )
    skipped = ~ok
    kl_coef = state.kl_coef
    if cfg.kl_adaptive:
        n_valid = jnp.sum(jnp.asarray(batch.valid_B).astype(jnp.float32))
        new_coef = algo.kl_controller_update(
            kl_coef, adv_metrics["kl_ref"], n_valid, cfg.kl_target, cfg.kl_horizon
        )
        kl_coef = jnp.where(skipped, kl_coef, new_coef)
    new_state = state.replace(
        step=state.step + 1,
        actor_params=actor_p,
        actor_opt_state=actor_o,
        critic_params=critic_p,
        critic_opt_state=critic_o,
        kl_coef=kl_coef,
        rng=rng,
        skipped_steps=state.skipped_steps + skipped.astype(jnp.int32),
        consecutive_skips=jnp.where(skipped, state.consecutive_skips + 1, 0),
    )
    metrics = {k: jnp.mean(v) for k, v in mb_metrics.items()}
    metrics["entropy"] = metrics.pop("entropy_tok")
    metrics.update(adv_metrics)
    metrics.update(
        skipped=skipped.astype(jnp.float32),
        inputs_finite=inputs_ok.astype(jnp.float32),
        skipped_minibatches=n_skipped.astype(jnp.float32),
        consecutive_skips=new_state.consecutive_skips.astype(jnp.float32),
        next_kl_coef=kl_coef,
    )
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


# ------------------------------------------------------------------------- jitted entry points
def rollout_batch_shardings(mesh, rules=None) -> RolloutBatch:
    """A RolloutBatch of NamedShardings: rows over `act_batch` (data x fsdp), the rest replicated.
    B must be divisible by the data x fsdp size."""
    rules = sharding.TRAIN_RULES if rules is None else rules
    bt, b = sharding.batch_sharding(mesh, rules, 2), sharding.batch_sharding(mesh, rules, 1)
    return RolloutBatch(
        tokens_BxT=bt, mask_BxT=bt, positions_BxT=bt, response_mask_BxT=bt, old_logp_BxT=bt,
        ref_logp_BxT=bt, old_values_BxT=bt, scores_B=b, valid_B=b, group_id_B=b,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PPOSteps:
    """The jitted steps for one (config, models, mesh). Call them anywhere; they trace inside
    the mesh and logical rules.

    update(state, batch) -> (state, metrics)        state donated
    prepare(state, batch) -> batch                   fills old_logp (actor, recomputed),
                                                     ref_logp and old_values in one call
    logprobs(state, batch) -> logp_BxT               actor (recompute old_logp)
    ref_logprobs(state, batch) -> ref_logp_BxT       frozen reference
    values(state, batch) -> values_BxT               critic (old_values)
    advantages(state, batch) -> (adv, returns, token_rewards, metrics)
    """

    state_shardings: TrainState
    batch_shardings: RolloutBatch
    mesh: Any
    rules: Any
    _update: Callable
    _prepare: Callable
    _logprobs: Callable
    _ref_logprobs: Callable
    _values: Callable | None
    _advantages: Callable

    def _call(self, fn, *args):
        with sharding.mesh_rules(self.mesh, self.rules):
            return fn(*args)

    def update(self, state, batch):
        return self._call(self._update, state, batch)

    def prepare(self, state, batch):
        return self._call(self._prepare, state, batch)

    def logprobs(self, state, batch):
        return self._call(self._logprobs, state, batch)

    def ref_logprobs(self, state, batch):
        return self._call(self._ref_logprobs, state, batch)

    def values(self, state, batch):
        if self._values is None:
            raise ValueError("this PPO config has no critic (advantage_estimator != 'gae')")
        return self._call(self._values, state, batch)

    def advantages(self, state, batch):
        return self._call(self._advantages, state, batch)


def make_jitted(
    cfg: PPOConfig, actor_model, critic_model, mesh, rules=None, compiler_options=None
) -> PPOSteps:
    """Jit every step once with explicit in/out shardings for `mesh`; `update` donates state.

    `compiler_options` go to XLA (tests use {"xla_backend_optimization_level": 0} to halve CPU
    compile time)."""
    rules = sharding.TRAIN_RULES if rules is None else rules
    check_models(cfg, actor_model, critic_model)
    policy_fn, value_fn = model_fns(actor_model, critic_model if cfg.separate_critic else None)
    pv_fn = policy_value_fn(actor_model) if cfg.shared_critic else None
    state_sh = train_state_shardings(cfg, actor_model, critic_model, mesh, rules)
    batch_sh = rollout_batch_shardings(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    bt = batch_sh.tokens_BxT
    update = functools.partial(
        ppo_update,
        cfg=cfg,
        policy_fn=policy_fn,
        value_fn=value_fn,
        policy_value_fn=pv_fn,
        mesh=mesh,
        rules=rules,
    )

    def jit(fn, out):
        return jax.jit(
            fn,
            in_shardings=(state_sh, batch_sh),
            out_shardings=out,
            compiler_options=compiler_options,
        )

    def ref_logp(state, batch):
        params = state.ref_params if state.ref_params is not None else state.actor_params
        return compute_logprobs(policy_fn, params, batch)

    def critic_params(state):
        return state.actor_params if cfg.shared_critic else state.critic_params

    def prepare(state, batch):
        """One forward pass per model: old log-probs, reference log-probs, old values."""
        if cfg.shared_critic:
            logits, values = pv_fn(
                state.actor_params, batch.tokens_BxT, batch.positions_BxT, batch.mask_BxT
            )
            return _with_ref(
                state,
                batch.replace(
                    old_logp_BxT=_aligned_logp_entropy(logits, batch.tokens_BxT, False)[0],
                    old_values_BxT=_shift_right(values.astype(jnp.float32)),
                ),
            )
        batch = batch.replace(old_logp_BxT=compute_logprobs(policy_fn, state.actor_params, batch))
        if state.critic_params is not None:
            batch = batch.replace(
                old_values_BxT=compute_values(value_fn, state.critic_params, batch)
            )
        return _with_ref(state, batch)

    def _with_ref(state, batch):
        if state.ref_params is not None:
            batch = batch.replace(ref_logp_BxT=compute_logprobs(policy_fn, state.ref_params, batch))
        return batch

    return PPOSteps(
        state_shardings=state_sh,
        batch_shardings=batch_sh,
        mesh=mesh,
        rules=rules,
        _update=jax.jit(
            update,
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, replicated),
            donate_argnums=(0,),
            compiler_options=compiler_options,
        ),
        _prepare=jit(prepare, batch_sh),
        _logprobs=jit(lambda s, b: compute_logprobs(policy_fn, s.actor_params, b), bt),
        _ref_logprobs=jit(ref_logp, bt),
        _values=(
            jit(lambda s, b: compute_values(value_fn, critic_params(s), b), bt)
            if cfg.use_critic
            else None
        ),
        _advantages=jit(
            lambda s, b: compute_advantages(b, cfg, s.kl_coef), (bt, bt, bt, replicated)
        ),
    )
