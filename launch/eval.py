"""Evaluation entry point: a policy or the "original query" baseline on one task split.

    python launch/eval.py --config=configs/eval_scifact.py --workdir=/tmp/eval [--config.a.b=v]

Writes WORKDIR/eval/<task>_<split>_<method>.{json,md,png} (see deepretrieval_jax/eval.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepretrieval_jax import runtime  # noqa: E402

if __name__ == "__main__":
    runtime.experiment_main("deepretrieval_jax.eval:run")
