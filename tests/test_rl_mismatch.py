"""Sampler-trainer mismatch on a real model: a bf16 sampler against the fp32 trainer moves the
ppo/mismatch_* metrics (an fp32 sampler leaves them at ~0), and TIS scales the PPO update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from deepretrieval_jax import sharding
from deepretrieval_jax.models import CausalLM, ModelConfig
from deepretrieval_jax.rl import mismatch, rollout
from deepretrieval_jax.rl.state import PPOConfig, init_train_state
from deepretrieval_jax.rl.update import compute_logprobs, loss_mask, make_jitted, model_fns
from deepretrieval_jax.sampler import Sampler, SamplingConfig, causal_lm_fns

MODEL = ModelConfig.tiny(
    vocab_size=64, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16,
)  # fmt: skip
B, P, L = 8, 8, 8
OPTS = {"xla_backend_optimization_level": 0}


def _setup():
    params = CausalLM(MODEL).init(jax.random.PRNGKey(0), *(jnp.zeros((1, 1), jnp.int32),) * 3)[
        "params"
    ]
    # Sharper logits than the 0.02 init gives, so that precision matters as in a trained model.
    params = jax.tree.map(lambda x: x * 8.0 if x.ndim >= 2 else x, params)
    params = jax.tree.map(
        lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, MODEL.vocab_size, (B, P)).astype(np.int32)
    mask = np.ones((B, P), np.int32)
    mask[::2, :3] = 0
    return params, np.where(mask, tokens, 0), mask


def _rollout(params, tokens, mask, dtype):
    scfg = SamplingConfig(method="sample", max_new_tokens=L, n=1, eos_ids=(1,), pad_id=0)
    sampler = Sampler(causal_lm_fns(dataclasses.replace(MODEL, dtype=dtype)), scfg,
                      prompt_buckets=(P,))  # fmt: skip
    out = sampler(params, tokens, mask, jax.random.PRNGKey(1))
    batch = rollout.assemble_batch(jnp.asarray(tokens), jnp.asarray(mask), out, 1)
    policy_fn = model_fns(CausalLM(MODEL))[0]
    trainer_logp = compute_logprobs(policy_fn, params, batch)  # fp32 trainer
    return batch, trainer_logp


def test_bf16_sampler_moves_the_mismatch_metrics_and_tis_corrects_the_update():
    params, tokens, mask = _setup()
    metrics = {}
    for dtype in ("float32", "bfloat16"):
        batch, trainer_logp = _rollout(params, tokens, mask, dtype)
        m = loss_mask(batch)
        assert int(jnp.sum(m)) > B  # the rows have response tokens
        metrics[dtype] = {
            k: float(v) for k, v in mismatch.mismatch_metrics(
                batch.old_logp_BxT, trainer_logp, m).items()
        }  # fmt: skip
    fp32, bf16 = metrics["float32"], metrics["bfloat16"]
    assert fp32["mismatch_abs_logp_diff_mean"] < 1e-5, fp32
    assert bf16["mismatch_abs_logp_diff_mean"] > 1e-3, bf16
    assert bf16["mismatch_kl_k3"] > 100 * max(fp32["mismatch_kl_k3"], 1e-12)
    assert bf16["mismatch_ratio_max"] > 1.0 + 1e-3

    # The correction, as the trainer runs it: sampler log-probs vs the recomputed ones.
    cfg = PPOConfig(advantage_estimator="grpo", kl_in_reward=False, mini_batch_size=B,
                    entropy_coef=0.0, actor_lr=1e-3, shuffle=False)  # fmt: skip
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    steps = make_jitted(cfg, CausalLM(MODEL), None, mesh, compiler_options=OPTS)
    state = init_train_state(cfg, CausalLM(MODEL), None, jax.random.PRNGKey(0), mesh,
                             actor_params=params, compiler_options=OPTS)  # fmt: skip
    sampler_logp = batch.old_logp_BxT
    batch = batch.replace(
        scores_B=jnp.asarray(np.arange(B) % 3, jnp.float32),
        group_id_B=jnp.asarray(np.arange(B) // 4, jnp.int32),
    )
    batch = jax.device_put(batch, steps.batch_shardings)
    batch = batch.replace(old_logp_BxT=steps.logprobs(state, batch))
    adv = steps.advantages(state, batch)
    off = mismatch.make_jitted_correction(0.0, steps.batch_shardings, mesh)(
        batch, sampler_logp, adv
    )
    cap = 1.0 + 0.5 * (bf16["mismatch_ratio_max"] - 1.0)  # some weights capped, some not
    on = mismatch.make_jitted_correction(cap, steps.batch_shardings, mesh)(batch, sampler_logp, adv)
    np.testing.assert_array_equal(off[0], adv[0])  # off: metrics only
    assert off[3]["mismatch_kl_k3"] > 0 and "tis_weight_mean" not in off[3]
    m = np.asarray(loss_mask(batch))
    w = np.asarray(mismatch.tis_weights(sampler_logp, batch.old_logp_BxT, m, cap))
    np.testing.assert_allclose(on[0], np.asarray(adv[0]) * w, rtol=1e-6, atol=1e-7)
    assert 0 < float(on[3]["tis_capped_fraction"]) < 1 and np.all(w[m] <= cap)
    assert np.any(np.abs(w[m] - 1.0) > 1e-3)
    s_off, met_off = steps.update(jax.tree.map(jnp.copy, state), batch, off)
    s_on, met_on = steps.update(state, batch, on)
    assert float(met_off["policy_loss"]) != float(met_on["policy_loss"])
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s_on.actor_params,
                        s_off.actor_params)  # fmt: skip
    assert max(jax.tree.leaves(diff)) > 0
