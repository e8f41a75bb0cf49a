"""The main job end to end: SFT -> PPO -> evaluation vs the original query -> HF export -> plots.

    python launch/demo.py --workdir=workdirs/demo [--config=configs/demo.py] [--config.a.b=v]

(`bash launch/demo.sh` sets up the venv and the data directory first.) Everything lands in one
workdir:

    sft/            cold-start SFT: checkpoints/, metrics.jsonl, tb/, eval/ (greedy SFT policy),
                    sampled/eval/ (the SFT policy sampled at the rollout temperature, seed 0)
    ppo/            PPO: checkpoints/, metrics.jsonl, tb/, reward_curve.png,
                    eval/ (greedy PPO policy and the original-query baseline, JSON/MD/PNG),
                    sampled/eval/ (the PPO policy sampled at the rollout temperature, seed 0)
    hf/             HF export of the PPO policy (config.json, model.safetensors, vocab_map.json)
    learning.png    per-step train reward with the first/last 20% means and their error bars
    summary.json    learning statistics, evaluation table, export check, stage wall times
    summary.md      the same as a readable table

Stages whose output already exists are skipped, so re-running the command resumes (PPO resumes
from its last checkpoint). "Visibly learns" is measured, not asserted: the mean per-step train
reward of PPO's last 20% of steps minus that of its first 20%, against the standard error of
that difference from the per-step rewards (`learning_stats`).

Data: `config.data.data_dir`, else $DEEPRETRIEVAL_DATA_DIR, else the BEIR zip is downloaded
into the cache (`data.download.beir_dataset_dir`). SciFact is CC BY-NC 2.0.

Compact vocabulary: the demo's model sees only the ~8k tokenizer ids its texts use
(`config.model.compact_vocab`). Its HF export keeps that vocabulary: `hf/vocab_map.json` lists
the Qwen2.5 tokenizer id of every model id (model id i = tokenizer id `ids[i]`); a run with
`compact_vocab=False` exports a plain HF directory with the tokenizer files.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path

import numpy as np
from absl import logging

from deepretrieval_jax import metrics

LEARNING_FRACTION = 0.2  # first/last fraction of PPO steps compared


def resolve_data(cfg) -> None:
    """Points `cfg.data.data_dir` at a directory holding the task's BEIR dataset.

    Order: the config field, $DEEPRETRIEVAL_DATA_DIR, else download into the cache.
    """
    from deepretrieval_jax.config import DATA_DIR_ENV
    from deepretrieval_jax.data import download, tasks

    if cfg.data.data_dir or os.environ.get(DATA_DIR_ENV):
        return
    spec = tasks.get_task(cfg.data.task)
    logging.info("No data dir configured: downloading BEIR %s into the cache", spec.dataset)
    cfg.data.data_dir = str(download.beir_dataset_dir(spec.dataset).parent)


def learning_stats(rewards, fraction: float = LEARNING_FRACTION) -> dict:
    """First vs last `fraction` of per-step mean rewards.

    noise = standard error of the difference of the two window means,
    sqrt(s_first^2 / k + s_last^2 / k) with sample variances s^2 of the per-step rewards in each
    window of k steps; `z` = difference / noise (> 2: the increase is not run-to-run noise).
    """
    r = np.asarray(rewards, np.float64)
    k = max(2, int(round(fraction * len(r))))
    if len(r) < 2 * k:
        raise ValueError(f"learning_stats: {len(r)} steps are too few for two windows of {k}")
    first, last = r[:k], r[-k:]
    diff = float(last.mean() - first.mean())
    se = math.sqrt(first.var(ddof=1) / k + last.var(ddof=1) / k)
    return {
        "steps": len(r),
        "window": k,
        "first_mean": float(first.mean()),
        "last_mean": float(last.mean()),
        "difference": diff,
        "noise_se": se,
        "z": diff / se if se > 0 else float("inf") if diff > 0 else 0.0,
    }


def plot_learning(ppo_dir: Path, stats: dict, out: Path) -> Path:
    """Train reward per step, validation reward, and the two windows' means +- 1 SE."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    records = metrics.read_jsonl(ppo_dir / metrics.JSONL_NAME)
    steps, rewards = metrics.series(records, "reward/mean")
    vsteps, vrewards = metrics.series(records, "val/reward/mean")
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    ax.plot(steps, rewards, lw=1, alpha=0.7, label="train reward (per step)")
    if vsteps:
        ax.plot(vsteps, vrewards, "o-", ms=4, label="validation reward (greedy)")
    k = stats["window"]
    for xs, mean, name in (
        (steps[:k], stats["first_mean"], "first"),
        (steps[-k:], stats["last_mean"], "last"),
    ):
        se_one = stats["noise_se"] / math.sqrt(2)  # per-window SE, roughly
        ax.hlines(mean, xs[0], xs[-1], colors="k", lw=2)
        ax.fill_between(xs, mean - se_one, mean + se_one, color="k", alpha=0.12)
        ax.annotate(f"{name} 20%: {mean:.3f}", (xs[0], mean), textcoords="offset points",
                    xytext=(0, 6), fontsize=8)  # fmt: skip
    ax.set_title(
        f"PPO train reward: last-first = {stats['difference']:+.3f} "
        f"(noise SE {stats['noise_se']:.3f}, z = {stats['z']:.1f})",
        fontsize=10,
    )
    ax.set_xlabel("PPO step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _stage(name: str, timings: dict):
    """Context manager logging and timing one stage."""

    class _Timer:
        def __enter__(self):
            logging.info("=== demo stage: %s ===", name)
            print(f"=== demo stage: {name} ===", flush=True)
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.t0, 1)
            print(f"=== {name} done in {timings[name]:.0f} s ===", flush=True)

    return _Timer()


