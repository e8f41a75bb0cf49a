"""PPO training entry point.

    python launch/train.py --config=configs/demo.py --workdir=/tmp/demo [--config.a.b=v ...]

Multi-host: run the same command on every host (launch/tpu_pod.sh, launch/multi_gpu.sh); the
coordinator comes from --coordinator_address/--num_processes/--process_id, the JAX_* env vars,
or the cluster itself (TPU pods, SLURM).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from deepretrieval_jax import runtime  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "Multi-host init.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    runtime.initialize_distributed(
        _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
    runtime.log_devices()
    from deepretrieval_jax.rl import trainer

    logging.info("Config:\n%s", _CONFIG.value)
    trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
