"""PPO sweep around the CPU demo (configs/demo.py): actor learning rate x KL coefficient.

Launch (after the demo's SFT, see configs/demo.py), two points at a time, one core each:
    python launch/sweep.py --config=configs/demo.py --sweep=configs/sweeps/demo_ppo.py \
        --workdir=/tmp/demo_sweep --parallel=2 --cpus_per_run=1 \
        --override=model.init_checkpoint=/tmp/demo_sft/checkpoints
    python launch/compare.py --workdirs=/tmp/demo_sweep --out=/tmp/demo_sweep
Six points, each one PPO run of the demo (its 40 steps, runtime as in configs/demo.py), two at
a time; re-running the first command skips finished points and resumes interrupted ones.
`:clip` sweeps the clip range (zipped low/high) and the sampling temperature instead.
"""

from deepretrieval_jax import sweep as hyper


def get_sweep(arg: str | None = None) -> list[hyper.Point]:
    if arg == "clip":
        return hyper.product(
            hyper.zip(
                hyper.sweep("config.ppo.clip_low", [0.1, 0.2, 0.2]),
                hyper.sweep("config.ppo.clip_high", [0.1, 0.2, 0.28]),
            ),
            hyper.sweep("config.sampling.temperature", [0.7, 1.0]),
        )
    return hyper.product(
        hyper.sweep("config.ppo.actor_lr", [3e-5, 1e-4, 3e-4]),
        hyper.sweep("config.ppo.kl_coef", [0.001, 0.01]),
    )
