"""Shared test helpers: tiny random transformers models (torch, fp32) and left-padded batches.

`save_tiny_hf_model(path, family=..., tie=..., max_shard_size=...)` builds a 2-layer Qwen2 or
Llama model whose every weight (biases and norm scales included) is random, saves it with
`save_pretrained` and returns the torch model, so tests can compare against the real thing.
`random_params` gives Flax params with weights large enough that logits are far from uniform.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from deepretrieval_jax.models import ModelConfig
from deepretrieval_jax.sampler import ModelFns

TINY_HF_DIMS = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)


def tiny_hf_config(family: str = "qwen2", tie: bool = True):
    """A transformers Qwen2Config / LlamaConfig with TINY_HF_DIMS."""
    import transformers

    if family == "qwen2":
        return transformers.Qwen2Config(
            **TINY_HF_DIMS, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie
        )
    if family == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return transformers.LlamaConfig(
            **TINY_HF_DIMS, rope_parameters=rope, rms_norm_eps=1e-5, tie_word_embeddings=tie
        )
    raise ValueError(f"unknown family {family!r}")


def make_tiny_hf_model(family: str = "qwen2", tie: bool = True, seed: int = 0):
    """A tiny transformers causal LM in eval mode with every weight random (std 0.1-0.3)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_hf_config(family, tie), dtype=torch.float32
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def save_tiny_hf_model(path, family="qwen2", tie=True, max_shard_size=None, seed=0):
    """Build and `save_pretrained` a tiny model into `path`; returns the torch model."""
    model = make_tiny_hf_model(family, tie, seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kwargs)
    return model


def left_padded_batch(pad_lengths, seq_len, vocab_size, seed=0):
    """tokens, positions, mask [B, T] (int32) for rows left-padded by `pad_lengths` tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab_size, size=(len(pad_lengths), seq_len)).astype(np.int32)
    mask = (np.arange(seq_len)[None, :] >= np.asarray(pad_lengths)[:, None]).astype(np.int32)
    tokens = tokens * mask  # pad id 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    return tokens, positions, mask


def torch_logits(model, tokens, positions, mask) -> np.ndarray:
    """Reference logits from a transformers model on a left-padded batch."""
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


def random_params(model: nn.Module, config: ModelConfig, seed: int = 0, scale: float = 0.1):
    """Params of `model` with every leaf random (NumPy, no compilation): norm scales near 1,
    everything else N(0, scale)."""
    dummy = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    abstract = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t, t, t)["params"], dummy)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.value.shape).astype(np.float32)
        value = 1.0 + 0.2 * noise if "scale" in jax.tree_util.keystr(path) else scale * noise
        return jnp.asarray(value, leaf.value.dtype)

    return jax.tree_util.tree_map_with_path(
        fill, abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


TINY_TOKENIZER_BYTES = [9, 10, *range(32, 127)]  # save_tiny_tokenizer: byte b has id 3 + index


def tiny_token_ids(text: str) -> list[int]:
    """`text` in `save_tiny_tokenizer`'s ids (one id per byte; printable ASCII, tab, newline)."""
    return [3 + TINY_TOKENIZER_BYTES.index(b) for b in text.encode()]


