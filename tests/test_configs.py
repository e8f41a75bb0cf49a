"""Every experiment config loads through config_flags, validates, and rejects unknown overrides."""

import pathlib
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from deepretrieval_jax import config as config_lib
from deepretrieval_jax.data import tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/*.py import `configs.common`, as the launchers allow
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common"))


def _parse(*argv):
    values = flags.FlagValues()
    argv = ["prog", *argv]
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


def _comment_lines(path):
    return [line for line in path.read_text().splitlines() if "=" in line and "#" in line]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_validates(path):
    cfg = _parse(f"--config={path}")
    config_lib.validate(cfg)
    assert cfg.data.task in tasks.list_tasks()
    from deepretrieval_jax.rl import policy_init

    if cfg.model.preset or cfg.model.hf_path:  # the demo's model is imported at run time
        model_cfg = policy_init.model_config(
            cfg
        )  # the preset and its overrides build a ModelConfig
        assert model_cfg.num_layers > 0
    text = path.read_text()
    assert "python launch/" in text and "Expected" in text, (
        f"{path.name}: docstring lacks launch/expected"
    )


def test_demo_overrides_apply_and_unknown_fields_fail():
    demo = str(ROOT / "configs" / "demo.py")
    cfg = _parse(f"--config={demo}", "--config.ppo.clip_low=0.1", "--config.train.num_steps=7")
    assert cfg.ppo.clip_low == 0.1 and cfg.train.num_steps == 7
    with pytest.raises(Exception, match="nonexistent"):
        _parse(f"--config={demo}", "--config.ppo.nonexistent=1")
    with pytest.raises(Exception, match="clip_epsilon"):
        _parse(f"--config={demo}", "--config.ppo.clip_epsilon=0.1")


def test_every_common_field_is_commented():
    # Lines assigning a field inside dict(...) blocks of common.py must carry a comment.
    text = (ROOT / "configs" / "common.py").read_text().splitlines()
    fields = [
        ln
        for ln in text
        if ln.startswith("            ") and "=" in ln and ln.rstrip().endswith(",")
    ]
    uncommented = [ln.strip() for ln in fields if "#" not in ln and "ConfigDict(" not in ln]
    assert not uncommented, f"configs/common.py fields without a comment: {uncommented}"


def test_validation_names_the_field():
    cfg = _parse(f"--config={ROOT / 'configs' / 'demo.py'}")
    cfg.unlock()
    cfg.ppo.micro_batch_size = 0
    cfg.ppo.mini_batch_size = 5
    with pytest.raises(ValueError, match="ppo.mini_batch_size"):
        config_lib.validate(cfg)
    cfg.ppo.mini_batch_size = 8
    with pytest.raises(ValueError, match="number of processes"):
        config_lib.validate(cfg, num_processes=3)
    with pytest.raises(ValueError, match=r"config.train: unknown field\(s\) \['bogus'\]"):
        config_lib.to_dataclass(config_lib.TrainConfig, {"bogus": 1}, "train")
    with pytest.raises(ValueError, match="config.train: train.num_steps must be positive"):
        config_lib.to_dataclass(config_lib.TrainConfig, {"num_steps": 0}, "train")


def test_data_dir_env_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv(config_lib.DATA_DIR_ENV, str(tmp_path))
    assert config_lib.resolve_data_dir("") == tmp_path
    monkeypatch.delenv(config_lib.DATA_DIR_ENV)
    with pytest.raises(ValueError, match="DEEPRETRIEVAL_DATA_DIR"):
        config_lib.resolve_data_dir("")
    with pytest.raises(FileNotFoundError, match="config.data.data_dir"):
        config_lib.resolve_data_dir(str(tmp_path / "missing"))


def test_launch_train_rejects_an_unknown_override_before_any_work(tmp_path):
    import subprocess

    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), f"--config={ROOT / 'configs/demo.py'}",
         f"--workdir={tmp_path / 'w'}", "--config.ppo.no_such_field=1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    fields = ", ".join(sorted(_parse(f"--config={ROOT / 'configs/demo.py'}").ppo))
    assert out.stderr.strip().splitlines()[-1] == (
        "error: --config.ppo.no_such_field=1: config.ppo has no field 'no_such_field' "
        f"(fields: {fields})"
    )
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_rejects_an_unknown_argument(path):
    with pytest.raises(Exception, match=r"unknown arg\(s\) \['bogus'\]"):
        _parse(f"--config={path}:bogus")


def _launch(*argv, timeout=120):
    import subprocess

    return subprocess.run(
        [sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_config_and_workdir():
    out = _launch(ROOT / "launch" / "sft.py", "--help")
    assert "--config:" in out.stdout and "--workdir:" in out.stdout
    assert "--coordinator_address:" in out.stdout


def test_user_error_is_one_line_exit_2_and_the_resolved_config_is_saved(tmp_path):
    import json

    workdir = tmp_path / "w"
    out = _launch(
        ROOT / "launch" / "eval.py", f"--config={ROOT / 'configs/eval_demo.py'}",
        f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'missing'}",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: config.data.data_dir: {tmp_path / 'missing'} is not a dir")
    assert "Traceback" not in out.stderr
    record = json.loads((workdir / "config.json").read_text())
    assert record["config"]["data"]["data_dir"] == str(tmp_path / "missing")
    assert record["argv"][-1] == f"--config.data.data_dir={tmp_path / 'missing'}"
    assert record["entry"] == "deepretrieval_jax.eval:run"


def test_bad_config_argument_is_one_line_exit_2(tmp_path):
    out = _launch(
        ROOT / "launch" / "train.py", f"--config={ROOT / 'configs/pubmed.py'}:reason",
        f"--workdir={tmp_path}",
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: ValueError: configs/pubmed.py: unknown arg(s) ['reason']; use no_reason"
    ]


def test_scifact_dense_variants_name_the_dense_task_and_its_encoder():
    scifact, evals = ROOT / "configs" / "scifact.py", ROOT / "configs" / "eval_scifact.py"
    cfg = _parse(f"--config={scifact}:dense,no_reason", "--config.reward.search_opts.model=minilm")
    assert cfg.data.task == "scifact_dense_no_reason"
    assert dict(cfg.reward.search_opts) == {"model": "minilm", "top_k": 1000}
    cfg = _parse(f"--config={evals}:policy,dense")
    assert (cfg.data.task, cfg.eval.method) == ("scifact_dense", "policy")
    assert dict(cfg.reward.search_opts) == {"model": "BAAI/bge-base-en-v1.5", "top_k": 100}
    assert _parse(f"--config={evals}").reward.search_opts.k1 == 1.2
    from configs import scifact as scifact_config

    with pytest.raises(ValueError, match=r"unknown arg\(s\) \['sparse'\]; use dense,no_reason"):
        scifact_config.get_config("dense,sparse")


def test_demo_launcher_with_its_default_config_reports_a_bad_override(tmp_path):
    out = _launch(ROOT / "launch" / "demo.py", f"--workdir={tmp_path}", "--config.sft.bogus=1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --config.sft.bogus=1: config.sft has no field 'bogus'")
    )
