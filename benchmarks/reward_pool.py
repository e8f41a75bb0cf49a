"""Reward pool vs the original serial client, against a local E-utilities stand-in.

    python benchmarks/reward_pool.py [--queries 64] [--latency_ms 300] [--rate 10]

The stand-in is `search/serve.py`'s `make_app` over a generated BM25 corpus, in-process on a
free 127.0.0.1 port, adding `latency_ms` to every answer and answering 429 above `rate`
requests/s (like NCBI with an API key). Measured in one run:

1. serial: the original's client, one blocking request after another, two requests per query
   (the search, then the count query it also sent) and a 0.2 s sleep after each query;
2. pool: `RewardPool` with the PubMed backend (token bucket at `rate`), `cache_mode="record"`;
3. overlap: submit(), 3 s of NumPy "device work" on the caller's thread, then result();
4. replay: the same batch replayed from the recorded sqlite cache with the server stopped.

The rate-limit floor is queries / rate seconds (6.4 s for 64 queries at 10/s). Prints figures;
never passes or fails on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
from aiohttp import web

from deepretrieval_jax.rewards.pool import PoolConfig, RewardPool, RewardRequest
from deepretrieval_jax.rewards.tasks import make_tasks
from deepretrieval_jax.search.bm25 import BM25Backend, BM25Index
from deepretrieval_jax.search.pubmed import PubMedBackend, PubMedConfig
from deepretrieval_jax.search.serve import make_app

VOCAB = [f"term{i}" for i in range(400)]


def make_corpus(n_docs: int, rng: random.Random):
    weights = [1.0 / (i + 1) for i in range(len(VOCAB))]  # Zipf-like term frequencies
    for d in range(n_docs):
        words = rng.choices(VOCAB, weights, k=60)
        yield (str(30_000_000 + d), " ".join(words), 20000101 + 10_000 * rng.randrange(20))


def make_requests(index: BM25Index, n: int, rng: random.Random) -> list[RewardRequest]:
    requests = []
    for i in range(n):
        a, b, c, d = rng.sample(VOCAB[20:200], 4)
        query = f"({a} OR {b}) AND ({c} OR {d})"
        relevant = index.search(query, top_k=3000)[:40]
        label = rng.sample(relevant, min(10, len(relevant))) + [
            f"missing{i}-{j}" for j in range(i % 10)
        ]
        completion = f'<think>\nPICO terms.\n</think>\n<answer>{{"query": "{query}"}}</answer>'
        requests.append(RewardRequest("pubmed", completion, label, {"maxdate": "2030/01/01"}))
    return requests


class Server:
    """The stand-in on its own loop thread."""

    def __init__(self, backend, latency_s: float, rate: float):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = self.call(self._start(backend, latency_s, rate))
        self.port = self.runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{self.port}/entrez/eutils/"

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _start(self, backend, latency_s, rate):
        await backend.open()
        runner = web.AppRunner(make_app(backend, latency_s, rate), shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    def stop(self):
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


def serial_client(base_url: str, requests: list[RewardRequest]) -> tuple[float, list]:
    """The original: blocking GETs, the model's query pasted in, two per query, 0.2 s sleep."""
    start = time.monotonic()
    id_lists = []
    for req in requests:
        query = json.loads(req.completion.split("<answer>")[1].split("</answer>")[0])["query"]
        params = {"db": "pubmed", "term": query, "retmode": "json", "retmax": 3000}
        params.update(datetype="pdat", mindate="1970/01/01", maxdate="2030/01/01")
        for retmax in (3000, 0):  # the search, then the count query
            url = base_url + "esearch.fcgi?" + urllib.parse.urlencode({**params, "retmax": retmax})
            with urllib.request.urlopen(url, timeout=30) as resp:
                body = json.load(resp)
            if retmax:
                id_lists.append(body["esearchresult"]["idlist"])
        time.sleep(0.2)
    return time.monotonic() - start, id_lists


def device_work(seconds: float) -> int:
    """NumPy matmuls for `seconds` (releases the GIL like device dispatch does)."""
    x = np.random.default_rng(0).standard_normal((384, 384), dtype=np.float32)
    end, steps = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        x = np.tanh(x @ x * 1e-3)
        steps += 1
    return steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--latency_ms", type=float, default=300.0)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--docs", type=int, default=5000)
    args = parser.parse_args()
    rng = random.Random(0)

    index = BM25Index.build(make_corpus(args.docs, rng))
    requests = make_requests(index, args.queries, rng)
    server = Server(BM25Backend(index), args.latency_ms / 1e3, args.rate)
    floor = args.queries / args.rate
    print(f"stand-in: {index.num_docs} docs, latency {args.latency_ms:g} ms, {args.rate:g} req/s")

    serial_s, serial_ids = serial_client(server.base_url, requests)

    workdir = tempfile.mkdtemp(prefix="reward_pool_bench_")
    cache = os.path.join(workdir, "cache.sqlite")
    tasks = make_tasks({"pubmed": None})

    def pool(mode, port=server.port):
        url = f"http://127.0.0.1:{port}/entrez/eutils/"
        backend = PubMedBackend(PubMedConfig(base_url=url, rate_per_s=args.rate, top_k=3000))
        return RewardPool({"pubmed": backend}, tasks, PoolConfig(cache_mode=mode, cache_path=cache))

    with pool("record") as p:
        start = time.monotonic()
        results = p.score(requests)
        pool_s = time.monotonic() - start
        m = p.metrics(reset=True)
    with pool("off") as p:  # the service answers again: this run measures the overlap
        start = time.monotonic()
        pending = p.submit(requests)
        submit_ms = (time.monotonic() - start) * 1e3
        steps = device_work(3.0)
        overlapped = pending.result()
        overlap_s = time.monotonic() - start
    port = server.port
    server.stop()
    with pool("replay", port) as p:
        start = time.monotonic()
        replayed = p.score(requests)
        replay_s = time.monotonic() - start

    same_ids = all(
        r.metrics["retrieved"] == len(ids) for r, ids in zip(results, serial_ids, strict=True)
    )
    print(f"serial client (2 requests/query + 0.2 s sleep): {serial_s:6.2f} s")
    print(
        f"reward pool:                                    {pool_s:6.2f} s  "
        f"(floor {floor:.2f} s, {100 * (pool_s / floor - 1):+.1f}%; {serial_s / pool_s:.1f}x faster)"
    )
    print(
        f"  submit() returned in {submit_ms:.2f} ms; pool + 3.0 s device work ({steps} steps) "
        f"took {overlap_s:.2f} s"
    )
    print(
        f"  replay from sqlite, server stopped:          {replay_s:6.3f} s, identical rewards: "
        f"{replayed == results == overlapped}"
    )
    print(
        f"  same result sizes as the serial client: {same_ids}; mean reward "
        f"{np.mean([r.reward for r in results]):.3f}; invalid {m['invalid_fraction']:.2f}"
    )
    print(
        f"  http requests {m['http_requests']:.0f}, 429s {m['http_429']:.0f}, retries "
        f"{m['retries']:.0f}, latency p50/p95/p99 {m['latency_p50_ms']:.0f}/"
        f"{m['latency_p95_ms']:.0f}/{m['latency_p99_ms']:.0f} ms"
    )


if __name__ == "__main__":
    main()
