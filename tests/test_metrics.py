"""Tests for deepretrieval_jax.metrics: JSONL, TensorBoard events, resume truncation, plot."""

import json
import math
import subprocess
import sys

from deepretrieval_jax import metrics


def test_writer_jsonl_tensorboard_and_plot(tmp_path):
    w = metrics.MetricsWriter(tmp_path, total_steps=3, enabled=True, progress=False)
    w.write(1, {"reward/mean": 0.5, "kl/mean": 1e-3})
    w.write(2, {"reward/mean": float("nan"), "reward/task/scifact/mean": 0.25})
    w.write_texts(2, "samples", ["a", "b"])
    w.close()

    records = metrics.read_jsonl(tmp_path / metrics.JSONL_NAME)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["reward/mean"] == 0.5 and records[0]["kl/mean"] == 1e-3
    assert records[1]["reward/mean"] is None  # non-finite -> null, never a bare NaN token
    assert "NaN" not in (tmp_path / metrics.JSONL_NAME).read_text()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    png = tmp_path / metrics.PLOT_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "samples.jsonl").read_text())["texts"] == ["a", "b"]


def test_resume_drops_records_after_start_step(tmp_path):
    w = metrics.MetricsWriter(tmp_path, enabled=True, tensorboard=False, progress=False)
    for step in (1, 2, 3):
        w.write(step, {"reward/mean": float(step)})
    w.close()
    # Resume from the checkpoint of step 2: step 3 is re-done and must appear once.
    w = metrics.MetricsWriter(
        tmp_path, start_step=2, enabled=True, tensorboard=False, progress=False
    )
    w.write(3, {"reward/mean": 30.0})
    w.close()
    steps, values = metrics.series(metrics.read_jsonl(tmp_path / metrics.JSONL_NAME), "reward/mean")
    assert steps == [1, 2, 3] and values == [1.0, 2.0, 30.0]


def test_disabled_writer_touches_nothing(tmp_path):
    w = metrics.MetricsWriter(tmp_path / "run", enabled=False)
    w.write(1, {"reward/mean": 1.0})
    w.log("hello")
    w.close()
    assert not (tmp_path / "run").exists()


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / metrics.JSONL_NAME
    path.write_text('{"step": 1, "reward/mean": 1.0}\n{"step": 2, "rew')
    assert metrics.read_jsonl(path) == [{"step": 1, "reward/mean": 1.0}]


def test_plot_cli(tmp_path):
    (tmp_path / metrics.JSONL_NAME).write_text(
        "".join(json.dumps({"step": s, "reward/mean": math.sin(s)}) + "\n" for s in range(5))
    )
    out = subprocess.run(
        [sys.executable, "-m", "deepretrieval_jax.metrics", "plot", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().endswith(metrics.PLOT_NAME)
    assert (tmp_path / metrics.PLOT_NAME).stat().st_size > 1000
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = subprocess.run(
        [sys.executable, "-m", "deepretrieval_jax.metrics", "plot", "--workdir", str(empty)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "No reward metrics" in bad.stderr


def _tensorboard_scalars(tb_dir):
    """{tag: [values]} read back from tensorboardX event files (TFRecord framing)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


def test_bucket_metrics_keep_distinct_tensorboard_tags(tmp_path):
    w = metrics.MetricsWriter(tmp_path, enabled=True, progress=False)
    w.write(1, {"reward/bucket/ndcg=0": 3.0, "reward/bucket/ndcg>0": 5.0, "recall@10": 0.5})
    w.close()
    assert _tensorboard_scalars(tmp_path / "tb") == {
        "reward/bucket/ndcg_eq_0": [3.0],
        "reward/bucket/ndcg_gt_0": [5.0],
        "recall_at_10": [0.5],
    }
    assert metrics.tensorboard_tag("a\u00e9/b") == "a\u00e9/b"  # \w is Unicode-aware
    assert metrics.tensorboard_tag("a|b") == "a_u007c_b"
