"""Ahead-of-time compilation of one PPO step for a TPU topology (or the local CPU mesh).

Nothing runs: each function of `aot_steps.step_functions` is lowered on abstract inputs with
the config's mesh laid over the topology's compile-only devices
(`jax.experimental.topologies.get_topology_desc`, needs libtpu: `pip install -e .[tpu]`) and
compiled by XLA:TPU. Per function and per chip the report gives XLA's `memory_analysis()`
(arguments, outputs, temporaries, generated code, peak) and `cost_analysis()` (FLOPs and bytes
accessed of the per-chip SPMD program), the chip's HBM capacity and whether it fits, and a
roofline time max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) from the published chip figures in
`CHIPS`. XLA's cost analysis counts a loop body once, so the update's figures are multiplied by
its scan trip count (mini-batches x micro-batches: exact without micro-batching, an upper bound
on the optimiser's share with it), and the forward-only passes' by their slice count
(`update.forward_slices`: rows / micro-batch rows).

Step estimate = prefill + L x decode step + log-probs + reference + values + advantages +
update (rewards and the trainer -> sampler weight reshard are not included); L decode steps is
the upper bound (every row runs to max_new_tokens). MFU bound = analytic model FLOPs of the
step / (chips x peak bf16 FLOP/s x estimated step time): what the step reaches at best if every
function ran at its roofline.

While sampling, the train state stays resident: the sampler rows add its per-chip bytes to
their own peak ("resident" column). `--topology=cpu` compiles for the local (fake) CPU devices:
a CPU-compiled estimate of per-device bytes (XLA:GPU fuses differently; no roofline).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

import jax
from absl import logging

from deepretrieval_jax import aot_steps, sharding

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (bf16 dense peak, HBM capacity and bandwidth)."""

    name: str
    hbm_bytes: float
    peak_flops: float  # bf16 FLOP/s
    hbm_bw: float  # bytes/s
    source: str


CHIPS = {  # keyed by jax.Device.device_kind
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}


def topology_devices(name: str) -> list:
    """Devices of `name`: "cpu" (local), a slice name ("v5e-8", "v5p-32", "v4-32": v4/v5p count
    TensorCores, 2 per chip) or a topology ("v5e:2x2", "v5p:2x2x4")."""
    if name == "cpu":
        return jax.devices("cpu")
    from jax.experimental import topologies

    # Compile-only: no chip is claimed, so parallel compiles (pytest workers) need no lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if ":" in name:
        gen, shape = name.split(":", 1)
    else:
        gen, _, count = name.partition("-")
        if not count.isdigit():
            raise ValueError(f"--topology={name!r}: expected cpu, e.g. v5e-8, v5p-32 or v5e:2x2")
        chips = int(count) // (2 if gen in ("v4", "v5p") else 1)
        table = _3D if gen in ("v4", "v5p") else _2D
        if chips not in table:
            raise ValueError(f"--topology={name!r}: {chips} chips; known {sorted(table)}")
        shape = table[chips]
    kwargs = {"chip_config_name": "megacore"} if gen == "v4" else {}  # one device per v4 chip
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{gen}:{shape}", **kwargs
        )
    except Exception as e:  # noqa: BLE001  (libtpu missing or an unknown topology)
        raise RuntimeError(
            f"--topology={name!r}: no TPU topology {gen}:{shape} ({e}). Compiling for TPU needs "
            "libtpu: pip install -e '.[tpu]'"
        ) from e
    return list(desc.devices)


@dataclasses.dataclass
class Row:
    """One compiled function's per-chip figures (bytes, FLOPs, seconds)."""

    name: str
    calls: int
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    peak: int
    resident: int  # train-state bytes resident beside this function (sampler only)
    flops: float  # per call, loops counted
    bytes_accessed: float
    model_flops: float
    seconds: float | None  # roofline per call
    compile_s: float
    note: str
    compiled: bool = True  # False: XLA refused it for exceeding HBM (peak = what XLA reported)


