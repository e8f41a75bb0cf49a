"""Objective comparison on the main job (configs/demo.py): PPO+GAE, GRPO, DAPO, Dr.GRPO, GSPO, LoRA.

Every point samples the same rows per step (group methods: ROWS/4 prompts x n=4; PPO+GAE: ROWS
prompts x n=1) and keeps the demo's recipe otherwise (no reference model, KL 0, lr 5e-6, fp32).
Equal compute: run every point under the same `train.cpu_budget_minutes` (the trainer stops after
the step that spends it). benchmarks/objectives_demo.py does that, two points at a time on one
core each, evaluates each trained policy on the 300 test claims and writes the table of
docs/benchmarks.md; by hand:
    python launch/sweep.py --config=configs/demo.py --sweep=configs/sweeps/objectives.py \
        --workdir=/tmp/objectives --parallel=2 --cpus_per_run=1 \
        --override=model.hf_path=workdirs/demo/model --override=train.num_steps=200 \
        --override=train.cpu_budget_minutes=15
The argument is "ROWS[,LORA_LR]": rows per step (default 32, the demo's 8 x 4) and the LoRA
points' actor_lr (default 5e-5: adapters want ~10x the full fine-tuning rate). Eight points:
ppo_gae (value head on the policy trunk), ppo_critic (separate value model), grpo, dapo
(asymmetric clip, token mean, dynamic sampling 2x, soft overlong penalty), dr_grpo, gspo,
grpo_lora and dapo_lora (LoRA r=16, alpha 32, every projection).
"""

from deepretrieval_jax import sweep as hyper

GROUP = 4  # samples per prompt for the group-baseline methods
LORA_LR = 5e-5  # LoRA points' default actor_lr (the demo's full fine-tuning rate is 5e-6)


def get_sweep(arg: str | None = None) -> list[hyper.Point]:
    rows, _, lora_lr = (arg or "32").partition(",")
    rows = int(rows)
    if rows % GROUP:
        raise ValueError(f"objectives sweep: {rows} rows per step not divisible by {GROUP}")
    group = {"config.sampling.n": GROUP, "config.train.prompts_per_step": rows // GROUP}
    gae = {
        "config.sampling.n": 1,
        "config.train.prompts_per_step": rows,
        "config.ppo.advantage_estimator": "gae",
    }
    grpo = {**group, "config.ppo.advantage_estimator": "grpo"}
    dapo = {
        **grpo,
        "config.ppo.clip_low": 0.2,
        "config.ppo.clip_high": 0.28,
        "config.ppo.loss_agg": "token-mean",
        "config.sampling.dynamic_sampling": True,
        "config.sampling.dynamic_oversample": 2,
        "config.ppo.overlong_buffer_len": 16,  # the last 16 of the 48 new tokens ramp down
        "config.ppo.overlong_max_len": 48,
    }
    dr_grpo = {
        **grpo,
        "config.ppo.grpo_normalize_std": False,
        "config.ppo.loss_agg": "seq-mean-token-sum-norm",
    }
    gspo = {
        **grpo,
        "config.ppo.policy_loss": "gspo",
        "config.ppo.loss_agg": "seq-mean-token-mean",
        "config.ppo.clip_low": 3e-4,
        "config.ppo.clip_high": 4e-4,
    }
    lora = {
        "config.model.lora.rank": 16,
        "config.model.lora.alpha": 32.0,
        "config.ppo.actor_lr": float(lora_lr) if lora_lr else LORA_LR,
    }
    return [
        *hyper.named("ppo_gae", {**gae, "config.ppo.critic": "shared"}),
        *hyper.named("ppo_critic", {**gae, "config.ppo.critic": "separate"}),
        *hyper.named("grpo", grpo),
        *hyper.named("dapo", dapo),
        *hyper.named("dr_grpo", dr_grpo),
        *hyper.named("gspo", gspo),
        *hyper.named("grpo_lora", {**grpo, **lora}),
        *hyper.named("dapo_lora", {**dapo, **lora}),
    ]
