"""Weights & Biases logging in offline mode (no network): records, samples, config, resume."""

import json
import re

import pytest

from deepretrieval_jax import metrics

wandb = pytest.importorskip("wandb")


def _logged(data: bytes, key: str) -> list:
    """Values logged under `key`, in order, from an offline run's .wandb file: each history
    item is a protobuf message {2: key, 16: value_json}, both length-prefixed (short here)."""
    k = key.encode()
    pattern = re.compile(re.escape(b"\x12" + bytes([len(k)]) + k + b"\x82\x01") + b"(.)", re.S)
    return [json.loads(data[m.end() : m.end() + m.group(1)[0]]) for m in pattern.finditer(data)]


def _offline_runs(workdir):
    return sorted((workdir / "wandb").glob("offline-run-*"))


def test_offline_run_gets_the_records_and_the_resolved_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", "")  # offline: no key, no login, no network
    (tmp_path / "config.json").write_text(
        json.dumps({"config": {"ppo": {"kl_coef": 0.01}}, "argv": ["launch/train.py"]})
    )
    settings = {"enabled": True, "mode": "offline", "project": "tests", "tags": ("ci",)}
    w = metrics.MetricsWriter(tmp_path, enabled=True, tensorboard=False, progress=False,
                              wandb=settings)  # fmt: skip
    w.write(1, {"reward/mean": 0.25, "reward/bucket/ndcg>0": 3.0})
    w.write(2, {"reward/mean": 0.5})
    w.write_texts(2, "train/completions", ["<answer>{}</answer>"])
    w.close()
    (run,) = _offline_runs(tmp_path)
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert run.name.endswith(run_id) and (run / f"run-{run_id}.wandb").stat().st_size > 0
    data = (run / f"run-{run_id}.wandb").read_bytes()
    values = _logged(data, "reward/mean")  # history rows, then the summary
    assert values[0] == 0.25 and values[-1] == 0.5
    assert _logged(data, "reward/bucket/ndcg>0")[0] == 3.0  # W&B keeps the key as it is
    assert b"kl_coef" in data and b"launch/train.py" in data  # the resolved config
    assert list((run / "files" / "media" / "table" / "train").glob("completions_2_*.table.json"))

    # A resumed run (same workdir) continues the same W&B run id.
    w = metrics.MetricsWriter(tmp_path, start_step=2, enabled=True, tensorboard=False,
                              progress=False, wandb=settings)  # fmt: skip
    w.write(3, {"reward/mean": 0.75})
    w.close()
    assert all(r.name.endswith(run_id) for r in _offline_runs(tmp_path))


def test_disabled_by_default_and_bad_mode_is_a_config_error(tmp_path):
    w = metrics.MetricsWriter(tmp_path, enabled=True, tensorboard=False, progress=False,
                              wandb={"enabled": False})  # fmt: skip
    w.write(1, {"reward/mean": 0.5})
    w.close()
    assert not (tmp_path / "wandb").exists()
    with pytest.raises(ValueError, match="config.logging.wandb.mode"):
        metrics.MetricsWriter(tmp_path, enabled=True, tensorboard=False, progress=False,
                              wandb={"enabled": True, "mode": "offlne"})  # fmt: skip