def scripted_agent_fns(scripts, vocab_size: int = 256, marker: str | None = None):
    """A cache-carrying `sampler.ModelFns` that plays a multi-turn agent from fixed text: the
    next token is scripts[s][k][j], with s = 1 when `marker` occurs among the row's tokens (else
    0), k = information blocks seen so far ('<i' pairs, capped at the script's last turn), j =
    real tokens since the last newline (the prompt and every inserted block end with one);
    <|im_end|> (id 2) after a turn's text. The cache holds the tokens themselves, so prefill,
    decode steps and inserted blocks all drive it like the real model's KV cache."""
    encoded = [[tiny_token_ids(t) for t in script] for script in scripts]
    turns = max(map(len, encoded))
    width = max(len(t) for s in encoded for t in s) + 1
    table = np.full((len(encoded), turns, width), 2, np.int32)
    for s, script in enumerate(encoded):
        for k in range(turns):
            text = script[min(k, len(script) - 1)]
            table[s, k, : len(text)] = text
    table = jnp.asarray(table)
    nl, lt, i_ = (tiny_token_ids(c)[0] for c in "\n<i")
    mark = None if marker is None else tiny_token_ids(marker)[0]

    def apply(params, tokens_BxT, positions_BxT, mask_BxT, cache):
        del params, positions_BxT
        index = cache["index"]
        toks = jax.lax.dynamic_update_slice(cache["tokens"], tokens_BxT, (0, index))
        mask = jax.lax.dynamic_update_slice(cache["mask"], mask_BxT > 0, (0, index))
        slots = jnp.arange(toks.shape[1])[None, :]
        last_nl = jnp.max(jnp.where((toks == nl) & mask, slots, -1), axis=1, keepdims=True)
        j = jnp.sum(mask & (slots > last_nl), axis=1)
        pairs = (toks[:, :-1] == lt) & (toks[:, 1:] == i_) & mask[:, :-1] & mask[:, 1:]
        k = jnp.minimum(jnp.sum(pairs, axis=1), turns - 1)
        s = jnp.zeros_like(k) if mark is None else jnp.any((toks == mark) & mask, axis=1)
        nxt = table[s.astype(jnp.int32), k, jnp.minimum(j, width - 1)]
        logits = 30.0 * jax.nn.one_hot(nxt, vocab_size)[:, None, :]
        return logits, {"tokens": toks, "mask": mask, "index": index + tokens_BxT.shape[1]}

    def init_cache(batch, max_len):
        return {
            "tokens": jnp.zeros((batch, max_len), jnp.int32),
            "mask": jnp.zeros((batch, max_len), jnp.bool_),
            "index": jnp.zeros((), jnp.int32),
        }

    def repeat(cache, n):
        return {**cache, "tokens": jnp.repeat(cache["tokens"], n, 0),
                "mask": jnp.repeat(cache["mask"], n, 0)}  # fmt: skip

    return ModelFns(apply, init_cache, repeat)


def save_tiny_tokenizer(path):
    """A byte-level BPE tokenizer with no merges over printable ASCII + tab/newline and Qwen's
    three special tokens (100 ids, fits the tiny models' 256) and a ChatML chat template;
    `Tokenizer.from_dir(path)` and `sampling.token_bytes_from_tokenizer` accept it."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deepretrieval_jax.sampling import _byte_decoder

    alphabet = {b: c for c, b in _byte_decoder().items()}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for b in TINY_TOKENIZER_BYTES:
        vocab[alphabet[b]] = len(vocab)
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        chat_template=template,
    )
    hf.add_special_tokens({"additional_special_tokens": specials})
    hf.save_pretrained(str(path))


def save_tiny_policy(path, seed: int = 0):
    """A tiny random Qwen2 policy as an HF directory (`ModelConfig.tiny`, weights N(0, 0.5))
    with `save_tiny_tokenizer`'s tokenizer; written by hf_io, so no torch is imported."""
    from deepretrieval_jax import hf_io
    from deepretrieval_jax.models import CausalLM

    config = ModelConfig.tiny()
    hf_io.save_params(random_params(CausalLM(config), config, seed, scale=0.5), config, path)
    save_tiny_tokenizer(path)
    return path


def write_tiny_scifact(root: Path) -> Path:
    """A 3-document BEIR corpus at ROOT/scifact/corpus.jsonl (the rewrite/serve tests' corpus)."""
    (root / "scifact").mkdir(parents=True, exist_ok=True)
    docs = [
        ("d1", "Vitamin D and bones", "Vitamin D supplements reduce fractures in older adults."),
        ("d2", "Aspirin", "Aspirin lowers the risk of a heart attack."),
        ("d3", "Sleep", "Short sleep is linked to obesity."),
    ]
    with open(root / "scifact" / "corpus.jsonl", "w") as f:
        for i, t, x in docs:
            f.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    return root
