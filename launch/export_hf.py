"""Export policy params from an orbax checkpoint as a Hugging Face checkpoint directory.

    python launch/export_hf.py --checkpoint_dir=/tmp/run/checkpoints --out_dir=/tmp/run/hf \
        [--model=qwen2.5-3b | --config_json=FILE] [--tokenizer_dir=/ckpt/Qwen2.5-3B-Instruct] \
        [--step=1250] [--dtype=bfloat16] [--eos_token_ids=151645,151643] [--vocab_map=FILE]

Without --model/--config_json the model comes from the run's WORKDIR/config.json, and
without --tokenizer_dir/--eos_token_ids the end ids come from the run's tokenizer.

Reads only the `--params_key` subtree of the saved train state (default: a PPO state's
actor_params, else an SFT state's params; a saved plain params tree is used as is), resharded over all local devices (FSDP), then writes config.json,
generation_config.json (with the end ids), safetensors and the tokenizer files (or the
vocab_map.json of an older compact-vocabulary run). Tokenizer, end ids and vocabulary are
checked before any weights are read (deepretrieval_jax/export.py).

A LoRA run (config.model.lora.rank > 0) saved adapters only: give its rank/alpha/targets and its
base weights (`--base_dir`: the run's model.hf_path, or its model.init_checkpoint); the adapters
are merged into the exported weights, and `--peft_dir` also writes a PEFT adapter directory.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_CKPT = flags.DEFINE_string("checkpoint_dir", None, "CheckpointManager directory.")
_STEP = flags.DEFINE_integer("step", None, "Step to export (default: latest finalised).")
_KEY = flags.DEFINE_string("params_key", None, "State key (default: actor_params, else params).")
_MODEL = flags.DEFINE_string("model", None, "Preset, e.g. qwen2.5-3b (default: the run's).")
_CONFIG_JSON = flags.DEFINE_string("config_json", None, "HF config.json instead of --model.")
_OUT = flags.DEFINE_string("out_dir", None, "Output HF checkpoint directory.")
_TOKENIZER = flags.DEFINE_string("tokenizer_dir", None, "HF tokenizer dir to copy along.")
_EOS = flags.DEFINE_list("eos_token_ids", None, "End ids (default: the tokenizer's).")
_VOCAB_MAP = flags.DEFINE_string("vocab_map", None, "vocab_map.json (default: the run's).")
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
    lambda f: f["model"] is None or f["config_json"] is None,
    message="give at most one of --model and --config_json",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from deepretrieval_jax import export, progress, runtime, sharding
    from deepretrieval_jax.models import ModelConfig

    progress.quiet_library_logs(not flags.FLAGS["verbosity"].present)

    with runtime.user_errors():
        if _MODEL.value:
            config = ModelConfig.preset(_MODEL.value)
        elif _CONFIG_JSON.value:
            hf = json.loads(export.as_path(_CONFIG_JSON.value).read_text())
            config = ModelConfig.from_hf_config(hf)
        else:  # the run's own config.json (written by launch/train.py and launch/sft.py)
            config = export.model_config_of_run(_CKPT.value)
        eos = [int(i) for i in _EOS.value] if _EOS.value else None
        tokenizer = _TOKENIZER.value
        if tokenizer is None and eos is None:
            tokenizer = export.run_tokenizer_dir(_CKPT.value)
        plan = export.plan_export(_CKPT.value, config.vocab_size, tokenizer, eos, _VOCAB_MAP.value)
        runtime.log_devices()
        if _LORA_RANK.value:  # adapters merged into --base_dir's weights
            from deepretrieval_jax import lora_export

            config = config.replace(lora_rank=_LORA_RANK.value, lora_alpha=_LORA_ALPHA.value,
                                    lora_targets=tuple(_LORA_TARGETS.value))  # fmt: skip
            lora_export.export(
                _CKPT.value, _OUT.value, config, _BASE.value, _PEFT.value, step=_STEP.value,
                key=_KEY.value or "actor_params", tokenizer=tokenizer, dtype=_DTYPE.value,
            )  # fmt: skip
            return
        export.export_run(
            _CKPT.value, _OUT.value, config, plan, _STEP.value, _KEY.value, _DTYPE.value,
            mesh=sharding.make_mesh(),
        )  # fmt: skip


if __name__ == "__main__":
    app.run(main)
