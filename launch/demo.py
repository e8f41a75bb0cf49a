"""The main job: pretrained policy -> zero-shot and HyDE baselines -> RL -> evaluation -> HF export.

    python launch/demo.py --workdir=workdirs/demo [--config=configs/demo.py] [--config.a.b=v]

`bash launch/demo.sh` is the one-command version (venv, install, data directory). Re-running
with the same --workdir resumes; see deepretrieval_jax/demo.py for what lands in the workdir.
Quiet logs, one-line user errors and WORKDIR/config.json as every entry point
(`runtime.experiment_main`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepretrieval_jax import runtime  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    runtime.experiment_main(
        "deepretrieval_jax.demo:run", default_config=os.path.join(_ROOT, "configs", "demo.py")
    )
