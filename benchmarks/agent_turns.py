"""Multi-turn agent figures on SciFact with the pretrained policy (issue 17 item 5; figures only).

    DEEPRETRIEVAL_DATA_DIR=../shared/data python benchmarks/agent_turns.py \
        --model=/path/to/smollm2-hf --out=/tmp/agent_turns \
        [--parts=throughput,rl] [--claims=32] [--cpu_budget_minutes=8] [--eval_claims=100]

(a) throughput: the first `--claims` SciFact test claims in one greedy batch, each sampler run
    twice and the second (warm) call timed: the plain single-turn `Sampler` on the one-turn
    prompts (configs/scifact_agent.py:one_turn: one query, `</answer>` stop, 64 tokens), the
    `AgentSampler` on the same prompts with max_turns=1, and the `AgentSampler` with
    max_turns=3 on configs/scifact_agent.py's prompts (searches on local BM25 between turns).
    Printed: wall seconds (searches included, and apart), tokens the policy generated, tokens/s,
    decode steps, the idle fraction of decode-step row slots (rows finished or waiting for a
    search; plain sampler: sum(max length - length) / (max length x rows)), round trips.
(b) RL at equal compute: configs/scifact_agent.py:one_turn (1 turn) and configs/scifact_agent.py
    (up to 3 turns) each trained under `train.cpu_budget_minutes` of training-loop CPU time in
    its own process pinned to its own core (taskset), both at once; validation off. Each arm
    stops at the step boundary nearest its budget (`train.cpu_budget_stop="nearest"`), so a
    costly 3-turn step cannot overshoot it by most of a step. Then each trained policy is
    evaluated greedily by the eval CLI (`eval.run`, the agent path) on the first `--eval_claims` test claims:
    NDCG@10, Recall@100, format errors, searches per answer, turns used, and a paired bootstrap
    95% CI of 3-turn minus 1-turn (`significance.paired_bootstrap`). One seed (`--seed`).
Written to OUT/agent_turns.md (and OUT/throughput.json, OUT/<arm>/result.json); re-running
skips arms whose result.json exists.
"""

from __future__ import annotations

import argparse
import dataclasses
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

ARMS = {"one_turn": "one_turn", "three_turns": None}  # arm -> configs/scifact_agent.py arg
RESULT = "result.json"


def arm_config(args, arm: str):
    """configs/scifact_agent.py (its `one_turn` variant for that arm) + the model + the budget."""
    from configs import eval_scifact, scifact_agent

    cfg = scifact_agent.get_config(ARMS[arm])
    cfg.model.hf_path = str(args.model)
    cfg.seed = args.seed
    cfg.train.num_steps = 1000  # the budget ends the run
    cfg.train.cpu_budget_minutes = args.cpu_budget_minutes
    cfg.train.cpu_budget_stop = "nearest"  # a 3-turn step costs several 1-turn steps
    cfg.train.prompts_per_step = args.prompts_per_step  # x sampling.n = 4 rows per step
    cfg.ppo.mini_batch_size = min(cfg.ppo.mini_batch_size, args.prompts_per_step * cfg.sampling.n)
    cfg.train.val_every = 0  # no validation inside the budget (the eval below measures)
    cfg.train.checkpoint_every = 0  # the final step is saved
    cfg.logging.progress = False
    cfg.eval = eval_scifact.eval_config("policy")
    cfg.eval.batch_size = 32
    cfg.eval.num_examples = args.eval_claims
    cfg.eval.compare_baseline = False
    cfg.eval.concurrency = 1
    return cfg


def _eval_cfg(cfg, checkpoint_dir: str):
    """The arm's config as the eval CLI's: its prompts and agent, top 100 for Recall@100."""
    import ml_collections

    ecfg = cfg.copy_and_resolve_references()
    ecfg.eval.checkpoint_dir = checkpoint_dir
    ecfg.reward.search_opts = ml_collections.ConfigDict(dict(k1=1.2, b=0.75, top_k=100))
    return ecfg


