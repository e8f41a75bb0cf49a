"""Process start-up shared by the launch scripts: multi-host JAX initialisation and device logs.

`initialize_distributed` calls `jax.distributed.initialize` only when the run is multi-process:
an explicit coordinator (flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
what launch/multi_gpu.sh exports), or a cluster JAX detects by itself (TPU pod slices, SLURM,
Open MPI) when `mode="auto"` sees its environment. Single-host runs skip it entirely.
"""

from __future__ import annotations

import os

from absl import logging

# Environment markers of clusters that jax.distributed.initialize() configures by itself.
_AUTO_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def initialize_distributed(
    mode: str = "auto",
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
) -> bool:
    """Joins the JAX cluster when there is one; returns whether it did.

    Args:
      mode: "auto" (initialise if a coordinator or a known cluster environment is present),
        "on" (always), "off" (never).
      coordinator_address, num_processes, process_id: explicit settings; empty/0/-1 fall back
        to JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
    """
    import jax

    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--distributed must be auto, on or off, got {mode!r}")
    if mode == "off":
        return False
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    count = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    index = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if address:
        if count <= 0 or index < 0:
            raise ValueError(
                f"coordinator {address!r} given without num_processes ({count}) and "
                f"process_id ({index}); set both (flags or JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
            )
        # Cross-process collectives between CPU devices (tests, CPU clusters) need gloo; set
        # before the backend starts, harmless on GPU/TPU hosts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, num_processes=count, process_id=index)
        return True
    if mode == "on" or any(k in os.environ for k in _AUTO_ENV):
        jax.distributed.initialize()
        return True
    return False


def log_devices() -> None:
    """One log line per process: its index, local and global devices."""
    import jax

    logging.info(
        "JAX process %d/%d, backend %s: %d local devices %s, %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.default_backend(),
        jax.local_device_count(),
        [str(d) for d in jax.local_devices()],
        jax.device_count(),
    )


def experiment_main(entry: str, *, distributed: bool = False, default_config: str | None = None):
    """The whole body of a config-driven entry point: `--config`, `--workdir`, then `entry`.

    Defines `--config` (an ml_collections config file, locked, `--config.a.b=v` overrides) and
    `--workdir`; with `distributed`, also the multi-host flags `--distributed`,
    `--coordinator_address`, `--num_processes`, `--process_id`. Then runs absl's app: joins the
    JAX cluster if there is one, logs devices and the config, and calls `entry(config, workdir)`.

    Args:
      entry: "module.path:function", imported only after JAX is initialised.
      distributed: whether the entry point may run multi-host.
      default_config: a config file used when `--config` is not given.
    """
    import importlib

    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file(
        "config", default_config, "Experiment config file.", lock_config=True
    )
    workdir = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, reports).")
    flags.mark_flags_as_required(["workdir"] if default_config else ["config", "workdir"])
    if distributed:
        mode = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "Multi-host init.")
        address = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
        count = flags.DEFINE_integer("num_processes", 0, "Processes in the job.")
        index = flags.DEFINE_integer("process_id", -1, "This process's index.")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        if distributed:
            initialize_distributed(mode.value, address.value, count.value, index.value)
        log_devices()
        module_name, fn_name = entry.split(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        logging.info("Config:\n%s", config.value)
        fn(config.value, workdir.value)

    app.run(main)
