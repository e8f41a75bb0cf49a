"""Export policy params from an orbax checkpoint as a Hugging Face checkpoint directory.

    python launch/export_hf.py --checkpoint_dir=/tmp/demo/checkpoints --model=qwen2.5-3b \
        --out_dir=/tmp/demo/hf [--step=1250] [--tokenizer_dir=...] [--dtype=bfloat16]

Reads only the `--params_key` subtree of the saved train state (a saved plain params tree is
detected and used as is), resharded over all local devices (FSDP), then writes config.json,
safetensors and the tokenizer files; `transformers.AutoModelForCausalLM` loads the result.

A LoRA run (config.model.lora.rank > 0) saved adapters only: give its rank/alpha/targets and its
base weights (`--base_dir`: the run's model.hf_path, or its model.init_checkpoint); the adapters
are merged into the exported weights, and `--peft_dir` also writes a PEFT adapter directory.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_CKPT = flags.DEFINE_string("checkpoint_dir", None, "CheckpointManager directory.")
_STEP = flags.DEFINE_integer("step", None, "Step to export (default: latest finalised).")
_KEY = flags.DEFINE_string("params_key", "actor_params", "State key holding the params.")
_MODEL = flags.DEFINE_string("model", None, "Model preset name, e.g. qwen2.5-3b.")
_CONFIG_JSON = flags.DEFINE_string("config_json", None, "HF config.json instead of --model.")
_OUT = flags.DEFINE_string("out_dir", None, "Output HF checkpoint directory.")
_TOKENIZER = flags.DEFINE_string("tokenizer_dir", None, "HF tokenizer dir to copy along.")
_DTYPE = flags.DEFINE_string("dtype", None, "Storage dtype (default: the model's param_dtype).")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "LoRA run: config.model.lora.rank.")
_LORA_ALPHA = flags.DEFINE_float("lora_alpha", 16.0, "LoRA run: config.model.lora.alpha.")
_LORA_TARGETS = flags.DEFINE_list(
    "lora_targets", "q,k,v,o,gate,up,down", "LoRA run: config.model.lora.targets."
)
_BASE = flags.DEFINE_string("base_dir", None, "LoRA run: base weights (HF dir or checkpoint).")
_PEFT = flags.DEFINE_string("peft_dir", None, "LoRA run: also write a PEFT adapter dir here.")
flags.mark_flags_as_required(["checkpoint_dir", "out_dir"])
flags.register_multi_flags_validator(
    ["model", "config_json"],
    lambda f: (f["model"] is None) != (f["config_json"] is None),
    message="give exactly one of --model and --config_json",
)


def export(checkpoint_dir, out_dir, config, step=None, params_key="actor_params", *,
           base_dir=None, peft_dir=None, **save_kw):  # fmt: skip
    """Restores the params of `step` (sharded over all devices) and writes them with hf_io.

    With `config.lora_rank` > 0: the checkpoint's adapters on `base_dir`'s weights, merged."""
    from deepretrieval_jax import checkpoint, hf_io, lora_export, sharding

    if config.lora_rank:
        return lora_export.export(checkpoint_dir, out_dir, config, base_dir, peft_dir,
                                  step=step, key=params_key, **save_kw)  # fmt: skip
    params = checkpoint.restore_policy_params(
        checkpoint_dir, config, step=step, key=params_key, mesh=sharding.make_mesh()
    )
    logging.info("Restored %s; writing %s", checkpoint_dir, out_dir)
    return hf_io.save_params(params, config, out_dir, **save_kw)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from deepretrieval_jax import runtime
    from deepretrieval_jax.models import ModelConfig

    runtime.log_devices()
    if _MODEL.value:
        config = ModelConfig.preset(_MODEL.value)
    else:
        with open(_CONFIG_JSON.value, encoding="utf-8") as f:
            config = ModelConfig.from_hf_config(json.load(f))
    if _LORA_RANK.value:
        config = config.replace(lora_rank=_LORA_RANK.value, lora_alpha=_LORA_ALPHA.value,
                                lora_targets=tuple(_LORA_TARGETS.value))  # fmt: skip
    save_kw = dict(tokenizer=_TOKENIZER.value, dtype=_DTYPE.value)
    export(_CKPT.value, _OUT.value, config, _STEP.value, _KEY.value, base_dir=_BASE.value,
           peft_dir=_PEFT.value, **save_kw)  # fmt: skip


if __name__ == "__main__":
    app.run(main)
