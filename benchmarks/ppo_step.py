"""PPO step time by phase (sample, old/ref log-probs, values, update) for two model shapes.

Shapes (random weights, fp32 on CPU):
  tiny   a 0.4M-parameter toy (2 layers, hidden 64, 4,224 ids: the earlier demo's random policy;
         the main job now trains SmolLM2-135M, measured end to end in docs/demo_results.md),
         16 prompts x 256 prompt tokens, 48 new tokens, mini-batch 8 (two updates per step).
  0.5b   Qwen2.5-0.5B's widths (hidden 896, 14/2 heads, MLP 4864, full 151,936 vocab) with
         --layers decoder layers (2 by default instead of 24: memory and time on a shared CPU),
         8 prompts x 128 tokens, 32 new tokens, mini-batch 4.
Both use the demo's PPO recipe (GAE critic of the same shape, reference model, KL in reward).

Phases are timed separately with `jax.block_until_ready` after each (the trainer overlaps the
log-prob/value passes with the reward wait; here nothing overlaps, and the reward phase is
left out: see benchmarks/reward_pool.py and bm25_scifact.py). Each phase runs once to compile
(reported) and then --reps times (median reported).

    python benchmarks/ppo_step.py                         # both shapes, ~5 min on 2 idle cores
    python benchmarks/ppo_step.py --shapes=tiny --reps=5
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import time

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int  # prompts per step (n = 1 sample each)
    prompt_len: int
    new_tokens: int
    mini_batch: int


SHAPES = {
    "tiny": Shape("tiny (0.4M toy)", 16, 256, 48, 8),
    "0.5b": Shape("Qwen2.5-0.5B widths", 8, 128, 32, 4),
}


def model_config(name: str, layers: int):
    from deepretrieval_jax.models import ModelConfig

    f32 = dict(dtype="float32", param_dtype="float32", remat=False)
    if name == "tiny":
        return ModelConfig.tiny(
            vocab_size=4224, embed_dim=64, mlp_dim=192, num_heads=4, num_kv_heads=2,
            head_dim=16, max_position_embeddings=1024, **f32,
        )  # fmt: skip
    return ModelConfig.qwen2_5_0_5b(num_layers=layers, **f32)


def _median_time(fn, reps: int):
    first_t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - first_t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, first, statistics.median(times)


def bench_shape(key: str, layers: int, reps: int) -> dict:
    from deepretrieval_jax import models, sharding
    from deepretrieval_jax.rl import rollout
    from deepretrieval_jax.rl.state import PPOConfig, init_train_state
    from deepretrieval_jax.rl.update import make_jitted
    from deepretrieval_jax.sampler import Sampler, SamplingConfig, causal_lm_fns

    shape = SHAPES[key]
    cfg_model = model_config(key, layers)
    ppo = PPOConfig(mini_batch_size=shape.mini_batch, actor_lr=1e-4, critic_lr=1e-3)
    mesh = sharding.make_mesh()
    actor, critic = models.CausalLM(cfg_model), models.ValueModel(cfg_model)
    state = init_train_state(ppo, actor, critic, jax.random.key(0), mesh)
    steps = make_jitted(ppo, actor, critic, mesh)
    sampler = Sampler(
        causal_lm_fns(cfg_model, rules=sharding.SAMPLER_RULES),
        SamplingConfig(method="sample", max_new_tokens=shape.new_tokens, eos_ids=(), pad_id=0),
        mesh=mesh,
        param_shardings=sharding.param_shardings(actor, mesh, sharding.SAMPLER_RULES),
        batch_axes=("data", "fsdp"),
        prompt_buckets=(shape.prompt_len,),
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg_model.vocab_size, (shape.batch, shape.prompt_len), np.int32)
    mask = np.ones_like(tokens)
    bt = steps.batch_shardings
    assemble = jax.jit(functools.partial(rollout.assemble_batch, n=1), out_shardings=bt)
    p_tok, p_mask = jax.device_put((tokens, mask), bt.tokens_BxT)

    out, c_sample, t_sample = _median_time(
        lambda: sampler(state.actor_params, tokens, mask, jax.random.key(1)), reps
    )
    batch = assemble(p_tok, p_mask, out)
    _, c_logp, t_logp = _median_time(lambda: steps.logprobs(state, batch), reps)
    _, c_ref, t_ref = _median_time(lambda: steps.ref_logprobs(state, batch), reps)
    _, c_val, t_val = _median_time(lambda: steps.values(state, batch), reps)
    scores = jax.device_put(rng.normal(size=shape.batch).astype(np.float32), bt.scores_B)
    batch = batch.replace(
        old_logp_BxT=steps.logprobs(state, batch),
        ref_logp_BxT=steps.ref_logprobs(state, batch),
        old_values_BxT=steps.values(state, batch),
        scores_B=scores,
    )
    holder = {"state": state}

    def update():
        holder["state"], m = steps.update(holder["state"], batch)
        return m

    _, c_upd, t_upd = _median_time(update, reps)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(holder["state"].actor_params))
    phases = {"sample": t_sample, "old logp": t_logp, "ref logp": t_ref, "values": t_val,
              "update": t_upd}  # fmt: skip
    compile_s = c_sample + c_logp + c_ref + c_val + c_upd - sum(phases.values())
    return {"shape": shape, "layers": cfg_model.num_layers, "params": params,
            "vocab": cfg_model.vocab_size, "phases": phases, "compile_s": compile_s}  # fmt: skip


def table(results) -> str:
    names = list(results[0]["phases"])
    head = "| model | layers | params | batch x (prompt + new) | " + " | ".join(names)
    lines = [head + " | step (sum) | compile |", "|---" * (len(names) + 6) + "|"]
    for r in results:
        s = r["shape"]
        cells = " | ".join(f"{r['phases'][n]:.2f} s" for n in names)
        lines.append(
            f"| {s.name} | {r['layers']} | {r['params'] / 1e6:.1f}M | "
            f"{s.batch} x ({s.prompt_len} + {s.new_tokens}) | {cells} | "
            f"{sum(r['phases'].values()):.2f} s | {r['compile_s']:.0f} s |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="tiny,0.5b", help="comma-separated: tiny, 0.5b")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the 0.5b shape")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per phase")
    args = p.parse_args()
    load = os.getloadavg()[0]
    results = [bench_shape(k, args.layers, args.reps) for k in args.shapes.split(",")]
    print(f"# {jax.devices()[0].platform}, {os.cpu_count()} cores, load average {load:.1f}")
    print(table(results))


if __name__ == "__main__":
    main()
