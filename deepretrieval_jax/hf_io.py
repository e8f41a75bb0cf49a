"""Hugging Face checkpoint I/O for Qwen2 / Llama: load into sharded params, export back.

One name table (`NAME_TABLE`) maps every HF tensor name to a Flax param path and a layout
rule; `load_params` and `save_params` both walk it, so import and export cannot drift apart.

Invariants:
- Loading reads one tensor at a time from the safetensors files (single file or sharded with
  `model.safetensors.index.json`), converts it on the host and `jax.device_put`s it straight onto
  its NamedSharding: the whole model never sits on one device or in host memory at once.
- Every error a user can cause (missing directory, missing/corrupt config.json or weights,
  another architecture, a missing, unexpected or mis-shaped tensor) raises `CheckpointError`
  naming the file and the key.
- Export writes config.json, generation_config.json, safetensors shards of at most
  `max_shard_size` (+ index when more than one) and the tokenizer files when a tokenizer is given;
  `transformers.AutoModelForCausalLM.from_pretrained` loads it with no missing/unexpected keys.
- Tied embeddings: no `lm_head.weight` is written; one found in a tied checkpoint is ignored.
- Export writes the LM only: a shared critic's `value_head` subtree (`rl.state.PolicyValueModel`)
  is dropped with a log line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from deepretrieval_jax import sharding as sharding_lib
from deepretrieval_jax.models import CausalLM, ModelConfig
from deepretrieval_jax.models.config import DTYPES

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
)
_IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, corrupt or does not fit the model."""


# Layout rules: (HF tensor -> Flax leaf of `shape`, Flax leaf -> HF tensor).
_Rule = tuple[Callable[[np.ndarray, tuple], np.ndarray], Callable[[Any], Any]]
RULES: dict[str, _Rule] = {
    "copy": (lambda t, s: t, lambda a: a),
    # nn.Linear weight [out, in] <-> kernel [in, out]
    "linear": (lambda t, s: t.T, lambda a: a.T),
    # q/k/v_proj.weight [H*Hd, D] <-> kernel [D, H, Hd]
    "linear_to_heads": (lambda t, s: t.T.reshape(s), lambda a: a.reshape(a.shape[0], -1).T),
    # q/k/v_proj.bias [H*Hd] <-> bias [H, Hd]
    "bias_to_heads": (lambda t, s: t.reshape(s), lambda a: a.reshape(-1)),
    # o_proj.weight [D, H*Hd] <-> kernel [H, Hd, D]
    "linear_from_heads": (lambda t, s: t.T.reshape(s), lambda a: a.reshape(-1, a.shape[-1]).T),
}

