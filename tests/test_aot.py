"""Ahead-of-time compilation of the PPO step (deepretrieval_jax.aot): TPU topology and CPU mesh.

The TPU test needs libtpu (`pip install -e '.[tpu]'`) and is skipped only when it is absent.
"""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_config as tiny

from configs import common
from deepretrieval_jax import aot, aot_steps, sharding

ROOT = Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def tiny_config(**mesh):
    """The tests' tiny config at test shapes: 1 layer, 8 prompts x 2 samples, 32 + 8 tokens."""
    cfg = tiny.get_config()
    cfg.model.overrides.num_layers = 1
    cfg.model.overrides.max_position_embeddings = 64
    cfg.data.prompt_buckets = (32,)
    cfg.sampling.max_new_tokens = 8
    cfg.sampling.n = 2
    cfg.train.prompts_per_step = 8
    cfg.ppo.mini_batch_size = 8
    cfg.sft.batch_size = 8
    cfg.sft.max_len = 48
    if mesh:
        cfg.mesh = common.mesh_config(**mesh)
    return cfg


ALL = (
    "sampler.reshard", "sampler.prefill", "sampler.decode_step", "ppo.logprobs",
    "ppo.ref_logprobs", "ppo.values", "ppo.advantages", "ppo.update", "sft.train_step",
)  # fmt: skip


def _check_rows(report, names=ALL, capacity=None):
    assert [r.name for r in report.rows] == list(names)
    for r in report.rows:
        assert r.peak > 0, r
        if capacity is not None:
            assert r.peak + r.resident < capacity, r
    rows = {r.name: r for r in report.rows}
    # The update takes the whole train state (donated: aliased to its output).
    update = rows["ppo.update"]
    assert update.argument >= rows["sampler.prefill"].resident > 0
    assert update.alias > 0
    if "sampler.reshard" in rows:  # its arguments (the trainer's actor) are part of the state
        reshard = rows["sampler.reshard"]
        assert reshard.output > 0 and "trainer -> sampler" in reshard.note
        assert reshard.resident + reshard.argument == rows["sampler.prefill"].resident
    # 8 prompts x 2 samples = 16 rows of mini-batch 8: the scan body runs twice.
    assert rows["ppo.update"].note.startswith("2 mini-batches")
    # Per-chip FLOPs x chips against the analytic 2 x params x tokens of the forward pass
    # (attention and softmax add the rest).
    fwd = rows["ppo.logprobs"]
    assert 0.5 < fwd.flops * report.num_chips / fwd.model_flops < 3.0
    assert update.flops > 2 * fwd.flops  # backward of actor and critic on top


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e '.[tpu]')")
def test_tiny_config_compiles_for_v5e_2x2():
    report = aot.compile_all(tiny_config(), "v5e:2x2", reuse_programs=False)
    assert report.num_chips == 4 and report.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report.chip.name == "v5e"
    _check_rows(report, capacity=report.chip.hbm_bytes)
    # The reference's log-probs compile to the actor's program (what reuse_programs relies on).
    rows = {r.name: r for r in report.rows}
    fields = ("argument", "output", "temp", "peak", "flops", "bytes_accessed")
    ref, actor = rows["ppo.ref_logprobs"], rows["ppo.logprobs"]
    assert [getattr(ref, f) for f in fields] == [getattr(actor, f) for f in fields]
    assert 0 < report.step_seconds
    assert 0 < report.mfu_bound <= 1.0
    text = aot.format_report(report)
    assert "estimated PPO step (roofline)" in text and "fits 16 GiB HBM: yes" in text


def test_cpu_topology_reports_per_device_bytes_of_the_mesh():
    names = ("sampler.reshard", "sampler.prefill", "ppo.logprobs", "ppo.update")  # rest: TPU
    report = aot.compile_all(tiny_config(data=2, fsdp=4, tensor=1), "cpu", only=names)
    assert report.num_chips == 8 and report.chip is None
    _check_rows(report, names)
    # The sampler's copy is made leaf by leaf: every leaf's output stays, one leaf's buffers.
    reshard = report.rows[0]
    assert reshard.peak == reshard.argument + reshard.output + reshard.temp
    assert "leaves" in reshard.note and reshard.output > reshard.argument  # FSDP 4 gathered
    assert report.step_seconds is None
    assert "CPU-compiled estimate" in aot.format_report(report)


