"""Tests for rewards/pool.py and rewards/cache.py against real aiohttp servers on 127.0.0.1.

The fake E-utilities server (tests/search_fakes.py) runs on its own event loop thread, the pool
on its own; the PubMed backend talks real HTTP between them. Synchronisation is by events and
joins, never by sleeping.
"""

import asyncio
import threading
import time

import pytest
from aiohttp import web
from search_fakes import FakeEutils, Fault

from deepretrieval_jax.rewards.cache import ResultCache, cache_key, normalise_query
from deepretrieval_jax.rewards.pool import PoolConfig, RewardBatchError, RewardPool, RewardRequest
from deepretrieval_jax.rewards.tasks import make_tasks
from deepretrieval_jax.search.base import BackendError, SearchBackend
from deepretrieval_jax.search.pubmed import PubMedBackend, PubMedConfig


class Eutils(FakeEutils):
    """Term "q<i>" answers ids "<i>-0" .. "<i>-<i>" (i+1 ids, so each answer is recognisable).

    Terms containing FAIL answer 503, SLOW ones hang; tracks the peak of concurrent requests.
    """

    def __init__(self, **kw):
        super().__init__(results=self.ids, **kw)
        self.inflight = self.max_inflight = 0
        self.first_request = threading.Event()

    @staticmethod
    def ids(term):
        i = int(term[1:]) if term[:1] == "q" and term[1:].isdigit() else 0
        return [f"{i}-{j}" for j in range(i + 1)]

    async def _handle(self, request):
        self.first_request.set()
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            term = request.query.get("term", "")
            if "FAIL" in term:
                return web.json_response({"error": "down"}, status=503)
            if "SLOW" in term:
                await asyncio.sleep(30)
            return await super()._handle(request)
        finally:
            self.inflight -= 1


@pytest.fixture(scope="module")
def server_loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


@pytest.fixture
def servers(server_loop):
    """start(**kw) -> a running Eutils; stop(server) stops it early; the rest stop at teardown."""
    running = []

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, server_loop).result(timeout=30)

    class Control:
        def start(self, **kw):
            server = call(Eutils(**kw).start())
            running.append(server)
            return server

        def stop(self, server):
            call(server.stop())
            running.remove(server)

    yield Control()
    for server in running:
        call(server.stop())


def pubmed(server, port=None, **kw):
    base = server.base_url if port is None else f"http://127.0.0.1:{port}/entrez/eutils/"
    cfg = dict(base_url=base, rate_per_s=200.0, backoff_base_s=0.01, timeout_s=5.0)
    return PubMedBackend(PubMedConfig(**{**cfg, **kw}))


def make_pool(backend, **config):
    return RewardPool({"pubmed": backend}, make_tasks({"pubmed": None}), PoolConfig(**config))


def request(i, term=None, label=None):
    term = f"q{i}" if term is None else term
    completion = f'<think>\nplan\n</think>\n<answer>{{"query": "{term}"}}</answer>'
    return RewardRequest("pubmed", completion, label or [f"{i}-0"], {"maxdate": "2020/01/01"})


def check_own_results(results, indices):
    """Each request got exactly its own answer, in order: i+1 ids and its label found."""
    assert len(results) == len(indices)
    for i, r in zip(indices, results, strict=True):
        assert (r.valid, r.query, r.metrics["retrieved"], r.metrics["recall"]) == (
            True,
            f"q{i}",
            i + 1,
            1.0,
        )
        assert r.reward == 6.0


def test_submit_returns_at_once_and_overlaps(servers):
    server = servers.start(latency_s=0.5)
    with make_pool(pubmed(server)) as pool:
        start = time.monotonic()
        pending = pool.submit([request(i) for i in range(8)])
        submit_s = time.monotonic() - start
        assert submit_s < 0.1, submit_s  # far below the 0.5 s server latency
        # The caller is free: requests reach the server before anyone calls result().
        assert server.first_request.wait(timeout=10)
        assert not pending.done()
        check_own_results(pending.result(timeout=30), range(8))
        elapsed = time.monotonic() - start
    assert elapsed < 8 * 0.5  # concurrent, not serial
    assert server.max_inflight >= 4


