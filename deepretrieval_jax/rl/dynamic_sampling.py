"""DAPO's dynamic sampling: oversample prompts, keep the groups whose rewards differ.

With group advantages (GRPO, RLOO) a prompt whose n samples all get the same reward contributes a
zero advantage on every token: its rows cost a forward and backward pass and teach nothing (for
query writing, most easy claims). The trainer samples `sampling.dynamic_oversample` times
`train.prompts_per_step` prompts, scores them all, and keeps `prompts_per_step` groups:
informative ones (>= 2 valid samples whose scores differ) first, in sampling order, then, only if
too few are informative, zero-variance ones, so that the step's batch size (and its compiled
shapes) never change. Host numpy; `take_rows` gathers the kept rows of any batch pytree.

Metrics (per step): dynamic/zero_variance_fraction (candidate groups without reward variance:
the fraction dropped by the filter), dynamic/filled_fraction (kept groups that had to be
zero-variance fillers), dynamic/candidate_groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def informative_groups(scores_R, valid_R, n: int, tol: float = 1e-8) -> np.ndarray:
    """[G] bool: group g (rows g*n .. g*n+n-1) has >= 2 valid rows whose scores span > tol."""
    scores = np.asarray(scores_R, np.float64).reshape(-1, n)
    valid = np.asarray(valid_R, bool).reshape(-1, n)
    hi = np.where(valid, scores, -np.inf).max(axis=1)
    lo = np.where(valid, scores, np.inf).min(axis=1)
    return (valid.sum(axis=1) >= 2) & (hi - lo > tol)


def select_groups(scores_R, valid_R, n: int, num_groups: int) -> tuple[np.ndarray, dict]:
    """Row indices (num_groups * n, in group order) of the kept groups, and the metrics."""
    informative = informative_groups(scores_R, valid_R, n)
    G = informative.size
    if num_groups > G:
        raise ValueError(f"dynamic sampling: keep {num_groups} groups of only {G} candidates")
    order = np.concatenate([np.flatnonzero(informative), np.flatnonzero(~informative)])
    kept = np.sort(order[:num_groups])
    rows = (kept[:, None] * n + np.arange(n)[None, :]).reshape(-1)
    metrics = {
        "dynamic/zero_variance_fraction": float(np.mean(~informative)),
        "dynamic/filled_fraction": float(np.mean(~informative[kept])),
        "dynamic/candidate_groups": float(G),
    }
    return rows.astype(np.int32), metrics


def take_rows(tree, rows_R):
    """Every leaf's rows `rows_R` (leading axis); jit it with the batch's out_shardings."""
    return jax.tree.map(lambda x: jnp.take(x, rows_R, axis=0), tree)


def host_global(arrays):
    """Host numpy copies of global (batch-sharded) arrays: every process gets all rows."""
    if jax.process_count() == 1:
        return tuple(np.asarray(a) for a in arrays)
    from jax.experimental import multihost_utils

    return tuple(np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in arrays)
