"""Run setup shared by SFT and PPO: model config, tokenizer, task data, initial params.

Everything here turns one piece of an experiment ConfigDict into the objects the loops use,
and raises one clear error naming the config field when the config cannot work.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from deepretrieval_jax import checkpoint, models, sharding
from deepretrieval_jax.config import as_dict, resolve_data_dir
from deepretrieval_jax.data import tasks as tasks_lib
from deepretrieval_jax.data.records import Example
from deepretrieval_jax.models import lora as lora_lib
from deepretrieval_jax.tokenizer import Tokenizer

CHECKPOINT_DIR = "checkpoints"


RANDOM_INIT_WARN_PARAMS = 100e6  # a random init above this size is almost surely a mistake


def model_config(cfg) -> models.ModelConfig:
    """`config.model.preset` (or, when it is "", model.hf_path's config.json) + overrides
    (and `config.model.lora`)."""
    overrides = as_dict(cfg.model.overrides)
    lora = cfg.model.get("lora")
    if lora is not None:
        overrides.update(
            lora_rank=lora.rank, lora_alpha=lora.alpha, lora_targets=tuple(lora.targets)
        )
    if not cfg.model.preset:
        if not cfg.model.hf_path:
            raise ValueError(
                "config.model: preset is empty, so model.hf_path must name a HF checkpoint "
                "directory whose config.json gives the model's shape"
            )
        from deepretrieval_jax import hf_io  # noqa: PLC0415

        try:
            path = hf_io.resolve_checkpoint_dir(Path(cfg.model.hf_path).expanduser())
            return hf_io.config_from_checkpoint(path, **overrides)
        except (TypeError, ValueError, OSError) as e:
            raise ValueError(f"config.model.hf_path: {e}") from e
    try:
        return models.ModelConfig.preset(cfg.model.preset, **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.model: {e}") from e


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
            f"{tok.vocab_size} ids"
        )
    return tok


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str) -> Tokenizer:
    """Loading a 152k-entry HF tokenizer takes seconds; SFT, PPO and eval in one process share it."""
    return Tokenizer.qwen25() if name == "qwen2.5" else Tokenizer.from_dir(name)


def task_spec(cfg) -> tasks_lib.TaskSpec:
    """`config.data.task` with the prompt pieces set in `config.data.prompt`, and its corpus
    replaced by `config.data.corpus` when that is set."""
    prompt = cfg.data.get("prompt") or {}
    overrides = {k: v for k, v in as_dict(prompt).items() if v is not None}
    if cfg.data.get("corpus", ""):
        overrides["corpus"] = cfg.data.corpus
    try:
        return tasks_lib.get_task(cfg.data.task, **overrides)
    except KeyError as e:
        raise ValueError(f"config.data: {e.args[0]}") from None


class ExampleList(Sequence):
    """A random-access list of examples with a short repr (grain stores the source's repr)."""

    def __init__(self, examples: Sequence[Example], name: str):
        self._examples, self._name = list(examples), name

    def __len__(self):
        return len(self._examples)

    def __getitem__(self, i):
        return self._examples[i]

    def __repr__(self):
        return f"ExampleList({self._name}, n={len(self._examples)})"


def load_examples(cfg, spec: tasks_lib.TaskSpec, split: str) -> ExampleList:
    """A split of the task: BEIR layout (`<data_dir>/<dataset>/`), a built TFDS dataset, or for
    a BEIR set (`download.BEIR_NAMES`) found in neither, the BEIR download (cached)."""
    from deepretrieval_jax.data import download, tfds_builder

    data_dir = resolve_data_dir(cfg.data.data_dir)
    beir_dir = data_dir / spec.dataset
    built = (tfds_builder.dataset_dir(data_dir, spec.dataset) / "dataset_info.json").exists()
    if not built and not beir_dir.exists() and spec.dataset in download.BEIR_NAMES:
        beir_dir = download.beir_dataset_dir(spec.dataset)
    if (beir_dir / "queries.jsonl").exists():
        from deepretrieval_jax.data.converters import read_beir

        examples = read_beir(beir_dir, split)
    else:
        from deepretrieval_jax.data.tfds_builder import load_split

        examples = load_split(data_dir, spec.dataset, split)
        examples = [examples[i] for i in range(len(examples))]
    if not examples:
        raise ValueError(f"config.data: split {split!r} of {spec.dataset} in {data_dir} is empty")
    return ExampleList(examples, f"{spec.dataset}/{split}")


def init_params(module: nn.Module, mesh, rules, rng) -> dict:
    """Random params created directly in their shardings."""
    return sharding.init_sharded(module, mesh, rules, rng)


def load_policy_params(cfg, module: nn.Module, mesh, rules, rng) -> dict:
    """The policy's starting params: an SFT checkpoint, a HF checkpoint, or random init.

    `config.model.init_checkpoint` is a CheckpointManager directory whose state holds the
    params under "params" (what `rl.sft` writes). With LoRA these are the base weights only
    (the adapters start fresh in `rl.state.init_train_state`).
    """
    if getattr(module.config, "lora_rank", 0) and isinstance(module, models.CausalLM):
        module = models.CausalLM(lora_lib.base_config(module.config))
    shardings = sharding.param_shardings(module, mesh, rules)
    if cfg.model.init_checkpoint:
        path = Path(cfg.model.init_checkpoint).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"config.model.init_checkpoint: {path} is not a directory")
        abstract = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            nn.meta.unbox(sharding.abstract_params(module)),
            shardings,
        )
        logging.info("Policy params from checkpoint %s", path)
        return checkpoint.restore_params(path, abstract, key="params")
    if cfg.model.hf_path:
        from deepretrieval_jax import hf_io  # noqa: PLC0415  (heavy: torch-free safetensors)

        logging.info("Policy params from HF checkpoint %s", cfg.model.hf_path)
        _, params = hf_io.load_params(cfg.model.hf_path, module.config, shardings=shardings)
        return params
    warn_random_init(module.config)
    logging.info("Policy params: random init (seed %d)", cfg.seed)
    return init_params(module, mesh, rules, rng)


