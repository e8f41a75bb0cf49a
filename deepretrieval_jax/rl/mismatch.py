"""Sampler-trainer mismatch: how far the sampler's log-probs are from the trainer's, and the
truncated importance-sampling (TIS) correction.

The sampler (KV cache, its own sharding, possibly bf16: `config.sampling.compute_dtype`) and the
trainer (full forward, fp32) compute slightly different distributions, so the rollout is
off-policy for the trainer's "old" policy. Every step logs

    log r_t  = logp_trainer_t - logp_sampler_t           on valid response tokens
    kl_k1    = mean_t (logp_sampler_t - logp_trainer_t)   (KL(sampler || trainer), k1 estimate)
    kl_k3    = mean_t (r_t - 1 - log r_t)                 (same KL, non-negative estimator)
and, with `ppo.tis_cap` > 0, weights each token's policy-gradient term by

    w_t = min(r_t, tis_cap)                               (Yao et al. 2025, "Your efficient RL
                                                           framework secretly brings you off-policy")
The weight multiplies the advantage: for w >= 0 the clipped surrogate is positively homogeneous
in A (the clip branch depends only on A's sign), so w * l(A) = l(w * A) exactly, the entropy and
KL-loss terms stay unweighted (as in verl), and the PPO step itself is unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from deepretrieval_jax.rl import algo
from deepretrieval_jax.rl.batch import loss_mask


@jax.jit
def mismatch_metrics(sampler_logp_BxT, trainer_logp_BxT, mask_BxT):
    """Token means over `mask_BxT` of the formulas above (0 for an empty mask).

    Returns:
        {mismatch_kl_k1, mismatch_kl_k3, mismatch_ratio_mean, mismatch_ratio_max,
         mismatch_abs_logp_diff_mean}, float32 scalars.
    """
    mask = jnp.asarray(mask_BxT).astype(jnp.bool_)
    log_r = jnp.where(mask, trainer_logp_BxT - sampler_logp_BxT, 0.0)
    ratio = jnp.exp(log_r)
    return {
        "mismatch_kl_k1": algo.masked_mean(-log_r, mask),
        "mismatch_kl_k3": algo.masked_mean(jnp.expm1(log_r) - log_r, mask),
        "mismatch_ratio_mean": algo.masked_mean(ratio, mask),
        "mismatch_ratio_max": jnp.max(jnp.where(mask, ratio, 0.0)),
        "mismatch_abs_logp_diff_mean": algo.masked_mean(jnp.abs(log_r), mask),
    }


@jax.jit
def tis_weights(sampler_logp_BxT, trainer_logp_BxT, mask_BxT, cap):
    """w_t = min(exp(logp_trainer_t - logp_sampler_t), cap) on `mask_BxT`, 0 elsewhere."""
    mask = jnp.asarray(mask_BxT).astype(jnp.bool_)
    log_r = jnp.where(mask, trainer_logp_BxT - sampler_logp_BxT, 0.0)
    return jnp.where(mask, jnp.minimum(jnp.exp(log_r), cap), 0.0)


def correct(advantages, batch, sampler_logp_BxT, tis_cap: float):
    """Adds the mismatch metrics to `advantages` (compute_advantages' output) and, with
    `tis_cap` > 0, scales the advantages by the TIS weights. `batch.old_logp_BxT` must hold the
    trainer's recomputed log-probs. Pure; see `make_jitted_correction`."""
    adv_BxT, returns_BxT, rewards_BxT, metrics = advantages
    mask = loss_mask(batch)
    metrics = dict(metrics, **mismatch_metrics(sampler_logp_BxT, batch.old_logp_BxT, mask))
    if tis_cap > 0:
        w_BxT = tis_weights(sampler_logp_BxT, batch.old_logp_BxT, mask, tis_cap)
        adv_BxT = jnp.where(mask, adv_BxT * w_BxT, 0.0)
        metrics["tis_weight_mean"] = algo.masked_mean(w_BxT, mask)
        metrics["tis_capped_fraction"] = algo.masked_mean(w_BxT >= tis_cap, mask)
    return adv_BxT, returns_BxT, rewards_BxT, metrics


def make_jitted_correction(tis_cap: float, batch_shardings, mesh):
    """`correct` jitted with the PPO steps' shardings: (batch, sampler_logp, advantages) ->
    advantages, ready for `PPOSteps.update(state, batch, advantages)`."""
    bt = batch_shardings.tokens_BxT
    adv_sh = (bt, bt, bt, NamedSharding(mesh, PartitionSpec()))
    return jax.jit(
        lambda batch, logp, adv: correct(adv, batch, logp, tis_cap),
        in_shardings=(batch_shardings, bt, adv_sh),
        out_shardings=adv_sh,
    )
