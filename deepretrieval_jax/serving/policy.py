"""A trained policy ready to answer: params + tokenizer + jitted sampler, batch in, text out.

`load_policy(path, ...)` reads either a Hugging Face directory (config.json + safetensors, e.g.
from `launch/export_hf.py`) or an orbax `CheckpointManager` directory written by the trainer
(the params under `params_key`; default: "actor_params" of a PPO state, else "params" of an
SFT state; a saved plain params tree is detected),
for which the model shape comes from a preset name or an HF config.json.

`Policy.generate(rows, settings, limits)` samples one completion per prompt in a single sampler
call. Invariants:
- Compilations are bounded: one `Sampler` per distinct `GenSettings` (kept in an LRU of
  `max_samplers`), each compiled once per (prompt bucket, batch bucket); the batch is padded to
  the next power of two in [min_batch, max_batch] with one-token dummy rows; every call decodes
  into a buffer of `max_new_tokens` columns with the per-call limit passed as a traced value.
- Rows with different limits share a call: the call runs to the largest limit and each row is
  cut to its own (its finish reason becomes "length"); sampling is causal, so a row's first k
  tokens do not depend on how long the call runs.
- Ids past the tokenizer's vocabulary (padding rows of the embedding) are never sampled. A
  compact-vocabulary policy (`vocab_map.json` next to the weights, from the CPU demo) maps
  tokenizer ids to model ids on the way in and back on the way out.
- Stop strings end rows on device when the tokenizer is byte-level BPE (`sampling.TokenBytes`);
  otherwise rows run on and the text is cut on the host. `Completion.text` keeps the stop
  string; callers with OpenAI semantics cut it (`cut_at_stop`).
- `generate` is synchronous and not thread-safe; the scheduler calls it from one worker thread.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from deepretrieval_jax import sampler as sampler_lib
from deepretrieval_jax import sampling
from deepretrieval_jax.models import ModelConfig
from deepretrieval_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class GenSettings:
    """Per-request sampling settings; requests are batched only with equal settings."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str  # decoded completion (a final end-of-sequence token removed; stop string kept)
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    # Per generated token (a final end-of-sequence token removed, as from `text`): model ids and
    # log p(token) under the raw model (temperature 1, no truncation), for OpenAI `logprobs`.
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()


def cut_at_stop(text: str, stop: Sequence[str], keep: bool = False) -> tuple[str, bool]:
    """`text` up to the earliest stop string (included when `keep`), and whether one occurred."""
    hits = [(i, s) for s in stop if (i := text.find(s)) >= 0]
    if not hits:
        return text, False
    i, s = min(hits)
    return text[: i + len(s)] if keep else text[:i], True


def _batch_bucket(n: int, min_batch: int, max_batch: int) -> int:
    b = 1
    while b < max(n, min_batch):
        b *= 2
    return min(b, max(max_batch, n))


def _vocab_masked(fns: sampler_lib.ModelFns, num_ids: int) -> sampler_lib.ModelFns:
    """`fns` whose logits are -inf past the tokenizer's ids (the embedding's padding rows)."""
    import jax.numpy as jnp

    def apply(params, tokens, positions, mask, cache):
        logits, cache = fns.apply(params, tokens, positions, mask, cache)
        real = jnp.arange(logits.shape[-1]) < num_ids
        return jnp.where(real, logits, jnp.finfo(logits.dtype).min), cache

    return dataclasses.replace(fns, apply=apply)


