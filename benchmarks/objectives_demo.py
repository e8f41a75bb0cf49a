"""Objectives at equal CPU minutes on the main job: train each point, evaluate, compare (figures).

    python benchmarks/objectives_demo.py --base=workdirs/demo --out=/tmp/objectives \
        [--points=grpo,ppo_gae,ppo_critic,dapo,gspo,grpo_lora] [--cpu_budget_minutes=15]

`--base` is a finished main-job workdir (`bash launch/demo.sh`): its imported model (model/) is
the starting policy and its zero-shot report (zero_shot/) the paired baseline. Every point of
configs/sweeps/objectives.py runs configs/demo.py with its overrides and
`train.cpu_budget_minutes` (the trainer stops after the step at which its loop has used that much
CPU time: sampling, update and BM25 together), `--parallel` points at a time, each pinned to its
own core (taskset), so that a point's CPU minutes are its own. Then each trained policy is
evaluated greedily on the 300 SciFact test claims, exactly as the main job evaluates (demo.py).
Printed and written to OUT/objectives.md: steps taken, CPU minutes (training loop, whole
process), train reward over the last steps, test NDCG@10 / Recall@100 / format errors, and paired
bootstrap 95% CIs against the zero-shot policy and against GRPO (the main job's objective).
Deterministic given the step count: rerunning a point with `train.num_steps=<steps>` and no
budget repeats it bit for bit; the budget itself can end a point one step earlier or later on
another machine or load. Re-running the command skips points whose result.json exists and
evaluates, without training again, those whose train.json exists.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_POINTS = "grpo,ppo_gae,ppo_critic,dapo,gspo,grpo_lora"
RESULT = "result.json"


def point_config(base: Path, name: str, budget: float, seed: int):
    """configs/demo.py + the sweep point's overrides + the base run's model + the budget."""
    from deepretrieval_jax import sweep as hyper

    points = {p.name: p for p in hyper.load_sweep(str(REPO / "configs/sweeps/objectives.py"))}
    if name not in points:
        raise SystemExit(f"unknown point {name!r}; have {sorted(points)}")
    extra = [
        f"model.hf_path={base / 'model'}",
        "train.num_steps=1000",  # the budget ends the run
        f"train.cpu_budget_minutes={budget}",
        f"seed={seed}",
    ]
    spec = str(REPO / "configs/demo.py")
    return hyper.resolve_point(hyper.load_config(spec), spec, points[name], extra)


def run_point(base: Path, out: Path, name: str, budget: float, seed: int) -> None:
    """One point, in this process: train under the budget, evaluate, write OUT/NAME/result.json."""
    from deepretrieval_jax import demo, metrics
    from deepretrieval_jax.rl import trainer

    cfg = point_config(base, name, budget, seed)
    demo.resolve_data(cfg)
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(cfg.to_json_best_effort(indent=1))
    trained = work / "train.json"  # a re-run evaluates without training again
    if not trained.is_file():
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = trainer.train(cfg, work / "rl")
        trained.write_text(json.dumps(dict(
            steps=result.step, train_cpu_minutes=round((time.process_time() - cpu0) / 60, 2),
            train_wall_minutes=round((time.perf_counter() - wall0) / 60, 2),
        )))  # fmt: skip
    ecfg = demo._eval_config(cfg, checkpoint_dir=str(work / "rl"))
    cpu1 = time.process_time()
    report = demo.run_eval(ecfg, work / "trained")
    _, rewards = metrics.series(metrics.read_jsonl(work / "rl" / metrics.JSONL_NAME), "reward/mean")
    (work / RESULT).write_text(json.dumps(dict(
        name=name, budget_minutes=budget, seed=seed, **json.loads(trained.read_text()),
        eval_cpu_minutes=round((time.process_time() - cpu1) / 60, 2),
        rewards=[float(r) for r in rewards], aggregates=report["aggregates"],
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    ), indent=1))  # fmt: skip


def launch_all(args, names: list[str]) -> None:
    """Runs the points `args.parallel` at a time, each in a child process on its own core."""
    cores = sorted(os.sched_getaffinity(0))
    todo = [n for n in names if not (args.out / n / RESULT).is_file()]
    running: dict[int, tuple[str, int, subprocess.Popen]] = {}
    while todo or running:
        while todo and len(running) < args.parallel:
            name, slot = (
                todo.pop(0),
                min(set(range(args.parallel)) - {s for _, s, _ in running.values()}),
            )
            cmd = [sys.executable, __file__, f"--base={args.base}", f"--out={args.out}",
                   f"--cpu_budget_minutes={args.cpu_budget_minutes}", f"--seed={args.seed}",
                   f"--point={name}"]  # fmt: skip
            if shutil.which("taskset") and args.parallel > 1:
                cmd = ["taskset", "-c", str(cores[slot % len(cores)]), *cmd]
            log = open(args.out / f"{name}.log", "ab")  # noqa: SIM115 - closed with the child
            print(f"start {name} on slot {slot}: log {args.out / (name + '.log')}", flush=True)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            log.close()
            running[proc.pid] = (name, slot, proc)
        pid, status = os.wait()[:2]
        if pid in running:
            name, _, _ = running.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            print(f"{'done' if code == 0 else f'FAILED ({code})'} {name}", flush=True)


def _per_example(report: dict, metric: str) -> dict:
    return {r["id"]: float(r["metrics"].get(metric, 0.0)) for r in report["records"]
            if r["status"] != "backend_error"}  # fmt: skip


def table(args, names: list[str], metric: str = "ndcg@10") -> str:
    from deepretrieval_jax.significance import paired_bootstrap

    def report(path: Path) -> dict:
        return json.loads(next(path.glob("eval/*_policy.json")).read_text())

    zero = _per_example(report(args.base / "zero_shot"), metric)
    per = {n: _per_example(report(args.out / n / "trained"), metric) for n in names}

    def ci(a: dict, b: dict) -> str:
        ids = [i for i in a if i in b]
        d = paired_bootstrap([a[i] for i in ids], [b[i] for i in ids])
        lo, hi = d["ci_low"], d["ci_high"]
        return f"{d['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}]"

    lines = [
        f"CPU budget {args.cpu_budget_minutes:g} min of training-loop CPU time per point, one "
        f"core each, seed {args.seed}; greedy test evaluation on {len(zero)} claims.",
        "",
        "| point | steps | train CPU min | train reward, last 5 steps | test ndcg@10 | recall@100"
        " | format errors | minus zero-shot (95% CI) | minus grpo (95% CI) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = json.loads((args.out / n / RESULT).read_text())
        agg, tail = r["aggregates"], r["rewards"][-5:]
        vs_grpo = ci(per[n], per["grpo"]) if "grpo" in per and n != "grpo" else "-"
        lines.append(
            f"| {n} | {r['steps']} | {r['train_cpu_minutes']:.1f} | {sum(tail) / len(tail):.3f} "
            f"| {agg['metrics'][metric]:.4f} | {agg['metrics']['recall@100']:.4f} "
            f"| {agg['rates']['format_error_rate']:.1%} | {ci(per[n], zero)} | {vs_grpo} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a finished main-job workdir")
    parser.add_argument("--out", type=Path, required=True, help="one subdirectory per point")
    parser.add_argument("--points", default=DEFAULT_POINTS, help="comma-separated sweep points")
    parser.add_argument("--cpu_budget_minutes", type=float, default=15.0)
    parser.add_argument("--parallel", type=int, default=2, help="points at a time (one core each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--point", default="", help=argparse.SUPPRESS)  # child: run one point
    args = parser.parse_args()
    args.base, args.out = args.base.resolve(), args.out.resolve()
    if args.point:
        run_point(args.base, args.out, args.point, args.cpu_budget_minutes, args.seed)
        return
    if not (args.base / "model").is_dir() or not list((args.base / "zero_shot").glob("eval/*")):
        raise SystemExit(f"{args.base}: not a finished main-job workdir (model/, zero_shot/)")
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.points.split(",")
    launch_all(args, names)
    done = [n for n in names if (args.out / n / RESULT).is_file()]
    text = table(args, done)
    (args.out / "objectives.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
