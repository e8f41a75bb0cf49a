"""GPU benchmark of the PubMed recipe's shapes: decode roofline, update MFU, full PPO step.

Model: the Qwen2.5-3B shape (36 layers, hidden 2048, vocab 151,936) with random weights.
Batch: the PubMed recipe (64 prompts x 500 tokens in the 512 bucket, 500 new tokens, one
sample per prompt, PPO mini-batch 16) on ONE device (`--micro_batch` rows per backward pass).
Actor, critic (same shape) and reference all live on the device; params are stored in
`--param_dtype` (default bfloat16, so that actor + critic + AdamW states + reference fit one
80 GB H100; fp32 master weights need the FSDP recipe of docs/recipes.md).

Three measurements, each printed as a markdown row (figures only, never pass/fail):
1. decode: sampler tokens/s and the decode step's fraction of the HBM roofline: bytes read per
   step (all weights + the whole preallocated bf16 KV cache) / step time / --peak_bw. The step
   time is (time for L tokens - time for 1 token) / (L - 1) from one compiled function.
   Target: >= 60% of the roofline.
2. update: one `ppo_update` (actor + critic, one epoch of 4 mini-batches) on the full batch;
   MFU = 6 * (actor + critic params) * tokens / time / --peak_flops (remat's extra forward and
   attention FLOPs are not counted, the usual MFU convention). Target: >= 40%.
3. step: sample -> rewards from a stand-in E-utilities service (`search/serve.py` over a
   generated corpus, --latency_ms per request, no rate limit by default) while the old/ref
   log-prob and value passes run -> update; the trainer's overlap. Random weights cannot write
   queries, so the reward requests carry fixed, valid Boolean-query completions (one per row)
   instead of the sampled text; the search load is the real one. Target: <= 15 s per step.

    python benchmarks/gpu.py                    # all three (bash benchmarks/run_gpu.sh)
    python benchmarks/gpu.py --layers=1 --vocab_size=1024 --batch=4 --prompt_len=16 \
        --bucket=16 --new_tokens=4 --mini_batch=4 --micro_batch=2 --reps=1   # plumbing (CPU)

Peak numbers come from the device kind (NVIDIA's datasheets: H100 SXM 989 TFLOP/s dense bf16
and 3.35 TB/s HBM3; H200 the same FLOP/s and 4.8 TB/s HBM3e), H100 SXM for unknown kinds;
--peak_flops/--peak_bw override them. After each part the device's peak memory in use is printed
(`memory_stats()`, where the backend reports it).
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default="decode,update,step")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--vocab_size", type=int, default=0, help="0 = the preset's (151,936)")
    p.add_argument("--batch", type=int, default=64, help="prompts per step")
    p.add_argument("--prompt_len", type=int, default=500)
    p.add_argument("--bucket", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=500)
    p.add_argument("--mini_batch", type=int, default=16)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--param_dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--latency_ms", type=float, default=300.0)
    p.add_argument("--rate", type=float, default=0.0, help="stand-in requests/s; 0 = no limit")
    p.add_argument("--concurrency", type=int, default=64, help="reward pool searches in flight")
    p.add_argument("--peak_flops", type=float, default=0.0, help="0 = from the device kind")
    p.add_argument("--peak_bw", type=float, default=0.0, help="0 = from the device kind")
    return p.parse_args(argv)


# Dense bf16 FLOP/s and HBM bytes/s by device kind (NVIDIA datasheets, SXM parts).
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


def peaks_for(device_kind: str) -> tuple[str, float, float]:
    """(name, FLOP/s, bytes/s) of the first PEAKS entry named in `device_kind`; H100 if none."""
    name = next((k for k in PEAKS if k in device_kind), "H100")
    return name, *PEAKS[name]


def peak_memory_line(dev) -> str:
    stats = dev.memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return "# device memory: not reported by this backend"
    limit = stats.get("bytes_limit", 0)
    return f"# device memory peak so far: {stats['peak_bytes_in_use'] / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB"


_START = time.perf_counter()


def _progress(what: str) -> None:
    """A timestamped line on stderr, so that a slow compile or a stalled part shows where."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {what}", file=sys.stderr, flush=True)


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def _median(fn, reps):
    out, first = _timed(fn)
    _progress(f"first call (compile + run) {first:.1f} s")
    times = []
    for _ in range(reps):
        out, t = _timed(fn)
        times.append(t)
        _progress(f"timed call {t:.2f} s")
    return out, first, statistics.median(times)