def warn_random_init(model_cfg: models.ModelConfig) -> None:
    """Says loudly when a large model is about to start from random weights."""
    abstract = nn.meta.unbox(sharding.abstract_params(models.CausalLM(model_cfg)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    if n > RANDOM_INIT_WARN_PARAMS:
        logging.warning(
            "\n%s\nRANDOM INIT of a %.0fM-parameter model: no config.model.hf_path or "
            "init_checkpoint is set, so the policy starts from random weights. Set "
            "--config.model.hf_path=DIR (or launch/import_gguf.py a GGUF file) to start from a "
            "pretrained model.\n%s",
            "!" * 78,
            n / 1e6,
            "!" * 78,
        )


def global_batch(local_arrays, mesh, rules):
    """Host-local [B_local, ...] numpy arrays -> global jax.Arrays sharded over the batch axes."""

    def one(x):
        sh = sharding.batch_sharding(mesh, rules, ndim=x.ndim)
        return jax.make_array_from_process_local_data(sh, x)

    return jax.tree.map(one, local_arrays)


def param_count(params) -> int:
    return int(sum(jnp.size(x) for x in jax.tree.leaves(params)))


class ShardedSampler:
    """Endless per-host batches of indices into a dataset of `n` items, resumable exactly.

    Epoch e is the permutation `default_rng([seed, e]).permutation(n)` truncated to a multiple
    of the global batch; global batch b covers positions [b*G, (b+1)*G) of it and process p takes
    the p-th contiguous slice of that batch. State is {"epoch", "batch"} (JSON-able): the
    next batch to return.
    """

    def __init__(self, n: int, global_batch: int, seed: int, process_index=0, process_count=1):
        if global_batch % process_count:
            raise ValueError(
                f"global batch {global_batch} does not divide over {process_count} processes"
            )
        if n < global_batch:
            raise ValueError(
                f"dataset of {n} items is smaller than one global batch ({global_batch})"
            )
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.local = global_batch // process_count
        self.offset = process_index * self.local
        self.per_epoch = n // global_batch
        self.epoch, self.batch = 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        start = self.batch * self.global_batch + self.offset
        idx = perm[start : start + self.local]
        self.batch += 1
        if self.batch == self.per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return idx

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def set_state(self, state: dict) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
