"""The reward pool: scores completions by querying search backends on a background loop.

API (the trainer and the evaluator code against it):

    pool = RewardPool({"pubmed": PubMedBackend(...)}, make_tasks({"pubmed": None}), PoolConfig())
    with pool:                                   # start() ... close()
        pending = pool.submit([RewardRequest("pubmed", completion, label, {"maxdate": d})])
        ...                                      # device work while requests are in flight
        results = pending.result()               # list[RewardResult], in request order
        step_metrics = pool.metrics(reset=True)
    results = pool.score(requests)               # synchronous form, for evaluation

Invariants:
- One asyncio event loop on one daemon thread, started by `start()`; backends are opened and
  closed on it. `submit()` validates the requests (unknown task or backend, a completion that
  is not a string: ValueError naming the request) and returns at once; scoring runs on the
  loop. A request whose label its task cannot score (empty, wrong type) is bad data: that one
  sample is invalid ("unusable label: ...", counted as `bad_labels`), the rest are scored.
- Concurrency: at most `concurrency` (or `concurrency_per_backend[name]`) searches in flight
  per backend (an asyncio.Semaphore). Identical searches in flight are shared, not repeated.
  Rate limiting, 429/Retry-After and per-HTTP-request retries belong to the backend
  (search/http.py); the pool never bypasses them.
- Timeouts: `request_timeout_s` per search call (the backend's own retries included);
  `batch_timeout_s` per batch: samples not finished by then are cancelled and marked invalid.
- Pool retries: a `BackendError(retryable=True)` or a timeout is retried up to `retries` times
  (None: 0 for backends that expose HTTP `counters`, i.e. retry each request themselves, else 2)
  after `retry_after` or exponential backoff with full jitter, outside the semaphore; a
  `retry_after` above `backoff_max_s` is not waited for (the sample is invalid).
- Cache (rewards/cache.py): consulted before every search; policy rejections are cached,
  infrastructure failures never are. Replay mode never touches a backend.
- Failure classes: a broken completion or `QueryRejected` -> the task's penalty (valid=True);
  `BackendError`, timeouts, replay misses, errors inside reward code -> valid=False, reward 0.0,
  counted in metrics, never a penalty. A `DataFileError` (a corrupt task database or index)
  fails the whole batch: `result()` raises it, naming the file. No failure is ever dropped: every request gets exactly
  one result, in request order. `PendingBatch.result()` raises `RewardBatchError` (results
  attached) when the invalid fraction exceeds `max_invalid_fraction`.
- Metrics (`metrics()`): samples, invalid_fraction, reward_mean, bucket counts, searches,
  cache_hits, shared_inflight, retries (pool + HTTP), http_requests, http_429, timeouts,
  backend_errors, query_rejected, replay_misses, bad_labels, latency_p50/p95/p99_ms of
  search calls.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deepretrieval_jax.rewards.cache import CacheMode, ReplayMiss, ResultCache, cache_key
from deepretrieval_jax.rewards.tasks import RewardResult, TaskReward
from deepretrieval_jax.search.base import (
    BackendError,
    DataFileError,
    QueryRejected,
    SearchBackend,
)


@dataclasses.dataclass(frozen=True)
class RewardRequest:
    """One completion to score. prompt_suffix: the assistant prefix the prompt supplied."""

    task: str
    completion: str
    label: Any
    search_opts: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    prompt_suffix: str = ""


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    concurrency: int = 16  # In-flight searches per backend.
    concurrency_per_backend: Mapping[str, int] = dataclasses.field(default_factory=dict)
    request_timeout_s: float = 120.0  # One search call, backend retries and rate waits included.
    batch_timeout_s: float | None = 900.0  # Whole batch; unfinished samples become invalid.
    retries: int | None = None  # Pool-level retries of retryable errors; None or -1: auto.
    backoff_base_s: float = 0.5  # Pool retry backoff: uniform(0, min(max, base * 2**attempt)).
    backoff_max_s: float = 30.0
    max_invalid_fraction: float = 0.5  # result() raises above this fraction of invalid samples.
    cache_mode: str = "off"  # off | read_write | record | replay
    cache_path: str | None = None  # sqlite file; None: memory only.
    lru_size: int = 100_000  # Entries kept in memory.

    def __post_init__(self):
        if self.retries == -1:  # Config files cannot hold None: -1 means "backend default".
            object.__setattr__(self, "retries", None)
        if self.cache_path == "":
            object.__setattr__(self, "cache_path", None)
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not 0.0 <= self.max_invalid_fraction <= 1.0:
            raise ValueError(
                f"max_invalid_fraction must be in [0, 1], got {self.max_invalid_fraction}"
            )
        if self.retries is not None and self.retries < 0:
            raise ValueError(f"retries must be >= 0 or None, got {self.retries}")

    @classmethod
    def from_dict(cls, values: Any) -> PoolConfig:
        values = values.to_dict() if hasattr(values, "to_dict") else dict(values)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"reward pool config: unknown field(s) {unknown}; known: {sorted(names)}"
            )
        return cls(**values)


class RewardBatchError(RuntimeError):
    """Too many samples of a batch were invalid (infrastructure); `.results` has them all."""

    def __init__(self, message: str, results: list[RewardResult]):
        super().__init__(message)
        self.results = results


class PendingBatch:
    """Handle of a submitted batch; `result()` joins."""

    def __init__(self, future: concurrent.futures.Future, max_invalid_fraction: float):
        self._future = future
        self._max_invalid = max_invalid_fraction

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> list[RewardResult]:
        """Waits up to `timeout` s (TimeoutError; the batch keeps running) for all results."""
        try:
            results = self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"reward batch not finished after {timeout} s") from None
        invalid = [r for r in results if not r.valid]
        if results and len(invalid) / len(results) > self._max_invalid:
            reasons = collections.Counter((r.error or "?").split(":")[0] for r in invalid)
            raise RewardBatchError(
                f"{len(invalid)}/{len(results)} reward samples are invalid (infrastructure "
                f"failures), above max_invalid_fraction={self._max_invalid}; causes: "
                f"{dict(reasons.most_common(5))}; first error: {invalid[0].error}",
                results,
            )
        return results


_COUNTS = (
    "samples",
    "invalid",
    "searches",
    "cache_hits",
    "shared_inflight",
    "pool_retries",
    "timeouts",
    "backend_errors",
    "query_rejected",
    "replay_misses",
    "batch_timeouts",
    "reward_errors",
    "bad_labels",
)


class _Stats:
    def __init__(self):
        self.counts: collections.Counter = collections.Counter(dict.fromkeys(_COUNTS, 0))
        self.latencies: list[float] = []
        self.rewards: list[float] = []


class RewardPool:
    """Scores `RewardRequest`s with `tasks` over `backends`. See the module docstring."""

    def __init__(
        self,
        backends: Mapping[str, SearchBackend],
        tasks: Mapping[str, TaskReward],
        config: PoolConfig | Mapping | None = None,
    ):
        if config is None or not isinstance(config, PoolConfig):
            config = PoolConfig.from_dict(config or {})
        self.config = config
        self.backends = dict(backends)
        self.tasks = dict(tasks)
        for name, task in self.tasks.items():
            if task.backend not in self.backends:
                raise ValueError(
                    f"task {name!r} uses backend {task.backend!r}, which is not among the pool's "
                    f"backends {sorted(self.backends)}"
                )
        self.cache = ResultCache(config.cache_mode, config.cache_path, config.lru_size)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self._lock = threading.Lock()
        self._stats = _Stats()
        self._http_base = self._http_counts()

    # Lifecycle ---------------------------------------------------------------------------

    def start(self) -> RewardPool:
        if self._loop is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="reward-pool", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._open())
        except BaseException:
            self.close()
            raise
        return self

    async def _open(self):
        for name in self.backends:
            limit = self.config.concurrency_per_backend.get(name, self.config.concurrency)
            self._sems[name] = asyncio.Semaphore(limit)
        # Opened in replay mode too: cache_params may need the opened index (no I/O happens:
        # an HTTP session connects only on a request, and replay sends none).
        await asyncio.gather(*(b.open() for b in self.backends.values()))

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self._call(self._close_backends())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._loop = self._thread = None
            self.cache.close()

    async def _close_backends(self):
        await asyncio.gather(*(b.close() for b in self.backends.values()))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # Public API --------------------------------------------------------------------------

    def submit(self, requests: Sequence[RewardRequest]) -> PendingBatch:
        """Validates `requests` and starts scoring them; returns at once."""
        if self._loop is None:
            raise RuntimeError("RewardPool.submit() before start() (or use `with pool:`)")
        requests = list(requests)
        for i, req in enumerate(requests):
            if req.task not in self.tasks:
                raise ValueError(
                    f"request {i}: unknown task {req.task!r}; known: {sorted(self.tasks)}"
                )
            if not isinstance(req.completion, str):
                raise ValueError(
                    f"request {i}: completion must be str, got {type(req.completion).__name__}"
                )
        bad_labels = {}
        for i, req in enumerate(requests):
            try:
                self.tasks[req.task].check_label(req.label)
            except ValueError as exc:  # Bad data, not the policy's fault: that sample only.
                bad_labels[i] = f"unusable label: {exc}"
        coro = self._score_batch(requests, bad_labels)
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return PendingBatch(future, self.config.max_invalid_fraction)

    def score(self, requests: Sequence[RewardRequest], timeout: float | None = None):
        """submit() + result(): the synchronous form for evaluation."""
        return self.submit(requests).result(timeout)

    def search(
        self, backend: str, queries: Sequence[str], opts: Mapping[str, Any], timeout=None
    ) -> list[tuple[str, Any]]:
        """Runs `queries` on `backend` through the pool (semaphore, cache, in-flight sharing,
        retries); returns one outcome per query, in order: ("ok", ids), ("rejected", message)
        or ("error", message) (a BackendError or timeout: infrastructure). The multi-turn
        rollout's searches go through here."""
        if self._loop is None:
            raise RuntimeError("RewardPool.search() before start() (or use `with pool:`)")
        if backend not in self.backends:
            raise ValueError(f"unknown backend {backend!r}; known: {sorted(self.backends)}")

        async def one(query):
            try:
                return ("ok", await self._search(backend, query, dict(opts)))
            except QueryRejected as exc:
                return ("rejected", str(exc))
            except (BackendError, ReplayMiss, asyncio.TimeoutError, TimeoutError) as exc:
                return ("error", f"{type(exc).__name__}: {exc}")

        async def batch():
            out = await asyncio.gather(*(one(q) for q in queries))
            self.cache.flush()
            return list(out)

        return asyncio.run_coroutine_threadsafe(batch(), self._loop).result(timeout)

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """Counters since the last reset (see the module docstring for the keys)."""
        with self._lock:
            s = self._stats
            out = {k: float(v) for k, v in sorted(s.counts.items())}
            samples = s.counts["samples"]
            out["samples"] = float(samples)
            out["invalid_fraction"] = s.counts["invalid"] / samples if samples else 0.0
            out["reward_mean"] = float(np.mean(s.rewards)) if s.rewards else 0.0
            for q in (50, 95, 99):
                lat = np.percentile(s.latencies, q) * 1e3 if s.latencies else 0.0
                out[f"latency_p{q}_ms"] = float(lat)
            http = self._http_counts()
            for key, value in http.items():
                out[key] = float(value - self._http_base.get(key, 0))
            out["retries"] = out.get("pool_retries", 0.0) + out.get("http_retries", 0.0)
            if reset:
                self._stats = _Stats()
                self._http_base = http
        return out

    # Internals ---------------------------------------------------------------------------

    def _http_counts(self) -> dict[str, int]:
        """Sums of the backends' HTTP counters (backends without `counters` add nothing)."""
        out = collections.Counter(dict.fromkeys(["http_requests", "http_retries", "http_429"], 0))
        for backend in self.backends.values():
            c = getattr(backend, "counters", None)
            if c is None:
                continue
            out["http_requests"] += getattr(c, "requests", 0)
            out["http_retries"] += getattr(c, "retries", 0)
            out["http_429"] += getattr(c, "http_429", 0)
        return dict(out)

    def _count(self, *keys: str, latency: float | None = None) -> None:
        with self._lock:
            self._stats.counts.update(keys)
            if latency is not None:
                self._stats.latencies.append(latency)

    async def _bad_label(self, message: str) -> RewardResult:
        self._count("bad_labels")
        return RewardResult.invalid(message)

    async def _score_batch(
        self, requests: list[RewardRequest], bad_labels: Mapping[int, str]
    ) -> list[RewardResult]:
        jobs = [
            asyncio.ensure_future(
                self._bad_label(bad_labels[i]) if i in bad_labels else self._score_one(r)
            )
            for i, r in enumerate(requests)
        ]
        timeout = self.config.batch_timeout_s
        if jobs:
            await asyncio.wait(jobs, timeout=timeout)
        results = []
        broken = [
            j
            for j in jobs
            if j.done() and not j.cancelled() and isinstance(j.exception(), DataFileError)
        ]
        if broken:
            for job in jobs:
                job.cancel()
            raise broken[0].exception()
        for job in jobs:
            if job.done():
                results.append(job.result())
            else:
                job.cancel()
                self._count("batch_timeouts")
                results.append(
                    RewardResult.invalid(f"batch timeout: not scored within {timeout} s")
                )
        self.cache.flush()
        with self._lock:
            for r in results:
                self._stats.counts.update(["samples", f"bucket/{r.bucket}"])
                if r.valid:
                    self._stats.rewards.append(r.reward)
                else:
                    self._stats.counts["invalid"] += 1
        return results

    async def _score_one(self, req: RewardRequest) -> RewardResult:
        task = self.tasks[req.task]
        try:
            parsed = task.parse(req.completion, req.prompt_suffix)
            if not parsed.ok:
                return task.finish(parsed, req.label, None)
            opts = task.search_opts(req.search_opts)

            async def search(query: str, **search_opts):
                return await self._search(task.backend, query, search_opts)

            try:
                outcome = await task.retrieve(parsed.value, req.label, opts, search)
            except (QueryRejected, BackendError) as exc:
                outcome = exc
            if task.grade_in_thread:
                return await asyncio.to_thread(task.finish, parsed, req.label, outcome)
            return task.finish(parsed, req.label, outcome)
        except (asyncio.CancelledError, DataFileError):
            raise
        except Exception as exc:  # A bug in reward code must not take the batch down.
            self._count("reward_errors")
            return RewardResult.invalid(f"reward error: {type(exc).__name__}: {exc}")

    async def _search(self, name: str, query: str, opts: Mapping[str, Any]) -> list:
        backend = self.backends[name]
        params = backend.cache_params(**opts)
        key = cache_key(f"{name}/{backend.name}", query, params)
        outcome = self.cache.get(key)
        if outcome is None and key in self._inflight:
            self._count("shared_inflight")
            outcome = await asyncio.shield(self._inflight[key])
        elif outcome is not None:
            self._count("cache_hits")
        elif self.cache.mode == CacheMode.REPLAY:
            self._count("replay_misses")
            raise ReplayMiss(f"replay miss: no recorded result for {name} query {query[:80]!r}")
        else:
            future = asyncio.get_running_loop().create_future()
            self._inflight[key] = future
            try:
                outcome = await self._call_backend(name, backend, query, opts)
                self.cache.put(key, outcome, name, query, params)
                future.set_result(outcome)
            except asyncio.CancelledError:
                future.set_exception(BackendError("shared search cancelled", retryable=False))
                future.exception()  # Mark retrieved: nobody else may be waiting.
                raise
            except Exception as exc:
                future.set_exception(exc)
                future.exception()
                raise
            finally:
                del self._inflight[key]
        kind, value = outcome
        if kind == "rejected":
            raise QueryRejected(value)
        return value

    async def _call_backend(self, name: str, backend: SearchBackend, query: str, opts) -> tuple:
        cfg = self.config
        retries = cfg.retries
        if retries is None:
            retries = 0 if hasattr(backend, "counters") else 2
        for attempt in range(retries + 1):
            try:
                async with self._sems[name]:
                    self._count("searches")
                    start = time.monotonic()
                    try:
                        result = await asyncio.wait_for(
                            backend.search(query, **opts), cfg.request_timeout_s
                        )
                    finally:
                        self._count(latency=time.monotonic() - start)
                return ("ok", list(result))
            except QueryRejected as exc:
                self._count("query_rejected")
                return ("rejected", str(exc))
            except (asyncio.TimeoutError, TimeoutError):
                self._count("timeouts")
                error = BackendError(f"{name}: search timed out after {cfg.request_timeout_s:g} s")
            except BackendError as exc:
                self._count("backend_errors")
                error = exc
            too_long = error.retry_after is not None and error.retry_after > cfg.backoff_max_s
            if not error.retryable or attempt == retries or too_long:
                raise error
            delay = error.retry_after
            if delay is None:
                delay = random.uniform(0, min(cfg.backoff_max_s, cfg.backoff_base_s * 2**attempt))
            self._count("pool_retries")
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")
