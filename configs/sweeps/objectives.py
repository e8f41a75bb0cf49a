"""Objective comparison on one main job: PPO+GAE, GRPO, DAPO, Dr.GRPO, GSPO, and LoRA variants.

Every point trains the same number of samples per step (rows = prompts_per_step x n), so equal
`train.num_steps` is (nearly) equal compute; set num_steps from the CPU-minute budget with
`--override=train.num_steps=N`. Launch after the main job's SFT, then compare:
    python launch/sweep.py --config=configs/demo.py --sweep=configs/sweeps/objectives.py:16 \
        --workdir=/tmp/objectives --parallel=2 --cpus_per_run=1 \
        --override=model.init_checkpoint=/tmp/demo_sft/checkpoints
    python launch/compare.py --workdirs=/tmp/objectives --out=/tmp/objectives
The argument is "PROMPTS[,LORA_LR]": the main job's train.prompts_per_step (default 16,
configs/demo.py), which PPO+GAE samples with n=1 while the group methods sample a quarter of it
with n=4 (same rows); and the LoRA points' actor_lr (default: the config's; adapters usually
want ~10x the full fine-tuning rate). Test NDCG@10
per point: `launch/eval.py` on each point's workdir (its checkpoints). Seven points: ppo_gae,
grpo, dapo, dr_grpo, gspo, grpo_lora, dapo_lora (LoRA r=16, alpha 32, every projection). DAPO's dynamic sampling samples 2x the prompts, so give it
~1.5x the wall time or compare at equal wall time with `launch/compare.py`'s time axis.
"""

from deepretrieval_jax import sweep as hyper

GROUP = 4  # samples per prompt for the group-baseline methods


def get_sweep(arg: str | None = None) -> list[hyper.Point]:
    prompts, _, lora_lr = (arg or "16").partition(",")
    prompts = int(prompts)
    if prompts % GROUP:
        raise ValueError(f"objectives sweep: prompts_per_step {prompts} not divisible by {GROUP}")
    group = {
        "config.sampling.n": GROUP,
        "config.train.prompts_per_step": prompts // GROUP,
        "config.ppo.kl_in_reward": False,
        "config.ppo.kl_loss_coef": 0.001,
    }
    grpo = {**group, "config.ppo.advantage_estimator": "grpo"}
    dapo = {
        **grpo,
        "config.ppo.clip_low": 0.2,
        "config.ppo.clip_high": 0.28,
        "config.ppo.loss_agg": "token-mean",
        "config.ppo.kl_loss_coef": 0.0,
        "config.sampling.dynamic_sampling": True,
        "config.sampling.dynamic_oversample": 2,
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
    lora = {"config.model.lora.rank": 16, "config.model.lora.alpha": 32.0}
    if lora_lr:
        lora["config.ppo.actor_lr"] = float(lora_lr)
    return [
        *hyper.named("ppo_gae", {**group, "config.ppo.advantage_estimator": "gae"}),
        *hyper.named("grpo", grpo),
        *hyper.named("dapo", dapo),
        *hyper.named("dr_grpo", dr_grpo),
        *hyper.named("gspo", gspo),
        *hyper.named("grpo_lora", {**grpo, **lora}),
        *hyper.named("dapo_lora", {**dapo, **lora}),
    ]
