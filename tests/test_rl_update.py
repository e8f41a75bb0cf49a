"""rl/state.py + rl/update.py: sharding invariance, invalid rows, NaN skips, alignment, learning.

Compiles are the cost here (CPU, shared machine): every test reuses three jitted step sets
(PPO on a 1-device mesh, PPO with micro-batching on a 2x2x2 mesh, GRPO on a 1-device mesh),
all at one batch shape, compiled at XLA optimisation level 0.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from deepretrieval_jax import sharding
from deepretrieval_jax.models import CausalLM, ModelConfig, ValueModel
from deepretrieval_jax.rl import algo, dynamic_sampling
from deepretrieval_jax.rl.state import (
    PPOConfig,
    create_train_state,
    init_train_state,
    make_lr_schedule,
    policy_model,
)
from deepretrieval_jax.rl.update import (
    RolloutBatch,
    compute_advantages,
    compute_logprobs,
    compute_values,
    make_jitted,
    merge_rows,
    model_fns,
    ppo_update,
    split_rows,
)

MODEL = ModelConfig.tiny(
    vocab_size=16, embed_dim=32, mlp_dim=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16
)
B, P, R = 32, 3, 4  # rows, prompt length (left-padded), response length
T = P + R
TARGET = 7  # toy task: reward = fraction of response tokens equal to TARGET
OPTS = {"xla_backend_optimization_level": 0}
PPO = PPOConfig(
    actor_lr=1e-2,
    critic_lr=1e-2,
    mini_batch_size=16,
    ppo_epochs=2,
    entropy_coef=0.0,
    kl_coef=0.01,
    kl_adaptive=True,
    kl_target=0.05,
    kl_horizon=1000.0,
)
GRPO = PPOConfig(
    advantage_estimator="grpo",
    actor_lr=1e-2,
    mini_batch_size=16,
    ppo_epochs=2,
    entropy_coef=0.0,
    kl_in_reward=False,
    kl_loss_coef=0.01,
)
GROUP = 4  # GRPO samples per prompt
POLICY_FN = model_fns(CausalLM(MODEL))[0]  # one callable: the sampler compiles once per mesh


def _mesh(shape):
    n = int(np.prod(shape))
    return sharding.make_mesh(
        dict(zip(("data", "fsdp", "tensor"), shape, strict=True)), jax.devices()[:n]
    )


@functools.cache
def _steps(cfg, shape):
    mesh = _mesh(shape)
    actor = policy_model(cfg, MODEL)  # CausalLM, or PolicyValueModel for a shared critic
    return mesh, make_jitted(cfg, actor, ValueModel(MODEL), mesh, compiler_options=OPTS)


def _init(cfg, shape, seed=0, **params):
    mesh, _ = _steps(cfg, shape)
    actor = policy_model(cfg, MODEL)
    key = jax.random.PRNGKey(seed)
    return init_train_state(
        cfg, actor, ValueModel(MODEL), key, mesh, compiler_options=OPTS, **params
    )


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _prompts(rng):
    tokens = rng.integers(0, MODEL.vocab_size, (B, P)).astype(np.int32)
    lengths = rng.integers(1, P + 1, B)
    mask = np.arange(P)[None, :] >= (P - lengths)[:, None]
    return np.where(mask, tokens, 0).astype(np.int32), mask


@functools.partial(jax.jit, static_argnums=0, compiler_options=OPTS)
def _sample(policy_fn, params, prompt_BxP, prompt_mask_BxP, key):
    """Temperature-1 ancestral sampling of R tokens (full forward per token; tiny model)."""
    tokens = jnp.concatenate([prompt_BxP, jnp.zeros((B, R), jnp.int32)], axis=1)
    mask = jnp.concatenate([prompt_mask_BxP, jnp.ones((B, R), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)

    def body(i, carry):
        tokens, key = carry
        key, sub = jax.random.split(key)
        logits = policy_fn(params, tokens, positions, mask)
        nxt = jax.random.categorical(sub, logits[:, P + i - 1])
        return tokens.at[:, P + i].set(nxt.astype(jnp.int32)), key

    tokens, _ = jax.lax.fori_loop(0, R, body, (tokens, key))
    return tokens, mask, positions


def _rollout(cfg, shape, state, rng, key, group=1):
    """Sample, score (toy rule), and fill old/ref log-probs and old values."""
    _, steps = _steps(cfg, shape)
    prompt, pmask = _prompts(rng)
    group_id = np.arange(B, dtype=np.int32) // group
    prompt, pmask = prompt[group_id * group], pmask[group_id * group]
    tokens, mask, positions = _sample(POLICY_FN, state.actor_params, prompt, pmask, key)
    tokens = np.asarray(tokens)
    resp = np.zeros((B, T), bool)
    resp[:, P:] = True
    scores = (tokens[:, P:] == TARGET).mean(axis=1).astype(np.float32)
    zeros = np.zeros((B, T), np.float32)
    batch = RolloutBatch(
        tokens, np.asarray(mask), np.asarray(positions), resp, zeros, zeros, zeros, scores,
        np.ones(B, bool), group_id,
    )  # fmt: skip
    return _fill(steps, state, batch)


def _fill(steps, state, batch):
    return steps.prepare(state, jax.device_put(batch, steps.batch_shardings))


def _edge_batch(cfg, shape, state):
    """A rollout with an invalid row, a zero-length response and a short response."""
    rng = np.random.default_rng(1)
    batch = _rollout(cfg, shape, state, rng, jax.random.PRNGKey(1))
    resp = np.array(batch.response_mask_BxT)
    valid = np.ones(B, bool)
    resp[3] = False  # zero-length response (valid, scored)
    resp[5, P + 2 :] = False  # response of 2 tokens
    valid[9] = False  # reward infrastructure failure
    batch = batch.replace(response_mask_BxT=resp, valid_B=valid)
    return jax.device_put(batch, _steps(cfg, shape)[1].batch_shardings)


# ----------------------------------------------------------------------------- tests
def test_config_validation():
    with pytest.raises(ValueError, match="advantage_estimator"):
        PPOConfig(advantage_estimator="ppo2")
    with pytest.raises(ValueError, match="micro_batch_size"):
        PPOConfig(mini_batch_size=16, micro_batch_size=5)
    with pytest.raises(ValueError, match="dual_clip"):
        PPOConfig(dual_clip=1.1)
    with pytest.raises(ValueError, match="kl_adaptive"):
        PPOConfig(kl_adaptive=True, kl_in_reward=False)
    with pytest.raises(ValueError, match="unknown fields"):
        PPOConfig.from_dict({"clip_ratio": 0.2})
    assert PPOConfig.from_dict({"clip_low": 0.1}).clip_low == 0.1
    assert PPOConfig().use_critic and PPOConfig().use_ref
    assert not GRPO.use_critic and GRPO.use_ref


def test_alignment_of_logprobs_and_values():
    """Values and log-probs of token t both come from position t - 1 (bug 7.9: critic shift)."""
    tokens = jnp.array([[3, 1, 4, 1, 5]], jnp.int32)
    batch = RolloutBatch(
        tokens, jnp.ones_like(tokens), jnp.arange(5)[None], None, None, None, None, None, None,
        None,
    )  # fmt: skip
    value_fn = lambda p, tok, pos, m: 10.0 * tok + pos  # noqa: E731
    np.testing.assert_allclose(compute_values(value_fn, None, batch), [[0, 30, 11, 42, 13]])
    # Logits at position s put all mass on token s + 1: every real token then has log-prob 0.
    next_tok = jnp.roll(tokens, -1, axis=1)
    policy_fn = lambda p, tok, pos, m: 50.0 * jax.nn.one_hot(next_tok, 8)  # noqa: E731
    logp = np.asarray(compute_logprobs(policy_fn, None, batch))
    assert logp[0, 0] == 0.0
    np.testing.assert_allclose(logp[0, 1:], 0.0, atol=1e-6)
    shifted = lambda p, tok, pos, m: 50.0 * jax.nn.one_hot(tok, 8)  # noqa: E731
    assert np.all(np.asarray(compute_logprobs(shifted, None, batch))[0, 1:] < -10)


@pytest.mark.parametrize("estimator", ["gae", "grpo", "rloo"])
def test_compute_advantages_matches_numpy(estimator):
    """Token rewards with in-reward k1 KL, then GAE + whitening or group baselines on the
    outcome (score - coef * summed KL); invalid rows and padding excluded."""
    rng = np.random.default_rng(3)
    n, t = 8, 6
    resp = np.zeros((n, t), bool)
    for b in range(n):
        resp[b, 2 : 2 + rng.integers(0, 5)] = True
    valid = np.ones(n, bool)
    valid[5] = False
    old, ref, values = rng.normal(size=(3, n, t)).astype(np.float32)
    scores = rng.normal(size=n).astype(np.float32)
    scores[5] = np.nan
    batch = RolloutBatch(
        np.zeros((n, t), np.int32), np.ones((n, t), bool), np.zeros((n, t), np.int32), resp,
        old, ref, values, scores, valid, np.arange(n, dtype=np.int32) // 4,
    )  # fmt: skip
    cfg = PPOConfig(advantage_estimator=estimator, gamma=0.9, lam=0.8, kl_coef=0.1)
    adv, ret, rew, metrics = jax.jit(compute_advantages, static_argnums=1)(batch, cfg, 0.1)
    m = resp & valid[:, None]
    kl = np.where(m, old - ref, 0.0)
    ref_rew = -0.1 * kl
    for b in range(n):
        if m[b].any():
            ref_rew[b, np.nonzero(m[b])[0][-1]] += scores[b]
    np.testing.assert_allclose(rew, ref_rew, rtol=1e-5, atol=1e-6)
    if estimator == "gae":
        raw = np.zeros((n, t))
        for b in range(n):
            nv = na = 0.0
            for i in np.nonzero(m[b])[0][::-1]:
                na = ref_rew[b, i] + 0.9 * nv - values[b, i] + 0.9 * 0.8 * na
                nv, raw[b, i] = values[b, i], na
        np.testing.assert_allclose(ret, np.where(m, raw + values, 0), rtol=1e-5, atol=1e-5)
        ref_adv = (raw - raw[m].mean()) / np.sqrt(raw[m].var(ddof=1) + 1e-8)
    else:
        outcome = scores - 0.1 * kl.sum(-1)
        ref_b = np.zeros(n)
        for g in range(2):
            idx = [i for i in range(4 * g, 4 * g + 4) if valid[i]]
            x = outcome[idx]
            if estimator == "grpo":
                ref_b[idx] = (x - x.mean()) / (x.std(ddof=1) + 1e-6)
            else:
                ref_b[idx] = [x[k] - np.delete(x, k).mean() for k in range(len(x))]
        ref_adv = np.broadcast_to(ref_b[:, None], (n, t))
    np.testing.assert_allclose(adv, np.where(m, ref_adv, 0), rtol=1e-4, atol=1e-5)
    assert float(metrics["invalid_count"]) == 1
    assert float(metrics["empty_response_count"]) == np.sum(valid & ~m.any(-1))
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_update_same_on_1_and_8_devices_with_micro_batches():
    """PPO (critic, adaptive in-reward KL) on 1 device vs a 2x2x2 mesh with 2 micro-batches per
    mini-batch: same metrics and params. Also: edge rows stay finite, KL controller formula."""
    s1 = _init(PPO, (1, 1, 1))
    cfg8 = PPO.replace(micro_batch_size=8)
    s8 = _init(cfg8, (2, 2, 2))
    b1 = _edge_batch(PPO, (1, 1, 1), s1)
    b8 = _fill(_steps(cfg8, (2, 2, 2))[1], s8, jax.device_get(b1))  # same tokens, recomputed
    np.testing.assert_allclose(b1.old_values_BxT, b8.old_values_BxT, rtol=1e-5, atol=1e-6)
    before = _copy(s1.actor_params)
    n1, m1 = _steps(PPO, (1, 1, 1))[1].update(s1, b1)
    n8, m8 = _steps(cfg8, (2, 2, 2))[1].update(s8, b8)
    assert set(m1) == set(m8)
    for k in m1:
        assert np.isfinite(float(m1[k])), k
        np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=2e-4, atol=2e-5, err_msg=k)
    # Adam turns reduction-order noise in near-zero gradients into steps of up to ~lr: params
    # after 4 updates at lr 1e-2 agree to 2e-4 (they move by ~4e-2).
    for a, b in zip(jax.tree.leaves(n1), jax.tree.leaves(n8), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=2e-4)
    pairs = zip(jax.tree.leaves(n1.actor_params), jax.tree.leaves(before), strict=True)
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in pairs]
    assert max(moved) > 1e-3  # the update did something
    assert float(m1["skipped"]) == 0 and int(n1.step) == 1
    assert float(m1["invalid_count"]) == 1 and float(m1["empty_response_count"]) == 1
    ref_coef = algo.kl_controller_update(
        jnp.float32(PPO.kl_coef), m1["kl_ref"], B - 1, PPO.kl_target, PPO.kl_horizon
    )
    np.testing.assert_allclose(float(n1.kl_coef), float(ref_coef), rtol=1e-6)
    assert float(n1.kl_coef) != PPO.kl_coef
    # The sharded state stays in its declared shardings after a donated update.
    spec = _steps(cfg8, (2, 2, 2))[1].state_shardings
    for arr, sh in zip(jax.tree.leaves(n8), jax.tree.leaves(spec), strict=True):
        assert arr.sharding.is_equivalent_to(sh, arr.ndim)


def test_forward_passes_in_micro_batch_slices_equal_the_whole_batch():
    """The trainer's old / reference log-probs and values run micro_batch rows at a time (peak
    memory: one slice's logits); they equal `prepare`'s single pass over the whole batch."""
    x = np.arange(2 * B).reshape(B, 2)
    sliced = np.asarray(split_rows(x, 8, None, None))
    assert sliced.shape == (B // 8, 8, 2)
    np.testing.assert_array_equal(sliced[1], x[1 :: B // 8])  # slice k: rows k, k + 4, ...
    np.testing.assert_array_equal(np.asarray(merge_rows(jnp.asarray(sliced))), x)
    cfg8 = PPO.replace(micro_batch_size=8)
    state = _init(cfg8, (2, 2, 2))
    steps = _steps(cfg8, (2, 2, 2))[1]
    whole = _edge_batch(cfg8, (2, 2, 2), state)  # filled by prepare: one pass per model
    for got, want in (
        (steps.logprobs(state, whole), whole.old_logp_BxT),
        (steps.ref_logprobs(state, whole), whole.ref_logp_BxT),
        (steps.values(state, whole), whole.old_values_BxT),
    ):
        assert got.sharding.is_equivalent_to(steps.batch_shardings.tokens_BxT, 2)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_invalid_rows_are_excluded_from_everything():
    """Garbage (NaN, huge) in an invalid row changes nothing: losses, whitening, KL, params."""
    cfg, shape = PPO, (1, 1, 1)
    state = _init(cfg, shape)
    batch = _edge_batch(cfg, shape, state)
    outs = []
    for garbage in (np.nan, 1e6):
        scores = np.array(batch.scores_B)
        old_logp = np.array(batch.old_logp_BxT)
        values = np.array(batch.old_values_BxT)
        scores[9], old_logp[9], values[9] = garbage, garbage, garbage
        b = batch.replace(scores_B=scores, old_logp_BxT=old_logp, old_values_BxT=values)
        b = jax.device_put(b, _steps(cfg, shape)[1].batch_shardings)
        outs.append(_steps(cfg, shape)[1].update(_copy(state), b))
    (s_a, m_a), (s_b, m_b) = outs
    assert float(m_a["skipped"]) == 0
    for k in m_a:
        np.testing.assert_allclose(float(m_a[k]), float(m_b[k]), rtol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(s_a), jax.tree.leaves(s_b), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A batch with no valid row: nothing moves (AdamW momentum / decay not applied), no skip.
    none_valid = jax.device_put(
        batch.replace(valid_B=np.zeros(B, bool)), _steps(cfg, shape)[1].batch_shardings
    )
    after, metrics = _steps(cfg, shape)[1].update(_copy(state), none_valid)
    assert float(metrics["skipped"]) == 0 and float(metrics["empty_minibatch"]) == 1
    assert float(metrics["invalid_count"]) == B
    assert all(np.isfinite(float(v)) for v in metrics.values())
    pairs = zip(
        jax.tree.leaves(after.actor_params), jax.tree.leaves(state.actor_params), strict=True
    )
    for a, b in pairs:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("field", ["scores_B", "old_logp_BxT", "ref_logp_BxT"])
def test_nan_input_skips_the_update(field):
    cfg, shape = PPO, (1, 1, 1)
    _, steps = _steps(cfg, shape)
    state = _init(cfg, shape)
    batch = _edge_batch(cfg, shape, state)
    x = np.array(getattr(batch, field))
    x[(0, -1) if x.ndim == 2 else 0] = np.nan  # a valid row's score or last response token
    bad = jax.device_put(batch.replace(**{field: x}), steps.batch_shardings)
    before = _copy(state)
    after, metrics = steps.update(state, bad)
    assert float(metrics["skipped"]) == 1 and float(metrics["inputs_finite"]) == 0
    assert int(after.step) == 1 and int(after.skipped_steps) == 1
    assert int(after.consecutive_skips) == 1
    for name in ("actor_params", "actor_opt_state", "critic_params", "critic_opt_state"):
        for a, b in zip(
            jax.tree.leaves(getattr(after, name)),
            jax.tree.leaves(getattr(before, name)),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert float(after.kl_coef) == float(before.kl_coef)
    after, metrics = steps.update(after, batch)  # a good step resets the consecutive count
    assert float(metrics["skipped"]) == 0
    assert int(after.step) == 2 and int(after.skipped_steps) == 1
    assert int(after.consecutive_skips) == 0


def test_update_given_precomputed_advantages_matches_the_fused_update():
    """The trainer dispatches `advantages` on its own (timed apart), then `update(..., adv)`."""
    cfg, shape = PPO, (1, 1, 1)
    _, steps = _steps(cfg, shape)
    state = _init(cfg, shape)
    batch = jax.device_put(_edge_batch(cfg, shape, state), steps.batch_shardings)
    adv = steps.advantages(state, batch)
    s_a, m_a = steps.update(_copy(state), batch, adv)
    s_b, m_b = steps.update(_copy(state), batch)
    assert set(m_a) == set(m_b)
    for k in m_a:
        np.testing.assert_allclose(float(m_a[k]), float(m_b[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(s_a), jax.tree.leaves(s_b), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def _learn(cfg, seed, n_steps, group):
    shape = (1, 1, 1)
    state = _init(cfg, shape, seed)
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(100 + seed)
    rewards = []
    for _ in range(n_steps):
        key, sub = jax.random.split(key)
        batch = _rollout(cfg, shape, state, rng, sub, group)
        rewards.append(float(np.mean(batch.scores_B)))
        state, metrics = _steps(cfg, shape)[1].update(state, batch)
        assert float(metrics["skipped"]) == 0
    return np.array(rewards)


def _learn_dynamic(cfg, seed, n_steps, group):
    """DAPO dynamic sampling as the trainer does it: two rollouts of B rows are the candidates,
    `select_groups` keeps B // group groups with reward variance, `take_rows` gathers them."""
    shape = (1, 1, 1)
    state = _init(cfg, shape, seed)
    steps = _steps(cfg, shape)[1]
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(100 + seed)
    rewards, dropped = [], []
    for _ in range(n_steps):
        parts = []
        for j in range(2):
            key, sub = jax.random.split(key)
            part = _rollout(cfg, shape, state, rng, sub, group)
            parts.append(part.replace(group_id_B=part.group_id_B + j * (B // group)))
        cand = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *parts)
        rewards.append(float(np.mean(cand.scores_B)))
        rows, met = dynamic_sampling.select_groups(cand.scores_B, cand.valid_B, group, B // group)
        dropped.append(met["dynamic/zero_variance_fraction"])
        batch = jax.device_put(dynamic_sampling.take_rows(cand, rows), steps.batch_shardings)
        state, metrics = steps.update(state, batch)
        assert float(metrics["skipped"]) == 0
    assert max(dropped) > 0  # groups without reward variance existed and were dropped
    return np.array(rewards)


SHARED = PPO.replace(critic="shared")
# DAPO: clip-higher, token-level mean, overlong penalty (constant here: every response has R
# tokens), no KL; used with dynamic sampling below.
DAPO = GRPO.replace(
    clip_high=0.28, loss_agg="token-mean", overlong_buffer_len=2, overlong_max_len=R,
    kl_loss_coef=0.0,
)  # fmt: skip
DR_GRPO = GRPO.replace(grpo_normalize_std=False, loss_agg="seq-mean-token-sum-norm")
GSPO = GRPO.replace(
    policy_loss="gspo", loss_agg="seq-mean-token-mean", clip_low=3e-3, clip_high=4e-3
)


@pytest.mark.parametrize(
    "cfg,group,learn",
    [
        (PPO, 1, _learn),
        (SHARED, 1, _learn),
        (GRPO, GROUP, _learn),
        (DAPO, GROUP, _learn_dynamic),
        (DR_GRPO, GROUP, _learn),
        (GSPO, GROUP, _learn),
    ],
    ids=["ppo_gae", "ppo_gae_shared_critic", "grpo", "dapo_dynamic", "dr_grpo", "gspo"],
)
def test_learns_toy_rule_reward(cfg, group, learn):
    """Reward = share of response tokens equal to 7 (chance 1/16). Over several seeds, the mean
    reward of the last 3 steps beats the first 3 by a wide margin on every seed (measured: first
    ~0.05, last ~0.9-1.0; a sign error drives it to 0, a no-op leaves it at ~0.06)."""
    n_steps, seeds = 10, (0, 1, 2)
    curves = np.stack([learn(cfg, s, n_steps, group) for s in seeds])
    first, last = curves[:, :3].mean(1), curves[:, -3:].mean(1)
    assert np.all(first < 0.2), curves
    assert np.all(last > first + 0.4), curves


# ------------------------------------------- pure ppo_update on a bigram model (compiles fast)
V_FAKE, POISON = 16, 13  # logits are NaN wherever the input token is POISON


def _bigram_policy(params, tokens_BxT, positions_BxT, mask_BxT):
    logits = params["w"][tokens_BxT]
    return jnp.where((tokens_BxT == POISON)[..., None], jnp.nan, logits)


def _bigram_value(params, tokens_BxT, positions_BxT, mask_BxT):
    return params["v"][tokens_BxT]


def _bigram_run(cfg, rows, poison_rows=(), ref_shift=None):
    """One jitted ppo_update on a fixed batch. With `ref_shift`, scores are equal (zero GRPO
    advantages), old_logp is the actual log-prob and ref_logp = old_logp + ref_shift."""
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, POISON, (16, 6)).astype(np.int32)[:rows]
    tokens[list(poison_rows), 3] = POISON
    resp = np.zeros((rows, 6), bool)
    resp[:, 2:] = True
    f = np.zeros((rows, 6), np.float32)
    scores = rng.normal(size=16).astype(np.float32)[:rows]
    group = np.arange(rows, dtype=np.int32) // 4
    batch = RolloutBatch(
        tokens, np.ones_like(resp), np.zeros_like(tokens), resp, f - 2.8, f - 2.8, f, scores,
        np.ones(rows, bool), group,
    )  # fmt: skip
    key = jax.random.PRNGKey(0)
    params = {"w": 0.1 * jax.random.normal(key, (V_FAKE, V_FAKE))}
    if ref_shift is not None:
        logp = compute_logprobs(_bigram_policy, params, batch)
        batch = batch.replace(
            scores_B=np.ones(rows, np.float32), old_logp_BxT=logp, ref_logp_BxT=logp + ref_shift
        )
    critic = {"v": jnp.zeros((V_FAKE,))} if cfg.use_critic else None
    state = create_train_state(cfg, params, critic, params, jnp.zeros(2, jnp.uint32))
    return state, _bigram_step(cfg)(state, batch)


@functools.cache
def _bigram_step(cfg):
    update = functools.partial(
        ppo_update, cfg=cfg, policy_fn=_bigram_policy, value_fn=_bigram_value
    )
    return jax.jit(update, compiler_options=OPTS)


def test_micro_batch_accumulation_is_exact():
    cfg = PPOConfig(mini_batch_size=8, actor_lr=1e-2, critic_lr=1e-2, ppo_epochs=2)
    _, (s_full, m_full) = _bigram_run(cfg, 16)
    _, (s_acc, m_acc) = _bigram_run(cfg.replace(micro_batch_size=2), 16)
    for a, b in zip(jax.tree.leaves(s_full), jax.tree.leaves(s_acc), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for k in m_full:
        np.testing.assert_allclose(float(m_full[k]), float(m_acc[k]), rtol=1e-5, atol=1e-6)


def test_non_finite_mini_batch_stops_the_rest_of_the_step():
    """Rows 8-15 (the 2nd mini-batch, no shuffle) have NaN logits: the 1st mini-batch is
    applied, the 2nd and every later one (2nd epoch) are not, and the step counts as skipped.
    GRPO, so that the first 8 rows' advantages do not depend on the others."""
    cfg = PPOConfig(
        advantage_estimator="grpo", mini_batch_size=8, actor_lr=1e-2, ppo_epochs=2, shuffle=False
    )
    state, (after, metrics) = _bigram_run(cfg, 16, poison_rows=range(8, 16))
    assert float(metrics["inputs_finite"]) == 1 and float(metrics["skipped"]) == 1
    assert float(metrics["skipped_minibatches"]) == 3
    assert int(after.skipped_steps) == 1 and int(after.consecutive_skips) == 1
    # Same as one update on the first 8 rows alone.
    _, (first_only, _) = _bigram_run(cfg.replace(ppo_epochs=1), 8)
    np.testing.assert_allclose(after.actor_params["w"], first_only.actor_params["w"], rtol=1e-6)
    assert np.abs(np.asarray(after.actor_params["w"] - state.actor_params["w"])).max() > 1e-3


@pytest.mark.parametrize(
    "overrides",
    [
        dict(
            advantage_estimator="rloo",
            kl_in_reward=False,
            kl_loss_coef=0.1,
            loss_agg="seq-mean-token-sum",
        ),
        dict(loss_agg="seq-mean-token-mean", kl_estimator="k3", value_clip=None, dual_clip=3.0),
    ],
    ids=["rloo_kl_loss_seq_sum", "gae_seq_mean_k3_dual"],
)
def test_config_variants_update(overrides):
    cfg = PPOConfig(mini_batch_size=8, actor_lr=1e-2, critic_lr=1e-2, **overrides)
    state, (after, metrics) = _bigram_run(cfg, 16)
    assert float(metrics["skipped"]) == 0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert ("kl_loss" in metrics) == (cfg.kl_loss_coef > 0)
    assert (after.critic_params is None) == (not cfg.use_critic)
    assert np.abs(np.asarray(after.actor_params["w"] - state.actor_params["w"])).max() > 1e-3


def test_lr_schedules():
    warm = make_lr_schedule(1.0, "constant", warmup_steps=4)
    np.testing.assert_allclose([warm(i) for i in (0, 2, 4, 9)], [0, 0.5, 1, 1], atol=1e-6)
    cos = make_lr_schedule(1.0, "cosine", warmup_steps=2, total_steps=12, min_lr_ratio=0.1)
    np.testing.assert_allclose([cos(2), cos(7), cos(12)], [1, 0.55, 0.1], atol=1e-6)


def test_shared_critic_state_from_lm_weights():
    """critic="shared": no critic params; given LM weights keep their values and get a value
    head; the sampler's CausalLM forward accepts the extended tree."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda k: nn.meta.unbox(CausalLM(MODEL).init(k, dummy, dummy, dummy)["params"]))
    lm = init(jax.random.PRNGKey(5))
    state = _init(SHARED, (1, 1, 1), actor_params=lm)
    assert state.critic_params is None and state.critic_opt_state is None
    assert set(state.actor_params) == set(lm) | {"value_head"}
    kept = {k: state.actor_params[k] for k in lm}
    for a, b in zip(jax.tree.leaves(lm), jax.tree.leaves(kept), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.zeros((2, 3), jnp.int32)
    assert jax.jit(POLICY_FN)(state.actor_params, tokens, tokens, tokens + 1).shape == (2, 3, 16)
    with pytest.raises(ValueError, match="PolicyValueModel"):
        make_jitted(SHARED, CausalLM(MODEL), None, _mesh((1, 1, 1)))


def test_kl_loss_is_added_not_subtracted():
    """Zero advantages, k3 KL loss only: the update pulls log-probs towards the reference's
    (down when ref < logp, up when ref > logp). A subtracted KL loss would push them away."""
    cfg = PPOConfig(
        advantage_estimator="grpo", mini_batch_size=16, actor_lr=1e-2, entropy_coef=0.0,
        kl_in_reward=False, kl_loss_coef=1.0, kl_loss_estimator="k3",
    )  # fmt: skip
    for shift, direction in ((-0.5, -1.0), (0.5, 1.0)):
        state, (after, metrics) = _bigram_run(cfg, 16, ref_shift=shift)
        assert float(metrics["kl_loss"]) > 0.01
        batch = RolloutBatch(*([None] * 10))  # only tokens/positions/mask are read
        rng = np.random.default_rng(4)
        tokens = rng.integers(0, POISON, (16, 6)).astype(np.int32)
        batch = batch.replace(tokens_BxT=tokens, positions_BxT=tokens * 0, mask_BxT=tokens * 0 + 1)
        before = compute_logprobs(_bigram_policy, state.actor_params, batch)[:, 2:]
        moved = compute_logprobs(_bigram_policy, after.actor_params, batch)[:, 2:]
        assert direction * float(jnp.mean(moved - before)) > 1e-3, shift
