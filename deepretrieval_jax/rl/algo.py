"""Pure RL math for PPO / GRPO / RLOO: masked statistics, advantages, KL, losses.

Every public function is a jitted pure function of arrays (strings and flags static; no model,
no sampler) with its formula in the docstring; `tests/test_rl_algo.py` checks each against a
NumPy reference.

Shape legend: B rows (samples), T token positions, V vocabulary. Token-aligned arrays follow the
trainer's convention: entry t belongs to token t (its log-prob given tokens < t, the value of the
state that emits it). A `mask_BxT` is 1 on the tokens a quantity is defined on (valid response
tokens); masked-out entries may hold anything, NaN included: they are selected away with
`jnp.where`, never multiplied by zero, so garbage in padding or in invalid samples cannot leak.

Empty masks are safe everywhere: a mean over zero tokens is 0 (not NaN), a row without response
tokens gets no reward, no advantage and no KL (reference bug 7.9: a zero-length response made the
mean KL and the adaptive KL coefficient NaN).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "abs", "k2", "mse", "k3", "low_var_kl")
LOSS_AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


# ------------------------------------------------------------------------- masked statistics
@functools.partial(jax.jit, static_argnames=("axis",))
def masked_sum(x, mask, axis=None):
    """sum(x[mask]) along `axis`; masked-out entries (even NaN) contribute nothing."""
    mask = jnp.asarray(mask).astype(jnp.bool_)
    return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


@functools.partial(jax.jit, static_argnames=("axis",))
def masked_mean(x, mask, axis=None):
    """sum(x * m) / max(sum(m), 1): the mean over masked-in entries, 0 when there are none."""
    count = jnp.sum(jnp.asarray(mask).astype(jnp.float32), axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


@functools.partial(jax.jit, static_argnames=("unbiased",))
def masked_var(x, mask, unbiased=True):
    """Variance over all masked-in entries; Bessel-corrected (n / (n - 1)) when `unbiased`."""
    mask = jnp.asarray(mask).astype(jnp.bool_)
    n = jnp.sum(mask.astype(jnp.float32))
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


@functools.partial(jax.jit, static_argnames=("shift_mean",))
def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps) with mean, var (unbiased) over the masked-in entries.

    With `shift_mean=False` the mean is added back (scale only). Masked-out entries are 0.
    """
    mask = jnp.asarray(mask).astype(jnp.bool_)
    mean = masked_mean(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask, whitened, 0.0)


@jax.jit
def explained_variance(values, returns, mask):
    """1 - Var[returns - values] / Var[returns] over masked-in entries (0 if Var[returns] = 0)."""
    var_ret = masked_var(returns, mask)
    var_err = masked_var(returns - values, mask)
    return jnp.where(var_ret > 0, 1.0 - var_err / jnp.where(var_ret > 0, var_ret, 1.0), 0.0)


# ------------------------------------------------------------------------------ advantages
@jax.jit
def gae(rewards_BxT, values_BxT, mask_BxT, gamma, lam):
    """Generalised advantage estimation over the masked-in tokens of each row.

    Scanning t backwards over masked-in tokens only (t' = the next masked-in token after t):
        delta_t = r_t + gamma * V_t' - V_t            (V_t' = 0 after a row's last token)
        A_t     = delta_t + gamma * lam * A_t'        (A_t' = 0 after a row's last token)
        R_t     = A_t + V_t
    Masked-out positions neither contribute nor break the recursion (they are skipped); their
    advantages and returns are 0.

    Returns:
        (advantages_BxT, returns_BxT), float32.
    """
    mask_BxT = jnp.asarray(mask_BxT).astype(jnp.bool_)
    rewards_BxT = jnp.where(mask_BxT, rewards_BxT, 0.0).astype(jnp.float32)
    values_BxT = jnp.where(mask_BxT, values_BxT, 0.0).astype(jnp.float32)

    def step(carry, xs):
        next_value_B, next_adv_B = carry
        r_B, v_B, m_B = xs
        delta_B = r_B + gamma * next_value_B - v_B
        adv_B = delta_B + gamma * lam * next_adv_B
        carry = (jnp.where(m_B, v_B, next_value_B), jnp.where(m_B, adv_B, next_adv_B))
        return carry, jnp.where(m_B, adv_B, 0.0)

    B = rewards_BxT.shape[0]
    init = (jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.float32))
    xs = (rewards_BxT.T, values_BxT.T, mask_BxT.T)
    _, adv_TxB = jax.lax.scan(step, init, xs, reverse=True)
    advantages_BxT = adv_TxB.T
    returns_BxT = jnp.where(mask_BxT, advantages_BxT + values_BxT, 0.0)
    return advantages_BxT, returns_BxT


