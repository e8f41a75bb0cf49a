"""The data order of a run: which examples each host takes at each step, resumable exactly."""

from __future__ import annotations

import numpy as np


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
