"""Deterministic, per-host-sharded, resumable iterators over stored task examples (grain).

`make_iterator(source, batch_size=..., seed=...)` returns an `ExampleIterator` yielding lists
of `Example` objects:
- order: grain `IndexSampler` over the source; with `shuffle=True` every epoch is a different
  permutation drawn from `seed` (and the epoch number); `num_epochs=None` repeats forever.
- sharding: `ShardOptions(shard_index, shard_count)`, by default
  `jax.process_index()` / `jax.process_count()`, so each host reads a disjoint slice.
  With `drop_remainder=True` (training) every host sees the same number of examples.
- resume: `get_state()` is a JSON-able dict (grain's iterator state) to store in a checkpoint;
  `set_state(state)` on a fresh iterator continues with exactly the next batch.
Grain runs in-process (`worker_count=0`): examples are small, and the policy step dominates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grain.python as grain

from deepretrieval_jax.data.records import Example


class _ToExample(grain.MapTransform):
    """Leaves `Example`s as they are; decodes JSON text records from plain sources."""

    def map(self, element: Any) -> Example:
        if isinstance(element, Example):
            return element
        return Example.from_json(element)


class ExampleIterator:
    """Iterator of `list[Example]` batches with a JSON-able, restorable state."""

    def __init__(self, loader: grain.DataLoader, batch_size: int):
        self._loader, self.batch_size = loader, batch_size
        self._it = iter(loader)

    def __iter__(self) -> ExampleIterator:
        return self

    def __next__(self) -> list[Example]:
        return next(self._it)

    def get_state(self) -> dict:
        """The position after the last batch returned (JSON-able; store it in a checkpoint)."""
        return json.loads(self._it.get_state().decode("utf-8"))

    def set_state(self, state: dict) -> None:
        """Continue from `state` (from `get_state`) with exactly the batch that followed it."""
        self._it.set_state(json.dumps(state).encode("utf-8"))


def _process_shard() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def make_iterator(
    source: Sequence,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
) -> ExampleIterator:
    """A grain iterator over `source` (an `ExampleSource` or any random-access sequence).

    Args:
      batch_size: examples per batch on this host.
      seed: shuffling seed (each epoch gets its own permutation).
      num_epochs: None repeats forever (training); 1 for a single pass (evaluation).
      shard_index, shard_count: default to this JAX process's index and the process count.
      drop_remainder: drop the uneven tail of the shard and the last partial batch, so every
        host yields the same number of equal batches. Use False for evaluation.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard_index is None or shard_count is None:
        shard_index, shard_count = _process_shard()
    if len(source) == 0:
        raise ValueError(f"{source!r} has no examples")
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.ShardOptions(
            shard_index=shard_index, shard_count=shard_count, drop_remainder=drop_remainder
        ),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed if shuffle else None,
    )
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            _ToExample(),
            grain.Batch(batch_size=batch_size, drop_remainder=drop_remainder, batch_fn=list),
        ],
        worker_count=0,
    )
    return ExampleIterator(loader, batch_size)