def test_faults_retried_rate_limited_and_nothing_lost(servers):
    server = servers.start()
    server.inject(
        Fault.status(500),
        Fault.drop(),
        Fault.status(429, retry_after="0.3"),
        Fault.status(502),
        Fault.malformed(),  # retried by the HTTP layer like a 5xx (issue 14)
    )
    backend = pubmed(server, rate_per_s=10.0, max_retries=3)
    n = 16
    with make_pool(backend, retries=1, backoff_base_s=0.01) as pool:
        results = pool.score([request(i) for i in range(n)], timeout=60)
        metrics = pool.metrics(reset=True)
        assert pool.metrics()["samples"] == 0.0  # reset per step
    check_own_results(results, range(n))
    assert metrics["http_429"] == 1 and metrics["pool_retries"] == 0
    assert metrics["retries"] == metrics["http_retries"] == 5
    assert metrics["http_requests"] == n + 5 and metrics["invalid_fraction"] == 0.0
    assert metrics["latency_p50_ms"] > 0 and metrics["latency_p99_ms"] >= metrics["latency_p95_ms"]
    times = [r.t for r in server.requests]
    # Token bucket at 10/s: n + 5 requests span at least (n + 4) / 10 s; no 1 s window > 11.
    assert times[-1] - times[0] >= 0.9 * (n + 4) / 10
    assert max(sum(1 for u in times if t <= u < t + 1.0) for t in times) <= 11
    # Retry-After honoured: for 0.3 s after the 429 at most one request goes out, one whose
    # token was granted before the 429 was read (requests still waiting in the bucket re-check
    # the pause after sleeping).
    t429 = next(r.t for r in server.requests if r.answered == "status_429")
    assert sum(1 for t in times if t429 < t < t429 + 0.29) <= 1
    assert server.violations == []


def test_service_rate_limit_429s_are_absorbed(servers):
    server = servers.start(rate_limit=5)  # the service allows 5/s, the client sends 20/s
    backend = pubmed(server, rate_per_s=20.0, max_retries=6)
    with make_pool(backend) as pool:
        results = pool.score([request(i) for i in range(10)], timeout=60)
        metrics = pool.metrics()
    check_own_results(results, range(10))
    assert metrics["http_429"] >= 1 and metrics["http_retries"] >= metrics["http_429"]


def test_infrastructure_failures_are_invalid_never_penalties(servers):
    server = servers.start()
    backend = pubmed(server, max_retries=1, max_query_chars=100)
    batch = [
        request(0),
        request(1, term="FAIL"),
        request(2),
        RewardRequest("pubmed", "junk", ["1"]),
    ]
    batch.append(request(4, term="x" * 101))  # oversize: the policy's fault
    with make_pool(backend, max_invalid_fraction=0.25) as pool:
        results = pool.score(batch, timeout=30)
        metrics = pool.metrics(reset=True)
        fail = results[1]
        assert (fail.valid, fail.reward, fail.bucket, fail.query) == (False, 0.0, "invalid", "FAIL")
        assert "503" in fail.error
        assert [r.reward for r in results[3:]] == [-4.0, -3.0]  # format bad; QueryRejected
        assert results[4].valid and "QueryRejected" in results[4].error
        assert metrics["invalid_fraction"] == pytest.approx(1 / 5)
        assert metrics["backend_errors"] == 1 and metrics["query_rejected"] == 1
        assert metrics["bucket/invalid"] == 1 and metrics["reward_mean"] == pytest.approx(
            (6 + 6 - 4 - 3) / 4
        )
        with pytest.raises(RewardBatchError, match=r"2/4 reward samples are invalid") as err:
            pool.score([request(0), request(1, "FAIL"), request(2, "FAIL x"), request(3)])
        assert [r.valid for r in err.value.results] == [True, False, False, True]
        assert "503" in str(err.value)


