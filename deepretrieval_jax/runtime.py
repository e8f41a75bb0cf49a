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
