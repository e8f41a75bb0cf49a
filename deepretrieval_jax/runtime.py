"""Process start-up shared by the launch scripts: multi-host JAX initialisation and device logs.

`initialize_distributed` calls `jax.distributed.initialize` only when the run is multi-process:
an explicit coordinator (flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
what launch/multi_gpu.sh exports), or a cluster JAX detects by itself (TPU pod slices, SLURM,
Open MPI) when `mode="auto"` sees its environment. Single-host runs skip it entirely.

`experiment_main` is the body of every config-driven entry point. A user error (a bad config
value or override, a missing file, a wrong checkpoint) ends the process with one line on stderr
naming the field or file and exit status 2, no traceback (`--verbosity=1` shows it). The
resolved config and the command line are written to WORKDIR/config.json before the run starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from absl import logging

from deepretrieval_jax import workdir as workdir_lib

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


USAGE_EXIT = 2  # exit status of a user error (as argparse)
RUN_CONFIG_FILE = workdir_lib.RUN_CONFIG_FILE
# Exceptions a user's input causes: our code raises them with a message naming the field/file
# (house style 14). CheckpointError is a ValueError.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _exit_user_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)


@contextlib.contextmanager
def user_errors():
    """Turns a `USER_ERRORS` exception into one stderr line and exit status 2.

    With `--verbosity=1` (or more) the exception propagates, traceback and all.
    """
    try:
        yield
    except USER_ERRORS as e:
        if logging.get_verbosity() >= logging.DEBUG:
            raise
        _exit_user_error(f"{e} (run with --verbosity=1 for the traceback)")


def _missing_override(config, argv) -> str | None:
    """The first `--config.a.b=v` whose path `a.b` the config does not have, explained."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0]
        node, seen = config, "config"
        for key in path.split("."):
            if not hasattr(node, "keys") or key not in node.keys():
                fields = sorted(node.keys()) if hasattr(node, "keys") else []
                return f"{arg}: {seen} has no field {key!r} (fields: {', '.join(fields)})"
            node, seen = node[key], f"{seen}.{key}"
    return None


_PARSE_ERRORS = (AttributeError, KeyError, TypeError, ValueError, OSError)


def parse_flags(argv: list[str], default_config: str | None = None) -> list[str]:
    """absl flag parsing where a bad flag, config file or override is one line + exit 2."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (flags.Error, *_PARSE_ERRORS) as e:
        _exit_parse_error(e, argv, default_config)


def _exit_parse_error(e: Exception, argv: list[str], default_config: str | None) -> None:
    from absl import flags

    message = str(e).strip() or type(e).__name__
    if "Traceback" in message:  # a config file's get_config raised: keep its last line
        message = message.splitlines()[-1]
    config = _config_alone(argv, default_config)
    if config is not None and isinstance(e, (flags.Error, AttributeError, KeyError)):
        message = _missing_override(config, argv) or message
    _exit_user_error(message)


def _config_alone(argv: list[str], default_config: str | None = None):
    """The config of `--config=FILE[:ARG]` in `argv` (else `default_config`), without
    overrides (None if it fails).

    Loaded by hand: config_flags reads override flags from sys.argv, and those failed.
    """
    import importlib.util

    given = [a[len("--config=") :] for a in argv[1:] if a.startswith("--config=")]
    if not given and not default_config:
        return None
    path, _, arg = (given[-1] if given else default_config).partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_run_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception:  # the original error is the one to report
        return None


def write_run_config(config, workdir: str, entry: str) -> str | None:
    """Writes WORKDIR/config.json: the resolved config, the command line and the entry point.

    Process 0 only; a rerun in the same workdir overwrites it (the latest start wins).
    """
    import jax
    from etils import epath

    if jax.process_index() != 0:
        return None
    path = epath.Path(workdir if "://" in workdir else os.path.abspath(os.path.expanduser(workdir)))
    path.mkdir(parents=True, exist_ok=True)
    record = {
        "entry": entry,
        "argv": list(sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": json.loads(config.to_json_best_effort()),
    }
    (path / RUN_CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return str(path / RUN_CONFIG_FILE)


def experiment_main(entry: str, *, distributed: bool = False, default_config: str | None = None):
    """The whole body of a config-driven entry point: `--config`, `--workdir`, then `entry`.

    Defines `--config` (an ml_collections config file, locked, `--config.a.b=v` overrides) and
    `--workdir` (both listed by `--help`); with `distributed`, also the multi-host flags
    `--distributed`, `--coordinator_address`, `--num_processes`, `--process_id`. Then runs
    absl's app: joins the JAX cluster if there is one, logs devices, writes
    WORKDIR/config.json and calls `entry(config, workdir)`. User errors: see `user_errors`.

    Args:
      entry: "module.path:function", imported only after JAX is initialised.
      distributed: whether the entry point may run multi-host.
      default_config: a config file used when `--config` is not given.
    """
    import importlib

    from absl import app, flags
    from ml_collections import config_flags

    try:  # with a default config, config_flags applies sys.argv's overrides right here
        config = config_flags.DEFINE_config_file(
            "config", default_config, "Experiment config file (overrides: --config.a.b=v).",
            lock_config=True,
        )  # fmt: skip
    except _PARSE_ERRORS as e:
        _exit_parse_error(e, sys.argv, default_config)
    workdir = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, reports).")
    names = ["config", "workdir"]
    if distributed:
        mode = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "Multi-host init.")
        address = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
        count = flags.DEFINE_integer("num_processes", 0, "Processes in the job.")
        index = flags.DEFINE_integer("process_id", -1, "This process's index.")
        names += ["distributed", "coordinator_address", "num_processes", "process_id"]
    for name in names:  # `--help` lists the main module's key flags: make these its own
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        if config.value is None:
            _exit_user_error("--config is required")
        if not workdir.value:
            _exit_user_error("--workdir is required")
        try:
            config.value.keys()  # config_flags loads lazily: a missing file fails here
        except OSError as e:
            _exit_user_error(str(e).splitlines()[0] + ": " + str(e).strip().splitlines()[-1])
        from deepretrieval_jax import progress

        progress.quiet_library_logs(not flags.FLAGS["verbosity"].present)
        with user_errors():
            if distributed:
                initialize_distributed(mode.value, address.value, count.value, index.value)
            log_devices()
            module_name, fn_name = entry.split(":")
            fn = getattr(importlib.import_module(module_name), fn_name)
            written = write_run_config(config.value, workdir.value, entry)
            if written:
                logging.info("Resolved config and command line: %s", written)
            logging.vlog(1, "Config:\n%s", config.value)
            with progress.phase(fn_name):
                fn(config.value, workdir.value)

    app.run(main, flags_parser=lambda argv: parse_flags(argv, default_config))