def test_timeouts_and_dropped_connections_are_invalid(servers):
    server = servers.start()
    server.inject(*[Fault.drop()] * 2)
    backend = pubmed(server, max_retries=1, timeout_s=20.0)
    with make_pool(backend, request_timeout_s=0.3, max_invalid_fraction=1.0) as pool:
        dropped, slow = pool.score([request(0), request(1, "SLOW")], timeout=30)
        assert not dropped.valid and "payload is not completed" in dropped.error
        assert not slow.valid and "timed out after 0.3 s" in slow.error
        assert pool.metrics()["timeouts"] == 1
    with make_pool(pubmed(server), batch_timeout_s=0.3, max_invalid_fraction=1.0) as pool:
        start = time.monotonic()
        good, slow = pool.score([request(0), request(1, "SLOW")], timeout=30)
        assert time.monotonic() - start < 5
        assert good.valid and not slow.valid and "batch timeout" in slow.error


def test_concurrency_limit_and_shared_inflight(servers):
    server = servers.start(latency_s=0.2)
    with make_pool(pubmed(server), concurrency=3) as pool:
        batch = [request(i) for i in range(9)] + [request(4)] * 4  # four repeats of q4
        results = pool.score(batch, timeout=30)
        metrics = pool.metrics()
    check_own_results(results, list(range(9)) + [4] * 4)
    assert server.max_inflight == 3
    assert len(server.requests) == 9 and metrics["searches"] == 9
    assert metrics["shared_inflight"] == 4


def test_record_then_replay_with_server_stopped(servers, tmp_path):
    server = servers.start()
    path = str(tmp_path / "cache.sqlite")
    batch = [request(i) for i in range(6)] + [request(7, term="x" * 101)]
    with make_pool(pubmed(server, max_query_chars=100), cache_mode="record", cache_path=path) as p:
        recorded = p.score(batch)
    assert len(server.requests) == 6
    port = server.port
    servers.stop(server)

    replay = dict(cache_mode="replay", cache_path=path)
    backend = pubmed(None, port=port, max_query_chars=100)
    with make_pool(backend, **replay) as pool:
        replayed = pool.score(batch)
        assert replayed == recorded
        assert pool.metrics()["cache_hits"] == 7 and pool.metrics()["searches"] == 0
        # Spelling variants of whitespace hit the same entry.
        spaced = RewardRequest("pubmed", batch[0].completion.replace("q0", " q0 "), ["0-0"])
        spaced = RewardRequest(**{**spaced.__dict__, "search_opts": batch[0].search_opts})
        assert pool.score([spaced])[0].reward == recorded[0].reward
        (miss,) = pool.score([request(99), request(1)])[:1]
        assert not miss.valid and "replay miss" in miss.error
        assert pool.metrics()["replay_misses"] == 1
    with make_pool(backend, max_invalid_fraction=0.0, **replay) as strict:
        with pytest.raises(RewardBatchError, match="replay miss"):
            strict.score([request(0), request(99)])


def test_read_write_cache_serves_repeats(servers, tmp_path):
    server = servers.start()
    path = str(tmp_path / "rw.sqlite")
    with make_pool(pubmed(server), cache_mode="read_write", cache_path=path) as pool:
        first = pool.score([request(i) for i in range(4)])
        second = pool.score([request(i) for i in range(4)])
        assert first == second and pool.metrics()["cache_hits"] == 4
    with make_pool(pubmed(server), cache_mode="read_write", cache_path=path) as pool:
        assert pool.score([request(2)]) == first[2:3]  # from sqlite, new process state
    assert len(server.requests) == 4
    with make_pool(pubmed(server), cache_mode="record", cache_path=path) as pool:
        pool.score([request(2)])  # record always asks the service
    assert len(server.requests) == 5


