"""Two JAX processes on 127.0.0.1 (gloo CPU collectives, 4 devices each, one global mesh of 8)
run two PPO steps of the tiny config through the whole loop and must agree."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from deepretrieval_jax import metrics

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path, workdir, *extra):
    """Runs trainer_fixtures.py in two joined processes; returns both OUT_JSON dicts."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAX_PLATFORMS="cpu",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        out = tmp_path / f"out{pid}.json"
        log = open(tmp_path / f"log{pid}.txt", "w")
        procs.append((subprocess.Popen(
            [sys.executable, str(HERE / "trainer_fixtures.py"), str(workdir), "2", str(out),
             *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        ), out, log))  # fmt: skip
    for proc, _, log in procs:
        try:
            proc.wait(timeout=420)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    for pid, (proc, _, _) in enumerate(procs):
        tail = (tmp_path / f"log{pid}.txt").read_text()[-3000:]
        assert proc.returncode == 0, f"process {pid} failed:\n{tail}"
    return [json.loads(out.read_text()) for _, out, _ in procs]


def test_two_processes_train_and_agree(tmp_path):
    workdir = tmp_path / "run"
    r0, r1 = _two_processes(tmp_path, workdir)
    assert (r0["process"], r1["process"], r0["count"]) == (0, 1, 2)
    assert r0["step"] == r1["step"] == 2
    assert r0["actor"] == r1["actor"] and r0["critic"] == r1["critic"]
    # Both hosts scored half of the rows; the merged reward metrics are global and equal.
    for key in (
        "reward/mean",
        "reward/invalid_fraction",
        "response/length_mean",
        "ppo/policy_loss",
    ):
        assert r0["metrics"][key] == r1["metrics"][key], key
    # Only process 0 writes logs; both joined the checkpoints.
    records = metrics.read_jsonl(workdir / metrics.JSONL_NAME)
    assert [r["step"] for r in records if "ppo/policy_loss" in r] == [1, 2]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "1",
        "2",
    ]


def test_two_processes_train_the_multi_turn_agent_and_agree(tmp_path):
    """The agent loop across two hosts: each decodes and searches its own rows between turns
    (scripted: one search, then the answer), and both end with the same params and metrics."""
    import tiny_models

    policy = tiny_models.save_tiny_policy(tmp_path / "policy")
    r0, r1 = _two_processes(tmp_path, tmp_path / "run", str(policy))
    assert (r0["process"], r1["process"], r0["count"]) == (0, 1, 2)
    assert r0["step"] == r1["step"] == 2 and r0["actor"] == r1["actor"]
    m0, m1 = r0["metrics"], r1["metrics"]
    assert m0["agent/answered_fraction"] == 1.0 and m0["agent/searches_per_answer"] == 1.0
    assert m0["reward/format_ok"] == 1.0 and m0["reward/mean"] > 0.1
    for key in ("reward/mean", "ppo/policy_loss", "agent/turns_mean", "ppo/response_len_mean"):
        assert m0[key] == m1[key], key
