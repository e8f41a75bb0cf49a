"""Cold-start SFT entry point (writes the checkpoint PPO starts from).

    python launch/sft.py --config=configs/demo.py --workdir=/tmp/demo_sft [--config.a.b=v ...]

Multi-host: as launch/train.py (same flags, same command on every host).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepretrieval_jax import runtime  # noqa: E402

if __name__ == "__main__":
    runtime.experiment_main("deepretrieval_jax.rl.sft:run_sft", distributed=True)
