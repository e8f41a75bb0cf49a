"""Serving throughput and latency: requests/s and p50/p95 at 1, 8 and 32 concurrent clients.

    python benchmarks/serve.py [--models=tiny,qwen0.5b] [--layers_0_5b=4] [--requests=64]
        [--max_new_tokens=16] [--max_batch=8] [--unbatched]

Starts the real service (launch/serve.py's app) in-process on 127.0.0.1 with random weights
and drives it over HTTP with aiohttp clients, each client sending `/v1/completions` requests
(greedy, `max_new_tokens`; ~110-char prompts, one 128-token bucket) back to back. Before timing, every batch shape
is compiled (warm-up), so the figures are steady-state. Models:
  tiny      `ModelConfig.tiny()` (2 layers, width 64) with a 100-id test tokenizer
  qwen0.5b  Qwen2.5-0.5B's shape (width 896, GQA 14:2, vocab 151,936, Qwen2.5 tokenizer) with
            `--layers_0_5b` of its 24 layers (CPU time); weights random
`--unbatched` adds a max_batch=1 run per concurrency (what batching buys). Prints a markdown
table; never passes or fails on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the tiny tokenizer and random params


def make_policy(name: str, layers: int, max_new_tokens: int, max_batch: int):
    from tiny_models import random_params, save_tiny_policy

    from deepretrieval_jax.models import CausalLM, ModelConfig
    from deepretrieval_jax.serving import policy as policy_lib
    from deepretrieval_jax.tokenizer import Tokenizer

    kw = dict(max_new_tokens=max_new_tokens, max_batch=max_batch, prompt_buckets=(128,))
    if name == "tiny":
        path = save_tiny_policy(Path(tempfile.mkdtemp(prefix="bench_serve_")))
        return policy_lib.load_policy(path, name="tiny", **kw)
    config = ModelConfig.qwen2_5_0_5b(num_layers=layers)
    params = random_params(CausalLM(config), config, scale=0.05)
    return policy_lib.Policy(config, params, Tokenizer.qwen25(), name=name, **kw)


def warm_up(policy, prompt_tokens):
    from deepretrieval_jax.serving.policy import GenSettings

    b = 1
    while b <= policy.max_batch:
        policy.generate([prompt_tokens] * b, GenSettings(), [policy.max_new_tokens] * b)
        b *= 2


async def drive(policy, clients: int, requests: int, max_batch: int, prompts) -> dict:
    import aiohttp
    from aiohttp import web

    from deepretrieval_jax.serving import server
    from deepretrieval_jax.serving.scheduler import SchedulerConfig

    # Closed-loop clients queue every request at once; on a loaded 2-core CPU the 0.5B shape's
    # queue takes minutes to drain, so the service's 120 s default would turn slow into failed.
    sched = SchedulerConfig(max_batch=max_batch, max_wait_ms=5.0, max_queue=1024, timeout_s=3600)
    service = server.Service(policy, server.ServerConfig(scheduler=sched))
    runner = web.AppRunner(server.make_app(service))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/completions"
    latencies, tokens, todo = [], [], iter(range(requests))

    async def client(http):
        for i in todo:
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": policy.max_new_tokens,
                    "temperature": 0}  # fmt: skip
            t0 = time.perf_counter()
            async with http.post(url, json=body) as r:
                reply = await r.json()
                assert r.status == 200, reply
            latencies.append(time.perf_counter() - t0)
            tokens.append(reply["usage"]["completion_tokens"])

    calls0 = policy.calls
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    await runner.cleanup()
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    return {
        "rps": requests / wall,
        "tok_s": sum(tokens) / wall,
        "p50": statistics.median(latencies),
        "p95": q[18],
        "calls": policy.calls - calls0,
        "mean_tokens": statistics.fmean(tokens),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="tiny,qwen0.5b")
    p.add_argument("--layers_0_5b", type=int, default=4)
    p.add_argument("--requests", type=int, default=64, help="per concurrency level")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--max_batch", type=int, default=8)
    p.add_argument("--unbatched", action="store_true")
    args = p.parse_args()
    import jax

    print(f"devices: {jax.devices()}  cpus: {os.cpu_count()}  load: {os.getloadavg()}")
    rows = []
    for name in args.models.split(","):
        policy = make_policy(name, args.layers_0_5b, args.max_new_tokens, args.max_batch)
        prompts = [f"Query {i}: find studies on vitamin D and bone fractures in adults over "
                   f"sixty, randomised trials only, published after {2000 + i}." for i in range(32)]  # fmt: skip
        t0 = time.perf_counter()
        warm_up(policy, policy.encode(prompts[0]))
        print(f"{name}: warm-up (compiles) {time.perf_counter() - t0:.1f} s", flush=True)
        for clients in (int(c) for c in args.clients.split(",")):
            for batch in [args.max_batch] + ([1] if args.unbatched and clients > 1 else []):
                r = asyncio.run(drive(policy, clients, args.requests, batch, prompts))
                rows.append((name, clients, batch, r))
                print(f"{name} clients={clients} max_batch={batch}: {r}", flush=True)
    print("\n| model | clients | max_batch | req/s | tokens/s | p50 s | p95 s | sampler calls |")
    print("|---|---|---|---|---|---|---|---|")
    for name, clients, batch, r in rows:
        print(f"| {name} | {clients} | {batch} | {r['rps']:.2f} | {r['tok_s']:.1f} | "
              f"{r['p50']:.3f} | {r['p95']:.3f} | {r['calls']} |")  # fmt: skip


if __name__ == "__main__":
    main()