class FlakyBackend(SearchBackend):
    """A backend without its own retries over a real aiohttp server answering 503 `fail` times."""

    name = "flaky"

    def __init__(self, url):
        self.url, self.session = url, None

    async def open(self):
        import aiohttp

        self.session = aiohttp.ClientSession()

    async def close(self):
        await self.session.close()

    async def search(self, query, **opts):
        async with self.session.get(self.url, params={"q": query}) as resp:
            if resp.status >= 500:
                raise BackendError(f"HTTP {resp.status}", retry_after=0.01, status=resp.status)
            return (await resp.json())["ids"]


def test_pool_retries_backends_without_their_own(server_loop):
    state = {"fail": 2, "seen": 0}

    async def handle(request):
        state["seen"] += 1
        if state["fail"] > 0:
            state["fail"] -= 1
            return web.json_response({}, status=503)
        return web.json_response({"ids": ["0-0"]})

    async def serve():
        runner = web.AppRunner(web.Application())
        runner.app.router.add_get("/s", handle)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(serve(), server_loop).result()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/s"
    tasks = make_tasks({"pubmed": {"backend": "flaky"}})
    try:
        with RewardPool({"flaky": FlakyBackend(url)}, tasks, PoolConfig()) as pool:
            (result,) = pool.score([request(0)])
            assert result.valid and result.reward == 6.0
            assert pool.metrics()["pool_retries"] == 2 and state["seen"] == 3
        state["fail"] = 1
        config = PoolConfig(retries=0, max_invalid_fraction=1.0)
        with RewardPool({"flaky": FlakyBackend(url)}, tasks, config) as pool:
            (result,) = pool.score([request(0)])
            assert not result.valid and "HTTP 503" in result.error
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), server_loop).result()


def test_user_errors_raise_clearly(tmp_path):
    backend = PubMedBackend(PubMedConfig(base_url="http://127.0.0.1:9/"))
    with pytest.raises(ValueError, match="backend 'pubmed'.*not among"):
        RewardPool({"other": backend}, make_tasks({"pubmed": None}))
    with pytest.raises(ValueError, match="unknown field"):
        PoolConfig.from_dict({"concurency": 3})
    sentinels = PoolConfig.from_dict({"retries": -1, "cache_path": ""})  # config-file values
    assert (sentinels.retries, sentinels.cache_path) == (None, None)
    with pytest.raises(ValueError, match="cache mode must be one of"):
        ResultCache("replay_all")
    with pytest.raises(ValueError, match="no recorded cache file"):
        ResultCache("replay", str(tmp_path / "missing.sqlite"))
    pool = make_pool(backend)
    with pytest.raises(RuntimeError, match="before start"):
        pool.submit([request(0)])
    with pool:
        with pytest.raises(ValueError, match="request 1: unknown task 'nq'"):
            pool.submit([request(0), RewardRequest("nq", "", ["a"])])
        with pytest.raises(ValueError, match="request 0: pubmed: label is empty"):
            pool.submit([RewardRequest("pubmed", "", [])])


def test_cache_keys():
    assert normalise_query("  a\n AND\tb ") == "a AND b"
    assert cache_key("pubmed", "a  AND b", {"x": 1}) == cache_key("pubmed", "a AND b ", {"x": 1})
    assert cache_key("pubmed", "a AND b", {"x": 1}) != cache_key("pubmed", "a and b", {"x": 1})
    assert cache_key("pubmed", "q", {"x": 1}) != cache_key("pubmed", "q", {"x": 2})
    assert cache_key("pubmed", "q", {}) != cache_key("ctgov", "q", {})


