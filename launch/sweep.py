"""Runs a config sweep locally, or writes its launch commands for a TPU pod slice or SLURM.

    python launch/sweep.py --config=configs/demo.py --sweep=configs/sweeps/demo_ppo.py \
        --workdir=/tmp/demo_sweep [--parallel=2 --cpus_per_run=1] [--mode=print|tpu|slurm]

Every point is validated against the config before anything starts; each gets its own workdir
(WORKDIR/<point name>, holding config.json). Re-running skips finished points and resumes the
others from their checkpoints. See docs/sweeps.md.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from deepretrieval_jax import sweep, sweep_runner  # noqa: E402

_CONFIG = flags.DEFINE_string("config", None, "Base experiment config, path.py[:arg].")
_SWEEP = flags.DEFINE_string("sweep", "", "File with get_sweep(arg=None); default: --config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep root; points run in WORKDIR/<name>.")
_MODE = flags.DEFINE_enum("mode", "local", list(sweep_runner.MODES), "Run here or write commands.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "a.b=v set for every point.")
_SCRIPT = flags.DEFINE_string("script", "launch/train.py", "Entry point of each point.")
_STEPS_FIELD = flags.DEFINE_string("steps_field", "train.num_steps", "Total-steps field.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Local: points at once; slurm: array limit.")
_GPUS = flags.DEFINE_integer("gpus_per_run", 0, "Local: GPUs per point (CUDA_VISIBLE_DEVICES).")
_CPUS = flags.DEFINE_integer("cpus_per_run", 0, "Local: cores per point (taskset).")
_TPU = flags.DEFINE_string("tpu_name", "", "TPU mode: the pod slice's name.")
_ZONE = flags.DEFINE_string("zone", "", "TPU mode: the pod slice's zone.")
_SBATCH = flags.DEFINE_multi_string(
    "sbatch", [], "SLURM mode: an #SBATCH option, e.g. --time=4:00:00."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # A shell starts background jobs with SIGINT ignored, and Python then leaves it ignored:
    # restore Ctrl-C / `kill -INT`, which the runner turns into SIGTERM to the running points.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = sweep_runner.execute(
            _CONFIG.value, _WORKDIR.value, _SWEEP.value, _MODE.value, _OVERRIDE.value,
            _SCRIPT.value, _STEPS_FIELD.value, _PARALLEL.value, _GPUS.value, _CPUS.value,
            _TPU.value, _ZONE.value, _SBATCH.value,
        )  # fmt: skip
    except sweep.SweepError as e:
        sys.exit(f"Sweep error: {e}")
    sys.exit(code)


if __name__ == "__main__":
    app.run(main)