def test_fsdp_shards_the_train_state_per_chip():
    """Independent of XLA: the per-chip state bytes follow the mesh's FSDP size."""
    import jax

    devices = jax.devices("cpu")
    per_chip = {}
    for fsdp in (1, 4):
        cfg = tiny_config(data=8 // fsdp, fsdp=fsdp, tensor=1)
        mesh = sharding.make_mesh(cfg.mesh, devices=devices)
        per_chip[fsdp] = aot_steps.train_state_bytes_per_chip(cfg, mesh)
    # Weights and AdamW moments with an embed axis divisible by 4 shard 4 ways; biases,
    # norms and scalars stay replicated, so the ratio is a little above 1/4.
    ratio = per_chip[4] / per_chip[1]
    assert 0.25 <= ratio < 0.35, per_chip


def test_topology_names():
    with pytest.raises(ValueError, match="expected cpu"):
        aot.topology_devices("v5e-eight")
    with pytest.raises(ValueError, match="chips"):
        aot.topology_devices("v5e-12")


def test_a_program_xla_refuses_for_hbm_is_reported_as_not_fitting():
    """XLA:TPU's CompileTimeHbmOom (the message of a real refusal: Qwen2.5-3B's PPO update on
    v5e-8) becomes a row that does not fit, with XLA's figure as its peak; other errors raise."""
    message = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out "
        "of memory in memory space hbm. Used 15.79G of 15.75G hbm. Exceeded hbm capacity by "
        "38.77M."
    )

    class Refused:
        name, calls_per_step, loop_trips, model_flops, note = "ppo.update", 1, 1, 1e12, ""
        parts = ()

        def lower(self):
            raise RuntimeError(message)

    chip = aot.CHIPS["TPU v5 lite"]
    row = aot._compile(Refused(), chip, resident=0)
    assert not row.compiled and row.seconds is None
    assert row.peak == int(15.79 * aot.GiB) and "15.79G of 15.75G" in row.note
    ok = dataclasses.replace(row, name="ppo.values", compiled=True, peak=1, seconds=0.5)
    report = aot.Report("v5e-8", 8, {"data": 1, "fsdp": 8, "tensor": 1}, chip, [ok, row])
    assert report.fits is False and report.step_seconds is None and report.mfu_bound is None
    text = aot.format_report(report)
    assert "fits 16 GiB HBM: NO" in text and "did not compile" in text

    class Broken(Refused):
        def lower(self):
            raise RuntimeError("INVALID_ARGUMENT: something else")

    with pytest.raises(RuntimeError, match="something else"):
        aot._compile(Broken(), chip, resident=0)

    class Temporaries(Refused):  # the other wording (the same 3B with mesh.tensor=2)
        def lower(self):
            raise RuntimeError(
                "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                "temporaries (20.85G) exceeds available HBM (15.75G)."
            )

    row = aot._compile(Temporaries(), chip, resident=0)
    assert not row.compiled and row.peak == int(20.85 * aot.GiB) and "of 15.75G" in row.note


def test_the_docs_table_keeps_the_latest_compile_of_each_row_in_model_order(tmp_path):
    def record(preset, topology, chips, step, overrides=(), **extra):
        rows = [{"name": "ppo.update", "compiled": step is not None}]
        return {
            "preset": preset, "topology": topology, "chips": chips, "overrides": list(overrides),
            "mesh": {"data": 1, "fsdp": chips, "tensor": 1}, "hbm_bytes": 16 * aot.GiB,
            "max_chip_bytes": 6 * aot.GiB, "step_seconds": step, "mfu_bound": 0.1,
            "fits": step is not None, "rows": rows, **extra,
        }  # fmt: skip

    lines = [
        record("qwen2.5-7b", "v5e-8", 8, None),
        record("qwen2.5-0.5b", "v5p-32", 16, 0.9),
        record("qwen2.5-0.5b", "v5e-8", 8, 9.9),  # superseded by the re-run below
        record("qwen2.5-0.5b", "v5e-8", 8, 3.7),
        record("qwen2.5-0.5b", "v5e-8", 8, 2.0, overrides=["mesh.tensor=2"]),
    ]
    path = tmp_path / "aot.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    script = ROOT / "benchmarks" / "aot_table.py"  # a subprocess: its absl flags stay its own
    run = subprocess.run([sys.executable, str(script), f"--out={path}", "--markdown"],
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    body = [x for x in run.stdout.splitlines() if x.startswith("| q")]
    assert [row.split(" | ")[:2] for row in body] == [
        ["| qwen2.5-0.5b", "v5e-8 (8)"],
        ["| qwen2.5-0.5b", "v5e-8 (8)"],
        ["| qwen2.5-0.5b", "v5p-32 (16)"],
        ["| qwen2.5-7b", "v5e-8 (8)"],
    ]
    assert "3.7 s" in body[0] and "mesh.tensor=2" in body[1] and "2.0 s" in body[1]
    assert "**no** (XLA refused ppo.update)" in body[3] and "9.9 s" not in "\n".join(body)