class Setup:
    """Models, train state, jitted steps and sampler for the benchmark's shapes."""

    def __init__(self, args):
        from deepretrieval_jax import models, sharding
        from deepretrieval_jax.rl.state import PPOConfig, init_train_state
        from deepretrieval_jax.rl.update import make_jitted
        from deepretrieval_jax.sampler import Sampler, SamplingConfig, causal_lm_fns

        self.args = args
        vocab = {"vocab_size": args.vocab_size} if args.vocab_size else {}
        self.config = models.ModelConfig.qwen2_5_3b(
            num_layers=args.layers, dtype="bfloat16", param_dtype=args.param_dtype, remat=True,
            **vocab,
        )  # fmt: skip
        self.mesh = sharding.make_mesh()
        self.actor = models.CausalLM(self.config)
        self.critic = models.ValueModel(self.config)
        self.ppo = PPOConfig(mini_batch_size=args.mini_batch, micro_batch_size=args.micro_batch)
        self.state = init_train_state(self.ppo, self.actor, self.critic, jax.random.key(0),
                                      self.mesh)  # fmt: skip
        self.steps = make_jitted(self.ppo, self.actor, self.critic, self.mesh)
        sampling = SamplingConfig(
            method="sample", max_new_tokens=args.new_tokens, eos_ids=(), pad_id=0
        )
        self.sampler = Sampler(
            causal_lm_fns(self.config, cache_dtype="bfloat16", rules=sharding.SAMPLER_RULES),
            sampling,
            mesh=self.mesh,
            param_shardings=sharding.param_shardings(self.actor, self.mesh, sharding.SAMPLER_RULES),
            batch_axes=("data", "fsdp"),
            prompt_buckets=(args.bucket,),
        )
        rng = np.random.default_rng(0)
        shape = (args.batch, args.prompt_len)
        self.tokens = rng.integers(1, self.config.vocab_size, shape).astype(np.int32)
        self.mask = np.ones_like(self.tokens)
        self.count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
        self.weight_bytes = sum(
            x.size * x.dtype.itemsize for x in jax.tree.leaves(self.state.actor_params)
        )

    def sample(self, limit=None, seed=1):
        return self.sampler(self.state.actor_params, self.tokens, self.mask,
                            jax.random.key(seed), max_new_tokens=limit)  # fmt: skip

    def rollout_batch(self, out):
        from deepretrieval_jax.rl import rollout

        bt = self.steps.batch_shardings
        assemble = jax.jit(functools.partial(rollout.assemble_batch, n=1), out_shardings=bt)
        p_tok, p_mask = jax.device_put((self.tokens, self.mask), bt.tokens_BxT)
        if self.args.bucket != self.args.prompt_len:  # left-pad to the bucket like the trainer
            pad = self.args.bucket - self.args.prompt_len
            p_tok = jnp.pad(p_tok, ((0, 0), (pad, 0)))
            p_mask = jnp.pad(p_mask, ((0, 0), (pad, 0)))
        return assemble(p_tok, p_mask, out)


def decode(s: Setup):
    a = s.args
    _, first, full = _median(lambda: s.sample(), a.reps)
    _, _, one = _median(lambda: s.sample(limit=1), a.reps)
    step = (full - one) / (a.new_tokens - 1)
    c = s.config
    kv_bytes = 2 * c.num_layers * a.batch * (a.bucket + a.new_tokens) * c.num_kv_heads
    kv_bytes *= c.head_dim * 2
    step_bytes = s.weight_bytes + kv_bytes
    print("| decode | batch | tok/s | step ms | bytes/step GB | HBM roofline | compile s |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| Qwen2.5-3B shape, {c.num_layers} layers | {a.batch} | "
        f"{a.batch * a.new_tokens / full:.0f} | {step * 1e3:.2f} | {step_bytes / 1e9:.2f} | "
        f"{step_bytes / step / a.peak_bw:.1%} | {first - full:.0f} |"
    )


