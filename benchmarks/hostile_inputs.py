"""Bounds under hostile input (docs/architecture.md, "Threat model and limits"): prints them.

    PYTHONPATH=. python benchmarks/hostile_inputs.py

1. Answer parsing: worst time over hostile completions of 10k, 100k and 1M characters.
2. SQL: time to stop a runaway query and a printf bomb; peak memory (max RSS of a fresh
   process) of the largest single row a 10,000-character query can build.
3. HTTP: request rate seen by a loopback server that resets every third connection, with the
   client configured at 20 requests/s (every arrival must be a counted request).
"""

from __future__ import annotations

import asyncio
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time

from aiohttp import web

from deepretrieval_jax.rewards.parsing import parse_completion
from deepretrieval_jax.search.pubmed import PubMedBackend, PubMedConfig
from deepretrieval_jax.search.sql import SQLConfig, execute


def hostile_completions(n: int) -> dict[str, str]:
    return {
        "unclosed fence + spaces": "<think>t</think><answer>```" + " " * n + "x</answer>",
        "many <answer>": "<answer>" * (n // 8),
        "many </answer>": "<answer>" + "</answer>" * (n // 9),
        "deep JSON": "<think>t</think><answer>" + "[" * n + "</answer>",
        "prose + braces": "<think>t</think><answer>" + "{ " * (n // 2) + "}</answer>",
        "tags interleaved": "<think></think>" * (n // 15),
    }


def bench_parse() -> None:
    print("1. parse_completion, worst of 3 runs")
    for n in (10_000, 100_000, 1_000_000):
        worst = {}
        for name, text in hostile_completions(n).items():
            times = []
            for _ in range(3):
                start = time.perf_counter()
                parse_completion(text)
                times.append(time.perf_counter() - start)
            worst[name] = max(times)
        name = max(worst, key=worst.get)
        print(f"   {n:>9,} chars: worst {worst[name] * 1e3:8.2f} ms ({name})")


_MEMORY_CHILD = """
import resource, sys, tracemalloc
from deepretrieval_jax.search.sql import SQLConfig, execute
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
try:
    execute(sys.argv[2], sys.argv[1], SQLConfig(timeout_s=30))
    outcome = "ran"
except Exception as exc:
    outcome = type(exc).__name__
python_peak = tracemalloc.get_traced_memory()[1]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{outcome} {(peak - base) / 1024:.0f} {python_peak / 2**20:.0f}")
"""


def bench_sql(db: str) -> None:
    c = SQLConfig()
    print(f"2. SQL (defaults: timeout {c.timeout_s:g} s, {c.max_value_bytes:,} B per value, "
          f"{c.max_result_bytes:,} B per result, {c.max_rows:,} rows)")  # fmt: skip
    runaway = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c"
    for timeout in (0.5, 5.0):
        start = time.perf_counter()
        try:
            execute(runaway, db, SQLConfig(timeout_s=timeout))
        except Exception as exc:  # noqa: BLE001 (printed)
            kind = type(exc).__name__
        print(
            f"   runaway CTE, timeout {timeout} s: {kind} after {time.perf_counter() - start:.3f} s"
        )
    bomb = "SELECT " + " || ".join(["printf('%.*c', 2000000000, 'x')"] * 300)
    start = time.perf_counter()
    try:
        execute(bomb, db, SQLConfig())
    except Exception as exc:  # noqa: BLE001 (printed)
        kind = type(exc).__name__
    print(f"   300 chained printf bombs: {kind} after {time.perf_counter() - start:.3f} s")
    top = c.max_value_bytes.bit_length() - 1  # 2**top: the longest doubling under the cap.
    cte = f"WITH RECURSIVE r(s, n) AS (SELECT 'x', 0 UNION ALL SELECT s || s, n + 1 FROM r WHERE n < {top})"
    col = f"(SELECT s FROM r WHERE n = {top})"
    wide = f"{cte} SELECT " + ", ".join([col] * ((9_900 - len(cte)) // (len(col) + 2)))
    cols = wide.count(col)
    rows = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 10000) SELECT "
        + ", ".join([f"printf('%{c.max_printf_width}c', 'y')"] * 10)
        + " FROM c"
    )
    for name, sql in (
        (f"one row of {cols} columns of {2**top:,} B", wide),
        (f"up to 10,000 rows of 10 x {c.max_printf_width:,} B", rows),
    ):
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_CHILD, db, sql], capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )  # fmt: skip
        outcome, rss, python = out.stdout.split()
        print(f"   {name}: {outcome}, peak Python heap {python} MiB, max RSS +{rss} MiB")


class _Resetting:
    def __init__(self):
        self.arrivals: list[float] = []

    async def handle(self, request):
        self.arrivals.append(time.monotonic())
        if len(self.arrivals) % 3 == 1:
            request.transport.abort()
            raise asyncio.CancelledError
        return web.json_response({"esearchresult": {"count": "1", "idlist": ["1"]}})


async def bench_rate(n: int = 40, rate: float = 20.0) -> None:
    server = _Resetting()
    app = web.Application()
    app.router.add_get("/e/esearch.fcgi", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/e/"
    config = PubMedConfig(base_url=url, rate_per_s=rate, max_retries=8, backoff_base_s=0.0)
    async with PubMedBackend(config) as pm:
        await asyncio.gather(*(pm.search(f"q{i}", top_k=1) for i in range(n)))
        counted = pm.counters.requests
    await runner.cleanup()
    t = server.arrivals
    window = max(sum(1 for u in t if s <= u < s + 1.0) for s in t)
    span = t[-1] - t[0]
    print(f"3. HTTP at {rate:g}/s, every third connection reset, {n} searches:")
    print(f"   arrivals {len(t)}, counted requests {counted}, max in any 1 s window {window},")
    print(f"   mean rate {(len(t) - 1) / span:.2f}/s")


def main() -> None:
    bench_parse()
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "t.sqlite")
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.commit()
        conn.close()
        bench_sql(db)
    asyncio.run(bench_rate())
    print(
        f"(this process: max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
