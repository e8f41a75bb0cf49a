"""Run comparison on fixture runs whose metrics.jsonl is written by the trainer's MetricsWriter."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from deepretrieval_jax import compare, metrics

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(workdir: Path, val_rewards, rewards, kl, step_s=1.0, name=None, overrides=None):
    """A run as the trainer logs it: a train record per step, a validation record every 2."""
    writer = metrics.MetricsWriter(workdir, enabled=True, tensorboard=False, progress=False)
    for i, (r, k) in enumerate(zip(rewards, kl, strict=True)):
        step = i + 1
        writer.write(step, {"reward/mean": r, "kl/mean": k, "time/step_s": step_s * step})
        if step % 2 == 0:
            v = val_rewards[step // 2 - 1]
            writer.write(step, {"val/reward/mean": v, "val/retrieval/ndcg@10": v / 2}, False)
    writer._jsonl.close()  # no close(): that would also draw the run's own reward plot
    if name is not None:
        point = {"name": name, "overrides": {**(overrides or {}), "train.num_steps": "4"},
                 "swept": overrides or {}, "command": "", "total_steps": 4}  # fmt: skip
        (workdir / "sweep_point.json").write_text(json.dumps(point))


@pytest.fixture
def sweep_root(tmp_path):
    root = tmp_path / "sweep"
    _write_run(
        root / "a", [0.1, 0.5], [0.1, 0.2, 0.3, 0.4], [0.0, 0.01, 0.02, 0.03], 1.0,
        name="actor_lr=1e-06", overrides={"ppo.actor_lr": "1e-06"},
    )  # fmt: skip
    _write_run(
        root / "b", [0.2, float("nan")], [0.5, 0.6, 0.7, 0.8], [0.0, 0.1, 0.2, 0.3], 2.0,
        name="actor_lr=3e-06", overrides={"ppo.actor_lr": "3e-06"},
    )  # fmt: skip
    (root / "not_a_run").mkdir()
    return root


def test_table_final_best_and_order(sweep_root):
    columns, rows = compare.table(compare.find_runs([sweep_root]))
    assert [r["run"] for r in rows] == ["actor_lr=1e-06", "actor_lr=3e-06"]  # best val first
    a, b = rows
    assert a["ppo.actor_lr"] == "1e-06" and a["steps"] == 4
    assert a["val/reward/mean final"] == 0.5 and a["val/reward/mean best"] == 0.5
    assert a["best step"] == 4 and a["val/retrieval/ndcg@10 final"] == 0.25
    assert a["reward final"] == 0.4 and a["reward last-10 mean"] == pytest.approx(0.25)
    assert a["KL final"] == 0.03 and a["step s (median)"] == 2.5
    # NaN at b's last validation is stored as null: final/best come from step 2.
    assert b["val/reward/mean final"] == 0.2 and b["best step"] == 2
    assert b["KL final"] == 0.3 and b["step s (median)"] == 5.0
    assert columns[:3] == ["run", "ppo.actor_lr", "steps"]

    _, rows = compare.table(compare.find_runs([sweep_root]), higher_is_better=False)
    assert [(r["run"], r["val/reward/mean best"], r["best step"]) for r in rows] == [
        ("actor_lr=1e-06", 0.1, 2),  # lowest first
        ("actor_lr=3e-06", 0.2, 2),
    ]


def test_compare_writes_markdown_csv_and_png(sweep_root, tmp_path):
    out = tmp_path / "out"
    written = compare.compare([sweep_root / "b", sweep_root / "a"], out)
    md = written["md"].read_text().splitlines()
    assert md[0].startswith("| run | ppo.actor_lr | steps | val/reward/mean final |")
    assert md[2].startswith("| actor_lr=1e-06 | 1e-06 | 4 | 0.5 | 0.5 | 4 |")
    rows = list(csv.DictReader(io.StringIO(written["csv"].read_text())))
    assert [r["run"] for r in rows] == ["actor_lr=1e-06", "actor_lr=3e-06"]
    assert float(rows[1]["KL final"]) == 0.3 and rows[0]["reward final"] == "0.4"
    png = written["png"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_plain_workdirs_without_sweep_point(tmp_path):
    _write_run(tmp_path / "run_x", [0.3, 0.4], [0.1] * 4, [0.0] * 4)
    _, rows = compare.table(compare.find_runs([tmp_path / "run_x"]))
    assert rows[0]["run"] == "run_x" and rows[0]["val/reward/mean best"] == 0.4
    assert compare.plot_curves([tmp_path / "run_x"], tmp_path / "c.png", ["no/such_key"]) is None


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        compare.find_runs([tmp_path / "missing"])
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run"):
        compare.find_runs([tmp_path / "empty_root"])
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="blank/metrics.jsonl: no metric records"):
        compare.summarize(tmp_path / "blank")


def test_launch_compare(sweep_root, tmp_path):
    cmd = [sys.executable, str(REPO / "launch" / "compare.py"), f"--workdirs={sweep_root}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "| actor_lr=1e-06 | 1e-06 | 4 |" in out.stdout
    assert (sweep_root / "comparison.png").read_bytes().startswith(PNG_MAGIC)
    bad = subprocess.run(
        [*cmd[:2], f"--workdirs={tmp_path / 'nope'},{sweep_root}", f"--out={tmp_path}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "nope" in bad.stderr
    typo = subprocess.run(
        [*cmd, "--metric=val/retrieval/ndgc@10"], capture_output=True, text=True, timeout=60
    )
    assert typo.returncode == 2 and "did you mean val/retrieval/ndcg@10?" in typo.stderr


def test_a_metric_no_run_logged_is_an_error(sweep_root):
    runs = compare.find_runs([sweep_root])
    with pytest.raises(ValueError, match=r"'reward/maen': no run logged it; did you mean"):
        compare.table(runs, "reward/maen")
