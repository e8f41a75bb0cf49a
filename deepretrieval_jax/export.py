"""Export a run's policy checkpoint as a Hugging Face directory that generates correctly.

`launch/export_hf.py` is a thin shell around `export_run`. Everything a user can get wrong is
checked *before* any weights are restored or written:

- Tokenizer: `~` is expanded and the directory must hold tokenizer files.
- End ids: generation_config.json gets `eos_token_id` (every end id of the tokenizer; Qwen2.5:
  `<|im_end|>` then `<|endoftext|>`) and `pad_token_id`, so `transformers.generate` stops where
  training's sampler stopped. They come from the tokenizer or from explicit `eos_ids`; with
  neither, the export is refused (an export whose generate never stops is worse than none).
- Compact vocabulary (older runs only): runs trained with the since removed
  `model.compact_vocab` left `WORKDIR/vocab_map.json` (model id i = tokenizer id ids[i]); the
  export copies it next to the weights (the serving loader reads it) and maps the end/pad ids
  into the model's vocabulary. Such a run (its `WORKDIR/config.json` says so, or the model's
  vocabulary is smaller than the tokenizer's) without a vocab map is refused. New runs speak the
  tokenizer's ids and have no vocab map.

- Prompt protocol: with the run's config.json, `deepretrieval_protocol.json` (the run's task,
  prompt pieces and stop strings) goes next to the weights, so that `launch/rewrite.py` and
  `launch/serve.py` prompt the policy as training did (`serving/protocol.py`).

Paths go through `etils.epath` (deepretrieval_jax/workdir.py), so the run directory and the
output directory may be gs:// URLs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from etils import epath

from deepretrieval_jax.workdir import RUN_CONFIG_FILE, Mirror, as_path, read_run_record

VOCAB_MAP_FILE = "vocab_map.json"


def _compact_vocab_size(ids, multiple: int = 128) -> int:
    """The model vocabulary of an older compact-vocabulary run: len(ids) rounded up."""
    return -(-len(ids) // multiple) * multiple


def run_dir(checkpoint_dir: str | os.PathLike) -> epath.Path:
    """The training run's workdir of a checkpoint directory (itself or its parent)."""
    path = as_path(checkpoint_dir)
    return path if (path / "checkpoints").is_dir() else path.parent


def run_config(checkpoint_dir: str | os.PathLike):
    """The run's resolved config (WORKDIR/config.json, as a ConfigDict), or None."""
    import ml_collections

    path = run_dir(checkpoint_dir) / RUN_CONFIG_FILE
    record = read_run_record(path)
    if record is None and path.exists():
        raise ValueError(f'{path}: not a run config (no "config" mapping)')
    return None if record is None else ml_collections.ConfigDict(record["config"])


def model_config_of_run(checkpoint_dir: str | os.PathLike):
    """The model of a run, from its config.json: the preset with its overrides and, for an
    older compact-vocabulary run, the size its vocab_map.json gives (as its trainer did)."""
    from deepretrieval_jax.rl import policy_init

    cfg = run_config(checkpoint_dir)
    if cfg is None:
        raise FileNotFoundError(
            f"{run_dir(checkpoint_dir) / RUN_CONFIG_FILE}: no run config; give --model or "
            "--config_json"
        )
    model_cfg = policy_init.model_config(cfg)
    if cfg.model.get("compact_vocab", False):
        vm_path = run_dir(checkpoint_dir) / VOCAB_MAP_FILE
        if not vm_path.exists():
            raise FileNotFoundError(f"{vm_path}: a compact-vocabulary run without its vocab map")
        ids = json.loads(vm_path.read_text())["ids"]
        model_cfg = model_cfg.replace(vocab_size=_compact_vocab_size(ids))
    return model_cfg


def run_tokenizer_dir(checkpoint_dir: str | os.PathLike) -> str | None:
    """The tokenizer directory the run used: its `tokenizer.name` (the offline Qwen2.5 one is
    built into its cache directory), else its `model.hf_path`; None without a run config."""
    cfg = run_config(checkpoint_dir)
    if cfg is None:
        return None
    name = cfg.get("tokenizer", {}).get("name", "") or cfg.get("model", {}).get("hf_path", "")
    if name == "qwen2.5":
        from deepretrieval_jax.tokenizer import Tokenizer

        return str(Tokenizer.qwen25().hf.name_or_path)
    return name or None


@dataclass(frozen=True)
class ExportPlan:
    """What the export writes besides the weights (all checked before restoring)."""

    tokenizer_dir: str | None  # tokenizer files copied next to the weights
    generation_config: dict  # generation_config.json
    vocab_map: dict | None  # vocab_map.json of an older compact-vocabulary run