def update(s: Setup):
    a = s.args
    out = s.sample()
    batch = s.rollout_batch(out)
    _progress("update: rollout sampled; compiling and running prepare (log-probs, values)")
    scores = np.random.default_rng(0).normal(size=a.batch).astype(np.float32)
    batch = s.steps.prepare(s.state, batch).replace(
        scores_B=jax.device_put(scores, s.steps.batch_shardings.scores_B)
    )
    jax.block_until_ready(batch)
    _progress("update: prepare done; compiling and running the update")
    holder = {"state": s.state}

    def one():
        holder["state"], metrics = s.steps.update(holder["state"], batch)
        return metrics

    _, first, t = _median(one, a.reps)
    s.state = holder["state"]
    tokens = a.batch * (a.bucket + a.new_tokens)
    n_actor, n_critic = s.count(s.state.actor_params), s.count(s.state.critic_params)
    flops = 6 * (n_actor + n_critic) * tokens * s.ppo.ppo_epochs
    print("| update | rows x tokens | actor + critic params | time s | MFU | compile s |")
    print("|---|---|---|---|---|---|")
    print(
        f"| PPO epoch, mini-batch {a.mini_batch}, micro {a.micro_batch} | {a.batch} x "
        f"{a.bucket + a.new_tokens} | {(n_actor + n_critic) / 1e9:.2f}B | {t:.2f} | "
        f"{flops / t / a.peak_flops:.1%} | {first - t:.0f} |"
    )


def full_step(s: Setup):
    import reward_pool as rp  # benchmarks/reward_pool.py: corpus, requests, stand-in server

    from deepretrieval_jax.rewards.pool import PoolConfig, RewardPool
    from deepretrieval_jax.rewards.tasks import make_tasks
    from deepretrieval_jax.search.bm25 import BM25Backend, BM25Index
    from deepretrieval_jax.search.pubmed import PubMedBackend, PubMedConfig

    a = s.args
    rng = random.Random(0)
    index = BM25Index.build(rp.make_corpus(5000, rng))
    requests = rp.make_requests(index, a.batch, rng)
    server = rp.Server(BM25Backend(index), a.latency_ms / 1e3, a.rate or 1e9)
    backend = PubMedBackend(
        PubMedConfig(base_url=server.base_url, rate_per_s=a.rate or 1e9, top_k=3000)
    )
    pool = RewardPool(
        {"pubmed": backend}, make_tasks({"pubmed": None}), PoolConfig(concurrency=a.concurrency)
    ).start()
    bt = s.steps.batch_shardings

    def step(seed):
        times = {}
        t0 = time.perf_counter()
        out = jax.block_until_ready(s.sample(seed=seed))
        times["sample"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        pending = pool.submit(requests)  # the trainer submits right after decoding
        batch = s.steps.prepare(s.state, s.rollout_batch(out))
        results = pending.result()
        times["reward wait"] = time.perf_counter() - t1
        scores = np.array([r.reward for r in results], np.float32)
        batch = batch.replace(scores_B=jax.device_put(scores, bt.scores_B))
        batch = jax.block_until_ready(batch)
        times["prepare + reward"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        s.state, metrics = s.steps.update(s.state, batch)
        jax.block_until_ready(metrics)
        times["update"] = time.perf_counter() - t2
        times["step"] = time.perf_counter() - t0
        return times

    try:
        _progress(f"step: first step (compiles) {step(100)['step']:.1f} s")
        runs = []
        for i in range(a.reps):
            runs.append(step(101 + i))
            _progress(f"step: timed step {runs[-1]['step']:.2f} s")
    finally:
        pool.close()
        server.stop()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"| full step ({a.latency_ms:g} ms search latency) | sample s | reward wait s | "
          "prepare + reward s | update s | step s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    print(
        f"| {a.batch} prompts, {a.new_tokens} new tokens | {med['sample']:.2f} | "
        f"{med['reward wait']:.2f} | {med['prepare + reward']:.2f} | {med['update']:.2f} | "
        f"{med['step']:.2f} |"
    )


def main(argv=None):
    args = parse_args(argv)
    dev = jax.devices()[0]
    print(f"# {dev.platform} {dev.device_kind} x{jax.device_count()}; jax {jax.__version__}")
    part, flops, bw = peaks_for(dev.device_kind)
    args.peak_flops = args.peak_flops or flops
    args.peak_bw = args.peak_bw or bw
    print(f"# peaks: {args.peak_flops / 1e12:.0f} TFLOP/s bf16, {args.peak_bw / 1e12:.2f} TB/s "
          f"({part} figures unless overridden)")  # fmt: skip
    _progress("building models, train state and jitted steps")
    s = Setup(args)
    print(
        f"# actor {s.count(s.state.actor_params) / 1e9:.2f}B params in {args.param_dtype}; "
        f"batch {args.batch} x ({args.prompt_len} -> bucket {args.bucket}) + {args.new_tokens}"
    )
    parts = {"decode": decode, "update": update, "step": full_step}
    for name in args.parts.split(","):
        _progress(f"part {name}")
        parts[name](s)
        print(peak_memory_line(dev))
        print()


if __name__ == "__main__":
    main()
