"""RL sweep around the CPU main job (configs/demo.py): actor learning rate x rollout temperature.

Launch, two points at a time, one core each (the pretrained model is imported once by
`bash launch/demo.sh`, into workdirs/demo/model):
    python launch/sweep.py --config=configs/demo.py --sweep=configs/sweeps/demo_ppo.py \
        --workdir=/tmp/demo_sweep --parallel=2 --cpus_per_run=1 \
        --override=model.hf_path=workdirs/demo/model
    python launch/compare.py --workdirs=/tmp/demo_sweep --out=/tmp/demo_sweep
Six points, each one RL run of the main job (its steps, runtime as in configs/demo.py); re-running
the first command skips finished points and resumes interrupted ones. `:clip` sweeps the clip
range (zipped low/high) and the number of samples per claim instead.
"""

from deepretrieval_jax import sweep as hyper


def get_sweep(arg: str | None = None) -> list[hyper.Point]:
    if arg == "clip":
        return hyper.product(
            hyper.zip(
                hyper.sweep("config.ppo.clip_low", [0.1, 0.2, 0.2]),
                hyper.sweep("config.ppo.clip_high", [0.1, 0.2, 0.28]),
            ),
            hyper.sweep("config.sampling.n", [4, 8]),
        )
    return hyper.product(
        hyper.sweep("config.ppo.actor_lr", [2e-6, 5e-6, 1e-5]),
        hyper.sweep("config.sampling.temperature", [0.7, 1.0]),
    )