# XLA:TPU's two wordings of a compile-time HBM refusal (libtpu 0.0.42.1).
_HBM_OOM = (
    re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+[KMGT]) hbm"),
    re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+[KMGT])\)"),
)
_UNITS = {"K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}


def _over_capacity(fn: aot_steps.StepFunction, error: Exception, resident: int, t0) -> Row | None:
    """XLA:TPU refuses a program that cannot fit HBM (CompileTimeHbmOom): a row saying so, its
    peak the bytes XLA reported using, or None for any other compile error."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    match = next((m for m in (p.search(text) for p in _HBM_OOM) if m), None)
    if match is None:
        return None
    used = int(float(match.group(1)) * _UNITS[match.group(2)])
    note = f"XLA:TPU refused it: used {match.group(1)}{match.group(2)} of {match.group(3)} HBM"
    return Row(fn.name, fn.calls_per_step, 0, 0, 0, 0, 0, used, resident, 0.0, 0.0,
               fn.model_flops, None, time.time() - t0, note, compiled=False)  # fmt: skip


def _figures(compiled, loop_trips: int) -> dict:
    """Per-chip bytes (memory_analysis) and per-call FLOPs / bytes accessed (cost_analysis)."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    peak = getattr(mem, "peak_memory_in_bytes", 0) or (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return dict(
        argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes,
        alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes,
        code=mem.generated_code_size_in_bytes, peak=int(peak),
        flops=float(cost.get("flops", 0.0)) * loop_trips,
        bytes_accessed=float(cost.get("bytes accessed", 0.0)) * loop_trips,
    )  # fmt: skip


def _roofline(chip: Chip | None, flops: float, nbytes: float) -> float | None:
    return None if chip is None else max(flops / chip.peak_flops, nbytes / chip.hbm_bw)


def _compile(fn: aot_steps.StepFunction, chip: Chip | None, resident: int) -> Row:
    t0 = time.time()
    try:
        if fn.parts:
            f = _compile_parts(fn.parts, chip)
        else:
            f = _figures(fn.lower().compile(), fn.loop_trips)
            f["seconds"] = _roofline(chip, f["flops"], f["bytes_accessed"])
    except Exception as e:  # noqa: BLE001  (jax's error type varies across versions)
        row = _over_capacity(fn, e, resident, t0)
        if row is None:
            raise
        return row
    return Row(fn.name, fn.calls_per_step, resident=resident, model_flops=fn.model_flops,
               compile_s=time.time() - t0, note=fn.note, **f)  # fmt: skip


def _compile_parts(parts, chip: Chip | None) -> dict:
    """Figures of programs run one after another (`StepFunction.parts`): arguments, outputs,
    FLOPs, bytes and roofline seconds add up over the runs (every output stays); the
    temporaries are the largest program's, and the peak is all arguments and outputs plus them
    (the last program's, at most)."""
    figs = [(_figures(lower().compile(), 1), runs) for lower, runs in parts]

    def total(key):
        return sum(f[key] * runs for f, runs in figs)

    temp = max(f["temp"] for f, _ in figs)
    seconds = None
    if chip is not None:
        seconds = sum(runs * _roofline(chip, f["flops"], f["bytes_accessed"]) for f, runs in figs)
    return dict(
        argument=total("argument"), output=total("output"), alias=total("alias"), temp=temp,
        code=sum(f["code"] for f, _ in figs),
        peak=total("argument") + total("output") - total("alias") + temp,
        flops=total("flops"), bytes_accessed=total("bytes_accessed"), seconds=seconds,
    )  # fmt: skip


@dataclasses.dataclass
class Report:
    topology: str
    num_chips: int
    mesh: dict
    chip: Chip | None
    rows: list[Row]

    @property
    def step_seconds(self) -> float | None:
        if self.chip is None or any(r.seconds is None for r in self.rows):
            return None  # CPU, or a function XLA refused
        return sum(r.calls * r.seconds for r in self.rows)

    @property
    def mfu_bound(self) -> float | None:
        t = self.step_seconds
        if not t:
            return None
        flops = sum(r.calls * r.model_flops for r in self.rows)
        return flops / (self.num_chips * self.chip.peak_flops * t)

    @property
    def max_chip_bytes(self) -> int:
        return max(r.peak + r.resident for r in self.rows)

    @property
    def fits(self) -> bool | None:
        """Every function compiled and fits HBM beside what stays resident (None on CPU)."""
        if self.chip is None:
            return None
        return all(r.compiled for r in self.rows) and self.max_chip_bytes <= self.chip.hbm_bytes


