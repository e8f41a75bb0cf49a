"""The main job: pretrained policy -> zero-shot and HyDE baselines -> RL -> evaluation -> HF export.

    python launch/demo.py --workdir=workdirs/demo [--config=configs/demo.py] [--config.a.b=v]

`bash launch/demo.sh` is the one-command version (venv, install, data directory). Re-running
with the same --workdir resumes; see deepretrieval_jax/demo.py for what lands in the workdir.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from deepretrieval_jax import runtime  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_ROOT, "configs", "demo.py"), "Experiment config file.",
    lock_config=True,
)  # fmt: skip
_WORKDIR = flags.DEFINE_string("workdir", None, "Demo directory (all stages' outputs).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    runtime.log_devices()
    from deepretrieval_jax import demo

    logging.info("Config:\n%s", _CONFIG.value)
    demo.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
