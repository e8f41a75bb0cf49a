"""gs:// workdirs without a network: an in-memory fsspec filesystem stands in for GCS.

What runs here through `etils.epath` on the fake bucket: metrics.jsonl, TensorBoard events,
samples and the reward plot (staged locally, copied by `workdir.Mirror`, resumed from the
bucket), WORKDIR/config.json, an older run's vocab map, an HF export, and launch/compare.py's
runs (a sweep root in the bucket) and outputs. Orbax checkpoints are not
covered (orbax writes arrays with tensorstore, whose GCS driver needs the real service); only
that the gs:// URL reaches orbax intact.
"""

import json

import fsspec
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from deepretrieval_jax import metrics, workdir


class FakeGCS(MemoryFileSystem):
    """MemoryFileSystem answering to gs:// (its store is a fresh dict per test)."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]


@pytest.fixture
def bucket():
    FakeGCS.store, FakeGCS.pseudo_dirs = {}, [""]
    for name in FakeGCS.protocol:
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    yield epath.Path("gs://bucket")
    epath.backend.fsspec_backend._get_filesystem.cache_clear()


def test_metrics_tensorboard_and_plot_land_in_the_bucket_and_resume(bucket):
    run = "gs://bucket/runs/a"
    w = metrics.MetricsWriter(run, total_steps=3, enabled=True, progress=False)
    w.write(1, {"reward/mean": 0.25})
    w.write(2, {"reward/mean": 0.5})
    w.write_texts(2, "val/completions", ["<answer>x</answer>"])
    w.close()
    remote = bucket / "runs" / "a"
    assert [r["step"] for r in metrics.read_jsonl(f"{run}/metrics.jsonl")] == [1, 2]
    assert list((remote / "tb").iterdir()) and (remote / "samples.jsonl").exists()
    assert (remote / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert any("bucket/runs/a/metrics.jsonl" in k for k in FakeGCS.store)  # in the fake bucket

    # Resumed from step 1: the bucket's log is pulled, step 2 is dropped and written again.
    w = metrics.MetricsWriter(run, start_step=1, enabled=True, progress=False)
    w.write(2, {"reward/mean": 0.75})
    w.close()
    records = metrics.read_jsonl(f"{run}/metrics.jsonl")
    assert [(r["step"], r["reward/mean"]) for r in records] == [(1, 0.25), (2, 0.75)]
    assert len(list((remote / "tb").iterdir())) == 2  # both runs' event files


def test_run_config_vocab_map_and_checkpoint_paths_keep_the_url(bucket):
    import ml_collections

    from deepretrieval_jax import checkpoint, export, runtime

    cfg = ml_collections.ConfigDict({"model": {"compact_vocab": True}})
    assert runtime.write_run_config(cfg, "gs://bucket/r", "x:y") == "gs://bucket/r/config.json"
    assert json.loads((bucket / "r" / "config.json").read_text())["config"] == cfg.to_dict()
    # An older compact-vocabulary run's map (model id i = tokenizer id ids[i]).
    (bucket / "r" / "vocab_map.json").write_text(json.dumps({"ids": [0, 5, 9]}))
    ckpt_dir = workdir.as_path("gs://bucket/r") / "checkpoints"  # what the trainer builds
    assert str(checkpoint._as_path(str(ckpt_dir))) == "gs://bucket/r/checkpoints"
    plan = export.plan_export("gs://bucket/r/checkpoints", 256, eos_ids=[5])
    assert plan.vocab_map["ids"] == [0, 5, 9] and plan.generation_config["eos_token_id"] == [1]


def test_hf_export_to_the_bucket(bucket, tmp_path):
    from tiny_models import random_params

    from deepretrieval_jax import export
    from deepretrieval_jax.checkpoint import CheckpointManager
    from deepretrieval_jax.models import CausalLM, ModelConfig

    config = ModelConfig.tiny()
    params = random_params(CausalLM(config), config, seed=2)
    with CheckpointManager(tmp_path / "ckpt", async_save=False) as mgr:
        mgr.save(1, {"actor_params": params})
    plan = export.plan_export(tmp_path / "ckpt", config.vocab_size, eos_ids=[3])
    out = export.export_run(tmp_path / "ckpt", "gs://bucket/hf", config, plan)
    assert str(out) == "gs://bucket/hf"
    names = sorted(p.name for p in (bucket / "hf").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    from safetensors.numpy import load

    tensors = load((bucket / "hf" / "model.safetensors").read_bytes())
    np.testing.assert_array_equal(
        tensors["model.embed_tokens.weight"],
        np.asarray(params["transformer"]["embedder"]["embedding"]),
    )


def test_compare_reads_runs_from_the_bucket_and_writes_there(bucket):
    from deepretrieval_jax import compare

    for name, reward in (("lr=1", 0.2), ("lr=2", 0.5)):
        run = bucket / "sweep" / name
        run.mkdir(parents=True)
        lines = [{"step": s, "time": 0.0, "reward/mean": reward * s, "time/step_s": 1.0}
                 for s in (1, 2)]  # fmt: skip
        (run / metrics.JSONL_NAME).write_text("".join(json.dumps(r) + "\n" for r in lines))
        (run / "sweep_point.json").write_text(json.dumps({"name": name, "swept": {"lr": name}}))
    (bucket / "sweep" / "notes").mkdir()  # not a run: skipped
    runs = compare.find_runs(["gs://bucket/sweep"])
    assert [str(r) for r in runs] == ["gs://bucket/sweep/lr=1", "gs://bucket/sweep/lr=2"]
    written = compare.compare(["gs://bucket/sweep"], "gs://bucket/out", metric="reward/mean")
    assert sorted(written) == ["csv", "md", "png"]
    table = (bucket / "out" / compare.TABLE_NAME).read_text()
    assert table.index("lr=2") < table.index("lr=1")  # best reward first
    assert (bucket / "out" / compare.PLOT_NAME).read_bytes().startswith(b"\x89PNG")
    with pytest.raises(FileNotFoundError, match="gs://bucket/nothing: no such run directory"):
        compare.find_runs(["gs://bucket/nothing"])


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_read_run_record_tells_a_run_record_from_other_config_files(where, bucket, tmp_path):
    root = bucket / "runs" if where == "bucket" else epath.Path(tmp_path)
    root.mkdir(parents=True, exist_ok=True)
    path = root / workdir.RUN_CONFIG_FILE
    assert workdir.read_run_record(path) is None  # no file
    path.write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    assert workdir.read_run_record(path) is None  # a Hugging Face model's config.json
    record = {"entry": "train", "argv": ["launch/train.py"], "config": {"data": {"task": "nq"}}}
    path.write_text(json.dumps(record))
    assert workdir.read_run_record(str(path)) == record
    path.write_text('{"config": {"data": ')  # cut short by a crash
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        workdir.read_run_record(path)
