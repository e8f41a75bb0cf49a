"""Tests for deepretrieval_jax.hf_io against real transformers models (torch CPU, fp32).

Parity: logits of tiny random Qwen2 / Llama checkpoints loaded by hf_io equal torch's on a
left-padded batch; export round-trips through `AutoModelForCausalLM.from_pretrained`.
"""

import json
import os

import jax
import numpy as np
import pytest
import transformers
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file
from tiny_models import left_padded_batch, random_params, save_tiny_hf_model, torch_logits

from deepretrieval_jax import hf_io, sharding
from deepretrieval_jax.models import CausalLM, ModelConfig

PAD_LENGTHS = (0, 2, 5)
SEQ_LEN = 9


def _jax_logits(config, params, tokens, positions, mask):
    logits, _ = jax.jit(CausalLM(config).apply)({"params": params}, tokens, positions, mask)
    return np.asarray(logits)


def _assert_real_close(actual, expected, mask, atol):
    real = mask.astype(bool)
    np.testing.assert_allclose(actual[real], expected[real], atol=atol, rtol=0)


@pytest.mark.parametrize(
    "family, tie, shard_size",
    [
        ("qwen2", True, None),
        ("qwen2", False, "20KB"),
        ("llama", True, "30KB"),
        ("llama", False, None),
    ],
)
def test_parity_and_round_trip_through_transformers(tmp_path, family, tie, shard_size):
    torch_model = save_tiny_hf_model(tmp_path / "src", family, tie, max_shard_size=shard_size)
    assert (tmp_path / "src" / hf_io.INDEX_FILE).exists() == (shard_size is not None)
    config, params = hf_io.load_params(tmp_path / "src")
    assert (config.family, config.tie_embeddings, config.qkv_bias) == (
        family,
        tie,
        family == "qwen2",
    )
    assert (config.rope_scaling is not None) == (family == "llama")
    assert ("lm_head" in params) == (not tie)

    tokens, positions, mask = left_padded_batch(PAD_LENGTHS, SEQ_LEN, config.vocab_size)
    expected = torch_logits(torch_model, tokens, positions, mask)
    _assert_real_close(_jax_logits(config, params, tokens, positions, mask), expected, mask, 1e-4)

    out = hf_io.save_params(params, config, tmp_path / "out", max_shard_size=shard_size or "5GB")
    assert (out / hf_io.INDEX_FILE).exists() == (shard_size is not None)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    np.testing.assert_allclose(torch_logits(reloaded, tokens, positions, mask), expected, atol=1e-6)
    saved_names = (
        set(json.loads((out / hf_io.INDEX_FILE).read_text())["weight_map"])
        if (shard_size)
        else set(load_file(str(out / hf_io.SINGLE_WEIGHTS_FILE)))
    )
    assert ("lm_head.weight" in saved_names) == (not tie)
    assert json.loads((out / hf_io.GENERATION_CONFIG_FILE).read_text())


def test_load_onto_mesh_places_each_tensor_sharded(tiny_qwen2_hf_dir):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config, params = hf_io.load_params(tiny_qwen2_hf_dir, mesh=mesh, rules=sharding.TRAIN_RULES)
    attn = params["transformer"]["layers_0"]["attn"]
    assert attn["q_kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert params["transformer"]["embedder"]["embedding"].sharding.spec == P("tensor", "fsdp")
    _, single = hf_io.load_params(tiny_qwen2_hf_dir)
    tokens, positions, mask = left_padded_batch((0, 1, 2, 3), 6, config.vocab_size)
    with sharding.mesh_rules(mesh, sharding.TRAIN_RULES):
        sharded_logits = _jax_logits(config, params, tokens, positions, mask)
    np.testing.assert_allclose(
        sharded_logits, _jax_logits(config, single, tokens, positions, mask), atol=1e-5
    )


def test_load_into_given_config_and_shardings(tiny_llama_hf_dir):
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    wanted = ModelConfig.tiny_llama(dtype="bfloat16", remat=True)
    shardings = sharding.param_shardings(CausalLM(wanted), mesh, sharding.SAMPLER_RULES)
    config, params = hf_io.load_params(tiny_llama_hf_dir, wanted, shardings=shardings)
    assert config == wanted
    emb = params["transformer"]["embedder"]["embedding"]
    assert emb.sharding == shardings["transformer"]["embedder"]["embedding"]
    assert emb.sharding.spec == P("tensor", None)
    with pytest.raises(
        hf_io.CheckpointError, match=r"config\.json: .*vocab_size=512 \(checkpoint: 256\)"
    ):
        hf_io.load_params(tiny_llama_hf_dir, wanted.replace(vocab_size=512))


def test_config_overrides_and_dtypes(tiny_llama_hf_dir):
    config, params = hf_io.load_params(tiny_llama_hf_dir, dtype="bfloat16", param_dtype="bfloat16")
    assert config.dtype == "bfloat16"
    assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in jax.tree_util.tree_leaves(params))


