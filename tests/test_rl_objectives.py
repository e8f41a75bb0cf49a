"""rl/objectives.py, rl/mismatch.py, rl/dynamic_sampling.py and the loss-aggregation modes against
plain NumPy references, on masks with empty rows and NaN outside the mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepretrieval_jax.rl import algo, dynamic_sampling, losses, mismatch, objectives
from deepretrieval_jax.rl.state import PPOConfig

RTOL, ATOL = 1e-5, 1e-6
AGGS = algo.LOSS_AGGREGATIONS


def _data(seed=0, B=6, T=9):
    """Per-row advantages, a mask with an empty row (2) and a hole, NaN outside the mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), bool)
    for b in range(B):
        start = rng.integers(1, T // 2)
        mask[b, start : start + rng.integers(1, T - start + 1)] = True
    mask[2] = False
    mask[0, 3:] = True
    mask[0, 5] = False
    old = rng.normal(-1.0, 0.5, (B, T))
    logp = old + rng.normal(0.0, 0.3, (B, T))
    adv_B = rng.normal(size=B)
    adv = np.repeat(adv_B[:, None], T, axis=1)
    nan = lambda x: np.where(mask, x, np.nan)  # noqa: E731
    return nan(logp), nan(old), nan(adv), mask


def np_agg(loss, m, agg, norm_len=None):
    if agg == "token-mean":
        return (loss * m).sum() / max(m.sum(), 1)
    rows = m.any(-1)
    per = np.where(m, loss, 0.0).sum(-1)
    if agg == "seq-mean-token-mean":
        per = per / np.maximum(m.sum(-1), 1)
    if agg == "seq-mean-token-sum-norm":
        per = per / (m.shape[-1] if norm_len is None else norm_len)
    return per[rows].sum() / max(rows.sum(), 1)


def np_gspo(logp, old, adv, m, cl, ch, agg):
    lr = np.where(m, logp - old, 0.0)
    s = np.exp(lr.sum(-1) / np.maximum(m.sum(-1), 1))[:, None] * np.ones_like(lr)
    a = np.where(m, adv, 0.0)
    loss = np.maximum(-a * s, -a * np.clip(s, 1 - cl, 1 + ch))
    return np_agg(np.where(m, loss, 0.0), m, agg), s


@pytest.mark.parametrize("agg", AGGS)
def test_aggregations_match_numpy_with_empty_rows(agg):
    rng = np.random.default_rng(1)
    _, _, _, m = _data()
    loss = np.where(m, rng.normal(size=m.shape), np.nan)
    for norm_len in (None, 32):
        got = algo.aggregate_loss(loss, m, agg, norm_len=norm_len)
        np.testing.assert_allclose(got, np_agg(np.where(m, loss, 0), m, agg, norm_len), RTOL, ATOL)
    assert float(algo.aggregate_loss(loss, np.zeros_like(m), agg)) == 0.0


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_gspo_matches_numpy_value_and_sequence_level_gradient(agg):
    logp, old, adv, m = _data(4)
    cl, ch = 0.05, 0.08
    got, metrics = objectives.gspo_policy_loss(logp, old, adv, m, cl, ch, agg)
    want, s = np_gspo(logp, old, adv, m, cl, ch, agg)
    np.testing.assert_allclose(got, want, RTOL, ATOL)
    rows = m.any(-1)
    np.testing.assert_allclose(metrics["seq_ratio_mean"], s[rows, 0].mean(), RTOL, ATOL)
    # Gradient: d loss / d logp_bt = -A_b * s_b / |y_b| / N_rows on unclipped rows, 0 on
    # clipped ones (one clip decision per sequence), finite despite the NaN padding.
    grad = np.asarray(
        jax.grad(lambda lp: objectives.gspo_policy_loss(lp, old, adv, m, cl, ch, agg)[0])(
            jnp.asarray(logp)
        )
    )
    assert np.all(np.isfinite(grad))
    a = np.where(m, adv, 0.0).sum(-1) / np.maximum(m.sum(-1), 1)  # the row's advantage
    clipped = ((a > 0) & (s[:, 0] > 1 + ch)) | ((a < 0) & (s[:, 0] < 1 - cl))
    assert clipped.any() and (~clipped & rows).any(), "pick data with both kinds of rows"
    if agg == "seq-mean-token-mean":
        scale = 1.0 / np.maximum(m.sum(-1), 1) / rows.sum()
    else:
        scale = np.full(m.shape[0], 1.0 / m.sum())
    want_grad = np.where(m, (-a * s[:, 0] * scale * ~clipped)[:, None], 0.0)
    np.testing.assert_allclose(grad, want_grad, RTOL, ATOL)


def test_overlong_penalty_matches_dapo():
    lengths = np.array([0, 10, 12, 13, 15, 16, 20])
    got = objectives.overlong_penalty(lengths, 16, 4, 0.5)
    want = [0, 0, 0, -0.125, -0.375, -0.5, -0.5]  # 0 up to 12, linear to -0.5 at 16
    np.testing.assert_allclose(got, want, RTOL, ATOL)


def test_clip_low_and_high_reach_the_actor_loss():
    """DAPO's clip-higher: PPOConfig.clip_low/clip_high are the bounds the actor loss uses."""
    logp, old, adv, m = _data(3)
    logp, old = np.minimum(logp, -0.05), np.minimum(old, -0.05)  # log-probs of real tokens
    T = m.shape[1]
    mb = losses.MiniBatch(
        tokens_BxT=jnp.zeros(m.shape, jnp.int32), mask_BxT=jnp.ones(m.shape, bool),
        positions_BxT=jnp.zeros(m.shape, jnp.int32), loss_mask_BxT=m,
        old_logp_BxT=np.where(m, old, 0.0), ref_logp_BxT=np.zeros(m.shape),
        old_values_BxT=np.zeros(m.shape), adv_BxT=np.where(m, adv, 0.0),
        returns_BxT=np.zeros(m.shape),
    )  # fmt: skip
    aligned = np.where(m, logp, -0.5)
    # logits whose aligned log-prob of token 0 is `aligned`: a 2-way softmax per position.
    z = np.log(np.expm1(-np.concatenate([aligned[:, 1:], np.full((m.shape[0], 1), -0.5)], 1)))
    logits = np.stack([np.zeros_like(z), z], axis=-1).astype(np.float32)
    np.testing.assert_allclose(
        algo.logprobs_from_logits(logits[:, :-1], np.zeros((m.shape[0], T - 1), np.int32)),
        aligned[:, 1:], rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    n, wants = float(m.sum()), []
    for cl, ch in [(0.2, 0.2), (0.1, 0.28)]:
        cfg = PPOConfig(clip_low=cl, clip_high=ch, entropy_coef=0.0)
        loss, met = losses._actor_terms(jnp.asarray(logits), mb, cfg, n, float(m.any(-1).sum()))
        want = np_agg(
            np.where(m, np.maximum(-adv * np.exp(logp - old),
                                   -adv * np.clip(np.exp(logp - old), 1 - cl, 1 + ch)), 0.0),
            m, "token-mean",
        )  # fmt: skip
        np.testing.assert_allclose(met["policy_loss"], want, rtol=1e-4, atol=1e-5)
        wants.append(want)
    assert abs(wants[0] - wants[1]) > 1e-3  # the data reaches the clip ranges that differ


def test_gspo_and_dr_grpo_configs_select_their_objective():
    cfg = PPOConfig(advantage_estimator="grpo", policy_loss="gspo", loss_agg="seq-mean-token-mean")
    assert cfg.policy_loss == "gspo"
    with pytest.raises(ValueError, match="policy_loss"):
        PPOConfig(policy_loss="vanilla")
    with pytest.raises(ValueError, match="overlong_max_len"):
        PPOConfig(overlong_buffer_len=8, overlong_max_len=8)
    with pytest.raises(ValueError, match="tis_cap"):
        PPOConfig(tis_cap=0.5)


def test_mismatch_metrics_and_tis_weights_match_numpy():
    trainer, sampler, _, m = _data(4)
    got = mismatch.mismatch_metrics(sampler, trainer, m)
    r = np.exp(np.where(m, trainer - sampler, 0.0))
    lr = np.log(r)
    np.testing.assert_allclose(got["mismatch_kl_k1"], (-lr)[m].mean(), RTOL, ATOL)
    np.testing.assert_allclose(got["mismatch_kl_k3"], (r - 1 - lr)[m].mean(), RTOL, ATOL)
    np.testing.assert_allclose(got["mismatch_ratio_mean"], r[m].mean(), RTOL, ATOL)
    np.testing.assert_allclose(got["mismatch_ratio_max"], r[m].max(), RTOL, ATOL)
    w = mismatch.tis_weights(sampler, trainer, m, 1.1)
    np.testing.assert_allclose(w, np.where(m, np.minimum(r, 1.1), 0.0), RTOL, ATOL)
    empty = mismatch.mismatch_metrics(sampler, trainer, np.zeros_like(m))
    assert all(float(v) == 0.0 for v in empty.values())


def test_tis_on_advantages_equals_weighting_the_clipped_surrogate():
    """w * l(A) == l(w * A) for w >= 0: the correction is exact on the policy-gradient term."""
    logp, old, adv, m = _data(5)
    w = np.where(m, np.random.default_rng(0).uniform(0, 2, m.shape), 0.0)
    ratio = np.exp(np.where(m, logp - old, 0.0))
    a = np.where(m, adv, 0.0)
    per_token = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.28))
    got, _ = algo.policy_loss(logp, old, np.where(m, adv, 0.0) * w, m, 0.2, 0.28)
    np.testing.assert_allclose(got, np_agg(per_token * w, m, "token-mean"), RTOL, ATOL)


