"""The task an experiment config names, and its examples.

`task_spec(cfg)`: `config.data.task` with the prompt pieces of `config.data.prompt` and the corpus
of `config.data.corpus`. `load_examples(cfg, spec, split)`: a split from the BEIR layout, a built
TFDS dataset or the BEIR download, as an `ExampleList` (random access, short repr).
"""

from __future__ import annotations

from collections.abc import Sequence

from deepretrieval_jax.config import as_dict, resolve_data_dir
from deepretrieval_jax.data import tasks as tasks_lib
from deepretrieval_jax.data.records import Example


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
