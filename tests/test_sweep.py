"""Sweeps (sweep.py, sweep_runner.py): expansion and names, validation against the config,
the local runner (skip finished, resume interrupted) with real subprocesses, TPU/SLURM scripts.

The runner tests run a stand-in training script (written below, no JAX) that behaves like
launch/train.py on disk: it resumes from the newest finalised checkpoint in WORKDIR/checkpoints,
writes `checkpoints/<step>/commit_success.txt` (orbax's commit marker, what the trainer's
CheckpointManager counts) and metrics.jsonl, and can be made to crash mid-run.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deepretrieval_jax import sweep as hyper
from deepretrieval_jax import sweep_runner as runner

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "tests" / "tiny_config.py")  # the tiny random-init policy

FAKE_TRAIN = textwrap.dedent(
    """
    import argparse, json, os, sys
    from pathlib import Path
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--workdir")
    p.add_argument("--config.train.num_steps", dest="steps", type=int)
    args, _ = p.parse_known_args()
    wd = Path(args.workdir)
    ckpts = wd / "checkpoints"
    done = [int(d.name) for d in ckpts.glob("*") if (d / "commit_success.txt").exists()]
    start = max(done, default=0)
    with open(wd.parent / "invocations.jsonl", "a") as f:
        f.write(json.dumps({"name": wd.name, "start": start, "argv": sys.argv[1:],
                            "cpus": sorted(os.sched_getaffinity(0)),
                            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
    crash = os.environ.get("FAKE_CRASH_POINT") == wd.name
    for step in range(start + 1, args.steps + 1):
        (ckpts / str(step)).mkdir(parents=True, exist_ok=True)
        if crash and step == 3:  # torn save: no commit marker, then die
            sys.exit(3)
        (ckpts / str(step) / "commit_success.txt").write_text("")
        with open(wd / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "time": 0.0, "reward/mean": step / 10}) + "\\n")
    """
)


# ----------------------------------------------------------------------------- expansion


def test_product_order_and_names():
    points = hyper.product(
        [
            hyper.sweep("config.ppo.actor_lr", [1e-6, 3e-6]),
            hyper.sweep("ppo.kl_coef", [0.001, 0.01]),
        ]
    )
    assert [p.name for p in points] == [
        "actor_lr=1e-06,kl_coef=0.001",
        "actor_lr=1e-06,kl_coef=0.01",
        "actor_lr=3e-06,kl_coef=0.001",
        "actor_lr=3e-06,kl_coef=0.01",
    ]
    assert points[1].as_dict() == {"ppo.actor_lr": 1e-6, "ppo.kl_coef": 0.01}
    # Varargs form gives the same points.
    same = hyper.product(
        hyper.sweep("ppo.actor_lr", [1e-6, 3e-6]), hyper.sweep("ppo.kl_coef", [0.001, 0.01])
    )
    assert same == points


def test_zip_fixed_hidden_named_and_clashing_leaf_names():
    points = hyper.product(
        hyper.zip(
            hyper.sweep("model.preset", ["qwen2.5-0.5b", "qwen2.5-3b"], name="model"),
            hyper.sweep("model.hf_path", ["/c/a", "/c/b"], hidden=True),
        ),
        hyper.fixed("train.num_steps", 7),
    )
    assert [p.name for p in points] == ["model=qwen2.5-0.5b", "model=qwen2.5-3b"]
    assert points[1].as_dict() == {
        "model.preset": "qwen2.5-3b",
        "model.hf_path": "/c/b",
        "train.num_steps": 7,
    }
    clash = hyper.product(hyper.sweep("ppo.entropy_coef", [0.0]), hyper.sweep("sft.lr", [1e-3]))
    assert clash[0].name == "entropy_coef=0.0,lr=0.001"
    same_leaf = hyper.product(hyper.sweep("sft.lr", [1.0]), hyper.sweep("x.lr", [2.0]))
    assert same_leaf[0].name == "sft.lr=1.0,x.lr=2.0"
    base = hyper.named("baseline", {"config.ppo.kl_coef": 0.0})
    assert base[0].name == "baseline" and base[0].as_dict() == {"ppo.kl_coef": 0.0}
    tup = hyper.sweep("data.prompt_buckets", [(256,), (128, 256)])
    assert [p.dirname for p in tup] == ["prompt_buckets=_256,_", "prompt_buckets=_128,_256_"]


def test_expansion_errors():
    with pytest.raises(hyper.SweepError, match=r"equal length, got lengths \[2, 3\]"):
        hyper.zip(hyper.sweep("a", [1, 2]), hyper.sweep("b", [1, 2, 3]))
    with pytest.raises(hyper.SweepError, match="empty list of values"):
        hyper.sweep("ppo.kl_coef", [])
    with pytest.raises(hyper.SweepError, match="config.a is set by two combined sweeps"):
        hyper.product(hyper.sweep("a", [1]), hyper.sweep("config.a", [2]))
    with pytest.raises(hyper.SweepError, match="not a sweep"):
        hyper.product(hyper.sweep("a", [1]), {"b": 2})
    with pytest.raises(hyper.SweepError, match="share the name"):
        hyper.check_names(hyper.sweep("a", [1, 1]))
    with pytest.raises(hyper.SweepError, match="no points"):
        hyper.check_names([])


def test_format_value_reads_back_through_config_flags():
    assert [hyper.format_value(v) for v in (1e-6, 0.001, 3, True, "x", (256,), (1, 2))] == [
        "1e-06", "0.001", "3", "True", "x", "(256,)", "(1, 2)",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- validation


def _write_sweep(tmp_path, body: str) -> str:
    path = tmp_path / "my_sweep.py"
    path.write_text("from deepretrieval_jax import sweep as hyper\n\n\n" + textwrap.dedent(body))
    return str(path)


@pytest.mark.parametrize(
    "points, message",
    [
        (hyper.sweep("ppo.no_such_field", [1.0]), r"config.ppo.no_such_field=1.0: .*no field"),
        (hyper.sweep("nope.lr", [1.0]), r"config.nope.lr=1.0"),
        (hyper.sweep("ppo.actor_lr", ["abc"]), r"config.ppo.actor_lr='abc'.*float"),
        (hyper.sweep("train.num_steps", [1.5]), r"config.train.num_steps=1.5"),
        (hyper.sweep("ppo.mini_batch_size", [5]), r"mini_batch_size=5.*divisible by"),
        (hyper.sweep("train.num_steps", [0]), r"train.num_steps must be positive"),
    ],
)
def test_plan_rejects_bad_points(tmp_path, points, message):
    good = hyper.sweep("ppo.kl_coef", [0.01])
    with pytest.raises(hyper.SweepError, match=message):
        hyper.plan(DEMO, good + points, tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_plan_resolves_configs_as_train_sees_them(tmp_path):
    points = hyper.product(
        hyper.sweep("ppo.actor_lr", [3e-5]), hyper.sweep("data.prompt_buckets", [(384, 512)])
    )
    (run,) = hyper.plan(DEMO, points, tmp_path, extra=["train.num_steps=5"])
    assert run.config.ppo.actor_lr == 3e-5 and run.config.data.prompt_buckets == (384, 512)
    assert run.total_steps == 5 and run.workdir == tmp_path / points[0].dirname
    with pytest.raises(hyper.SweepError, match="both a shared override and swept"):
        hyper.plan(DEMO, points, tmp_path, extra=["ppo.actor_lr=1e-3"])
    for field in ("data.task", "train.no_such_steps"):
        with pytest.raises(hyper.SweepError, match=f"steps_field '{field}' is not an int field"):
            hyper.plan(DEMO, points, tmp_path, steps_field=field)
    with pytest.raises(hyper.SweepError, match=r"train.num_steps=many: invalid literal for int"):
        hyper.plan(DEMO, points, tmp_path, extra=["train.num_steps=many"])


def test_load_sweep_errors(tmp_path):
    with pytest.raises(hyper.SweepError, match="does not exist"):
        hyper.load_sweep(str(tmp_path / "missing.py"))
    with pytest.raises(hyper.SweepError, match="defines no get_sweep"):
        hyper.load_sweep(_write_sweep(tmp_path, "X = 1\n"))
    with pytest.raises(hyper.SweepError, match="no points"):
        hyper.load_sweep(_write_sweep(tmp_path, "def get_sweep(arg=None):\n    return []\n"))
    spec = _write_sweep(
        tmp_path,
        """
        def get_sweep(arg=None):
            return hyper.sweep("ppo.kl_coef", [0.1] if arg == "one" else [0.1, 0.2])
        """,
    )
    assert len(hyper.load_sweep(spec)) == 2 and len(hyper.load_sweep(spec + ":one")) == 1
    assert len(hyper.load_sweep(str(REPO / "configs/sweeps/demo_ppo.py"))) == 6


# ----------------------------------------------------------------------------- local runner


def _invocations(root: Path) -> list[dict]:
    path = root / "invocations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_local_runner_skips_finished_and_resumes_interrupted(tmp_path, monkeypatch):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    spec = _write_sweep(
        tmp_path,
        """
        def get_sweep(arg=None):
            return hyper.product(
                hyper.sweep("config.ppo.actor_lr", [1e-5, 2e-5, 3e-5]), hyper.fixed("seed", 5)
            )
        """,
    )
    root = tmp_path / "root"
    kw = dict(sweep_spec=spec, extra=["train.num_steps=4"], script=str(fake), log=lambda m: None)
    monkeypatch.setenv("FAKE_CRASH_POINT", "actor_lr=2e-05")
    assert runner.execute(DEMO, root, parallel=2, **kw) == 1  # one point crashed
    first = _invocations(root)
    assert sorted(i["name"] for i in first) == [
        "actor_lr=1e-05",
        "actor_lr=2e-05",
        "actor_lr=3e-05",
    ]
    assert all(i["start"] == 0 for i in first)
    crashed = root / "actor_lr=2e-05"
    assert hyper.finished_step(crashed) == 2  # step 3 has no commit marker
    saved = json.loads((crashed / "config.json").read_text())
    assert saved["ppo"]["actor_lr"] == 2e-5 and saved["train"]["num_steps"] == 4
    points = {p["name"]: p for p in json.loads((root / "sweep.json").read_text())}
    assert points["actor_lr=2e-05"]["overrides"] == {"ppo.actor_lr": "2e-05", "seed": "5"}
    assert points["actor_lr=2e-05"]["swept"] == {"ppo.actor_lr": "2e-05"}

    monkeypatch.delenv("FAKE_CRASH_POINT")
    assert runner.execute(DEMO, root, **kw) == 0
    second = _invocations(root)[len(first) :]
    assert [(i["name"], i["start"]) for i in second] == [("actor_lr=2e-05", 2)]
    steps = [
        json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]
    assert "--config.ppo.actor_lr=2e-05" in second[0]["argv"]

    assert runner.execute(DEMO, root, **kw) == 0
    assert len(_invocations(root)) == len(first) + 1  # everything finished: nothing ran
    statuses = {p["name"]: p["status"] for p in json.loads((root / "sweep.json").read_text())}
    assert set(statuses.values()) == {"finished"}
    messages = []
    changed = dict(kw, extra=["train.num_steps=4", "ppo.kl_coef=0.5"], log=messages.append)
    assert runner.execute(DEMO, root, **changed) == 0
    assert sum("WARNING: its config differs" in m for m in messages) == 3


def test_local_runner_pins_each_slot(tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    spec = _write_sweep(
        tmp_path, "def get_sweep(arg=None):\n    return hyper.sweep('seed', [1, 2, 3, 4])\n"
    )
    root = tmp_path / "root"
    code = runner.execute(
        DEMO, root, spec, extra=["train.num_steps=1"], script=str(fake), parallel=2,
        gpus_per_run=2, cpus_per_run=1, log=lambda m: None,
    )  # fmt: skip
    assert code == 0
    calls = _invocations(root)
    assert len(calls) == 4
    slots = {0: ([runner.slot_cpus(0, 1)[0]], "0,1"), 1: ([runner.slot_cpus(1, 1)[0]], "2,3")}
    for call in calls:
        assert (call["cpus"], call["gpus"]) in slots.values()
    assert runner.slot_env(1, 2) == {"CUDA_VISIBLE_DEVICES": "2,3"} and runner.slot_env(0, 0) == {}


def test_bad_point_stops_before_anything_runs(tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    spec = _write_sweep(
        tmp_path,
        "def get_sweep(arg=None):\n    return hyper.sweep('ppo.kl_coef', [0.1, 'high'])\n",
    )
    with pytest.raises(hyper.SweepError, match=r"kl_coef='high'"):
        runner.execute(DEMO, tmp_path / "root", spec, script=str(fake), log=lambda m: None)
    assert not (tmp_path / "root").exists() and not _invocations(tmp_path / "root")


# ----------------------------------------------------------------------------- cluster scripts


def _launch(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "sweep.py"), *args],
        capture_output=True, text=True, cwd=cwd, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip


def test_launch_print_and_slurm_leave_out_finished_points(tmp_path):
    root = tmp_path / "root"
    args = ["--config=configs/demo.py", "--sweep=configs/sweeps/demo_ppo.py", f"--workdir={root}"]
    done = root / "actor_lr=2e-06,temperature=0.7" / "checkpoints" / "40"
    done.mkdir(parents=True)
    (done / "commit_success.txt").write_text("")
    out = _launch(*args, "--mode=slurm", "--sbatch=--time=1:00:00", "--parallel=2")
    assert out.returncode == 0, out.stderr
    script = (root / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-4%2" in script and "#SBATCH --time=1:00:00" in script
    assert "temperature=0.7 --config.ppo.actor_lr=2e-06 " not in script  # finished: left out
    assert f"--workdir={root}/actor_lr=1e-05,temperature=1.0 --config.ppo.actor_lr=1e-05" in script
    assert subprocess.run(["bash", "-n", str(root / "sweep.sbatch")]).returncode == 0

    out = _launch(*args, "--mode=tpu", "--tpu_name=v5p-64", "--zone=us-east5-a")
    assert out.returncode == 0, out.stderr
    tpu = (root / "tpu_sweep.sh").read_text()
    assert tpu.count("TPU_NAME=v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh launch/train.py") == 5
    assert subprocess.run(["bash", "-n", str(root / "tpu_sweep.sh")]).returncode == 0

    out = _launch(*args, "--mode=print")
    lines = [x for x in out.stdout.splitlines() if x.startswith("python3 launch/train.py")]
    assert len(lines) == 5 and "--config=configs/demo.py" in lines[0]


def test_launch_reports_bad_sweep_clearly(tmp_path):
    spec = _write_sweep(
        tmp_path, "def get_sweep(arg=None):\n    return hyper.sweep('ppo.kl_coeff', [0.1])\n"
    )
    out = _launch("--config=configs/demo.py", f"--sweep={spec}", f"--workdir={tmp_path / 'r'}")
    assert out.returncode == 1
    assert "Sweep error: sweep point 'kl_coeff=0.1': config.ppo.kl_coeff=0.1" in out.stderr
    assert not (tmp_path / "r").exists()


def test_sequential_runs_start_in_sweep_order(tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    spec = _write_sweep(
        tmp_path, "def get_sweep(arg=None):\n    return hyper.sweep('seed', [3, 1, 2])\n"
    )
    root = tmp_path / "root"
    code = runner.execute(
        DEMO, root, spec, extra=["train.num_steps=1"], script=str(fake), log=lambda m: None
    )
    assert code == 0
    assert [i["name"] for i in _invocations(root)] == ["seed=3", "seed=1", "seed=2"]
    assert "fake_train.py" in (root / "seed=1" / "sweep_point.json").read_text()


TINY_DEMO = [  # tests/tiny_config.py shrunk so one point takes ~1 minute on 2 cores
    "model.overrides.num_layers=1",
    "model.overrides.embed_dim=32",
    "model.overrides.mlp_dim=64",
    "train.prompts_per_step=8",
    "ppo.mini_batch_size=8",
    "sampling.max_new_tokens=4",
    "data.num_val_examples=8",
    "train.val_every=0",
    "logging.tensorboard=False",
    "logging.progress=False",
]


@pytest.mark.skipif(
    not os.environ.get("DEEPRETRIEVAL_SLOW_TESTS"),
    reason="runs launch/train.py for real (~2-4 min on 2 cores); set DEEPRETRIEVAL_SLOW_TESTS=1",
)
def test_real_trainer_point_finishes_resumes_and_is_skipped(tmp_path, monkeypatch):
    data = Path(os.environ.get("DEEPRETRIEVAL_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (data / "scifact" / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact (BEIR layout) not under {data}")
    monkeypatch.setenv("DEEPRETRIEVAL_DATA_DIR", str(data))
    spec = _write_sweep(
        tmp_path, "def get_sweep(arg=None):\n    return hyper.sweep('ppo.actor_lr', [1e-4])\n"
    )
    root, kw = tmp_path / "root", dict(sweep_spec=spec, log=lambda m: None)
    workdir = root / "actor_lr=0.0001"
    assert runner.execute(DEMO, root, extra=[*TINY_DEMO, "train.num_steps=1"], **kw) == 0
    assert hyper.finished_step(workdir) == 1
    # The same point with more steps: not finished, so the trainer resumes from step 1.
    assert runner.execute(DEMO, root, extra=[*TINY_DEMO, "train.num_steps=2"], **kw) == 0
    assert hyper.finished_step(workdir) == 2
    log = (workdir / "train.log").read_text()
    assert "Resumed from" in log and "step 1" in log
    train_steps = [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").open())
                   if "reward/mean" in r]  # fmt: skip
    assert train_steps == [1, 2]
    assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 2
    size = len(log)
    assert runner.execute(DEMO, root, extra=[*TINY_DEMO, "train.num_steps=2"], **kw) == 0
    assert len((workdir / "train.log").read_text()) == size  # finished: not launched again


FAKE_WAITING_TRAIN = textwrap.dedent(
    """
    import signal, sys
    from pathlib import Path
    wd = Path([a for a in sys.argv if a.startswith("--workdir=")][0].split("=", 1)[1])
    def on_term(signum, frame):
        (wd / "got_sigterm").write_text("")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    (wd / "started").write_text("")
    while True:
        signal.pause()
    """
)


def test_ctrl_c_forwards_sigterm_to_running_points(tmp_path):
    fake = tmp_path / "fake_wait.py"
    fake.write_text(FAKE_WAITING_TRAIN)
    spec = _write_sweep(tmp_path, "def get_sweep(arg=None):\n    return hyper.sweep('seed', [1])\n")
    root = tmp_path / "root"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "sweep.py"), f"--config={DEMO}", f"--sweep={spec}",
         f"--workdir={root}", f"--script={fake}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    started = root / "seed=1" / "started"
    for _ in range(600):  # wait (up to 60 s) for the point to be running
        if started.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert started.exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert (root / "seed=1" / "got_sigterm").exists(), out
    assert "Interrupted: SIGTERM to running points" in out


def test_slurm_script_activates_the_project_venv(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "activate").write_text(f"export VIRTUAL_ENV={repo / '.venv'}\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text('#!/bin/sh\necho "venv=$VIRTUAL_ENV cmd=$*"\n')
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setattr(runner, "REPO_ROOT", repo)
    run = hyper.Run(hyper.Point(()), tmp_path / "w", None, 1, ["python", "train.py"])
    script = tmp_path / "sweep.sbatch"
    script.write_text(runner.slurm_script([run], tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PATH=f"{fake_bin}:{env['PATH']}", SLURM_ARRAY_TASK_ID="0")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == f"venv={repo / '.venv'} cmd=python train.py", out.stderr


def test_objectives_sweep_points_validate_against_the_demo_config(tmp_path):
    """configs/sweeps/objectives.py: every objective point is a valid demo config, rows equal."""
    points = hyper.load_sweep(str(REPO / "configs/sweeps/objectives.py") + ":16,1e-3")
    runs = hyper.plan(str(REPO / "configs/demo.py"), points, tmp_path)
    names = [r.point.name for r in runs]
    assert names == [
        "ppo_gae", "ppo_critic", "grpo", "dapo", "dr_grpo", "gspo", "grpo_lora", "dapo_lora"
    ]  # fmt: skip
    for r in runs:
        c = r.config
        assert c.train.prompts_per_step * c.sampling.n == 16
    by_name = {r.point.name: r.config for r in runs}
    assert by_name["ppo_gae"].ppo.critic == "shared" and by_name["ppo_gae"].sampling.n == 1
    assert by_name["ppo_critic"].ppo.critic == "separate"
    assert by_name["gspo"].ppo.policy_loss == "gspo"
    assert by_name["dapo"].sampling.dynamic_sampling and by_name["dapo"].ppo.clip_high == 0.28
    assert by_name["dapo"].ppo.overlong_buffer_len == 16
    assert by_name["dapo_lora"].model.lora.rank == 16
    assert by_name["grpo_lora"].ppo.actor_lr == 1e-3
    assert by_name["grpo"].ppo.actor_lr == 5e-6  # the demo's rate: only LoRA points change it