def test_dynamic_sampling_keeps_informative_groups_and_the_batch_size():
    n = 3
    scores = np.array([1, 1, 1, 0, 1, 0, 2, 2, 2, 0, 0, 5, 7, 7, 7, 3, 3, 4], np.float32)
    valid = np.ones(18, bool)
    valid[15] = False  # group 5: two valid rows (3, 4) still differ
    rows, met = dynamic_sampling.select_groups(scores, valid, n, 3)
    np.testing.assert_array_equal(rows.reshape(3, n)[:, 0] // n, [1, 3, 5])
    assert met["dynamic/zero_variance_fraction"] == pytest.approx(3 / 6)
    assert met["dynamic/filled_fraction"] == 0.0
    rows, met = dynamic_sampling.select_groups(scores, valid, n, 4)  # one filler needed
    np.testing.assert_array_equal(rows.reshape(4, n)[:, 0] // n, [0, 1, 3, 5])
    assert met["dynamic/filled_fraction"] == pytest.approx(1 / 4)
    # A group with a single valid row has no variance.
    valid2 = valid.copy()
    valid2[3:5] = False
    assert not dynamic_sampling.informative_groups(scores, valid2, n)[1]
    with pytest.raises(ValueError, match="only 6 candidates"):
        dynamic_sampling.select_groups(scores, valid, n, 7)
    taken = dynamic_sampling.take_rows({"x": jnp.arange(18)}, rows)
    np.testing.assert_array_equal(taken["x"], rows)