def test_jax_params_round_trip_exactly(tmp_path):
    config = ModelConfig.tiny(tie_embeddings=False)
    params = random_params(CausalLM(config), config)
    hf_io.save_params(params, config, tmp_path, max_shard_size=40_000)
    loaded_config, loaded = hf_io.load_params(tmp_path)
    assert loaded_config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded)
    # bf16 export is read back as bf16-rounded fp32.
    hf_io.save_params(params, config, tmp_path / "bf16", dtype="bfloat16")
    _, rounded = hf_io.load_params(tmp_path / "bf16")
    leaf = params["transformer"]["layers_1"]["mlp"]["up_kernel"]
    np.testing.assert_array_equal(
        rounded["transformer"]["layers_1"]["mlp"]["up_kernel"],
        np.asarray(leaf).astype(jax.numpy.bfloat16).astype(np.float32),
    )


def test_export_with_tokenizer_object_and_dir(tmp_path, tiny_qwen2_hf_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    config, params = hf_io.load_params(tiny_qwen2_hf_dir)
    first = hf_io.save_params(params, config, tmp_path / "a", tokenizer=tokenizer)
    # AutoTokenizer would pick Qwen2's class from config.json; this toy tokenizer is WordLevel.
    load = transformers.PreTrainedTokenizerFast.from_pretrained
    assert load(str(first)).encode("hello world") == [1, 2]
    second = hf_io.save_params(params, config, tmp_path / "b", tokenizer=first)
    assert load(str(second)).encode("world") == [2]
    with pytest.raises(ValueError, match="no tokenizer files"):
        hf_io.save_params(params, config, tmp_path / "c", tokenizer=tiny_qwen2_hf_dir)


# --------------------------------------------------------------------------------- bad input
def _copy_checkpoint(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _edit_config(ckpt, **changes):
    hf = json.loads((ckpt / "config.json").read_text())
    hf.update(changes)
    (ckpt / "config.json").write_text(json.dumps(hf))


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(hf_io.CheckpointError, match="does not exist"):
        hf_io.load_params(tmp_path / "nope")
    with pytest.raises(hf_io.CheckpointError, match=r"config\.json: missing"):
        hf_io.load_params(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(hf_io.CheckpointError, match=r"config\.json: not valid JSON"):
        hf_io.load_params(tmp_path)


def test_hub_id_offline_gives_clear_error():
    with pytest.raises(hf_io.CheckpointError, match="Hub download failed"):
        hf_io.load_params("no-such-org-xyz/no-such-model")


def test_other_architecture_is_rejected(tmp_path):
    gpt2 = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]
    )
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(hf_io.CheckpointError, match=r"config\.json.*'gpt2'.*GPT2LMHeadModel"):
        hf_io.load_params(tmp_path)


def test_missing_or_corrupt_weights(tmp_path, tiny_qwen2_hf_dir):
    ckpt = _copy_checkpoint(tiny_qwen2_hf_dir, tmp_path / "ckpt")
    weights = ckpt / hf_io.SINGLE_WEIGHTS_FILE
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(
        hf_io.CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' missing"
    ):
        hf_io.load_params(ckpt)
    weights.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(hf_io.CheckpointError, match=r"model\.safetensors: not a readable"):
        hf_io.load_params(ckpt)
    weights.unlink()
    with pytest.raises(
        hf_io.CheckpointError, match="no model.safetensors or model.safetensors.index"
    ):
        hf_io.load_params(ckpt)


def test_shape_mismatch_names_file_and_key(tmp_path, tiny_qwen2_hf_dir):
    ckpt = _copy_checkpoint(tiny_qwen2_hf_dir, tmp_path / "ckpt")
    _edit_config(ckpt, intermediate_size=96)
    with pytest.raises(
        hf_io.CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
        r"\(128, 64\), expected \(96, 64\)",
    ):
        hf_io.load_params(ckpt)


def test_unexpected_tensors_are_rejected(tmp_path, tiny_qwen2_hf_dir):
    ckpt = _copy_checkpoint(tiny_qwen2_hf_dir, tmp_path / "ckpt")
    _edit_config(ckpt, num_hidden_layers=1, layer_types=["full_attention"])
    with pytest.raises(hf_io.CheckpointError, match=r"do not fit the model.*model\.layers\.1\."):
        hf_io.load_params(ckpt)


def test_parse_size_and_name_table_covers_every_param():
    assert hf_io.parse_size("5GB") == 5 * 10**9 and hf_io.parse_size("2MiB") == 2 * 2**20
    assert hf_io.parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size"):
        hf_io.parse_size("lots")
    for name in ("qwen2_5_7b", "llama3_2_3b"):
        config = ModelConfig.preset(name)
        abstract = sharding.abstract_params(CausalLM(config))
        paths = {
            tuple(k.key for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(
                abstract, is_leaf=lambda x: hasattr(x, "names")
            )[0]
        }
        assert {path for _, path, _ in hf_io.name_pairs(config)} == paths
