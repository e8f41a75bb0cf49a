"""Paired comparisons of two methods evaluated on the same examples.

`paired_bootstrap` resamples the per-example differences (scipy.stats.bootstrap, percentile
intervals) with a fixed seed, so a report's interval is reproducible from its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_RESAMPLES = 10_000


def paired_bootstrap(
    treatment: Sequence[float],
    control: Sequence[float],
    *,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict:
    """Mean of (treatment - control) over paired examples and its bootstrap CI.

    Returns {"n", "mean_treatment", "mean_control", "difference", "ci_low", "ci_high",
    "confidence", "excludes_zero"}.
    """
    from scipy import stats  # noqa: PLC0415  (heavy import, only when a report is made)

    t, c = np.asarray(treatment, np.float64), np.asarray(control, np.float64)
    if t.shape != c.shape or t.ndim != 1:
        raise ValueError(
            f"paired_bootstrap: need two equal-length vectors, got {t.shape}, {c.shape}"
        )
    if len(t) < 2:
        raise ValueError(f"paired_bootstrap: need at least 2 pairs, got {len(t)}")
    diff = t - c
    if np.all(diff == diff[0]):  # no spread: the interval is the point
        low = high = float(diff[0])
    else:
        res = stats.bootstrap(
            (diff,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
            method="percentile", rng=np.random.default_rng(seed),
        )  # fmt: skip
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {
        "n": int(len(t)),
        "mean_treatment": float(t.mean()),
        "mean_control": float(c.mean()),
        "difference": float(diff.mean()),
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "excludes_zero": bool(low > 0 or high < 0),
    }
