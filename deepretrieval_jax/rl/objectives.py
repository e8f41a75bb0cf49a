"""Policy objectives beyond PPO's token-level clipped surrogate: GSPO and DAPO's overlong penalty.

Pure jitted functions with their formulas in the docstrings; `tests/test_rl_objectives.py` checks
each against a NumPy reference, on masks with empty rows. Conventions as in `rl/algo.py` (entry t
of a `[B, T]` array belongs to token t; masked-out entries may hold anything, NaN included).

How the 2025 recipes map onto `PPOConfig` (see docs/configuration.md):
    DAPO     grpo advantages, clip_low=0.2 / clip_high=0.28 (clip-higher), loss_agg="token-mean",
             overlong_buffer_len > 0 (this module's `overlong_penalty`), kl_coef=0, and dynamic
             sampling in the rollout (`config.sampling.dynamic_sampling`, `rl/dynamic_sampling.py`)
    Dr.GRPO  grpo advantages with grpo_normalize_std=False and
             loss_agg="seq-mean-token-sum-norm" (no std and no length normalisation)
    GSPO     policy_loss="gspo" (this module's `gspo_policy_loss`, a sequence-level ratio),
             loss_agg="seq-mean-token-mean", small clips (the paper: 3e-4 / 4e-4)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepretrieval_jax.rl.algo import aggregate_loss, kl_estimate, masked_mean, masked_sum

POLICY_LOSSES = ("ppo", "gspo")


@functools.partial(jax.jit, static_argnames=("agg",))
def gspo_policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    clip_low=3e-4,
    clip_high=4e-4,
    agg="seq-mean-token-mean",
    num_tokens=None,
    num_rows=None,
    norm_len=None,
):
    """Group Sequence Policy Optimisation (Zheng et al. 2025), in its token form (GSPO-token).

        s_b    = exp( sum_t m*(logp - old_logp) / max(sum_t m, 1) )   (length-normalised
                                                                       sequence ratio)
        s_bt   = sg(s_b) * exp(logp_bt - sg(logp_bt))                 (value s_b; gradient
                                                                       s_b * grad logp_bt)
        l_bt   = max(-A_bt * s_bt, -A_bt * clip(s_bt, 1 - clip_low, 1 + clip_high))
    With a per-row advantage (GRPO/RLOO broadcast it) and `agg="seq-mean-token-mean"` this is the
    paper's objective exactly: one clip decision per sequence, every token of a clipped sequence
    gets no gradient. Clip edges count as unclipped, as in `algo.policy_loss`.

    Returns:
        (loss scalar, metrics): clipfrac_low / clipfrac_high (token shares of clipped sequences),
        dual_clipfrac (0), ratio_mean (token mean of s_b), seq_ratio_mean (row mean of s_b over
        rows with tokens), approx_kl (k3 of old vs new per token).
    """
    mask = jnp.asarray(mask).astype(jnp.bool_)
    log_ratio = jnp.where(mask, logp - old_logp, 0.0)
    n_B = jnp.sum(mask, axis=-1).astype(jnp.float32)
    seq_log_ratio_B = masked_sum(log_ratio, mask, axis=-1) / jnp.maximum(n_B, 1.0)
    logp_safe = jnp.where(mask, logp, 0.0)
    ratio = jnp.exp(
        jax.lax.stop_gradient(seq_log_ratio_B)[:, None]
        + logp_safe
        - jax.lax.stop_gradient(logp_safe)
    )
    adv = jnp.where(mask, advantages, 0.0)
    low, high = 1.0 - clip_low, 1.0 + clip_high
    clipped_high = (adv > 0) & (ratio > high)
    clipped_low = (adv < 0) & (ratio < low)
    loss = jnp.where(clipped_high, -adv * high, jnp.where(clipped_low, -adv * low, -adv * ratio))
    has_tokens_B = n_B > 0
    metrics = {
        "clipfrac_low": masked_mean(clipped_low, mask),
        "clipfrac_high": masked_mean(clipped_high, mask),
        "dual_clipfrac": jnp.zeros((), jnp.float32),
        "ratio_mean": masked_mean(ratio, mask),
        "seq_ratio_mean": masked_mean(jnp.exp(seq_log_ratio_B), has_tokens_B),
        "approx_kl": masked_mean(kl_estimate(-log_ratio, 0.0, "k3"), mask),
    }
    return aggregate_loss(loss, mask, agg, num_tokens, num_rows, norm_len), metrics


@jax.jit
def overlong_penalty(lengths_B, max_len, buffer_len, factor=1.0):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the score.

        R(L) = 0                                        L <= max_len - buffer_len
             = factor * (max_len - buffer_len - L) / buffer_len     otherwise, down to
             = -factor                                  L >= max_len
    `buffer_len` must be > 0 (a disabled penalty is simply not called).

    Returns:
        penalty_B float32 (<= 0).
    """
    lengths_B = jnp.asarray(lengths_B, jnp.float32)
    start = jnp.asarray(max_len, jnp.float32) - buffer_len
    over = jnp.clip((lengths_B - start) / buffer_len, 0.0, 1.0)
    return (-factor * over).astype(jnp.float32)
