"""Compile one PPO step (and the SFT step) for a TPU topology without running it.

    python launch/aot_compile.py --config=configs/pubmed.py --topology=v5p-8 \
        [--config.mesh.fsdp=-1 --config.mesh.data=1 ...]

--topology: "cpu" (the local devices; a CPU-compiled estimate), a slice ("v5e-8", "v5p-8",
"v4-32", "v5p-32") or a topology ("v5e:2x2"). TPU topologies need libtpu (pip install -e
'.[tpu]'); no TPU is needed. Prints per function and per chip the compiled memory, FLOPs,
bytes, HBM fit and roofline time, then the estimated step time and MFU bound
(deepretrieval_jax/aot.py; figures in docs/benchmarks.md).
"""

import os

from absl import app, flags
from ml_collections import config_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never claim an accelerator

from deepretrieval_jax import aot  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "cpu", "cpu, a TPU slice (v5e-8) or topology.")
_SFT = flags.DEFINE_bool("sft", True, "Also compile the SFT step.")
_ONLY = flags.DEFINE_list("only", [], "Compile only these functions (e.g. ppo.update).")


def main(argv):
    del argv
    report = aot.compile_all(
        _CONFIG.value, _TOPOLOGY.value, include_sft=_SFT.value, only=_ONLY.value
    )
    print(aot.format_report(report))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