# (HF name template, Flax param path template, rule, when). `{i}` is the layer index.
NAME_TABLE: tuple[tuple[str, str, str, str], ...] = (
    ("model.embed_tokens.weight", "transformer/embedder/embedding", "copy", "always"),
    ("model.norm.weight", "transformer/final_norm/scale", "copy", "always"),
    ("lm_head.weight", "lm_head/kernel", "linear", "untied"),
    ("model.layers.{i}.input_layernorm.weight", "transformer/layers_{i}/input_norm/scale", "copy", "always"),
    ("model.layers.{i}.post_attention_layernorm.weight", "transformer/layers_{i}/post_attn_norm/scale", "copy", "always"),
    ("model.layers.{i}.self_attn.q_proj.weight", "transformer/layers_{i}/attn/q_kernel", "linear_to_heads", "always"),
    ("model.layers.{i}.self_attn.k_proj.weight", "transformer/layers_{i}/attn/k_kernel", "linear_to_heads", "always"),
    ("model.layers.{i}.self_attn.v_proj.weight", "transformer/layers_{i}/attn/v_kernel", "linear_to_heads", "always"),
    ("model.layers.{i}.self_attn.q_proj.bias", "transformer/layers_{i}/attn/q_bias", "bias_to_heads", "qkv_bias"),
    ("model.layers.{i}.self_attn.k_proj.bias", "transformer/layers_{i}/attn/k_bias", "bias_to_heads", "qkv_bias"),
    ("model.layers.{i}.self_attn.v_proj.bias", "transformer/layers_{i}/attn/v_bias", "bias_to_heads", "qkv_bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "transformer/layers_{i}/attn/o_kernel", "linear_from_heads", "always"),
    ("model.layers.{i}.mlp.gate_proj.weight", "transformer/layers_{i}/mlp/gate_kernel", "linear", "always"),
    ("model.layers.{i}.mlp.up_proj.weight", "transformer/layers_{i}/mlp/up_kernel", "linear", "always"),
    ("model.layers.{i}.mlp.down_proj.weight", "transformer/layers_{i}/mlp/down_kernel", "linear", "always"),
)  # fmt: skip


def name_pairs(config: ModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """Concrete (HF name, Flax path, rule) triples for `config`, from NAME_TABLE."""
    enabled = {"always": True, "untied": not config.tie_embeddings, "qkv_bias": config.qkv_bias}
    pairs = []
    for hf_t, flax_t, rule, when in NAME_TABLE:
        if not enabled[when]:
            continue
        layers = range(config.num_layers) if "{i}" in hf_t else [None]
        for i in layers:
            hf = hf_t.format(i=i) if i is not None else hf_t
            path = flax_t.format(i=i) if i is not None else flax_t
            pairs.append((hf, tuple(path.split("/")), rule))
    return pairs


def _get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------------------------- loading
def resolve_checkpoint_dir(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory; a Hub repo id ("Qwen/Qwen2.5-3B-Instruct") is downloaded."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    looks_like_repo = re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not path.exists()
    if not looks_like_repo:
        raise CheckpointError(f"{text}: checkpoint directory does not exist")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", *TOKENIZER_FILES]
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, auth: one clear message
        raise CheckpointError(f"{text}: not a local directory and Hub download failed: {e}") from e


def read_hf_config(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory."""
    file = Path(ckpt_dir) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (expected a Hugging Face config.json)")
    try:
        hf = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(hf).__name__}")
    return hf


def config_from_checkpoint(ckpt_dir: str | os.PathLike, **overrides) -> ModelConfig:
    """ModelConfig from a checkpoint's config.json (+ overrides such as dtype, remat)."""
    hf = read_hf_config(ckpt_dir)
    try:
        return ModelConfig.from_hf_config(hf, **overrides)
    except ValueError as e:
        message = str(e).removeprefix(f"{CONFIG_FILE}: ")
        raise CheckpointError(f"{Path(ckpt_dir) / CONFIG_FILE}: {message}") from e


def _weight_map(ckpt_dir: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it."""
    index = ckpt_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' ({e!r})") from e
        return {name: ckpt_dir / file for name, file in weight_map.items()}
    single = ckpt_dir / SINGLE_WEIGHTS_FILE
    if not single.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {SINGLE_WEIGHTS_FILE} or {INDEX_FILE}")
    try:
        with safe_open(str(single), framework="numpy") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{single}: not a readable safetensors file ({e})") from e


class _Reader:
    """Opens each safetensors file once and reads tensors by name."""

    def __init__(self):
        self._open: dict[Path, Any] = {}

    def get(self, file: Path, name: str) -> np.ndarray:
        try:
            if file not in self._open:
                self._open[file] = safe_open(str(file), framework="numpy")
            return self._open[file].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from e


def load_params(
    path_or_repo: str | os.PathLike,
    config: ModelConfig | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding_lib.Rules = sharding_lib.TRAIN_RULES,
    shardings: Any = None,
    revision: str | None = None,
    **config_overrides,
) -> tuple[ModelConfig, dict]:
    """Load an HF Qwen2/Llama checkpoint into CausalLM params.

    Args:
      path_or_repo: a local directory, or a Hub repo id (downloaded when not a directory).
      config: the model to load into (its dtype / param_dtype / remat are kept); its shape
        fields must match the checkpoint's config.json. Default: built from config.json.
      mesh, rules: where to place params (default: the first device), or
      shardings: a tree of shardings matching the params tree (overrides mesh/rules).
      config_overrides: ModelConfig fields to override, e.g. dtype="bfloat16", remat=True.
    Returns:
      (config, params): params is a plain pytree of arrays in `config.param_dtype`.
    """
    ckpt_dir = resolve_checkpoint_dir(path_or_repo, revision)
    if config is None:
        config = config_from_checkpoint(ckpt_dir, **config_overrides)
    else:
        config = config.replace(**config_overrides)
        _check_same_shapes(config, ckpt_dir)
    boxed = sharding_lib.abstract_params(CausalLM(config))
    abstract = nn.meta.unbox(boxed)
    if shardings is None and mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, abstract)
    elif shardings is None:
        shardings = sharding_lib.shardings_for(boxed, mesh, rules)

    weight_map = _weight_map(ckpt_dir)
    reader = _Reader()
    param_dtype = DTYPES[config.param_dtype]
    params: dict = {}
    pairs = name_pairs(config)
    for hf_name, path, rule in pairs:
        if hf_name not in weight_map:
            raise CheckpointError(f"{ckpt_dir}: tensor {hf_name!r} missing from the checkpoint")
        leaf = _get_path(abstract, path)
        expected = _hf_shape(leaf, rule)
        tensor = reader.get(weight_map[hf_name], hf_name)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"{weight_map[hf_name]}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                f"expected {expected} for the model in {CONFIG_FILE}"
            )
        value = np.ascontiguousarray(RULES[rule][0](tensor, leaf.shape).astype(param_dtype))
        _set_path(params, path, jax.device_put(value, _get_path(shardings, path)))

    used = {hf for hf, _, _ in pairs}
    if config.tie_embeddings:
        used.add("lm_head.weight")
    unexpected = sorted(n for n in weight_map if n not in used and not _IGNORED_HF_KEYS.match(n))
    if unexpected:
        raise CheckpointError(
            f"{ckpt_dir}: {len(unexpected)} tensors do not fit the model in {CONFIG_FILE}, "
            f"e.g. {unexpected[:3]}"
        )
    return config, params


# Fields an HF checkpoint does not fix (LoRA adapters are ours; export merges them).
_NON_SHAPE_FIELDS = (
    "dtype", "param_dtype", "remat", "max_position_embeddings",
    "lora_rank", "lora_alpha", "lora_targets",
)  # fmt: skip


def _check_same_shapes(config: ModelConfig, ckpt_dir: Path) -> None:
    """Raise unless `config` describes the same network as the checkpoint's config.json."""
    keep = {name: getattr(config, name) for name in _NON_SHAPE_FIELDS}
    found = config_from_checkpoint(ckpt_dir, **keep)
    diff = [
        f"{f.name}={getattr(config, f.name)!r} (checkpoint: {getattr(found, f.name)!r})"
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(found, f.name)
    ]
    if diff:
        raise CheckpointError(
            f"{ckpt_dir / CONFIG_FILE}: the model config differs from the checkpoint's: "
            + ", ".join(diff)
        )


def _hf_shape(leaf, rule: str) -> tuple[int, ...]:
    return tuple(jax.eval_shape(RULES[rule][1], jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)).shape)


# ---------------------------------------------------------------------------------- export
def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size: expected bytes or e.g. '5GB', got {size!r}")
    units = {
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
    }
    return int(float(m.group(1)) * units[(m.group(2) or "b").lower()])


def save_params(
    params: dict,
    config: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    hf_config_extra: dict | None = None,
    generation_config: dict | None = None,
) -> Path:
    """Write CausalLM params as an HF checkpoint directory that transformers loads.

    Args:
      tokenizer: an object with `save_pretrained(dir)` or a directory to copy tokenizer files from.
      dtype: storage dtype of the tensors (default: config.param_dtype).
      hf_config_extra: extra config.json keys, e.g. bos/eos token ids of the source checkpoint.
      generation_config: contents of generation_config.json (e.g. eos_token_id, temperature).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or config.param_dtype
    if dtype not in DTYPES:
        raise ValueError(f"save_params: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    np_dtype = np.dtype(DTYPES[dtype])
    limit = parse_size(max_shard_size)

    pairs = name_pairs(config)
    dropped = sorted(set(params) - {path[0] for _, path, _ in pairs})
    if dropped:  # e.g. a shared critic's value head: not part of the HF causal LM
        logging.info("save_params: not exported (no HF tensor): %s", ", ".join(dropped))
    shards: list[list[tuple[str, tuple, str]]] = [[]]
    shard_bytes, total = 0, 0
    for hf_name, path, rule in pairs:
        try:
            leaf = _get_path(params, path)
        except (KeyError, TypeError):
            raise ValueError(f"save_params: params have no leaf {'/'.join(path)}") from None
        nbytes = int(np.prod(leaf.shape)) * np_dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((hf_name, path, rule))
        shard_bytes += nbytes
        total += nbytes

    names = (
        [SINGLE_WEIGHTS_FILE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map = {}
    for file, shard in zip(names, shards, strict=True):
        tensors = {}
        for hf_name, path, rule in shard:
            host = np.asarray(jax.device_get(_get_path(params, path)))
            tensors[hf_name] = np.ascontiguousarray(RULES[rule][1](host).astype(np_dtype))
            weight_map[hf_name] = file
        save_file(tensors, str(out / file), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))

    hf_config = {**(hf_config_extra or {}), **config.to_hf_config(), "torch_dtype": dtype}
    hf_config["dtype"] = dtype
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    gen = {"_from_model_config": generation_config is None, **(generation_config or {})}
    (out / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2, sort_keys=True))
    _save_tokenizer(tokenizer, out)
    return out


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
        return
    src = Path(tokenizer)
    if not src.is_dir():
        raise ValueError(f"save_params: tokenizer {tokenizer!r} is neither a tokenizer nor a dir")
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not copied:
        raise ValueError(f"save_params: no tokenizer files {TOKENIZER_FILES} in {src}")
    for name in copied:
        shutil.copyfile(src / name, out / name)
