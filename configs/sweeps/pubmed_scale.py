"""PubMed (configs/pubmed.py) across policy sizes, each with its own learning rate.

Launch on a SLURM cluster (writes WORKDIR/sweep.sbatch, an array job of one task per point):
    python launch/sweep.py --config=configs/pubmed.py --sweep=configs/sweeps/pubmed_scale.py \
        --workdir=/shared/runs/pubmed_scale --mode=slurm \
        --sbatch=--gres=gpu:8 --sbatch=--time=48:00:00 --override=data.data_dir=/data
    sbatch /shared/runs/pubmed_scale/sweep.sbatch
or on a TPU pod slice (--mode=tpu --tpu_name=NAME --zone=ZONE writes WORKDIR/tpu_sweep.sh).
HF checkpoints are expected under /ckpt/<repo name>; each point's model preset and weights
move together (a zip), the learning rate is crossed with both.
"""

from deepretrieval_jax import sweep as hyper

PRESETS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b")
HF_DIRS = tuple(f"/ckpt/Qwen2.5-{p.split('-')[1].upper()}-Instruct" for p in PRESETS)


def get_sweep(arg: str | None = None) -> list[hyper.Point]:
    del arg
    return hyper.product(
        hyper.zip(
            hyper.sweep("config.model.preset", PRESETS, name="model"),
            hyper.sweep("config.model.hf_path", HF_DIRS, hidden=True),
        ),
        hyper.sweep("config.ppo.actor_lr", [5e-7, 1e-6]),
    )
