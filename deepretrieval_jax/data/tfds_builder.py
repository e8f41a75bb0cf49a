"""Task datasets as tensorflow-datasets builders writing array_record, read back without TF.

One builder class, `DeepRetrievalExamples`, with one builder config per dataset name (e.g.
"scifact", "pubmed"). Each split stores one row per `Example`:
    {"id": Text, "index": int64 (position in the converter's output), "record": Text (JSON)}
Layout: `<data_dir>/deep_retrieval_examples/<name>/<version>/` with `dataset_info.json`,
`features.json` and `deep_retrieval_examples-<split>.array_record-NNNNN-of-MMMMM`. Writing and
reading need no TensorFlow (TFDS's array_record path plus `as_data_source`). Shuffling at write
time is disabled so `index` equals the row position; the pipeline shuffles per epoch instead.

`build_examples(name, splits, data_dir, overwrite=False)` writes; a dataset already built there
is an error (`FileExistsError`) unless `overwrite`, which replaces it (never a silent no-op);
`load_split(data_dir, name, split)` returns an `ExampleSource`, a random-access source of
`Example` objects that grain can sample from.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from deepretrieval_jax.data.records import Example

VERSION = "1.0.0"
BUILDER_NAME = "deep_retrieval_examples"


class DeepRetrievalExamples(tfds.core.GeneratorBasedBuilder):
    """Examples of one task dataset; splits come from converter callables given at build time."""

    VERSION = tfds.core.Version(VERSION)

    # TFDS looks for a checksums file next to the builder's code, a lookup that needs the
    # `importlib_resources` backport for packaged modules; this builder downloads nothing.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def __init__(
        self,
        *,
        name: str,
        splits: Mapping[str, Callable[[], Iterable[Example]]] | None = None,
        **kwargs,
    ):
        self._splits = dict(splits or {})
        config = tfds.core.BuilderConfig(name=name, description=f"DeepRetrieval task {name}")
        super().__init__(config=config, file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="DeepRetrieval task examples (deepretrieval_jax.data.records.Example).",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "index": tfds.features.Scalar(dtype=np.int64),
                    "record": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        if not self._splits:
            raise ValueError(f"{self.name}/{self.builder_config.name}: no splits to build")
        return {split: self._generate_examples(fn) for split, fn in self._splits.items()}

    def _generate_examples(self, make_examples):
        seen: set[str] = set()
        for i, ex in enumerate(make_examples()):
            if ex.id in seen:
                raise ValueError(f"duplicate example id {ex.id!r} (row {i})")
            seen.add(ex.id)
            yield i, {"id": ex.id, "index": i, "record": ex.to_json()}


def dataset_dir(data_dir: str | os.PathLike, name: str) -> Path:
    return Path(data_dir) / BUILDER_NAME / name / VERSION


def build_examples(
    name: str,
    splits: Mapping[str, Callable[[], Iterable[Example]] | Iterable[Example]],
    data_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Writes the splits (callables or lists of Examples) as array_record; returns the dir.

    An existing build of `name` raises `FileExistsError` unless `overwrite` (then it is
    replaced only after the new one was written, so a failed rebuild keeps the old data).
    """
    out = dataset_dir(data_dir, name)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out}: dataset {name!r} is already built; rebuild with overwrite=True "
            "(build CLI: --overwrite) or delete the directory"
        )
    fns = {s: (v if callable(v) else (lambda v=v: v)) for s, v in splits.items()}
    if out.exists():  # Build in a scratch root, then swap it in.
        scratch = Path(data_dir) / f".{BUILDER_NAME}-{name}.rebuild-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            DeepRetrievalExamples(
                name=name, splits=fns, data_dir=os.fspath(scratch)
            ).download_and_prepare()
            old = out.with_name(out.name + f".old-{os.getpid()}")
            os.replace(out, old)
            os.replace(dataset_dir(scratch, name), out)
            shutil.rmtree(old)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return out
    builder = DeepRetrievalExamples(name=name, splits=fns, data_dir=os.fspath(data_dir))
    builder.download_and_prepare()
    return dataset_dir(data_dir, name)


class ExampleSource:
    """Random access to the `Example`s of one stored split (grain `RandomAccessDataSource`)."""

    def __init__(self, source, path: Path, split: str):
        self._source, self.path, self.split = source, path, split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Example:
        return Example.from_json(self._source[index]["record"])

    def __repr__(self) -> str:
        # Part of the grain iterator state, which must survive moving the data directory.
        return (
            f"ExampleSource({self.path.parent.name}/{self.path.name}, {self.split}, n={len(self)})"
        )


def load_split(data_dir: str | os.PathLike, name: str, split: str) -> ExampleSource:
    """The stored split `split` of dataset `name` under `data_dir` (no TensorFlow needed)."""
    path = dataset_dir(data_dir, name)
    if not (path / "dataset_info.json").exists():
        raise FileNotFoundError(
            f"{path}: no built dataset {name!r}; build it with "
            "deepretrieval_jax.data.tfds_builder.build_examples"
        )
    builder = tfds.builder_from_directory(os.fspath(path))
    if split not in builder.info.splits:
        raise KeyError(f"{path}: no split {split!r}; have {sorted(builder.info.splits)}")
    return ExampleSource(builder.as_data_source(split=split), path, split)