def _load_tokenizer(tokenizer_dir: str):
    from deepretrieval_jax import hf_io
    from deepretrieval_jax.tokenizer import Tokenizer

    path = as_path(tokenizer_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"--tokenizer_dir: {path} is not a directory")
    if not any((path / n).exists() for n in hf_io.TOKENIZER_FILES):
        raise FileNotFoundError(f"--tokenizer_dir: no tokenizer files in {path}")
    return str(path), Tokenizer.from_dir(str(path))


def _compact_in_config(workdir: epath.Path) -> bool:
    record = read_run_record(workdir / RUN_CONFIG_FILE) or {}
    return bool(record.get("config", {}).get("model", {}).get("compact_vocab", False))


def plan_export(
    checkpoint_dir: str | os.PathLike,
    model_vocab_size: int,
    tokenizer_dir: str | None = None,
    eos_ids: list[int] | None = None,
    vocab_map_path: str | None = None,
) -> ExportPlan:
    """Resolves tokenizer, end ids and vocab map; raises a one-line error on any problem.

    Args:
      checkpoint_dir: the CheckpointManager directory (or the run's workdir).
      model_vocab_size: the exported model's vocabulary size.
      tokenizer_dir: HF tokenizer directory to copy along and to take the end ids from.
      eos_ids: explicit end ids (tokenizer ids); override the tokenizer's.
      vocab_map_path: a vocab_map.json; default WORKDIR/vocab_map.json when it exists.
    """
    workdir = run_dir(checkpoint_dir)
    tok_path, tok = _load_tokenizer(tokenizer_dir) if tokenizer_dir else (None, None)
    vocab_map = None
    vm_path = as_path(vocab_map_path) if vocab_map_path else workdir / VOCAB_MAP_FILE
    if vm_path.exists():
        vocab_map = json.loads(vm_path.read_text())
        if not isinstance(vocab_map.get("ids"), list):
            raise ValueError(f"{vm_path}: expected {{'tokenizer': ..., 'ids': [...]}}")
    elif vocab_map_path:
        raise FileNotFoundError(f"--vocab_map: {vm_path} does not exist")
    compact = _compact_in_config(workdir) or (tok is not None and tok.vocab_size > model_vocab_size)
    if compact and vocab_map is None:
        raise ValueError(
            f"{checkpoint_dir}: a compact-vocabulary model (vocab {model_vocab_size}) but no "
            f"{VOCAB_MAP_FILE} in {workdir}; give --vocab_map (such runs wrote it to their workdir)"
        )
    if eos_ids is None and tok is None:
        raise ValueError(
            "give --tokenizer_dir or --eos_token_ids: without end ids in "
            "generation_config.json, transformers.generate never stops at <|im_end|>"
        )
    eos = list(eos_ids) if eos_ids is not None else list(tok.eos_ids)
    pad = tok.pad_id if tok is not None else eos[0]
    if vocab_map is not None:  # tokenizer ids -> model ids
        index = {int(t): i for i, t in enumerate(vocab_map["ids"])}
        missing = [t for t in (*eos, pad) if t not in index]
        if missing:
            raise ValueError(f"{vm_path}: end/pad ids {missing} are not in the vocab map")
        eos, pad = [index[t] for t in eos], index[pad]
        tok_path = None  # a compact model's ids are not the tokenizer's: no tokenizer files
    gen = {"eos_token_id": eos, "pad_token_id": pad}
    return ExportPlan(tokenizer_dir=tok_path, generation_config=gen, vocab_map=vocab_map)


def export_run(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config,
    plan: ExportPlan,
    step: int | None = None,
    params_key: str | None = None,
    dtype: str | None = None,
    mesh=None,
) -> epath.Path:
    """Restores `step`'s params (sharded over `mesh`) and writes the HF directory of `plan`."""
    from absl import logging

    from deepretrieval_jax import checkpoint, hf_io

    params = checkpoint.restore_policy_params(
        checkpoint_dir, config, step=step, key=params_key, mesh=mesh
    )
    logging.info("Restored %s; writing %s", checkpoint_dir, out_dir)
    mirror = Mirror(out_dir)  # safetensors writes local files; copied to a gs:// out_dir
    hf_io.save_params(
        params,
        config,
        mirror.local,
        tokenizer=plan.tokenizer_dir,
        dtype=dtype,
        generation_config=plan.generation_config,
    )
    if plan.vocab_map is not None:
        (mirror.local / VOCAB_MAP_FILE).write_text(json.dumps(plan.vocab_map))
    run = run_config(checkpoint_dir)
    if run is not None and run.get("data", {}).get("task"):  # how serving must prompt it
        from deepretrieval_jax.serving import protocol

        protocol.write(mirror.local, run.to_dict())
    mirror.close()
    return mirror.remote