class Policy:
    """Params, tokenizer and samplers of one policy. See the module docstring."""

    def __init__(
        self,
        model_config: ModelConfig,
        params,
        tokenizer: Tokenizer,
        *,
        vocab_ids: Sequence[int] | None = None,
        name: str = "policy",
        max_new_tokens: int = 512,
        max_batch: int = 8,
        min_batch: int = 1,
        prompt_buckets: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
        seed: int = 0,
        max_samplers: int = 8,
    ):
        # A compact vocabulary (the CPU demo): model id i is tokenizer id vocab_ids[i].
        self.vocab_ids = None if vocab_ids is None else np.asarray(vocab_ids, np.int64)
        self.num_ids = tokenizer.vocab_size if vocab_ids is None else len(self.vocab_ids)
        if self.num_ids > model_config.vocab_size:
            raise ValueError(
                f"the tokenizer has {self.num_ids} ids but the model's vocabulary only "
                f"{model_config.vocab_size}; pass the tokenizer the policy was trained with"
            )
        if self.vocab_ids is not None:
            self._to_model = {int(t): i for i, t in enumerate(self.vocab_ids)}
        self.model_config, self.params, self.tokenizer, self.name = (
            model_config, params, tokenizer, name,
        )  # fmt: skip
        self.max_new_tokens, self.max_batch, self.min_batch = max_new_tokens, max_batch, min_batch
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.pad_id = self._model_ids([tokenizer.pad_id])[0]
        self.eos_ids = tuple(self._model_ids(tokenizer.eos_ids))
        self._fns = _vocab_masked(sampler_lib.causal_lm_fns(model_config), self.num_ids)
        try:
            table = sampling.token_bytes_from_tokenizer(tokenizer, model_config.vocab_size)
        except ValueError:  # not byte-level BPE: stop strings are cut on the host only
            table = None
        if table is not None and self.vocab_ids is not None:
            rows = np.zeros(model_config.vocab_size, np.int64)  # padding rows: id 0, no bytes
            rows[: self.num_ids] = self.vocab_ids
            lengths = np.where(np.arange(len(rows)) < self.num_ids, table.lengths_V[rows], 0)
            table = sampling.TokenBytes(table.bytes_VxM[rows], lengths.astype(np.int32))
        self._token_bytes = table
        self._samplers: collections.OrderedDict = collections.OrderedDict()
        self._max_samplers = max_samplers
        self._key = jax.random.key(seed)
        self._calls = 0
        self._lock = threading.Lock()

    @property
    def calls(self) -> int:
        """Sampler calls so far (one per `generate`)."""
        return self._calls

    @property
    def max_prompt_tokens(self) -> int:
        return self.prompt_buckets[-1]

    def _model_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        if self.vocab_ids is None:
            return ids
        unk = self._to_model.get(int(self.tokenizer.pad_id), 0)
        return [self._to_model.get(i, unk) for i in ids]

    def encode(self, text: str) -> list[int]:
        """Model ids of `text` (ids outside a compact vocabulary map to the pad id's slot)."""
        return self._model_ids(self.tokenizer.encode(text))

    def decode(self, ids) -> str:
        ids = np.asarray(ids, np.int64)
        if self.vocab_ids is not None:
            ids = self.vocab_ids[np.clip(ids, 0, self.num_ids - 1)]
        return self.tokenizer.decode(ids)

    def render_chat(self, messages: Sequence[dict], assistant_prefix: str = "") -> str:
        return self.tokenizer.render_chat(messages, assistant_prefix=assistant_prefix)

    def warmup(self, settings: Sequence[GenSettings], prompt_lengths: Sequence[int]) -> int:
        """Compiles every batch bucket for each settings and prompt length (so the first
        requests do not wait for compilation); returns the number of sampler calls made."""
        sizes = sorted(
            {_batch_bucket(n, self.min_batch, self.max_batch) for n in range(1, self.max_batch + 1)}
        )
        calls = 0
        for s in settings:
            for length in prompt_lengths:
                for size in sizes:
                    self.generate([[self.pad_id] * length] * size, s, [1] * size)
                    calls += 1
        return calls

    def _sampler(self, settings: GenSettings) -> sampler_lib.Sampler:
        greedy = settings.temperature == 0
        stop = settings.stop if self._token_bytes is not None else ()
        config = sampler_lib.SamplingConfig(
            method="greedy" if greedy else "sample",
            temperature=1.0 if greedy else settings.temperature,
            top_k=0 if greedy else settings.top_k,
            top_p=1.0 if greedy else settings.top_p,
            max_new_tokens=self.max_new_tokens,
            eos_ids=self.eos_ids,
            stop=stop,
            pad_id=self.pad_id,
        )
        if config in self._samplers:
            self._samplers.move_to_end(config)
            return self._samplers[config]
        s = sampler_lib.Sampler(
            self._fns,
            config,
            token_bytes=self._token_bytes if stop else None,
            prompt_buckets=self.prompt_buckets,
        )
        self._samplers[config] = s
        if len(self._samplers) > self._max_samplers:
            self._samplers.popitem(last=False)
        return s

    def generate(
        self, rows: Sequence[Sequence[int]], settings: GenSettings, limits: Sequence[int]
    ) -> list[Completion]:
        """One completion per prompt (token ids), each at most `limits[i]` tokens long."""
        if not rows or len(rows) != len(limits):
            raise ValueError("generate needs one limit per prompt and at least one prompt")
        if any(not r for r in rows):
            raise ValueError("every prompt needs at least one token")
        if max(len(r) for r in rows) > self.max_prompt_tokens:
            raise ValueError(f"a prompt is longer than {self.max_prompt_tokens} tokens")
        limits = [max(1, min(int(n), self.max_new_tokens)) for n in limits]
        with self._lock:
            return self._generate(rows, settings, limits)

    def _generate(self, rows, settings, limits) -> list[Completion]:
        n = len(rows)
        B = _batch_bucket(n, self.min_batch, self.max_batch)
        width = max(len(r) for r in rows)
        tokens = np.full((B, width), self.pad_id, np.int32)
        mask = np.zeros((B, width), np.int32)
        for b, r in enumerate(rows):
            tokens[b, width - len(r) :], mask[b, width - len(r) :] = r, 1
        mask[n:, -1] = 1  # dummy rows: one real (pad) token
        sampler = self._sampler(settings)
        key = jax.random.fold_in(self._key, self._calls)
        self._calls += 1
        out = sampler(self.params, tokens, mask, key, max_new_tokens=max(limits))
        out_tokens = np.asarray(out.tokens_BnxL)
        out_logprobs = np.asarray(out.logprobs_BnxL)
        lengths, reasons = np.asarray(out.lengths_Bn), np.asarray(out.finish_reason_Bn)
        results = []
        for b in range(n):
            length, reason = int(lengths[b]), int(reasons[b])
            finished = reason != sampler_lib.FinishReason.MAX_TOKENS
            if length > limits[b]:
                length, finished = limits[b], False
            ids = out_tokens[b, :length]
            count = length
            if finished and length and int(ids[-1]) in self.eos_ids:
                ids = ids[:-1]
            text = self.decode(ids)
            if settings.stop and not finished:
                text, finished = cut_at_stop(text, settings.stop, keep=True)
            reason = "stop" if finished else "length"
            token_ids = tuple(int(i) for i in ids)
            logprobs = tuple(float(x) for x in out_logprobs[b, : len(ids)])
            results.append(Completion(text, reason, len(rows[b]), count, token_ids, logprobs))
        return results


