"""The run's tokenizer: the one a config names, loaded once per process.

`config.tokenizer.name` ("qwen2.5": the offline Qwen2.5 tokenizer; else a tokenizer directory),
else the directory of `config.model.hf_path`, else Qwen2.5. The model speaks the tokenizer's ids
directly, so its vocabulary must hold them all.
"""

from __future__ import annotations

import functools
from pathlib import Path

from deepretrieval_jax import models
from deepretrieval_jax.tokenizer import Tokenizer


def tokenizer_name(cfg) -> str:
    """config.tokenizer.name, else model.hf_path (its tokenizer files), else "qwen2.5"."""
    return cfg.tokenizer.name or cfg.model.hf_path or "qwen2.5"


def load_tokenizer(cfg, model_cfg: models.ModelConfig | None) -> Tokenizer:
    """ "qwen2.5" builds the offline tokenizer; "" uses model.hf_path; else a tokenizer dir."""
    name = tokenizer_name(cfg)
    tok = _tokenizer(name if name == "qwen2.5" else str(Path(name).expanduser()))
    if model_cfg is not None and tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"config.model: vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's "
            f"{tok.vocab_size} ids (the model speaks the tokenizer's ids; config.tokenizer.name "
            f"is {name!r})"
        )
    return tok


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str) -> Tokenizer:
    """Loading a 152k-entry HF tokenizer takes seconds; SFT, PPO and eval in one process share it."""
    return Tokenizer.qwen25() if name == "qwen2.5" else Tokenizer.from_dir(name)
