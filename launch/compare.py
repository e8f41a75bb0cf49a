"""Compares runs: a markdown/CSV table of final and best metrics and overlaid curves (PNG).

    python launch/compare.py --workdirs=/tmp/demo_sweep --out=/tmp/demo_sweep
    python launch/compare.py --workdirs=/tmp/run_a,/tmp/run_b --out=/tmp/ab \
        --metric=val/retrieval/ndcg@10

A workdir holds metrics.jsonl; a sweep root's sub-directories are its runs. Writes
OUT/comparison.md, comparison.csv and comparison.png, and prints the table.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from deepretrieval_jax import compare, runtime  # noqa: E402

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Run workdirs or sweep roots.")
_OUT = flags.DEFINE_string("out", "", "Output directory; default: the one --workdirs entry.")
_METRIC = flags.DEFINE_string("metric", compare.DEFAULT_METRIC, "Selection metric (best of).")
_LOWER = flags.DEFINE_bool("lower_is_better", False, "The selection metric is a loss.")
_CURVES = flags.DEFINE_list("curves", list(compare.CURVE_KEYS), "Metric keys to plot.")
flags.mark_flags_as_required(["workdirs"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _OUT.value and len(_WORKDIRS.value) != 1:
        raise app.UsageError("--out is required when comparing several --workdirs")
    out = _OUT.value or _WORKDIRS.value[0]
    with runtime.user_errors():  # one line, exit 2
        written = compare.compare(
            _WORKDIRS.value, out, _METRIC.value, not _LOWER.value, _CURVES.value
        )
    print(written["md"].read_text())
    for path in written.values():
        print(path)


if __name__ == "__main__":
    app.run(main)
