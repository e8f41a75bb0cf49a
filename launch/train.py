"""PPO training entry point.

    python launch/train.py --config=configs/demo.py --workdir=/tmp/demo [--config.a.b=v ...]

Multi-host: run the same command on every host (launch/tpu_pod.sh, launch/multi_gpu.sh); the
coordinator comes from --coordinator_address/--num_processes/--process_id, the JAX_* env vars,
or the cluster itself (TPU pods, SLURM).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepretrieval_jax import runtime  # noqa: E402

if __name__ == "__main__":
    runtime.experiment_main("deepretrieval_jax.rl.trainer:train", distributed=True)
