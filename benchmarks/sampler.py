"""Sampler throughput: our jitted sampler against transformers' generate; prints figures.

CPU (default): a Qwen2.5-0.5B-shaped model with random weights and fewer layers (--layers, 4 by
default), fp32, greedy, prompt 256, 128 new tokens, batch 1 and 16; transformers runs on the
same weights with torch.set_num_threads(--threads). Throughput = batch * new tokens / wall time
of one whole call (prefill included) for both. JAX's compile time is reported apart: the first
call is a warm-up.

    python benchmarks/sampler.py                      # ~5 min on 2 idle cores
    python benchmarks/sampler.py --batches=16 --layers=2

GPU (--gpu): the Qwen2.5-3B shape (36 layers) in bf16 (params and KV cache), batch 64, prompt
500 (bucket 512), 500 new tokens; JAX only. Reports tokens/s and the decode step's fraction of
the HBM-bandwidth roofline: bytes read per step (all weights + the whole preallocated KV cache,
which our attention reads every step) / measured step time / --peak_bw (H100 SXM: 3.35e12 B/s).
The step time is (time of L tokens - time of 1 token) / (L - 1), both from one compiled
function (the per-call token limit does not recompile).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="Qwen2.5-3B shape, bf16, JAX only")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (CPU default 4)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument("--prompt_len", type=int, default=None)
    p.add_argument("--new_tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU mode)")
    p.add_argument("--peak_bw", type=float, default=3.35e12, help="HBM bytes/s (H100 SXM)")
    p.add_argument("--skip_hf", action="store_true", help="time only the JAX sampler")
    return p.parse_args()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def jax_sampler(config, prompt_len, new_tokens, cache_dtype=None):
    from deepretrieval_jax.sampler import Sampler, SamplingConfig, causal_lm_fns

    greedy = SamplingConfig(method="greedy", max_new_tokens=new_tokens, eos_ids=(), pad_id=0)
    return Sampler(causal_lm_fns(config, cache_dtype), greedy, prompt_buckets=(prompt_len,))


def run_jax(sampler, params, tokens, mask, limit=None):
    out = sampler(params, tokens, mask, max_new_tokens=limit)
    return jax.block_until_ready(out)


def cpu_benchmark(args):
    import torch
    import transformers

    from deepretrieval_jax import hf_io
    from deepretrieval_jax.models import ModelConfig

    torch.set_num_threads(args.threads)
    layers = args.layers or 4
    prompt_len, new_tokens = args.prompt_len or 256, args.new_tokens or 128
    batches = [int(b) for b in (args.batches or "1,16").split(",")]
    config = ModelConfig.qwen2_5_0_5b(num_layers=layers)
    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(**config.to_hf_config())
    torch_model = transformers.Qwen2ForCausalLM(hf_config).eval()  # random init, std 0.02
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        config, params = hf_io.load_params(tmp)
    sampler = jax_sampler(config, prompt_len, new_tokens)
    print(f"# load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        f"| Qwen2.5-0.5B shape, {layers} layers, fp32 | batch | prompt | new | "
        "JAX tok/s | HF tok/s | ratio | JAX compile s |"
    )
    for batch in batches:
        rng = np.random.default_rng(batch)
        tokens = rng.integers(1, config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
        mask = np.ones_like(tokens)
        traces = sampler.trace_count
        _, first = timed(run_jax, sampler, params, tokens, mask)
        out, steady = timed(run_jax, sampler, params, tokens, mask)
        assert sampler.trace_count == traces + 1, "the timed call recompiled"
        jax_tps = batch * new_tokens / steady
        hf_tps = float("nan")
        if not args.skip_hf:
            with torch.no_grad():
                ref, hf_time = timed(
                    torch_model.generate,
                    input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            hf_tps = batch * new_tokens / hf_time
            same = np.mean(ref[:, prompt_len:].numpy() == np.asarray(out.tokens_BnxL))
            print(f"# batch {batch}: greedy tokens equal to transformers: {same:.1%}")
        print(
            f"| | {batch} | {prompt_len} | {new_tokens} | {jax_tps:.1f} | {hf_tps:.1f} | "
            f"{jax_tps / hf_tps:.2f}x | {first - steady:.1f} |"
        )


def gpu_benchmark(args):
    from deepretrieval_jax.models import CausalLM, ModelConfig

    layers = args.layers or 36
    prompt_len, new_tokens = args.prompt_len or 500, args.new_tokens or 500
    bucket = 512 if prompt_len <= 512 else prompt_len
    batches = [int(b) for b in (args.batches or "64").split(",")]
    config = ModelConfig.qwen2_5_3b(num_layers=layers, dtype="bfloat16", param_dtype="bfloat16")
    model = CausalLM(config)
    dummy = jnp.zeros((1, 1), jnp.int32)
    init = lambda r: nn.meta.unbox(model.init(r, dummy, dummy, dummy)["params"])  # noqa: E731
    params = jax.jit(init)(jax.random.key(0))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    sampler = jax_sampler(config, bucket, new_tokens, cache_dtype="bfloat16")
    print(f"# {jax.devices()[0].device_kind}; weights {weight_bytes / 1e9:.2f} GB (bf16)")
    print(
        "| Qwen2.5-3B shape, bf16 | batch | prompt | new | tok/s | step ms | "
        "bytes/step GB | roofline | compile s |"
    )
    for batch in batches:
        rng = np.random.default_rng(batch)
        tokens = rng.integers(1, config.vocab_size, size=(batch, prompt_len)).astype(np.int32)
        mask = np.ones_like(tokens)
        _, first = timed(run_jax, sampler, params, tokens, mask)
        _, full = timed(run_jax, sampler, params, tokens, mask)
        _, one = timed(run_jax, sampler, params, tokens, mask, limit=1)
        step = (full - one) / (new_tokens - 1)
        slots = bucket + new_tokens
        kv_bytes = 2 * layers * batch * slots * config.num_kv_heads * config.head_dim * 2
        step_bytes = weight_bytes + kv_bytes
        roofline = step_bytes / step / args.peak_bw
        print(
            f"| | {batch} | {prompt_len} | {new_tokens} | {batch * new_tokens / full:.0f} | "
            f"{step * 1e3:.2f} | {step_bytes / 1e9:.2f} | {roofline:.1%} | {first - full:.1f} |"
        )


if __name__ == "__main__":
    args = parse_args()
    gpu_benchmark(args) if args.gpu else cpu_benchmark(args)
