"""End-to-end test of launch/export_hf.py: orbax checkpoint -> HF directory -> transformers."""

import importlib.util
import os
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from absl import flags
from tiny_models import left_padded_batch, random_params, torch_logits
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, pre_tokenizers

from deepretrieval_jax.checkpoint import CheckpointManager
from deepretrieval_jax.models import CausalLM, ModelConfig

EXPORT = Path(__file__).resolve().parents[1] / "launch" / "export_hf.py"
_spec = importlib.util.spec_from_file_location("export_hf", EXPORT)
export_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_hf)


def run_cli(*argv):
    """Parses the entry point's flags and runs its main() in this process."""
    try:
        export_hf.main(flags.FLAGS(["export_hf", *argv]))
    finally:
        flags.FLAGS.unparse_flags()


def save_word_tokenizer(path):
    raw = RawTokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="[UNK]").save_pretrained(
        str(path)
    )


def test_export_train_state_step_loads_in_transformers(tmp_path):
    config = ModelConfig.tiny()
    model = CausalLM(config)
    ckpt = tmp_path / "ckpt"
    with CheckpointManager(ckpt) as mgr:
        for step, seed in ((3, 3), (5, 5)):
            state = {
                "actor_params": random_params(model, config, seed=seed),
                "critic_params": {"w": jnp.zeros((4, 4))},
                "step": jnp.int32(step),
            }
            mgr.save(step, state, {"step": step})
    save_word_tokenizer(tmp_path / "tok")
    out = tmp_path / "hf"
    run_cli(
        f"--checkpoint_dir={ckpt}",
        "--step=3",
        "--model=tiny",
        f"--out_dir={out}",
        f"--tokenizer_dir={tmp_path / 'tok'}",
    )
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    tokens, positions, mask = left_padded_batch((0, 3), 7, config.vocab_size)
    want, _ = jax.jit(model.apply)(
        {"params": random_params(model, config, seed=3)}, tokens, positions, mask
    )
    got = torch_logits(hf_model, tokens, positions, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], np.asarray(want)[real], atol=2e-4, rtol=0)
    assert RawTokenizer.from_file(str(out / "tokenizer.json")).encode("hello world").ids == [0, 1]


def test_export_plain_params_tree(tmp_path):
    config = ModelConfig.tiny()
    model = CausalLM(config)
    params = random_params(model, config, seed=1)
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(0, params)
    out = tmp_path / "hf"
    export_hf.export(tmp_path / "ckpt", out, config, params_key="ignored_for_plain_trees")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    embed = hf_model.model.embed_tokens.weight.detach().numpy()
    want = np.asarray(params["transformer"]["embedder"]["embedding"])
    np.testing.assert_array_equal(embed, want)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]


def test_export_lora_run_merges_adapters_and_writes_peft(tmp_path):
    """A LoRA run's checkpoint (adapters only) on an HF base: the merged export and the PEFT
    adapter directory both reproduce the adapter forward."""
    import pytest
    import torch

    from deepretrieval_jax import hf_io
    from deepretrieval_jax.models import lora

    config = ModelConfig.tiny()
    base = random_params(CausalLM(config), config, seed=2)
    hf_io.save_params(base, config, tmp_path / "base")
    lcfg = config.replace(lora_rank=2, lora_alpha=4.0, lora_targets=("q", "v", "down"))
    fresh = CausalLM(lcfg).init(jax.random.PRNGKey(0), *(jnp.zeros((1, 1), jnp.int32),) * 3)
    adapters, _ = lora.split(flax.linen.meta.unbox(fresh["params"]))
    adapters = jax.tree.map(lambda x: np.random.default_rng(x.size).normal(0, 0.3, x.shape)
                            .astype(np.float32), adapters)  # fmt: skip
    with CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(4, {"actor_params": adapters, "step": jnp.int32(4)})
    run_cli(f"--checkpoint_dir={tmp_path / 'ckpt'}", "--model=tiny", f"--out_dir={tmp_path / 'hf'}",
            "--lora_rank=2", "--lora_alpha=4.0", "--lora_targets=q,v,down",
            f"--base_dir={tmp_path / 'base'}", f"--peft_dir={tmp_path / 'peft'}")  # fmt: skip
    tokens, positions, mask = left_padded_batch((0, 3), 7, config.vocab_size)
    want = np.asarray(
        CausalLM(lcfg).apply({"params": lora.combine(base, adapters)}, tokens, positions, mask)[0]
    )
    real = mask.astype(bool)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    merged = torch_logits(hf_model, tokens, positions, mask)
    np.testing.assert_allclose(merged[real], want[real], atol=2e-4, rtol=0)
    peft = pytest.importorskip("peft")
    base_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(base_model, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(
            torch_logits(peft_model, tokens, positions, mask)[real], merged[real], atol=1e-5, rtol=0
        )