# ------------------------------------------------------------------------------------- loading
def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors*"))


def load_policy(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    config_json: str | os.PathLike | None = None,
    tokenizer: str | None = None,
    step: int | None = None,
    params_key: str | None = None,
    dtype: str | None = None,
    **policy_kwargs,
) -> Policy:
    """A `Policy` from an HF directory or an orbax checkpoint directory (or a run's workdir).

    Args:
      model, config_json: the model's shape for an orbax checkpoint (a preset name such as
        "qwen2.5-3b", or an HF config.json); an HF directory carries its own config.
      tokenizer: "qwen2.5" (offline Qwen2.5 tokenizer), a tokenizer directory, or None: the
        HF directory's own tokenizer files when present, else Qwen2.5's.
      dtype: compute and storage dtype override ("bfloat16" on accelerators).
      policy_kwargs: `Policy` options (max_new_tokens, max_batch, prompt_buckets, seed, name).
    """
    from deepretrieval_jax import checkpoint, hf_io

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such policy directory (HF dir or orbax checkpoint)")
    overrides = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
    if _is_hf_dir(path):
        config, params = hf_io.load_params(path, **overrides)
    else:
        if (model is None) == (config_json is None):
            raise ValueError(
                f"{path} is not an HF directory (no config.json + safetensors), so it is read as "
                "an orbax checkpoint: give exactly one of model (preset) and config_json"
            )
        if model is not None:
            config = ModelConfig.preset(model, **overrides)
        else:
            hf = json.loads(Path(config_json).read_text())
            config = ModelConfig.from_hf_config(hf, **overrides)
        params = checkpoint.restore_policy_params(path, config, step=step, key=params_key)
    vocab_ids = None
    if (path / "vocab_map.json").is_file():  # the CPU demo's compact-vocabulary export
        vocab_map = json.loads((path / "vocab_map.json").read_text())
        vocab_ids = vocab_map["ids"]
        tokenizer = tokenizer or vocab_map.get("tokenizer") or None
    if tokenizer == "qwen2.5":
        tok = Tokenizer.qwen25()
    elif tokenizer:
        tok = Tokenizer.from_dir(tokenizer)
    elif (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_dir(path)
    else:
        tok = Tokenizer.qwen25()
    policy_kwargs.setdefault("name", path.name)
    return Policy(config, params, tok, vocab_ids=vocab_ids, **policy_kwargs)