def run_arm(args, arm: str) -> None:
    """One arm, in this process: train under the budget, evaluate, write OUT/ARM/result.json."""
    from deepretrieval_jax import eval as eval_lib
    from deepretrieval_jax import metrics
    from deepretrieval_jax.rl import trainer

    cfg = arm_config(args, arm)
    work = args.out / arm
    work.mkdir(parents=True, exist_ok=True)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = trainer.train(cfg, work / "rl")
    cpu_train, wall_train = time.process_time() - cpu0, time.perf_counter() - wall0
    steps, last = result.step, result.last_metrics
    del result  # the train state (params, optimiser): the eval restores the checkpoint
    cpu1, wall1 = time.process_time(), time.perf_counter()
    report = eval_lib.run(_eval_cfg(cfg, str(work / "rl")), work / "trained").to_json()
    rows = metrics.read_jsonl(work / "rl" / metrics.JSONL_NAME)
    _, rewards = metrics.series(rows, "reward/mean")
    agent_train = {k: v for k, v in last.items() if k.startswith("agent/")}
    (work / RESULT).write_text(json.dumps(dict(
        arm=arm, steps=steps, budget_minutes=args.cpu_budget_minutes, seed=args.seed,
        train_cpu_minutes=round(cpu_train / 60, 2), train_wall_minutes=round(wall_train / 60, 2),
        eval_cpu_minutes=round((time.process_time() - cpu1) / 60, 2),
        eval_wall_minutes=round((time.perf_counter() - wall1) / 60, 2),
        rewards=[float(r) for r in rewards], last_train_agent_metrics=agent_train,
        aggregates=report["aggregates"],
        per_claim_ndcg10={r["id"]: float(r["metrics"].get("ndcg@10", 0.0))
                          for r in report["records"] if r["status"] != "backend_error"},
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    ), indent=1))  # fmt: skip


def launch_arms(args) -> None:
    """Both arms at once, each a child process pinned to its own core."""
    cores = sorted(os.sched_getaffinity(0))
    procs = []
    for slot, arm in enumerate(ARMS):
        if (args.out / arm / RESULT).is_file():
            continue
        cmd = [sys.executable, __file__, f"--model={args.model}", f"--out={args.out}",
               f"--cpu_budget_minutes={args.cpu_budget_minutes}", f"--seed={args.seed}",
               f"--eval_claims={args.eval_claims}", f"--prompts_per_step={args.prompts_per_step}",
               f"--arm={arm}"]  # fmt: skip
        if shutil.which("taskset") and len(cores) > 1:
            cmd = ["taskset", "-c", str(cores[slot % len(cores)]), *cmd]
        log = open(args.out / f"{arm}.log", "ab")  # noqa: SIM115 - closed with the child
        print(f"start {arm}: {' '.join(cmd[:3])} ...; log {args.out / (arm + '.log')}", flush=True)
        procs.append((arm, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)))
        log.close()
    for arm, proc in procs:
        code = proc.wait()
        print(f"{'done' if code == 0 else f'FAILED ({code})'} {arm}", flush=True)