def test_sql_tasks_through_the_pool_with_replay(tmp_path):
    import sqlite3

    from deepretrieval_jax.search.sql import SQLBackend

    db = str(tmp_path / "shop.sqlite")
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE items (name TEXT, price REAL)")
        conn.executemany("INSERT INTO items VALUES (?, ?)", [("a", 1.5), ("b", 2.0), ("c", 2.0)])

    def sql_request(task, sql, gold="SELECT name FROM items WHERE price = 2.0"):
        completion = f'<think>t</think><answer>{{"sql": "{sql}"}}</answer>'
        return RewardRequest(task, completion, gold, {"db_path": db})

    batch = [
        sql_request("bird", "SELECT name FROM items WHERE price > 1.9 ORDER BY name DESC"),
        sql_request("bird", "SELECT name FROM items"),
        sql_request("spider", "SELECT name FROM items"),
        sql_request("spider", "SELECT nme FROM items"),  # execution error
        sql_request("bird", "DELETE FROM items"),  # denied: read-only
        sql_request("bird", "SELECT 1", gold="SELECT missing FROM items"),  # broken gold
    ]
    tasks = make_tasks({"bird": None, "spider": None})
    cache = dict(cache_path=str(tmp_path / "sql.sqlite"), max_invalid_fraction=1.0)
    with RewardPool({"sql": SQLBackend()}, tasks, PoolConfig(cache_mode="record", **cache)) as p:
        live = p.score(batch)
    assert [r.reward for r in live] == pytest.approx([1.1, 0.4, 0.0, 0.0, 0.0, 0.0])
    assert [r.bucket for r in live] == ["match", "mismatch", "mismatch"] + ["exec_error"] * 2 + [
        "invalid"
    ]
    assert "gold SQL failed" in live[-1].error
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM items").fetchone() == (3,)
    with RewardPool({"sql": SQLBackend()}, tasks, PoolConfig(cache_mode="replay", **cache)) as p:
        replayed = p.score(batch)
    assert replayed[:-1] == live[:-1] and not replayed[-1].valid  # failures are never cached


def test_evidence_task_through_the_pool_with_bm25():
    from deepretrieval_jax.search.bm25 import BM25Backend, BM25Index

    passages = {
        "p1": "The Louvre is a museum in Paris.",
        "p2": "Mount Everest is the highest mountain on Earth.",
        "p3": "The Eiffel Tower was designed by Gustave Eiffel's company.",
    }
    index = BM25Index.build(passages.items())
    tasks = make_tasks({"nq": {"backend": "bm25"}}, passages=passages)
    completion = '<think>t</think><answer>{"query": "highest mountain Earth"}</answer>'
    miss = completion.replace("highest mountain Earth", "museum Paris")
    with RewardPool({"bm25": BM25Backend(index)}, tasks) as pool:
        hit, nohit = pool.score(
            [RewardRequest("nq", completion, ["Everest"]), RewardRequest("nq", miss, ["Everest"])]
        )
    assert (hit.reward, hit.metrics["rank"], hit.bucket) == (6.0, 1.0, "<=5")
    assert (nohit.reward, nohit.bucket) == (1.0 - 3.5, "else")


def test_result_cache_modes_and_lru(tmp_path):
    path = str(tmp_path / "c.sqlite")
    rw = ResultCache("read_write", path, lru_size=2)
    for i in range(3):
        rw.put(f"k{i}", ("ok", [str(i), (i, "row")]), "b", f"q{i}", {"top_k": 3})
    rw.put("bad", ("rejected", "too long"), "b", "x", {})
    assert list(rw._lru) == ["k2", "bad"]  # LRU holds the 2 newest
    assert rw.get("k0") == ("ok", ["0", [0, "row"]])  # evicted from memory, read from sqlite
    rw.close()
    assert len(ResultCache("read_write", path)) == 4  # committed by close()
    record = ResultCache("record", path)
    assert record.get("k1") is None  # record mode always asks the backend
    record.put("k1", ("ok", ["new"]), "b", "q1", {})
    assert record.get("k1") == ("ok", ["new"])  # ...but reuses what this run produced
    record.close()
    replay = ResultCache("replay", path)
    assert replay.get("k1") == ("ok", ["new"]) and replay.get("bad") == ("rejected", "too long")
    replay.put("k9", ("ok", []), "b", "q9", {})  # replay never writes
    assert replay.get("k9") is None
    off = ResultCache("off", path)
    assert off.get("k1") is None and not off.enabled
