"""Per-micro-batch PPO losses and their gradient accumulation (pure; `rl/update.py` jits them).

Every loss is scaled so that the micro-batch losses of one mini-batch sum to the mini-batch's
loss (`num_tokens` / `num_rows` are the mini-batch's totals); token-mean metrics are weighted by
the micro-batch's share of the mini-batch's tokens, so they too sum to the mini-batch's value.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from deepretrieval_jax.rl import algo, objectives
from deepretrieval_jax.rl.batch import aligned_logp_entropy, shift_right
from deepretrieval_jax.rl.state import PPOConfig


@flax.struct.dataclass
class MiniBatch:
    """Rows of one mini- or micro-batch, with the per-token targets of the update."""

    tokens_BxT: jax.Array  # int32, as in RolloutBatch
    mask_BxT: jax.Array  # bool/int, real tokens
    positions_BxT: jax.Array  # int32
    loss_mask_BxT: jax.Array  # bool, valid response tokens (`batch.loss_mask`)
    old_logp_BxT: jax.Array  # float32, token-aligned; 0 outside loss_mask
    ref_logp_BxT: jax.Array  # float32, token-aligned; 0 outside loss_mask
    old_values_BxT: jax.Array  # float32, token-aligned; 0 outside loss_mask
    adv_BxT: jax.Array  # float32, advantages; 0 outside loss_mask
    returns_BxT: jax.Array  # float32, value targets; 0 outside loss_mask


def actor_loss(params, mb, cfg: PPOConfig, policy_fn, num_tokens, num_rows):
    """Actor loss of one micro-batch, scaled so that micro-batch losses sum to the mini-batch's.

    L = clipped surrogate - entropy_coef * H + kl_loss_coef * KL(actor || ref)  (KL ADDED)
    """
    logits_BxTxV = policy_fn(params, mb.tokens_BxT, mb.positions_BxT, mb.mask_BxT)
    return _actor_terms(logits_BxTxV, mb, cfg, num_tokens, num_rows)


def _agg(cfg: PPOConfig, num_tokens, num_rows) -> dict:
    return dict(
        agg=cfg.loss_agg,
        num_tokens=num_tokens,
        num_rows=num_rows,
        norm_len=cfg.loss_norm_len or None,
    )


def _actor_terms(logits_BxTxV, mb, cfg: PPOConfig, num_tokens, num_rows):
    logp_BxT, entropy_BxT = aligned_logp_entropy(logits_BxTxV, mb.tokens_BxT)
    m = mb.loss_mask_BxT
    agg = _agg(cfg, num_tokens, num_rows)
    if cfg.policy_loss == "gspo":
        pg_loss, metrics = objectives.gspo_policy_loss(
            logp_BxT, mb.old_logp_BxT, mb.adv_BxT, m, cfg.clip_low, cfg.clip_high, **agg
        )
    else:
        pg_loss, metrics = algo.policy_loss(
            logp_BxT, mb.old_logp_BxT, mb.adv_BxT, m, cfg.clip_low, cfg.clip_high, cfg.dual_clip,
            **agg,
        )  # fmt: skip
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


def critic_loss(params, mb, cfg: PPOConfig, value_fn, num_tokens, num_rows):
    """Clipped value loss of one micro-batch (same scaling as `actor_loss`)."""
    values_BxT = value_fn(params, mb.tokens_BxT, mb.positions_BxT, mb.mask_BxT)
    return _critic_terms(values_BxT, mb, cfg, num_tokens, num_rows)


def _critic_terms(raw_values_BxT, mb, cfg: PPOConfig, num_tokens, num_rows):
    values_BxT = shift_right(raw_values_BxT.astype(jnp.float32))
    m = mb.loss_mask_BxT
    loss, metrics = algo.value_loss(
        values_BxT, mb.old_values_BxT, mb.returns_BxT, m, cfg.value_clip,
        **_agg(cfg, num_tokens, num_rows),
    )  # fmt: skip
    share = jnp.sum(m) / jnp.maximum(num_tokens, 1.0)
    metrics = {k: v * share for k, v in metrics.items()}
    metrics["value_loss"] = loss
    return loss, metrics


def shared_loss(params, mb, cfg: PPOConfig, policy_value_fn, num_tokens, num_rows):
    """Shared trunk: actor loss + value_loss_coef * value loss from one forward pass."""
    logits_BxTxV, values_BxT = policy_value_fn(params, mb.tokens_BxT, mb.positions_BxT, mb.mask_BxT)
    a_loss, a_metrics = _actor_terms(logits_BxTxV, mb, cfg, num_tokens, num_rows)
    c_loss, c_metrics = _critic_terms(values_BxT, mb, cfg, num_tokens, num_rows)
    return a_loss + cfg.value_loss_coef * c_loss, {**a_metrics, **c_metrics}


def accumulate_grads(loss_fn, params, micro, num_tokens, num_rows):
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