def _eval_config(cfg, checkpoint_dir: Path, key: str, compare_baseline: bool, temperature=0.0):
    """`cfg` plus the `eval` block of `eval.run` (the fields of configs/eval_scifact.py)."""
    import ml_collections

    ecfg = cfg.copy_and_resolve_references()
    with ecfg.unlocked():
        ecfg.eval = ml_collections.ConfigDict(
            dict(
                method="policy",
                split=cfg.data.val_split,  # SciFact: the 300 test claims
                num_examples=-1,
                checkpoint_dir=str(checkpoint_dir),
                checkpoint_key=key,
                step=-1,
                temperature=temperature,  # 0 = greedy
                top_p=1.0,
                top_k=0,
                seed=0,
                batch_size=cfg.train.prompts_per_step,
                length_policy="drop",
                concurrency=8,
                compare_baseline=compare_baseline,
            )
        )
        # Eval metrics need the top 100 (Recall@100); training may rank fewer.
        ecfg.reward.search_opts.top_k = max(100, int(cfg.reward.search_opts.get("top_k", 0)))
    return ecfg


def _row(name: str, report) -> dict:
    agg = report.aggregates
    return {
        "method": name,
        **{m: v for m, v in agg["metrics"].items()},
        "format_error_rate": agg["rates"]["format_error_rate"],
        "n": agg["num_examples"],
    }


def export_and_check(cfg, ppo_dir: Path, hf_dir: Path) -> dict:
    """Writes the PPO policy as an HF directory, loads it with transformers, compares logits."""
    import jax
    import torch
    import transformers
    from flax import linen as nn

    from deepretrieval_jax import checkpoint, hf_io, models, sharding
    from deepretrieval_jax.data import render, tasks
    from deepretrieval_jax.rl import setup

    _, model_cfg, codec = setup.text_setup(cfg)
    module = models.CausalLM(model_cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    shardings = sharding.param_shardings(module, mesh, sharding.TRAIN_RULES)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.meta.unbox(sharding.abstract_params(module)),
        shardings,
    )
    params = checkpoint.restore_params(ppo_dir / setup.CHECKPOINT_DIR, target, key="actor_params")
    eos = [int(i) for i in codec.eos_ids]
    gen = {"eos_token_id": eos, "pad_token_id": int(codec.pad_id)}
    tokenizer = None if codec.vocab_map is not None else codec.tokenizer.hf
    hf_io.save_params(params, model_cfg, hf_dir, tokenizer=tokenizer, generation_config=gen)
    if codec.vocab_map is not None:
        (hf_dir / "vocab_map.json").write_text(
            json.dumps({"tokenizer": cfg.tokenizer.name, "ids": codec.vocab_map.ids.tolist()})
        )

    spec = tasks.get_task(cfg.data.task)
    example = setup.load_examples(cfg, spec, cfg.data.val_split)[0]
    ids = np.asarray([codec.encode(render.render_prompt(spec, example.input, codec.tokenizer))])
    mask = np.ones_like(ids)
    positions = np.arange(ids.shape[1])[None]
    flax_logits = np.asarray(module.apply({"params": params}, ids, positions, mask)[0])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf_model(torch.from_numpy(ids).long()).logits.numpy()
    diff = float(np.max(np.abs(hf_logits - flax_logits)))
    agree = float(np.mean(hf_logits.argmax(-1) == flax_logits.argmax(-1)))
    check = {
        "hf_dir": str(hf_dir),
        "prompt_tokens": int(ids.shape[1]),
        "max_abs_logit_diff": diff,
        "argmax_agreement": agree,
        "ok": bool(diff < 1e-3 and agree == 1.0),
    }
    if not check["ok"]:
        raise RuntimeError(f"HF export check failed: {check}")
    return check


