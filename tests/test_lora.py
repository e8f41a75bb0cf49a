"""models/lora.py and LoRA PPO: exact base at zero adapters, merge and HF / PEFT export against
the adapter forward, adapters-only optimiser state, adapter shardings, and a toy run that learns."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from tiny_models import left_padded_batch, save_tiny_hf_model, torch_logits

from deepretrieval_jax import hf_io, sharding
from deepretrieval_jax.models import CausalLM, ModelConfig, lora
from deepretrieval_jax.rl.state import PPOConfig, init_train_state, policy_params
from deepretrieval_jax.rl.update import RolloutBatch, make_jitted, model_fns

OPTS = {"xla_backend_optimization_level": 0}
TINY = ModelConfig.tiny(
    vocab_size=16, embed_dim=32, mlp_dim=64, num_layers=1, num_heads=2, num_kv_heads=1,
    head_dim=16,
)  # fmt: skip


def _random_adapters(params, seed=1, std=0.2):
    adapters, base = lora.split(params)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(adapters))))
    adapters = jax.tree.map(lambda x: std * jax.random.normal(next(keys), x.shape), adapters)
    return adapters, base


def _logits(config, params, batch):
    return np.asarray(jax.jit(CausalLM(config).apply)({"params": params}, *batch)[0])


def test_zero_adapter_is_exactly_the_base_and_merge_equals_the_adapter_forward(tmp_path):
    torch_model = save_tiny_hf_model(tmp_path / "base", "qwen2", tie=False)
    config, base = hf_io.load_params(tmp_path / "base")
    lcfg = config.replace(lora_rank=4, lora_alpha=8.0, lora_targets=lora.TARGETS)
    batch = left_padded_batch((0, 2, 5), 9, config.vocab_size)
    fresh = nn.meta.unbox(CausalLM(lcfg).init(jax.random.PRNGKey(0), *batch)["params"])
    adapters, _ = lora.split(fresh)
    names = {k for layer in adapters["transformer"].values() for m in layer.values() for k in m}
    assert names == {f"{t}_lora_{ab}" for t in lora.TARGETS for ab in "ab"}
    base_logits = _logits(config, base, batch)
    # Zero-initialised B: bit for bit the base model; so is the LoRA model on base-only params.
    np.testing.assert_array_equal(_logits(lcfg, lora.combine(base, adapters), batch), base_logits)
    np.testing.assert_array_equal(_logits(lcfg, base, batch), base_logits)

    adapters, _ = _random_adapters(fresh)
    params = lora.combine(base, adapters)
    lora_logits = _logits(lcfg, params, batch)
    assert np.abs(lora_logits - base_logits).max() > 0.1  # the adapters matter
    merged = lora.merge(params, lcfg)
    assert not lora.has_adapters(merged)
    np.testing.assert_allclose(_logits(config, merged, batch), lora_logits, atol=1e-5, rtol=0)

    # HF export of the merged weights: transformers reproduces the adapter forward.
    out = hf_io.save_params(merged, config, tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    merged_torch = torch_logits(reloaded, *batch)
    real = batch[2].astype(bool)
    np.testing.assert_allclose(merged_torch[real], lora_logits[real], atol=1e-4, rtol=0)

    # PEFT adapter directory on the (unchanged) base checkpoint == the merged export.
    peft = pytest.importorskip("peft")
    lora.save_peft(params, lcfg, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        peft_logits = torch_logits(peft_model, *batch)
    np.testing.assert_allclose(peft_logits[real], merged_torch[real], atol=1e-5, rtol=0)


def test_targets_subset_and_validation():
    cfg = TINY.replace(lora_rank=2, lora_targets=("q", "down"))
    p = nn.meta.unbox(CausalLM(cfg).init(jax.random.PRNGKey(0), *(jnp.zeros((1, 1), int),) * 3))
    attn, mlp = (
        p["params"]["transformer"]["layers_0"]["attn"],
        p["params"]["transformer"]["layers_0"]["mlp"],
    )
    assert {k for k in attn if "lora" in k} == {"q_lora_a", "q_lora_b"}
    assert {k for k in mlp if "lora" in k} == {"down_lora_a", "down_lora_b"}
    with pytest.raises(ValueError, match="lora_targets"):
        TINY.replace(lora_rank=2, lora_targets=("qkv",))
    with pytest.raises(ValueError, match="lora_alpha"):
        TINY.replace(lora_rank=2, lora_alpha=0.0)


def test_optimizer_state_holds_adapters_only_and_ref_is_the_base():
    cfg = PPOConfig(advantage_estimator="grpo", kl_in_reward=False, kl_loss_coef=0.01)
    model = CausalLM(TINY.replace(lora_rank=4))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    base = nn.meta.unbox(CausalLM(TINY).init(jax.random.PRNGKey(3), *(jnp.zeros((1, 1), int),) * 3))
    state = init_train_state(cfg, model, None, jax.random.PRNGKey(0), mesh,
                             actor_params=base["params"], compiler_options=OPTS)  # fmt: skip
    assert lora.is_adapter_tree(state.actor_params)
    n_adapter = sum(x.size for x in jax.tree.leaves(state.actor_params))
    n_base = sum(x.size for x in jax.tree.leaves(state.ref_params))
    assert not lora.has_adapters(state.ref_params) and n_adapter < n_base
    # AdamW moments (mu, nu) of the adapters and nothing else.
    n_opt = sum(x.size for x in jax.tree.leaves(state.actor_opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_adapter
    # The given base weights are the reference (one copy, unchanged).
    for a, b in zip(
        jax.tree.leaves(state.ref_params), jax.tree.leaves(base["params"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Adapter shardings follow the kernel's logical axes; the rank axis is replicated.
    attn = state.actor_params["transformer"]["layers_0"]["attn"]
    assert attn["q_lora_a"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert attn["q_lora_b"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
    mlp = state.actor_params["transformer"]["layers_0"]["mlp"]
    assert mlp["down_lora_a"].sharding.spec == jax.sharding.PartitionSpec("tensor", None)


B, P, R, GROUP, TARGET = 32, 3, 4, 4, 7


@functools.partial(jax.jit, static_argnums=0, compiler_options=OPTS)
def _sample(policy_fn, params, prompt_BxP, key):
    tokens = jnp.concatenate([prompt_BxP, jnp.zeros((B, R), jnp.int32)], axis=1)
    mask = jnp.ones(tokens.shape, bool)
    positions = jnp.broadcast_to(jnp.arange(P + R), tokens.shape)

    def body(i, carry):
        tokens, key = carry
        key, sub = jax.random.split(key)
        nxt = jax.random.categorical(sub, policy_fn(params, tokens, positions, mask)[:, P + i - 1])
        return tokens.at[:, P + i].set(nxt.astype(jnp.int32)), key

    return jax.lax.fori_loop(0, R, body, (tokens, key))[0], mask, positions


def _lora_grpo_curve(seed, n_steps=10):
    cfg = PPOConfig(advantage_estimator="grpo", actor_lr=1e-1, mini_batch_size=16, ppo_epochs=2,
                    entropy_coef=0.0, kl_in_reward=False, kl_loss_coef=0.01)  # fmt: skip
    model = CausalLM(TINY.replace(lora_rank=4, lora_alpha=8.0))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    steps = make_jitted(cfg, model, None, mesh, compiler_options=OPTS)
    # A base whose tied LM head can express a confident policy (the 0.02 init caps the logits
    # of a unit-RMS hidden state at about +-0.6, out of reach of any adapter).
    base = nn.meta.unbox(
        CausalLM(TINY).init(jax.random.PRNGKey(seed), *(jnp.zeros((1, 1), int),) * 3)
    )
    base = base["params"]
    emb = base["transformer"]["embedder"]["embedding"]
    base = lora.combine(base, {"transformer": {"embedder": {"embedding": emb * 5.0}}})
    state = init_train_state(cfg, model, None, jax.random.PRNGKey(seed), mesh,
                             actor_params=base, compiler_options=OPTS)  # fmt: skip
    base = jax.tree.map(np.asarray, state.ref_params)
    policy_fn = model_fns(model)[0]
    rng, key, curve = np.random.default_rng(seed), jax.random.PRNGKey(100 + seed), []
    for _ in range(n_steps):
        key, sub = jax.random.split(key)
        prompt = np.repeat(rng.integers(0, 16, (B // GROUP, P)), GROUP, axis=0).astype(np.int32)
        tokens, mask, positions = _sample(policy_fn, policy_params(state), prompt, sub)
        scores = (np.asarray(tokens)[:, P:] == TARGET).mean(1).astype(np.float32)
        curve.append(scores.mean())
        resp = np.zeros((B, P + R), bool)
        resp[:, P:] = True
        zeros = np.zeros((B, P + R), np.float32)
        batch = RolloutBatch(tokens, mask, positions, resp, zeros, zeros, zeros, scores,
                             np.ones(B, bool), np.arange(B, dtype=np.int32) // GROUP)  # fmt: skip
        batch = steps.prepare(state, jax.device_put(batch, steps.batch_shardings))
        state, metrics = steps.update(state, batch)
        assert float(metrics["skipped"]) == 0
    for a, b in zip(jax.tree.leaves(state.ref_params), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # the base stayed frozen
    return np.array(curve)


def test_lora_grpo_learns_toy_rule_reward():
    """Reward = share of response tokens equal to 7 (chance 1/16): adapters alone learn it
    (measured: first 3 steps ~0.06-0.09, last 3 ~0.35-0.49 on every seed; a frozen or
    sign-flipped adapter stays at or below chance)."""
    curves = np.stack([_lora_grpo_curve(s) for s in (0, 1, 2)])
    first, last = curves[:, :3].mean(1), curves[:, -3:].mean(1)
    assert np.all(first < 0.15), curves
    assert np.all(last > first + 0.2), curves
