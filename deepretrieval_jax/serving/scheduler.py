"""The batching scheduler: many concurrent requests -> few sampler calls on the device.

Requests are grouped by `GenSettings` (requests with different sampling settings never share
a sampler call). One dispatcher task, on the server's event loop, repeatedly takes the group
whose oldest request waited longest and sends up to `max_batch` of its requests to the device
as soon as the group is full or its oldest request has waited `max_wait_ms`; requests that
arrive while the device is busy form the next batch.

Invariants:
- The device runs one batch at a time, in one worker thread (`generate` is blocking); the event
  loop never blocks on it, so the HTTP server keeps answering while a batch runs.
- The queue is bounded: `submit` raises `QueueFull` at once when `max_queue` requests are
  waiting (not yet on the device); nothing waits for room.
- Every request ends exactly once: with its completion, with `RequestTimeout` after
  `timeout_s` (a queued request is then removed; a running one's result is dropped), with the
  generation's exception (every request of a failed batch gets it), or with `SchedulerClosed`.
- `stats()` counts sampler calls (`batches`), rows, rejections and timeouts; `wait_for(pred)`
  resolves once `pred(stats())` holds (tests and readiness checks; no polling).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
from collections.abc import Callable, Sequence

from deepretrieval_jax.serving.policy import Completion, GenSettings

GenerateFn = Callable[[Sequence[Sequence[int]], GenSettings, Sequence[int]], list[Completion]]


class QueueFull(RuntimeError):
    """The bounded queue is full (HTTP 503)."""


class RequestTimeout(TimeoutError):
    """The request did not finish within the timeout (HTTP 504)."""


class SchedulerClosed(RuntimeError):
    """The scheduler shut down before the request ran (HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 8  # requests per sampler call
    max_wait_ms: float = 10.0  # how long the oldest request waits for a fuller batch
    max_queue: int = 256  # requests waiting (not on the device); more get QueueFull
    timeout_s: float = 120.0  # per request, queueing included

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1: {self}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError(f"max_wait_ms must be >= 0 and timeout_s > 0: {self}")


@dataclasses.dataclass(eq=False)
class _Item:
    tokens: Sequence[int]
    limit: int
    future: asyncio.Future
    t0: float


class BatchScheduler:
    """Collects requests into batches for `generate` (see the module docstring)."""

    def __init__(self, generate: GenerateFn, config: SchedulerConfig = SchedulerConfig()):
        self.generate, self.config = generate, config
        self._groups: dict[GenSettings, collections.deque[_Item]] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "device")
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._waiters: list[tuple[Callable[[dict], bool], asyncio.Future]] = []
        self._closed = False
        self._counts = collections.Counter()
        self._batch_sizes: collections.Counter = collections.Counter()
        self._running = 0

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Starts the dispatcher on the running loop."""
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._dispatch_loop(), name="batch-dispatcher")

    async def close(self) -> None:
        """Fails queued requests with `SchedulerClosed`, stops the dispatcher and the thread."""
        self._closed = True
        for group in self._groups.values():
            for item in group:
                if not item.future.done():
                    item.future.set_exception(SchedulerClosed("the server is shutting down"))
        self._groups.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)
        self._notify()

    # ---------------------------------------------------------------- requests
    @property
    def queued(self) -> int:
        return sum(len(g) for g in self._groups.values())

    async def submit(self, tokens: Sequence[int], settings: GenSettings, limit: int) -> Completion:
        """The completion of one prompt; raises QueueFull, RequestTimeout or SchedulerClosed."""
        if self._closed or self._task is None:
            raise SchedulerClosed("the scheduler is not running")
        if self.queued >= self.config.max_queue:
            self._counts["rejected_queue_full"] += 1
            self._notify()
            raise QueueFull(f"the request queue is full ({self.config.max_queue} waiting)")
        loop = asyncio.get_running_loop()
        item = _Item(tokens, limit, loop.create_future(), loop.time())
        self._groups.setdefault(settings, collections.deque()).append(item)
        self._counts["submitted"] += 1
        self._arrived.set()
        self._notify()
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), self.config.timeout_s)
        except TimeoutError:
            self._counts["timed_out"] += 1
            group = self._groups.get(settings)
            if group is not None and item in group:
                group.remove(item)
            item.future.cancel()
            self._notify()
            raise RequestTimeout(f"no result within {self.config.timeout_s} s") from None

    def stats(self) -> dict:
        return {
            "queued": self.queued,
            "running": self._running,
            "batches": self._counts["batches"],
            "rows": self._counts["rows"],
            "submitted": self._counts["submitted"],
            "completed": self._counts["completed"],
            "failed": self._counts["failed"],
            "rejected_queue_full": self._counts["rejected_queue_full"],
            "timed_out": self._counts["timed_out"],
            "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
        }

    async def wait_for(self, predicate: Callable[[dict], bool]) -> dict:
        """Resolves (with the stats) once `predicate(stats())` is true."""
        stats = self.stats()
        if predicate(stats):
            return stats
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, fut))
        return await fut

    def _notify(self) -> None:
        if not self._waiters:
            return
        stats, keep = self.stats(), []
        for predicate, fut in self._waiters:
            if fut.done():
                continue
            if predicate(stats):
                fut.set_result(stats)
            else:
                keep.append((predicate, fut))
        self._waiters = keep

    # ---------------------------------------------------------------- dispatch
    def _oldest_group(self) -> GenSettings | None:
        live = [(g[0].t0, i, k) for i, (k, g) in enumerate(self._groups.items()) if g]
        return min(live)[2] if live else None

    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = self._oldest_group()
            if key is None:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            group = self._groups[key]
            while group and len(group) < self.config.max_batch:
                remaining = group[0].t0 + self.config.max_wait_ms / 1000 - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch = [group.popleft() for _ in range(min(len(group), self.config.max_batch))]
            if not group:
                del self._groups[key]
            if batch:
                await self._run(key, batch)

    async def _run(self, settings: GenSettings, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        self._running = len(batch)
        self._counts["batches"] += 1
        self._counts["rows"] += len(batch)
        self._batch_sizes[len(batch)] += 1
        self._notify()
        try:
            completions = await loop.run_in_executor(
                self._executor,
                self.generate,
                [i.tokens for i in batch],
                settings,
                [i.limit for i in batch],
            )
        except Exception as e:  # the device call failed: every request of the batch gets it
            self._counts["failed"] += len(batch)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
        else:
            for item, completion in zip(batch, completions, strict=True):
                if not item.future.done():
                    item.future.set_result(completion)
                    self._counts["completed"] += 1
        finally:
            self._running = 0
            self._notify()
