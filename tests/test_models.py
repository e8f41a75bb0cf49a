"""Tests for deepretrieval_jax.models: KV cache, padding, remat, dtypes, value head, presets.

Parity against transformers logits lives in tests/test_hf_io.py (it needs the weight loader).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import left_padded_batch, random_params

from deepretrieval_jax.models import CausalLM, ModelConfig, RopeScaling, ValueModel, init_cache

PAD_LENGTHS = (0, 3, 6)
SEQ_LEN = 10


def _apply(model, params, tokens, positions, mask, cache=None):
    return jax.jit(model.apply)({"params": params}, tokens, positions, mask, cache)


@pytest.fixture(scope="module", params=["tiny", "tiny_llama"])
def lm(request):
    config = ModelConfig.preset(request.param)
    model = CausalLM(config)
    return config, model, random_params(model, config)


def test_kv_cache_prefill_then_decode_matches_full_forward(lm):
    config, model, params = lm
    tokens, positions, mask = left_padded_batch(PAD_LENGTHS, SEQ_LEN, config.vocab_size)
    full_BxTxV, no_cache = _apply(model, params, tokens, positions, mask)
    assert no_cache is None

    prompt_len = 6  # row 2 is all padding in the prefill: its queries are fully masked
    cache = init_cache(config, len(PAD_LENGTHS), SEQ_LEN + 2)
    step = jax.jit(model.apply)
    logits, cache = step(
        {"params": params},
        tokens[:, :prompt_len],
        positions[:, :prompt_len],
        mask[:, :prompt_len],
        cache,
    )
    pieces = [logits]
    for t in range(prompt_len, SEQ_LEN):
        sl = slice(t, t + 1)
        logits, cache = step(
            {"params": params}, tokens[:, sl], positions[:, sl], mask[:, sl], cache
        )
        pieces.append(logits)
    cached_BxTxV = np.concatenate(pieces, axis=1)

    assert int(cache.index) == SEQ_LEN
    np.testing.assert_array_equal(np.asarray(cache.mask_BxS)[:, :SEQ_LEN], mask.astype(bool))
    assert np.isfinite(cached_BxTxV).all() and np.isfinite(np.asarray(full_BxTxV)).all()
    real = mask.astype(bool)
    np.testing.assert_allclose(cached_BxTxV[real], np.asarray(full_BxTxV)[real], atol=1e-4)
    assert np.abs(np.asarray(full_BxTxV)[real]).max() > 1.0  # logits far from uniform


def test_left_padding_does_not_change_real_token_logits(lm):
    config, model, params = lm
    tokens, positions, mask = left_padded_batch(PAD_LENGTHS, SEQ_LEN, config.vocab_size)
    padded_BxTxV, _ = _apply(model, params, tokens, positions, mask)
    for row, pad in list(enumerate(PAD_LENGTHS))[1:]:  # padded rows; each is one compile
        alone_1xTxV, _ = _apply(
            model,
            params,
            tokens[row : row + 1, pad:],
            positions[row : row + 1, pad:],
            mask[row : row + 1, pad:],
        )
        np.testing.assert_allclose(
            np.asarray(padded_BxTxV)[row, pad:], np.asarray(alone_1xTxV)[0], atol=1e-4
        )


def test_attention_is_causal(lm):
    config, model, params = lm
    tokens, positions, mask = left_padded_batch((0, 2), 8, config.vocab_size)
    changed = tokens.copy()
    changed[:, 5] = (changed[:, 5] + 1) % config.vocab_size
    a, _ = _apply(model, params, tokens, positions, mask)
    b, _ = _apply(model, params, changed, positions, mask)
    np.testing.assert_allclose(np.asarray(a)[:, :5], np.asarray(b)[:, :5], atol=1e-6)
    assert np.abs(np.asarray(a)[:, 5:] - np.asarray(b)[:, 5:]).max() > 1e-3


def test_fully_padded_row_is_finite(lm):
    config, model, params = lm
    tokens, positions, mask = left_padded_batch((0, 6), 6, config.vocab_size)
    logits, _ = _apply(model, params, tokens, positions, mask)
    assert mask[1].sum() == 0 and np.isfinite(np.asarray(logits)).all()


def test_remat_gives_same_logits_and_grads():
    config = ModelConfig.tiny(num_layers=1)
    model, remat_model = CausalLM(config), CausalLM(config.replace(remat=True))
    params = random_params(model, config)
    tokens, positions, mask = left_padded_batch(PAD_LENGTHS, SEQ_LEN, config.vocab_size)

    def loss(m, p):
        logits, _ = m.apply({"params": p}, tokens, positions, mask)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)

    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
    l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(remat_model, p)))(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_bf16_compute_with_fp32_params_is_close():
    config = ModelConfig.tiny()
    model = CausalLM(config)
    bf16_model = CausalLM(config.replace(dtype="bfloat16"))
    params = random_params(model, config)
    tokens, positions, mask = left_padded_batch(PAD_LENGTHS, SEQ_LEN, config.vocab_size)
    ref, _ = _apply(model, params, tokens, positions, mask)
    out, _ = _apply(bf16_model, params, tokens, positions, mask)
    assert out.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    real = mask.astype(bool)
    err = np.abs(np.asarray(out)[real] - np.asarray(ref)[real]).max()
    assert 0 < err < 0.1 * np.abs(np.asarray(ref)[real]).max()
    cache = init_cache(bf16_model.config, 3, SEQ_LEN)
    assert cache.k.dtype == jnp.bfloat16
    _, cache = _apply(bf16_model, params, tokens, positions, mask, cache)
    assert cache.k.dtype == jnp.bfloat16 and int(cache.index) == SEQ_LEN


def test_bf16_params_are_stored_in_bf16():
    config = ModelConfig.tiny(param_dtype="bfloat16", dtype="bfloat16")
    dummy = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(lambda: CausalLM(config).init(jax.random.PRNGKey(0), *[dummy] * 3))
    leaves = jax.tree_util.tree_leaves(abstract)
    assert leaves and all(leaf.dtype == jnp.bfloat16 for leaf in leaves)


def test_value_model_and_hidden_states():
    config = ModelConfig.tiny()
    critic = ValueModel(config)
    params = random_params(critic, config)
    tokens, positions, mask = left_padded_batch(PAD_LENGTHS, SEQ_LEN, config.vocab_size)
    values_BxT, cache = _apply(critic, params, tokens, positions, mask)
    assert values_BxT.shape == (3, SEQ_LEN) and values_BxT.dtype == jnp.float32 and cache is None
    assert set(params) == {"transformer", "value_head"}
    # The critic trunk has the policy trunk's layout, so a policy can initialise it.
    lm = CausalLM(config)
    hidden, _ = jax.jit(lm.apply, static_argnames="method")(
        {"params": {"transformer": params["transformer"]}},
        tokens, positions, mask, method=CausalLM.hidden_states,
    )  # fmt: skip
    head = params["value_head"]
    np.testing.assert_allclose(
        np.asarray(hidden) @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
        np.asarray(values_BxT),
        atol=1e-4,
    )


def test_cache_too_small_raises():
    config = ModelConfig.tiny()
    model = CausalLM(config)
    params = random_params(model, config)
    tokens, positions, mask = left_padded_batch((0,), 8, config.vocab_size)
    with pytest.raises(ValueError, match="KVCache"):
        model.apply({"params": params}, tokens, positions, mask, init_cache(config, 1, 4))


# ------------------------------------------------------------------------------ presets

# Parameter counts of the published checkpoints (model cards / safetensors headers).
KNOWN_PARAM_COUNTS = {
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_1_5b": 1_543_714_304,
    "qwen2_5_3b": 3_085_938_688,
    "qwen2_5_7b": 7_615_616_512,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
}


def test_preset_dimensions():
    q3 = ModelConfig.preset("qwen2.5-3b")
    assert (q3.num_layers, q3.embed_dim, q3.mlp_dim, q3.num_heads, q3.num_kv_heads) == (
        36, 2048, 11008, 16, 2,
    )  # fmt: skip
    assert (q3.head_dim, q3.vocab_size, q3.rope_theta, q3.tie_embeddings) == (
        128,
        151936,
        1e6,
        True,
    )
    q7 = ModelConfig.qwen2_5_7b()
    assert (q7.num_layers, q7.embed_dim, q7.mlp_dim, q7.num_heads, q7.num_kv_heads) == (
        28, 3584, 18944, 28, 4,
    )  # fmt: skip
    assert (q7.vocab_size, q7.tie_embeddings) == (152064, False)
    q05, q15 = ModelConfig.qwen2_5_0_5b(), ModelConfig.qwen2_5_1_5b()
    assert (q05.num_layers, q05.embed_dim, q05.mlp_dim, q05.num_heads, q05.num_kv_heads) == (
        24, 896, 4864, 14, 2,
    )  # fmt: skip
    assert (q15.num_layers, q15.embed_dim, q15.mlp_dim, q15.num_heads, q15.num_kv_heads) == (
        28, 1536, 8960, 12, 2,
    )  # fmt: skip
    assert q05.tie_embeddings and q15.tie_embeddings and q05.qkv_bias
    l3 = ModelConfig.preset("llama3.2-3b")
    assert (l3.num_layers, l3.embed_dim, l3.mlp_dim, l3.num_heads, l3.num_kv_heads) == (
        28, 3072, 8192, 24, 8,
    )  # fmt: skip
    assert (l3.head_dim, l3.vocab_size, l3.rope_theta, l3.tie_embeddings) == (
        128, 128256, 500000.0, True,
    )  # fmt: skip
    assert l3.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192) and not l3.qkv_bias
    l1 = ModelConfig.llama3_2_1b()
    assert (l1.num_layers, l1.embed_dim, l1.mlp_dim, l1.num_heads, l1.num_kv_heads) == (
        16, 2048, 8192, 32, 8,
    )  # fmt: skip
    assert l1.head_dim == 64 and l1.tie_embeddings


@pytest.mark.parametrize("name", sorted(KNOWN_PARAM_COUNTS))
def test_preset_param_count_and_hf_config_round_trip(name):
    import torch
    import transformers

    config = ModelConfig.preset(name)
    dummy = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    abstract = jax.eval_shape(
        lambda t: CausalLM(config).init(jax.random.PRNGKey(0), t, t, t), dummy
    )
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(abstract))
    assert count == KNOWN_PARAM_COUNTS[name]

    hf_dict = config.to_hf_config()
    hf_config = transformers.AutoConfig.for_model(**hf_dict)
    assert (
        type(hf_config).__name__ == {"qwen2": "Qwen2Config", "llama": "LlamaConfig"}[config.family]
    )
    assert ModelConfig.from_hf_config(hf_config.to_dict()) == config
    with torch.device("meta"):  # shapes only, no allocation
        torch_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in torch_model.parameters()) == count


def test_from_hf_config_accepts_legacy_rope_scaling():
    legacy = ModelConfig.tiny_llama().to_hf_config()
    legacy.pop("rope_parameters")
    assert ModelConfig.from_hf_config(legacy) == ModelConfig.tiny_llama()
    overridden = ModelConfig.from_hf_config(legacy, dtype="bfloat16", remat=True)
    assert overridden.dtype == "bfloat16" and overridden.remat


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(family="gpt2"), "family"),
        (dict(num_heads=6, num_kv_heads=4), "num_kv_heads"),
        (dict(head_dim=15), "head_dim"),
        (dict(dtype="float8"), "dtype"),
    ],
)
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(ModelConfig.tiny(), **change)
    with pytest.raises(ValueError, match="high_freq_factor"):
        RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)


def test_unknown_preset_and_foreign_hf_config():
    with pytest.raises(ValueError, match="Unknown model preset"):
        ModelConfig.preset("gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelConfig.from_hf_config({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    bad = ModelConfig.tiny().to_hf_config()
    del bad["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf_config(bad)