def _same_group_BxB(group_id_B, valid_B):
    """same[i, j] = group_id[i] == group_id[j] and j is valid."""
    valid_B = jnp.asarray(valid_B).astype(jnp.bool_)
    return (group_id_B[:, None] == group_id_B[None, :]) & valid_B[None, :]


@functools.partial(jax.jit, static_argnames=("normalize_std",))
def grpo_advantages(scores_B, group_id_B, valid_B, eps=1e-6, normalize_std=True):
    """Group-normalised outcome advantages (GRPO, Shao et al. 2024).

        A_i = (s_i - mean_g(s)) / (std_g(s) + eps)      (std unbiased; no division if not
                                                          `normalize_std`, as in Dr. GRPO)
    where g is i's group (same `group_id_B`, e.g. the n samples of one prompt) restricted to
    valid members. Invalid samples and members of groups with fewer than two valid samples get 0
    (no baseline exists). O(B^2) pairwise masks: fine for the batch sizes of a PPO step.

    Returns:
        advantages_B float32.
    """
    scores_B = jnp.asarray(scores_B, jnp.float32)
    valid_B = jnp.asarray(valid_B).astype(jnp.bool_)
    same_BxB = _same_group_BxB(group_id_B, valid_B)
    s_B = jnp.where(valid_B, scores_B, 0.0)
    n_B = jnp.sum(same_BxB, axis=1).astype(jnp.float32)
    mean_B = jnp.sum(jnp.where(same_BxB, s_B[None, :], 0.0), axis=1) / jnp.maximum(n_B, 1.0)
    dev_BxB = jnp.where(same_BxB, s_B[None, :] - mean_B[:, None], 0.0)
    var_B = jnp.sum(jnp.square(dev_BxB), axis=1) / jnp.maximum(n_B - 1.0, 1.0)
    adv_B = s_B - mean_B
    if normalize_std:
        adv_B = adv_B / (jnp.sqrt(var_B) + eps)
    return jnp.where(valid_B & (n_B >= 2), adv_B, 0.0)


