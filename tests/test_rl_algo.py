"""rl/algo.py against plain NumPy references: masks, empty rows, clip edges, invalid samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepretrieval_jax.rl import algo

RTOL, ATOL = 1e-5, 1e-5


def _random_mask(rng, B, T, empty_rows=(1,)):
    """Left-padded prompts then a response span; some rows empty; a hole in one row."""
    mask = np.zeros((B, T), bool)
    for b in range(B):
        start = rng.integers(0, T // 2)
        length = rng.integers(1, T - start + 1)
        mask[b, start : start + length] = True
    for b in empty_rows:
        mask[b] = False
    mask[0, :] = True
    mask[0, T // 2] = False  # a hole must be skipped, not break the recursion
    return mask


# ---------------------------------------------------------------- NumPy references
def np_gae(r, v, m, gamma, lam):
    B, T = r.shape
    adv = np.zeros((B, T))
    for b in range(B):
        idx = np.nonzero(m[b])[0]
        next_v, next_a = 0.0, 0.0
        for t in idx[::-1]:
            delta = r[b, t] + gamma * next_v - v[b, t]
            next_a = delta + gamma * lam * next_a
            next_v = v[b, t]
            adv[b, t] = next_a
    ret = np.where(m, adv + v, 0.0)
    return adv, ret


def np_kl(lp, ref, kind):
    d = lp - ref
    if kind == "k1":
        return d
    if kind == "abs":
        return np.abs(d)
    if kind in ("k2", "mse"):
        return 0.5 * d**2
    x = np.clip(ref - lp, -20, 20)
    return np.clip(np.exp(x) - x - 1, -10, 10)


def np_policy_loss(lp, old, adv, m, cl, ch, dual, agg):
    ratio = np.exp(lp - old)
    l1 = -adv * ratio
    l2 = -adv * np.clip(ratio, 1 - cl, 1 + ch)
    loss = np.maximum(l1, l2)
    if dual is not None:
        loss = np.where(adv < 0, np.minimum(loss, -adv * dual), loss)
    return np_agg(loss, m, agg)


def np_agg(loss, m, agg):
    if agg == "token-mean":
        return (loss * m).sum() / max(m.sum(), 1)
    rows = m.any(-1)
    per = (loss * m).sum(-1)
    if agg == "seq-mean-token-mean":
        per = per / np.maximum(m.sum(-1), 1)
    if agg == "seq-mean-token-sum-norm":
        per = per / m.shape[-1]
    return per[rows].sum() / max(rows.sum(), 1)


# ------------------------------------------------------------------------ tests
def test_masked_stats_ignore_nan_in_padding_and_empty_mask_is_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 9))
    m = _random_mask(rng, 4, 9)
    x_nan = np.where(m, x, np.nan)
    np.testing.assert_allclose(algo.masked_mean(x_nan, m), x[m].mean(), rtol=RTOL)
    np.testing.assert_allclose(algo.masked_var(x_nan, m), x[m].var(ddof=1), rtol=RTOL)
    np.testing.assert_allclose(
        algo.masked_mean(x_nan, m, axis=-1),
        [x[b][m[b]].mean() if m[b].any() else 0.0 for b in range(4)],
        rtol=RTOL,
    )
    w = np.asarray(algo.masked_whiten(x_nan, m))
    ref = (x - x[m].mean()) / np.sqrt(x[m].var(ddof=1) + 1e-8)
    np.testing.assert_allclose(w[m], ref[m], rtol=1e-4, atol=ATOL)
    assert np.all(w[~m] == 0)
    w2 = np.asarray(algo.masked_whiten(x_nan, m, shift_mean=False))
    np.testing.assert_allclose(w2[m], ref[m] + x[m].mean(), rtol=1e-4, atol=ATOL)
    empty = np.zeros_like(m)
    assert float(algo.masked_mean(x_nan, empty)) == 0.0
    assert np.all(np.asarray(algo.masked_whiten(x_nan, empty)) == 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_numpy_with_holes_and_empty_rows(gamma, lam):
    rng = np.random.default_rng(1)
    B, T = 5, 11
    m = _random_mask(rng, B, T)
    r = np.where(m, rng.normal(size=(B, T)), np.nan)  # garbage outside the mask
    v = np.where(m, rng.normal(size=(B, T)), np.inf)
    adv, ret = algo.gae(r, v, m, gamma, lam)
    ref_adv, ref_ret = np_gae(np.nan_to_num(r), np.where(m, v, 0), m, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ret, ref_ret, rtol=RTOL, atol=ATOL)
    assert np.all(np.asarray(adv)[1] == 0)  # empty row


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rng = np.random.default_rng(2)
    r, v = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    m = np.ones((3, 6), bool)
    adv, ret = algo.gae(r, v, m, 1.0, 1.0)
    to_go = np.cumsum(r[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(ret, to_go, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(adv, to_go - v, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", algo.KL_ESTIMATORS)
def test_kl_estimators_match_numpy(kind):
    rng = np.random.default_rng(3)
    lp, ref = rng.normal(size=(4, 7)) - 2, rng.normal(size=(4, 7)) - 2
    lp[0, 0], ref[0, 0] = -60.0, 0.0  # exercises the k3 clamps
    np.testing.assert_allclose(
        algo.kl_estimate(lp, ref, kind), np_kl(lp, ref, kind), rtol=1e-5, atol=1e-7
    )
    if kind in ("k3", "low_var_kl", "abs", "k2", "mse"):
        assert np.all(np.asarray(algo.kl_estimate(lp, ref, kind)) >= 0)
    with pytest.raises(ValueError, match="kind"):
        algo.kl_estimate(lp, ref, "k4")


def test_zero_length_response_gives_finite_kl_rewards_and_controller():
    kl = np.array([[0.0, 0.2, 0.4], [np.nan, np.nan, np.nan]])
    m = np.array([[0, 1, 1], [0, 0, 0]], bool)
    cur = algo.mean_sequence_kl(kl, m)
    np.testing.assert_allclose(cur, 0.3, rtol=RTOL)
    assert float(algo.mean_sequence_kl(kl, np.zeros_like(m))) == 0.0
    coef = algo.kl_controller_update(jnp.float32(0.1), cur, 8, target=0.3, horizon=100)
    np.testing.assert_allclose(coef, 0.1, rtol=RTOL)
    r = algo.token_rewards(np.array([2.0, 5.0]), kl, m, 0.5)
    np.testing.assert_allclose(r, [[0, -0.1, 2.0 - 0.2], [0, 0, 0]], rtol=RTOL, atol=ATOL)


def test_adaptive_kl_controller_matches_ziegler_and_ignores_nan():
    for cur, target in [(0.5, 0.1), (0.01, 0.1), (0.11, 0.1)]:
        err = np.clip(cur / target - 1, -0.2, 0.2)
        ref = 0.2 * (1 + err * 64 / 1000)
        got = algo.kl_controller_update(jnp.float32(0.2), jnp.float32(cur), 64, target, 1000)
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    got = algo.kl_controller_update(jnp.float32(0.2), jnp.float32(np.nan), 64, 0.1, 1000)
    assert float(got) == pytest.approx(0.2)


def test_token_rewards_score_on_last_response_token():
    rng = np.random.default_rng(4)
    B, T = 6, 10
    m = _random_mask(rng, B, T, empty_rows=(2,))
    m[0] = False
    m[0, 3:8] = True
    kl = rng.normal(size=(B, T))
    s = rng.normal(size=B)
    got = np.asarray(algo.token_rewards(s, kl, m, 0.01))
    ref = np.where(m, -0.01 * kl, 0.0)
    for b in range(B):
        if m[b].any():
            ref[b, np.nonzero(m[b])[0][-1]] += s[b]
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    assert got[0, 7] == pytest.approx(s[0] - 0.01 * kl[0, 7], rel=1e-5)
    no_kl = np.asarray(algo.token_rewards(s, None, m, 0.01))
    assert no_kl.sum() == pytest.approx(sum(s[b] for b in range(B) if m[b].any()), rel=1e-5)


def test_grpo_and_rloo_match_numpy_with_invalid_samples():
    rng = np.random.default_rng(5)
    group = np.repeat(np.arange(4), 4)
    s = rng.normal(size=16)
    valid = np.ones(16, bool)
    valid[[1, 9, 10, 11]] = False  # group 2 keeps one valid member
    s[1] = np.nan  # an invalid sample's score is garbage
    grpo = np.asarray(algo.grpo_advantages(s, group, valid, eps=1e-6))
    rloo = np.asarray(algo.rloo_advantages(s, group, valid))
    ref_g, ref_r = np.zeros(16), np.zeros(16)
    for g in range(4):
        idx = [i for i in range(16) if group[i] == g and valid[i]]
        if len(idx) < 2:
            continue
        x = s[idx]
        ref_g[idx] = (x - x.mean()) / (x.std(ddof=1) + 1e-6)
        ref_r[idx] = [x[k] - np.delete(x, k).mean() for k in range(len(x))]
    np.testing.assert_allclose(grpo, ref_g, rtol=1e-4, atol=ATOL)
    np.testing.assert_allclose(rloo, ref_r, rtol=1e-4, atol=ATOL)
    assert grpo[9] == 0 and grpo[8] == 0 and grpo[1] == 0
    no_std = np.asarray(algo.grpo_advantages(s, group, valid, normalize_std=False))
    np.testing.assert_allclose(
        no_std[:4][valid[:4]], (s[:4] - np.nanmean(s[:4]))[valid[:4]], rtol=1e-5
    )


@pytest.mark.parametrize("agg", algo.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("dual", [None, 3.0])
def test_policy_loss_matches_numpy(agg, dual):
    rng = np.random.default_rng(6)
    B, T = 5, 8
    m = _random_mask(rng, B, T)
    old = rng.normal(size=(B, T)) - 3
    lp = old + rng.normal(size=(B, T)) * 0.6
    lp[2, :3] = old[2, :3] + 2.0  # ratio far beyond the dual clip
    adv = rng.normal(size=(B, T))
    got, metrics = algo.policy_loss(lp, old, adv, m, 0.2, 0.28, dual, agg)
    np.testing.assert_allclose(got, np_policy_loss(lp, old, adv, m, 0.2, 0.28, dual, agg), 1e-5)
    ratio = np.exp(lp - old)
    np.testing.assert_allclose(
        metrics["clipfrac_high"], ((adv > 0) & (ratio > 1.28))[m].mean(), rtol=1e-5
    )
    np.testing.assert_allclose(
        metrics["clipfrac_low"], ((adv < 0) & (ratio < 0.8))[m].mean(), rtol=1e-5
    )
    np.testing.assert_allclose(metrics["ratio_mean"], ratio[m].mean(), rtol=1e-5)


def test_policy_loss_gradient_at_clip_edges_and_token_mean_accumulation():
    old = np.zeros((1, 4), np.float32)
    lp = np.log(np.array([[1.2, 0.8, 1.2, 0.8]], np.float32))  # exactly on the edges
    adv = np.array([[1.0, -1.0, -1.0, 1.0]], np.float32)
    m = np.ones((1, 4), bool)
    grad = jax.grad(lambda x: algo.policy_loss(x, old, adv, m, 0.2, 0.2)[0])(jnp.asarray(lp))
    # On the edge the unclipped branch is active: d/dlogp (-A * ratio) / N
    np.testing.assert_allclose(grad, -adv * np.exp(lp) / 4, rtol=1e-5)
    _, metrics = algo.policy_loss(lp, old, adv, m, 0.2, 0.2)
    assert float(metrics["clipfrac_low"]) == 0.0 and float(metrics["clipfrac_high"]) == 0.0
    # Beyond the edge (A > 0, ratio > 1.2) the gradient vanishes.
    lp2 = lp + np.array([[0.1, 0, 0, 0]], np.float32)
    g2 = jax.grad(lambda x: algo.policy_loss(x, old, adv, m, 0.2, 0.2)[0])(jnp.asarray(lp2))
    assert float(g2[0, 0]) == 0.0
    # Micro-batch losses with the global token count sum to the full-batch loss.
    rng = np.random.default_rng(7)
    mm = _random_mask(rng, 6, 5)
    x, o, a = rng.normal(size=(3, 6, 5))
    full, _ = algo.policy_loss(x, o, a, mm)
    parts = [algo.policy_loss(x[i::2], o[i::2], a[i::2], mm[i::2], num_tokens=mm.sum())[0]
             for i in range(2)]  # fmt: skip
    np.testing.assert_allclose(sum(parts), full, rtol=1e-5)


def test_policy_loss_nan_outside_mask_gives_finite_gradient():
    m = np.array([[1, 1, 0]], bool)
    old = np.array([[-1.0, -2.0, np.nan]], np.float32)
    adv = np.array([[1.0, -1.0, np.nan]], np.float32)
    g = jax.grad(lambda x: algo.policy_loss(x, old, adv, m, dual_clip=3.0)[0])(
        jnp.array([[-1.0, -2.0, -3.0]])
    )
    assert np.all(np.isfinite(np.asarray(g)))
    assert float(g[0, 2]) == 0.0


@pytest.mark.parametrize("clip", [None, 0.5])
def test_value_loss_matches_numpy(clip):
    rng = np.random.default_rng(8)
    B, T = 4, 9
    m = _random_mask(rng, B, T)
    v, old, ret = rng.normal(size=(3, B, T))
    got, metrics = algo.value_loss(v, old, ret, m, clip)
    if clip is None:
        ref = 0.5 * (v - ret) ** 2
        frac = 0.0
    else:
        vc = old + np.clip(v - old, -clip, clip)
        ref = 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2)
        frac = ((np.abs(v - old) > clip) & ((vc - ret) ** 2 > (v - ret) ** 2))[m].mean()
    np.testing.assert_allclose(got, ref[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["value_clipfrac"], frac, rtol=1e-5)


def test_logprobs_entropy_explained_variance():
    rng = np.random.default_rng(9)
    z = rng.normal(size=(2, 3, 11)) * 3
    tok = rng.integers(0, 11, size=(2, 3))
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref_lp = np.log(np.take_along_axis(p, tok[..., None], -1)[..., 0])
    np.testing.assert_allclose(algo.logprobs_from_logits(z, tok), ref_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        algo.entropy_from_logits(z), -(p * np.log(p)).sum(-1), rtol=1e-5, atol=1e-5
    )
    v, ret = rng.normal(size=(2, 4, 6))
    m = _random_mask(rng, 4, 6)
    ev = 1 - (ret - v)[m].var(ddof=1) / ret[m].var(ddof=1)
    np.testing.assert_allclose(algo.explained_variance(v, ret, m), ev, rtol=1e-4)
    assert float(algo.explained_variance(v, np.ones_like(ret), m)) == 0.0


def test_jit_compatible():
    rng = np.random.default_rng(10)
    r, v = rng.normal(size=(2, 3, 5)).astype(np.float32)
    m = np.ones((3, 5), bool)
    a1, _ = jax.jit(algo.gae, static_argnums=(3, 4))(r, v, m, 1.0, 0.95)
    a2, _ = algo.gae(r, v, m, 1.0, 0.95)
    np.testing.assert_allclose(a1, a2, rtol=1e-6)