def compile_all(
    cfg,
    topology: str,
    include_sft: bool = True,
    only=(),
    reuse_programs: bool = True,
    sampler_weights_dtype: str | None = "compute",
) -> Report:
    """Compile every function of one PPO step (and SFT) of `cfg` for `topology`; `only`: the
    names to compile (e.g. ("ppo.update",)), empty = all. The step estimate covers those.
    `reuse_programs`: a function whose program equals an earlier one's (the reference's
    log-probs = the actor's) takes its figures instead of compiling again.
    `sampler_weights_dtype`: see `aot_steps.step_functions`."""
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    kind = devices[0].device_kind
    chip = None if topology == "cpu" else CHIPS.get(kind)
    if topology != "cpu" and chip is None:
        raise ValueError(f"no published figures for {kind!r} in aot.CHIPS")
    state_bytes = aot_steps.train_state_bytes_per_chip(cfg, mesh)
    rows = []
    functions = aot_steps.step_functions(cfg, mesh, include_sft, sampler_weights_dtype)
    unknown = set(only) - {fn.name for fn in functions}
    if unknown:
        raise ValueError(
            f"unknown functions {sorted(unknown)}: expected {[f.name for f in functions]}"
        )
    for fn in functions:
        if only and fn.name not in only:
            continue
        resident = state_bytes if fn.name.startswith("sampler.") else 0
        same = [r for r in rows if r.name == fn.same_program_as]
        if same and not reuse_programs:
            same = []
        if same:
            rows.append(dataclasses.replace(same[0], name=fn.name, compile_s=0.0, note=fn.note))
            continue
        rows.append(_compile(fn, chip, resident))
        if fn.args_in_state:  # its arguments are counted in its own peak, not twice
            rows[-1] = dataclasses.replace(rows[-1], resident=state_bytes - rows[-1].argument)
        r = rows[-1]
        logging.info(
            "compiled %s in %.1f s: peak %.2f GiB (+%.2f resident), %.3g FLOP, %.3g B per chip",
            fn.name, r.compile_s, r.peak / GiB, r.resident / GiB, r.flops, r.bytes_accessed,
        )  # fmt: skip
    return Report(topology, len(devices), dict(mesh.shape), chip, rows)


def format_report(report: Report) -> str:
    """A plain-text table, per function and per chip, and the step summary."""
    chip = report.chip
    g = lambda b: f"{b / GiB:7.2f}"  # noqa: E731
    head = f"topology {report.topology}: {report.num_chips} devices, mesh {report.mesh}"
    if chip is None:
        head += "\nCPU-compiled estimate (XLA:CPU; XLA:GPU fuses differently): bytes only"
    else:
        head += (
            f"\nchip {chip.name}: HBM {chip.hbm_bytes / GiB:.0f} GiB, "
            f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bw / 1e9:.0f} GB/s ({chip.source})"
        )
    lines = [
        head,
        "per chip, GiB   | calls |   args |    out |  alias |   temp |   code |   peak | "
        "+resident |  fits | TFLOP/call | GB/call | roofline ms/call | compile s",
    ]
    for r in report.rows:
        total = r.peak + r.resident
        fits = "-" if chip is None else ("yes" if total <= chip.hbm_bytes and r.compiled else "NO")
        ms = "-" if r.seconds is None else f"{r.seconds * 1e3:10.2f}"
        lines.append(
            f"{r.name:<18}| {r.calls:5d} |{g(r.argument)} |{g(r.output)} |{g(r.alias)} |"
            f"{g(r.temp)} |{g(r.code)} |{g(r.peak)} |  {g(r.resident)} | {fits:>5} | "
            f"{r.flops / 1e12:10.3f} | {r.bytes_accessed / 1e9:7.2f} | {ms:>16} | "
            f"{r.compile_s:7.1f}  {r.note}"
        )
    worst = report.max_chip_bytes
    lines.append(f"largest per-chip footprint: {worst / GiB:.2f} GiB")
    if chip is not None:
        lines.append(f"fits {chip.hbm_bytes / GiB:.0f} GiB HBM: {'yes' if report.fits else 'NO'}")
        if report.step_seconds is None:
            lines.append("estimated PPO step: none (a function did not compile for this chip)")
        else:
            lines.append(
                f"estimated PPO step (roofline): {report.step_seconds:.2f} s; "
                f"MFU bound {100 * report.mfu_bound:.1f}%"
            )
    return "\n".join(lines)