@jax.jit
def rloo_advantages(scores_B, group_id_B, valid_B):
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024).

        A_i = s_i - mean_{j in g, j != i}(s_j) = n / (n - 1) * (s_i - mean_g(s))
    over the valid members of i's group; 0 for invalid samples and groups with < 2 valid members.

    Returns:
        advantages_B float32.
    """
    scores_B = jnp.asarray(scores_B, jnp.float32)
    valid_B = jnp.asarray(valid_B).astype(jnp.bool_)
    same_BxB = _same_group_BxB(group_id_B, valid_B)
    s_B = jnp.where(valid_B, scores_B, 0.0)
    n_B = jnp.sum(same_BxB, axis=1).astype(jnp.float32)
    total_B = jnp.sum(jnp.where(same_BxB, s_B[None, :], 0.0), axis=1)
    baseline_B = (total_B - s_B) / jnp.maximum(n_B - 1.0, 1.0)
    return jnp.where(valid_B & (n_B >= 2), s_B - baseline_B, 0.0)


# -------------------------------------------------------------------------------------- KL
@functools.partial(jax.jit, static_argnames=("kind",))
def kl_estimate(logp, ref_logp, kind="k1"):
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens' log-probs.

    k1:             logp - ref_logp
    abs:            |logp - ref_logp|
    k2 / mse:       0.5 * (logp - ref_logp)^2
    k3 / low_var_kl: d = clip(ref_logp - logp, -20, 20);  clip(exp(d) - d - 1, -10, 10)
                    (Schulman's unbiased, non-negative estimator, clamped as in verl)
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimate: kind must be one of {KL_ESTIMATORS}, got {kind!r}")
    diff = logp - ref_logp
    if kind == "k1":
        return diff
    if kind == "abs":
        return jnp.abs(diff)
    if kind in ("k2", "mse"):
        return 0.5 * jnp.square(diff)
    d = jnp.clip(-diff, -20.0, 20.0)
    return jnp.clip(jnp.expm1(d) - d, -10.0, 10.0)  # expm1: no cancellation near d = 0


@jax.jit
def mean_sequence_kl(kl_BxT, mask_BxT, row_mask_B=None):
    """mean over rows with >= 1 token of (per-row token-mean KL); 0 if no row has a token.

    The quantity the adaptive controller tracks (verl's `current_kl`), without its NaN on
    zero-length responses.
    """
    mask_BxT = jnp.asarray(mask_BxT).astype(jnp.bool_)
    per_row_B = masked_mean(kl_BxT, mask_BxT, axis=-1)
    has_tokens_B = jnp.any(mask_BxT, axis=-1)
    if row_mask_B is not None:
        has_tokens_B = has_tokens_B & jnp.asarray(row_mask_B).astype(jnp.bool_)
    return masked_mean(per_row_B, has_tokens_B)


@jax.jit
def last_token_mask(mask_BxT):
    """1 at the last masked-in position of each row (all 0 for an empty row)."""
    mask_BxT = jnp.asarray(mask_BxT).astype(jnp.bool_)
    T = mask_BxT.shape[-1]
    last_B = T - 1 - jnp.argmax(mask_BxT[:, ::-1], axis=-1)
    return (jnp.arange(T)[None, :] == last_B[:, None]) & jnp.any(mask_BxT, axis=-1, keepdims=True)


@jax.jit
def token_rewards(scores_B, kl_BxT, mask_BxT, coef):
    """Per-token rewards: r_t = -coef * kl_t on response tokens, plus score on the last one.

        r_t = -coef * kl_t + [t = last response token] * score
    A row without response tokens gets no reward (there is no action to credit). Pass
    `kl_BxT=None` (or coef=0) when the KL is not in the reward.
    """
    mask_BxT = jnp.asarray(mask_BxT).astype(jnp.bool_)
    last_BxT = last_token_mask(mask_BxT)
    rewards_BxT = jnp.where(last_BxT, jnp.asarray(scores_B, jnp.float32)[:, None], 0.0)
    if kl_BxT is not None:
        rewards_BxT = rewards_BxT - coef * jnp.where(mask_BxT, kl_BxT, 0.0)
    return jnp.where(mask_BxT, rewards_BxT, 0.0)


@jax.jit
def kl_controller_update(kl_coef, current_kl, n_steps, target, horizon):
    """Adaptive KL coefficient (Ziegler et al. 2019), a pure update of the scalar state.

        e     = clip(current_kl / target - 1, -0.2, 0.2)
        coef' = coef * (1 + e * n_steps / horizon)
    A non-finite `current_kl` (e.g. from a corrupted batch) leaves the coefficient unchanged, so
    one bad step cannot poison the rest of the run. A fixed controller simply never calls this.
    """
    error = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
    new_coef = kl_coef * (1.0 + error * n_steps / horizon)
    return jnp.where(jnp.isfinite(new_coef), new_coef, kl_coef).astype(jnp.float32)


# ---------------------------------------------------------------------------------- losses
@functools.partial(jax.jit, static_argnames=("agg",))
def aggregate_loss(
    loss_BxT, mask_BxT, agg="token-mean", num_tokens=None, num_rows=None, norm_len=None
):
    """Reduce a per-token loss to a scalar.

        token-mean:              sum_{b,t} m*l / N_tokens               (DAPO's token-level mean)
        seq-mean-token-mean:     sum_b [ sum_t m*l / max(sum_t m, 1) ] / N_rows  (GRPO, GSPO)
        seq-mean-token-sum:      sum_b [ sum_t m*l ] / N_rows
        seq-mean-token-sum-norm: sum_b [ sum_t m*l ] / (N_rows * L)     (Dr. GRPO: a constant
                                 L = `norm_len` instead of each row's length; None = T)
    N_tokens (masked-in tokens) and N_rows (rows with >= 1 masked-in token) default to this
    batch's counts; a gradient-accumulation loop passes the whole mini-batch's counts so the sum
    of its micro-batch losses equals the mini-batch loss exactly.
    """
    if agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"aggregate_loss: agg must be one of {LOSS_AGGREGATIONS}, got {agg!r}")
    mask_BxT = jnp.asarray(mask_BxT).astype(jnp.bool_)
    if agg == "token-mean":
        if num_tokens is None:
            num_tokens = jnp.sum(mask_BxT)
        return masked_sum(loss_BxT, mask_BxT) / jnp.maximum(num_tokens, 1.0)
    if num_rows is None:
        num_rows = jnp.sum(jnp.any(mask_BxT, axis=-1))
    row_B = masked_sum(loss_BxT, mask_BxT, axis=-1)
    if agg == "seq-mean-token-mean":
        row_B = row_B / jnp.maximum(jnp.sum(mask_BxT, axis=-1), 1.0)
    if agg == "seq-mean-token-sum-norm":
        row_B = row_B / (mask_BxT.shape[-1] if norm_len is None else norm_len)
    return jnp.sum(row_B) / jnp.maximum(num_rows, 1.0)


@functools.partial(jax.jit, static_argnames=("agg",))
def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=None,
    agg="token-mean",
    num_tokens=None,
    num_rows=None,
    norm_len=None,
):
    """Clipped surrogate (PPO) with separate low/high clip and optional dual clip.

        ratio = exp(logp - old_logp)
        l     = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
        l     = min(l, -A * c)   where A < 0            (dual clip, c = `dual_clip` > 1)
    implemented with explicit selects, so a ratio exactly on a clip edge counts as unclipped and
    takes the unclipped gradient. Aggregated with `aggregate_loss`.

    Returns:
        (loss scalar, metrics): clipfrac_low (A < 0, ratio < 1 - clip_low), clipfrac_high
        (A > 0, ratio > 1 + clip_high), dual_clipfrac, ratio_mean, approx_kl (k3 of old vs new),
        all token means over `mask`.
    """
    mask = jnp.asarray(mask).astype(jnp.bool_)
    log_ratio = jnp.where(mask, logp - old_logp, 0.0)
    ratio = jnp.exp(log_ratio)
    adv = jnp.where(mask, advantages, 0.0)
    low, high = 1.0 - clip_low, 1.0 + clip_high
    clipped_high = (adv > 0) & (ratio > high)
    clipped_low = (adv < 0) & (ratio < low)
    loss = jnp.where(clipped_high, -adv * high, jnp.where(clipped_low, -adv * low, -adv * ratio))
    dual = jnp.zeros_like(mask)
    if dual_clip is not None:
        dual = (adv < 0) & (ratio > dual_clip)
        loss = jnp.where(dual, -adv * dual_clip, loss)
    metrics = {
        "clipfrac_low": masked_mean(clipped_low, mask),
        "clipfrac_high": masked_mean(clipped_high, mask),
        "dual_clipfrac": masked_mean(dual, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "approx_kl": masked_mean(kl_estimate(-log_ratio, 0.0, "k3"), mask),
    }
    return aggregate_loss(loss, mask, agg, num_tokens, num_rows, norm_len), metrics


@functools.partial(jax.jit, static_argnames=("agg",))
def value_loss(
    values,
    old_values,
    returns,
    mask,
    clip=0.5,
    agg="token-mean",
    num_tokens=None,
    num_rows=None,
    norm_len=None,
):
    """Clipped value loss (PPO2).

        v_clip = old_values + clip(values - old_values, -clip, clip)
        l      = 0.5 * max((values - R)^2, (v_clip - R)^2)
    `clip=None` gives the plain 0.5 * (values - R)^2.

    Returns:
        (loss scalar, metrics): value_clipfrac (|values - old| > clip and the clipped
        branch strictly larger), value_mean.
    """
    mask = jnp.asarray(mask).astype(jnp.bool_)
    # Select garbage away before any arithmetic so NaN in padding cannot reach the gradient.
    values = jnp.where(mask, values, 0.0)
    old_values = jnp.where(mask, old_values, 0.0)
    returns = jnp.where(mask, returns, 0.0)
    err = jnp.square(values - returns)
    if clip is None:
        loss, clipped = 0.5 * err, jnp.zeros_like(mask)
    else:
        v_clip = old_values + jnp.clip(values - old_values, -clip, clip)
        err_clip = jnp.square(v_clip - returns)
        # Clipped = the clipped branch is active and wins (robust to ties at the first epoch).
        clipped = (jnp.abs(values - old_values) > clip) & (err_clip > err)
        loss = 0.5 * jnp.maximum(err, err_clip)
    metrics = {
        "value_clipfrac": masked_mean(clipped, mask),
        "value_mean": masked_mean(values, mask),
    }
    return aggregate_loss(loss, mask, agg, num_tokens, num_rows, norm_len), metrics


# ---------------------------------------------------------------------------------- logits
@jax.jit
def logprobs_from_logits(logits_BxTxV, tokens_BxT):
    """log softmax(logits)[token] in float32: log-prob of each given token."""
    logits = logits_BxTxV.astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits, axis=-1)
    picked_BxT = jnp.take_along_axis(logits, tokens_BxT[..., None], axis=-1)[..., 0]
    return picked_BxT - logz_BxT


@jax.jit
def entropy_from_logits(logits_BxTxV):
    """H = logsumexp(z) - sum softmax(z) * z, in float32."""
    logits = logits_BxTxV.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)
