"""End-to-end test of launch/export_hf.py: orbax checkpoint -> HF directory -> transformers."""

import importlib.util
import json
import os
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from absl import flags
from tiny_models import left_padded_batch, random_params, save_tiny_tokenizer, torch_logits
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, pre_tokenizers

from deepretrieval_jax import export
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
    plan = export.plan_export(tmp_path / "ckpt", config.vocab_size, eos_ids=[1])
    export.export_run(tmp_path / "ckpt", out, config, plan, params_key="ignored_for_plain_trees")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
    embed = hf_model.model.embed_tokens.weight.detach().numpy()
    want = np.asarray(params["transformer"]["embedder"]["embedding"])
    np.testing.assert_array_equal(embed, want)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]


def _tiny_run(workdir, compact=False):
    """A run directory: checkpoints/ with one train state, config.json as the launcher writes."""
    config = ModelConfig.tiny()
    with CheckpointManager(workdir / "checkpoints") as mgr:
        mgr.save(1, {"actor_params": random_params(CausalLM(config), config, seed=0)})
    record = {"config": {"model": {"compact_vocab": compact}}}
    (workdir / "config.json").write_text(json.dumps(record))
    return workdir / "checkpoints"


def test_export_writes_end_ids_and_expands_a_home_tokenizer_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    save_tiny_tokenizer(tmp_path / "home" / "tok")
    ckpt = _tiny_run(tmp_path / "run")
    out = tmp_path / "hf"
    run_cli(f"--checkpoint_dir={ckpt}", "--model=tiny", f"--out_dir={out}", "--tokenizer_dir=~/tok")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    gen = transformers.GenerationConfig.from_pretrained(str(out))
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert gen.eos_token_id == [im_end, eot] and gen.pad_token_id == eot
    # generate() stops at <|im_end|>: a processor forces it as the 2nd new token.
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()

    class ForceImEnd(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == 4:
                scores[:, im_end] = 1e9
            return scores

    processors = transformers.LogitsProcessorList([ForceImEnd()])
    prompt = torch.tensor([[5, 6, 7]])
    generated = model.generate(
        prompt, max_new_tokens=8, do_sample=False, logits_processor=processors
    )
    assert generated.shape == (1, 5) and generated[0, -1].item() == im_end


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokenizer_dir=~/no_such_tok"], "--tokenizer_dir: "),
        ([], "give --tokenizer_dir or --eos_token_ids"),
    ],
)
def test_export_refuses_before_writing_anything(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("HOME", str(tmp_path))
    ckpt = _tiny_run(tmp_path / "run")
    out = tmp_path / "hf"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(f"--checkpoint_dir={ckpt}", "--model=tiny", f"--out_dir={out}", *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_older_compact_vocabulary_run_export_needs_and_copies_the_vocab_map(tmp_path, capsys):
    """Runs trained with the removed `model.compact_vocab` left WORKDIR/vocab_map.json."""
    ckpt = _tiny_run(tmp_path / "run", compact=True)
    out = tmp_path / "hf"
    with pytest.raises(SystemExit):
        run_cli(f"--checkpoint_dir={ckpt}", "--model=tiny", f"--out_dir={out}", "--eos_token_ids=7")
    assert "vocab_map.json" in capsys.readouterr().err and not out.exists()
    ids = [0, 3, 7, 151645]  # model id i is tokenizer id ids[i]
    (tmp_path / "run" / "vocab_map.json").write_text(
        json.dumps({"tokenizer": "qwen2.5", "ids": ids})
    )
    run_cli(
        f"--checkpoint_dir={ckpt}", "--model=tiny", f"--out_dir={out}", "--eos_token_ids=151645,7"
    )
    assert json.loads((out / "vocab_map.json").read_text())["ids"] == ids
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [3, 2] and gen["pad_token_id"] == 3


def test_export_takes_model_and_tokenizer_from_the_run_config(tmp_path):
    config = ModelConfig.tiny().replace(num_layers=1)
    run = tmp_path / "run"
    with CheckpointManager(run / "checkpoints") as mgr:  # an SFT state: {"params", ...}
        mgr.save(4, {"params": random_params(CausalLM(config), config, seed=4), "step": 4})
    save_tiny_tokenizer(tmp_path / "tok")
    prompt = {
        "system": "You write search queries.",
        "assistant_prefix": '<answer>{"query": "',
        "answer_suffix": "</answer>",
        "instruction": None,
    }
    record = {"config": {"model": {"preset": "tiny", "overrides": {"num_layers": 1}},
                         "tokenizer": {"name": str(tmp_path / "tok")},
                         "data": {"task": "scifact_no_reason", "prompt": prompt, "corpus": ""},
                         "sampling": {"stop": ['"}']}}}  # fmt: skip
    (run / "config.json").write_text(json.dumps(record))
    run_cli(f"--checkpoint_dir={run / 'checkpoints'}", f"--out_dir={tmp_path / 'hf'}")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["num_hidden_layers"] == 1
    gen = transformers.GenerationConfig.from_pretrained(str(tmp_path / "hf"))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert gen.eos_token_id == tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    # How serving must prompt it: the run's task, prompt pieces (None = the task's) and stops.
    saved = json.loads((tmp_path / "hf" / "deepretrieval_protocol.json").read_text())
    assert saved == {"task": "scifact_no_reason", "corpus": "", "stop": ['"}'],
                     "prompt": {k: v for k, v in prompt.items() if v is not None}}  # fmt: skip


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
            f"--base_dir={tmp_path / 'base'}", f"--peft_dir={tmp_path / 'peft'}",
            "--eos_token_ids=1")  # fmt: skip
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
