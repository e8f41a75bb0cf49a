"""Tests for deepretrieval_jax.sharding on the 8 fake CPU devices set up by conftest.py."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tiny_models import left_padded_batch

from deepretrieval_jax import sharding
from deepretrieval_jax.models import CausalLM, ModelConfig, ValueModel, init_cache

PAD_LENGTHS = (0, 1, 3, 5)


def test_make_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (2, 2, 2)
    assert sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=-1)).devices.shape == (2, 4, 1)
    assert sharding.make_mesh().devices.shape == (1, 8, 1)
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="not divisible"):
        sharding.make_mesh({"data": 3, "fsdp": -1})
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.make_mesh({"data": 2, "model": 4})
    with pytest.raises(ValueError, match="single -1"):
        sharding.MeshConfig(data=-1, fsdp=-1)


@pytest.fixture(scope="module")
def sharded_lm():
    config = ModelConfig.tiny(num_layers=1)
    model = CausalLM(config)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = sharding.init_sharded(model, mesh, sharding.TRAIN_RULES, jax.random.PRNGKey(0))
    return config, model, mesh, params


def test_params_are_created_sharded(sharded_lm):
    _, _, mesh, params = sharded_lm
    attn = params["transformer"]["layers_0"]["attn"]
    assert attn["q_kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert attn["o_kernel"].sharding.spec == P("tensor", None, "fsdp")
    assert params["transformer"]["embedder"]["embedding"].sharding.spec == P("tensor", "fsdp")
    mlp = params["transformer"]["layers_0"]["mlp"]
    assert mlp["down_kernel"].sharding.spec == P("tensor", "fsdp")
    assert all(leaf.sharding.mesh == mesh for leaf in jax.tree_util.tree_leaves(params))
    # Each device holds only its shard.
    shard = attn["q_kernel"].addressable_shards[0].data
    assert shard.shape == (32, 2, 16)


@pytest.mark.parametrize("rules_name", ["TRAIN_RULES", "SAMPLER_RULES"])
def test_sharded_logits_equal_single_device(sharded_lm, rules_name):
    config, model, mesh, params = sharded_lm
    rules = getattr(sharding, rules_name)
    params = sharding.reshard(params, model, mesh, rules)
    tokens, positions, mask = left_padded_batch(PAD_LENGTHS, 8, config.vocab_size)
    host_params = jax.device_get(params)
    ref, _ = jax.jit(model.apply)({"params": host_params}, tokens, positions, mask)

    batch = sharding.batch_sharding(mesh, rules)
    inputs = [jax.device_put(x, batch) for x in (tokens, positions, mask)]
    with sharding.mesh_rules(mesh, rules):
        out, _ = jax.jit(model.apply)({"params": params}, *inputs)
        cache = init_cache(config, len(PAD_LENGTHS), 10)
        cache = jax.device_put(cache, sharding.cache_shardings(cache, mesh, rules))
        prefill, cache = jax.jit(model.apply)({"params": params}, *inputs, cache)
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(prefill), np.asarray(ref), atol=1e-5)
    expected = jax.sharding.NamedSharding(mesh, P(None, ("data", "fsdp"), None, "tensor", None))
    assert cache.k.sharding.is_equivalent_to(expected, 5)


def test_reshard_to_sampler_rules_drops_fsdp(sharded_lm):
    _, model, mesh, params = sharded_lm
    sampler_params = sharding.reshard(params, model, mesh, sharding.SAMPLER_RULES)
    emb = sampler_params["transformer"]["embedder"]["embedding"]
    assert emb.sharding.spec == P("tensor", None)
    np.testing.assert_array_equal(
        np.asarray(emb), np.asarray(params["transformer"]["embedder"]["embedding"])
    )


def test_indivisible_dims_are_replicated():
    # 2 kv heads cannot split over tensor=4; 4 query heads can.
    config = ModelConfig.tiny()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    shardings = sharding.param_shardings(CausalLM(config), mesh, sharding.TRAIN_RULES)
    attn = shardings["transformer"]["layers_0"]["attn"]
    assert attn["k_kernel"].spec == P("fsdp", None, None)
    assert attn["q_kernel"].spec == P("fsdp", "tensor", None)


def test_value_model_shardings_cover_every_leaf():
    config = ModelConfig.tiny()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    critic = ValueModel(config)
    shardings = sharding.param_shardings(critic, mesh, sharding.TRAIN_RULES)
    leaves = jax.tree_util.tree_leaves(shardings)
    assert len(leaves) == len(jax.tree_util.tree_leaves(sharding.abstract_params(critic)))
    assert shardings["value_head"]["kernel"].spec == P("fsdp")
    assert shardings["value_head"]["bias"].spec == P()