def summary_markdown(summary: dict) -> str:
    s = summary["learning"]
    lines = [
        "# Demo summary",
        "",
        f"Wall time: {summary['wall_s'] / 60:.1f} min ({summary['timings_s']}); CPU time "
        f"{summary['cpu_s'] / 60:.1f} min; load average at the end {summary['load_average_1m']}.",
        "",
        "## PPO learning (train reward per step)",
        "",
        f"- steps {s['steps']}, window {s['window']} steps",
        f"- first 20% mean {s['first_mean']:.4f}, last 20% mean {s['last_mean']:.4f}",
        f"- difference {s['difference']:+.4f}, noise (SE of the difference) {s['noise_se']:.4f}, "
        f"z = {s['z']:.2f}",
        "",
        "## Evaluation (test claims)",
        "",
    ]
    rows = summary["eval"]
    metric_names = [k for k in rows[0] if k not in ("method", "format_error_rate", "n")]
    lines.append("| method | " + " | ".join(metric_names) + " | format errors | n |")
    lines.append("|---" * (len(metric_names) + 3) + "|")
    for r in rows:
        vals = " | ".join(f"{r[m]:.4f}" if r[m] is not None else "-" for m in metric_names)
        lines.append(f"| {r['method']} | {vals} | {r['format_error_rate']:.1%} | {r['n']} |")
    hf = summary["hf_check"]
    lines += [
        "",
        "## HF export",
        "",
        f"`{hf['hf_dir']}` loads with transformers; max |logit diff| vs Flax "
        f"{hf['max_abs_logit_diff']:.2e}, argmax agreement {hf['argmax_agreement']:.0%} on a "
        f"{hf['prompt_tokens']}-token prompt.",
        "",
    ]
    return "\n".join(lines)


def _latest_step(directory: Path) -> int | None:
    from deepretrieval_jax import checkpoint

    if not directory.is_dir():
        return None
    with checkpoint.CheckpointManager(directory, async_save=False) as mgr:
        return mgr.latest_step()


def run(cfg, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) every stage of the demo; returns and writes the summary."""
    from deepretrieval_jax import eval as eval_lib
    from deepretrieval_jax.rl import setup, sft, trainer

    t_start = time.perf_counter()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    resolve_data(cfg)
    sft_dir, ppo_dir, hf_dir = workdir / "sft", workdir / "ppo", workdir / "hf"
    timings: dict[str, float] = {}

    if cfg.sft.num_steps > 0 and not (sft_dir / setup.CHECKPOINT_DIR).is_dir():
        with _stage("sft", timings):
            sft.run_sft(cfg, sft_dir)
    ppo_cfg = cfg.copy_and_resolve_references()
    if cfg.sft.num_steps > 0:
        ppo_cfg.model.init_checkpoint = str(sft_dir / setup.CHECKPOINT_DIR)
    if _latest_step(ppo_dir / setup.CHECKPOINT_DIR) != cfg.train.num_steps:
        with _stage("ppo", timings):
            trainer.train(ppo_cfg, ppo_dir)

    _, rewards = metrics.series(metrics.read_jsonl(ppo_dir / metrics.JSONL_NAME), "reward/mean")
    stats = learning_stats(rewards)
    plot_learning(ppo_dir, stats, workdir / "learning.png")
    print(
        f"PPO train reward: first 20% mean {stats['first_mean']:.4f}, last 20% mean "
        f"{stats['last_mean']:.4f}, difference {stats['difference']:+.4f}, noise (SE) "
        f"{stats['noise_se']:.4f}, z = {stats['z']:.2f}",
        flush=True,
    )

    with _stage("eval", timings):
        ppo_report = eval_lib.run(
            _eval_config(ppo_cfg, ppo_dir / setup.CHECKPOINT_DIR, "actor_params", True), ppo_dir
        )
        baseline = json.loads(
            (ppo_dir / "eval" / f"{ppo_report.task}_{ppo_report.split}_original_query.json")
            .read_text()
        )  # fmt: skip
        rows = [
            {
                "method": "original query (BM25 on the claim)",
                **baseline["aggregates"]["metrics"],
                "format_error_rate": baseline["aggregates"]["rates"]["format_error_rate"],
                "n": baseline["aggregates"]["num_examples"],
            }
        ]
        t = float(cfg.sampling.temperature)
        policies = [("PPO", ppo_dir, "actor_params", ppo_cfg)]
        if cfg.sft.num_steps > 0:
            policies.insert(0, ("SFT", sft_dir, "params", cfg))
        for name, run_dir, key, run_cfg in policies:
            ckpt = run_dir / setup.CHECKPOINT_DIR
            if name == "PPO":
                report = ppo_report
            else:
                report = eval_lib.run(_eval_config(run_cfg, ckpt, key, False), run_dir)
            rows.append(_row(f"{name} policy (greedy)", report))
            # Sampled at the rollout temperature (seed 0): what the policy does in training.
            sampled = eval_lib.run(_eval_config(run_cfg, ckpt, key, False, t), run_dir / "sampled")
            rows.append(_row(f"{name} policy (sampled, T={t:g})", sampled))

    with _stage("export", timings):
        hf_check = export_and_check(ppo_cfg, ppo_dir, hf_dir)

    metrics.plot_rewards(ppo_dir)
    summary = {
        "workdir": str(workdir),
        "learning": stats,
        "eval": rows,
        "hf_check": hf_check,
        "timings_s": timings,
        "wall_s": round(time.perf_counter() - t_start, 1),
        # CPU seconds of this process (all threads): the wall time an idle machine would need,
        # roughly, when the measured wall time is inflated by other jobs on the cores.
        "cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
        "load_average_1m": round(os.getloadavg()[0], 1),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    text = summary_markdown(summary)
    (workdir / "summary.md").write_text(text)
    print(text, flush=True)
    return summary