# ------------------------------------------------------------------ (a) sampler throughput
def throughput(args) -> list[dict]:
    """The three samplers of part (a) on the first `args.claims` test claims (greedy)."""
    import jax
    import numpy as np

    from deepretrieval_jax import eval as eval_lib
    from deepretrieval_jax import sampler as S
    from deepretrieval_jax.agent import harness, protocol
    from deepretrieval_jax.agent.decode import AgentSampler, decode_transcripts
    from deepretrieval_jax.agent.evaluate import BackendSearch
    from deepretrieval_jax.config import resolve_data_dir
    from deepretrieval_jax.data import backends, render, task_data
    from deepretrieval_jax.sampling import token_bytes_from_tokenizer

    rows, fixed = [], None
    for name, arm, multi in (("Sampler (single turn)", "one_turn", False),
                             ("AgentSampler max_turns=1", "one_turn", True),
                             ("AgentSampler max_turns=3", "three_turns", True)):  # fmt: skip
        cfg = arm_config(args, arm)
        spec = task_data.task_spec(cfg)
        if fixed is None:  # the model and the index once
            model_cfg, codec, params, _ = eval_lib.policy_params(cfg)  # codec: the tokenizer
            data_dir = resolve_data_dir(cfg.data.data_dir)
            index_opts, search_opts = backends.split_search_opts(spec, cfg.reward.search_opts)
            backend = backends.task_backend(spec, data_dir, index_opts)
            documents = harness.load_documents(spec, data_dir)
            token_bytes = token_bytes_from_tokenizer(codec, model_cfg.vocab_size)
            examples = list(task_data.load_examples(cfg, spec, "test"))[: args.claims]
            fixed = True
        texts = [render.render_prompt(spec, ex.input, codec) for ex in examples]
        tokens, mask = eval_lib.left_pad(codec, texts)
        config = S.SamplingConfig(
            method="greedy", max_new_tokens=cfg.sampling.max_new_tokens, eos_ids=codec.eos_ids,
            pad_id=int(codec.pad_id), stop=tuple(cfg.sampling.stop),
        )  # fmt: skip
        kw = dict(token_bytes=token_bytes, prompt_buckets=tuple(cfg.data.prompt_buckets))
        fns = S.causal_lm_fns(model_cfg)
        search_s = [0.0]
        if multi:
            agent = harness.agent_config(cfg)
            search = BackendSearch(backend, {**spec.search_opts(), **search_opts}, documents, 1)

            def timed(queries, search=search, search_s=search_s):
                t0 = time.perf_counter()
                out = search(queries)
                search_s[0] += time.perf_counter() - t0
                return out

            sampler = AgentSampler(
                fns, dataclasses.replace(config, tool_stop=(protocol.SEARCH_CLOSE,)), agent,
                codec=codec, search_fn=timed, prompt_suffix=spec.assistant_prefix, **kw,
            )  # fmt: skip
        else:
            sampler = S.Sampler(fns, config, **kw)
        key = jax.random.key(0)
        t0 = time.perf_counter()
        jax.block_until_ready(sampler(params, tokens, mask, key))  # compile + first run
        first_s = time.perf_counter() - t0
        search_s[0] = 0.0
        t0 = time.perf_counter()
        res = jax.block_until_ready(sampler(params, tokens, mask, key))
        wall = time.perf_counter() - t0
        out, st = res if multi else (res, None)
        lengths = np.asarray(out.lengths_Bn)
        generated = int(np.asarray(out.generated_BnxL).sum())
        if multi:
            idle, steps, trips = st.idle_fraction, st.decode_steps, st.round_trips
            transcripts = decode_transcripts(codec, out, np.asarray(out.finish_reason_Bn))
            parsed = [protocol.parse_transcript(t, spec.assistant_prefix) for t in transcripts]
            answered = float(np.mean([p.ok for p in parsed]))
            searches = float(np.mean(st.searches_R[: len(texts)]))
        else:
            steps = int(lengths.max())
            idle = float((steps - lengths).sum() / (steps * len(lengths)))
            trips, searches = 0, 0.0
            transcripts = [
                codec.decode(t[: int(n)])
                for t, n in zip(np.asarray(out.tokens_BnxL), lengths, strict=True)
            ]
            answered = float(
                np.mean(np.asarray(out.finish_reason_Bn) == S.FinishReason.STOP_STRING)
            )
        rows.append(dict(
            sampler=name, rows=len(texts), buffer=cfg.sampling.max_new_tokens,
            first_call_s=round(first_s, 2), wall_s=round(wall, 2), search_s=round(search_s[0], 2),
            generated_tokens=generated, tokens_per_s=round(generated / wall, 1),
            decode_steps=int(steps), idle_fraction=round(float(idle), 3), round_trips=int(trips),
            searches_per_row=round(searches, 2), answered=round(answered, 3),
            example=spec.assistant_prefix + transcripts[0][:400],
        ))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def throughput_table(rows: list[dict]) -> str:
    lines = [
        "| sampler | rows | buffer L | warm wall s | of which search s | generated tokens "
        "| tokens/s | decode steps | idle slot fraction | round trips | searches/row | answered |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['rows']} | {r['buffer']} | {r['wall_s']} | {r['search_s']} "
            f"| {r['generated_tokens']} | {r['tokens_per_s']} | {r['decode_steps']} "
            f"| {r['idle_fraction']} | {r['round_trips']} | {r['searches_per_row']} "
            f"| {r['answered']} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ (b) the RL comparison
def rl_table(args) -> str:
    from deepretrieval_jax.significance import paired_bootstrap

    res = {a: json.loads((args.out / a / RESULT).read_text()) for a in ARMS}
    lines = [
        f"CPU budget {args.cpu_budget_minutes:g} min of training-loop CPU time per arm, one core "
        f"each, seed {args.seed}; greedy eval on the first {args.eval_claims} test claims.",
        "",
        "| arm | steps | train CPU min | train reward, first / last 3 steps | ndcg@10 | recall@100"
        " | format errors | searches per answer | turns used | eval wall min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in res.items():
        agg, rw = r["aggregates"], r["rewards"]
        head, tail = rw[:3], rw[-3:]
        a = agg.get("agent", {})
        spa = a.get("searches_per_answer")
        lines.append(
            f"| {arm} | {r['steps']} | {r['train_cpu_minutes']:.1f} "
            f"| {sum(head) / len(head):.3f} / {sum(tail) / len(tail):.3f} "
            f"| {agg['metrics']['ndcg@10']:.4f} | {agg['metrics']['recall@100']:.4f} "
            f"| {agg['rates']['format_error_rate']:.1%} | {'-' if spa is None else f'{spa:.2f}'} "
            f"| {a.get('turns_used')} | {r['eval_wall_minutes']:.1f} |"
        )
    one, three = res["one_turn"]["per_claim_ndcg10"], res["three_turns"]["per_claim_ndcg10"]
    ids = [i for i in three if i in one]
    if len(ids) >= 2:
        d = paired_bootstrap([three[i] for i in ids], [one[i] for i in ids])
        lines += ["", f"ndcg@10, 3-turn minus 1-turn over {d['n']} claims: "
                  f"{d['difference']:+.4f} (95% CI [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}])"]  # fmt: skip
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="HF dir of the policy")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="throughput,rl", help="throughput and/or rl")
    parser.add_argument("--claims", type=int, default=32, help="(a): test claims, one batch")
    parser.add_argument("--cpu_budget_minutes", type=float, default=15.0, help="(b): per arm")
    parser.add_argument("--eval_claims", type=int, default=100, help="(b): test claims")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts_per_step", type=int, default=4, help="(b): claims per step")
    parser.add_argument("--arm", default="", help=argparse.SUPPRESS)  # child: run one arm
    args = parser.parse_args()
    args.model, args.out = args.model.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.arm:
        run_arm(args, args.arm)
        return
    parts, text = args.parts.split(","), []
    if "throughput" in parts:
        rows = throughput(args)
        (args.out / "throughput.json").write_text(json.dumps(rows, indent=1))
        text += [f"(a) sampler throughput, greedy, first {args.claims} test claims:", "",
                 throughput_table(rows), ""]  # fmt: skip
    if "rl" in parts:
        launch_arms(args)
        if all((args.out / a / RESULT).is_file() for a in ARMS):
            text += ["(b) RL at equal compute:", "", rl_table(args), ""]
    text += [f"load average at the end: {os.getloadavg()}"]
    (args.out / "agent_turns.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
