"""Evaluation entry point: a policy or the "original query" baseline on one task split.

    python launch/eval.py --config=configs/eval_scifact.py --workdir=/tmp/eval [--config.a.b=v]

Writes WORKDIR/eval/<task>_<split>_<method>.{json,md,png} (see deepretrieval_jax/eval.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from deepretrieval_jax import runtime  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Evaluation config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (report under WORKDIR/eval).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    runtime.log_devices()
    from deepretrieval_jax import eval as eval_lib

    logging.info("Config:\n%s", _CONFIG.value)
    eval_lib.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
