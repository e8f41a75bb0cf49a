"""The HTTP layer under the PubMed and ClinicalTrials.gov backends.

Invariants:
- One `aiohttp.ClientSession` per client, created by `open()` and closed by `close()`; at most
  `max_connections` sockets at once.
- Every HTTP request (each page of a paged search included) first takes a token from the
  client's `TokenBucket` (`rate_per_s`, `burst`). A 429 pauses the bucket for its Retry-After,
  so concurrent searches on the same client back off together.
- Per-request timeout `timeout_s` (total) and `connect_timeout_s` (`aiohttp.ClientTimeout`).
- Retries: a 5xx, a timeout or a dropped connection is retried after exponential backoff with
  full jitter (`backoff_base_s * 2**attempt`, capped at `backoff_max_s`); a 429 is retried after
  its Retry-After (seconds or HTTP-date; `backoff` when absent). At most `max_retries` retries per
  request; then `BackendError` (retryable=True, with the last status and Retry-After).
  A Retry-After longer than `max_retry_after_s` is not waited for: `BackendError` at once.
- Other 4xx: `BackendError(retryable=False, status=...)`; callers may reinterpret it.
- A 2xx body that is not JSON, or whose JSON the caller's `parse` rejects (`schema_error`), is
  retried like a 5xx (counted as `errors["malformed"]`).
- Every attempt is one HTTP request that passed the token bucket and the counters: aiohttp's
  own silent re-send of an idempotent request after a connection reset is switched off
  (`ClientSession._retry_connection`, the switch aiohttp's own test client uses; there is no
  public one), so a reset is a failed attempt retried by the policy above.
- A failure is never an empty result. Secret parameters (api_key) are added only when the
  request is sent: they are not in `repr`, counters, or any exception message (every message
  that can carry server or aiohttp text is redacted, raw and URL-encoded, and aiohttp
  exceptions are not chained).
- Parameters always travel as a mapping that aiohttp URL-encodes, so text inside a value
  (`&`, `=`, `#`, newlines) can never add or change a parameter.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import email.utils
import json
import random
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from deepretrieval_jax.search.base import BackendError, SearchBackend


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    """Transport settings shared by the HTTP backends."""

    base_url: str  # Service root; tests and the local service point this elsewhere.
    rate_per_s: float = 3.0  # Token-bucket refill rate (requests per second).
    burst: int = 1  # Bucket capacity; 1 spaces requests evenly at 1/rate_per_s.
    timeout_s: float = 30.0  # Total time for one HTTP request (connect + read).
    connect_timeout_s: float = 10.0
    max_retries: int = 4  # Retry budget per request (so at most max_retries + 1 attempts).
    backoff_base_s: float = 0.5  # First backoff; doubles per attempt, full jitter.
    backoff_max_s: float = 8.0
    max_retry_after_s: float = 60.0  # A longer Retry-After is reported, not waited for.
    max_connections: int = 16
    user_agent: str = "deepretrieval_jax"

    def __post_init__(self):
        if self.rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be > 0, got {self.rate_per_s}")
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


class TokenBucket:
    """An async token bucket (GCRA form): `acquire()` waits until a request may be sent.

    Waiters are served in arrival order (asyncio.Lock is FIFO). Tokens refill at `rate_per_s`;
    at most `burst` requests may go at once after an idle period.
    """

    def __init__(self, rate_per_s: float, burst: int = 1):
        self.interval = 1.0 / rate_per_s
        self.burst = burst
        self._tat = 0.0  # Theoretical arrival time of the next conforming request.
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            loop = asyncio.get_running_loop()
            now = loop.time()
            # Loop: a 429 that arrives while we sleep moves `_paused_until` forward, and the
            # request must then wait for the new pause rather than go out inside it.
            while True:
                ready = max(self._tat - (self.burst - 1) * self.interval, self._paused_until)
                if ready <= now:
                    break
                await asyncio.sleep(ready - now)
                now = loop.time()
            self._tat = max(self._tat, now) + self.interval

    def pause(self, seconds: float) -> None:
        """No request is sent for `seconds` from now (used on 429)."""
        until = asyncio.get_running_loop().time() + seconds
        self._paused_until = max(self._paused_until, until)


@dataclasses.dataclass
class HttpCounters:
    """Counters the reward pool reads for metrics. Holds no URLs, parameters or secrets."""

    requests: int = 0  # HTTP requests sent (every attempt, every page).
    retries: int = 0
    http_429: int = 0
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    latencies_s: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=4096)
    )

    def snapshot(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0  # noqa: E731
        return {
            "requests": self.requests,
            "retries": self.retries,
            "http_429": self.http_429,
            **{f"errors/{k}": v for k, v in sorted(self.errors.items())},
            "latency_p50_s": pct(0.5),
            "latency_p95_s": pct(0.95),
        }


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class _Secret:
    """A value that never shows itself in repr/str."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self):
        return "<secret>"

    __str__ = __repr__


class _Attempt(Exception):
    """One failed attempt: kind for counters, message already redacted."""

    def __init__(self, kind: str, message: str, status=None, retry_after=None):
        super().__init__(message)
        self.kind, self.status, self.retry_after = kind, status, retry_after


class MalformedResponse(BackendError):
    """A 2xx response whose JSON does not have the expected shape (see `schema_error`)."""


class HttpClient:
    """GETs JSON with rate limiting, timeouts and retries. See the module docstring."""

    def __init__(
        self,
        config: HttpConfig,
        *,
        secret_params: Mapping[str, str | None] | None = None,
        bucket: TokenBucket | None = None,
        name: str = "http",
    ):
        self.config = config
        self.name = name
        self._secrets = {k: _Secret(v) for k, v in (secret_params or {}).items() if v}
        self.bucket = bucket or TokenBucket(config.rate_per_s, config.burst)
        self.counters = HttpCounters()
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self):
        secrets = ",".join(sorted(self._secrets))
        return f"HttpClient(name={self.name!r}, base_url={self.config.base_url!r}, secrets=[{secrets}])"

    async def open(self) -> None:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(
                total=self.config.timeout_s, sock_connect=self.config.connect_timeout_s
            )
            self._session = aiohttp.ClientSession(
                timeout=timeout,
                connector=aiohttp.TCPConnector(limit=self.config.max_connections),
                headers={"User-Agent": self.config.user_agent},
                raise_for_status=False,
            )
            # Off: aiohttp would re-send a GET once after a reset, past our bucket and counters.
            if hasattr(self._session, "_retry_connection"):
                self._session._retry_connection = False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def redact(self, text: str) -> str:
        """`text` with every secret value (raw, or as a URL parameter in any encoding) -> ***."""
        for name, secret in self._secrets.items():
            for form in {secret.value, urllib.parse.quote(secret.value, safe=""),
                         urllib.parse.quote_plus(secret.value)}:  # fmt: skip
                text = text.replace(form, "***")
            text = re.sub(rf"({re.escape(name)}=)[^&\s\"'#]*", r"\1***", text)
        return text

    def url(self, path: str) -> str:
        return (
            self.config.base_url.rstrip("/") + "/" + path.lstrip("/")
            if path
            else self.config.base_url
        )

    async def get_json(
        self, path: str, params: Mapping[str, str], parse: Callable[[Any], Any] | None = None
    ) -> Any:
        """GET base_url/path with `params` (+ secret params); returns the decoded JSON body, or
        `parse(body)` when given (a `MalformedResponse` from it is retried like a 5xx)."""
        if self._session is None:
            raise RuntimeError(f"{self.name}: call open() (or use `async with`) before searching")
        cfg = self.config
        for attempt in range(cfg.max_retries + 1):
            try:
                body = await self._attempt(self.url(path), params)
                return body if parse is None else parse(body)
            except MalformedResponse as exc:
                failure = _Attempt("malformed", self.redact(str(exc)))
                self.counters.errors[failure.kind] += 1
                last = failure
            except _Attempt as failure:
                self.counters.errors[failure.kind] += 1
                last = failure
            too_long = last.retry_after is not None and last.retry_after > cfg.max_retry_after_s
            if attempt == cfg.max_retries or too_long:
                break
            if last.retry_after is not None:
                delay = last.retry_after
            else:
                delay = random.uniform(0, min(cfg.backoff_max_s, cfg.backoff_base_s * 2**attempt))
            self.counters.retries += 1
            await asyncio.sleep(delay)
        raise BackendError(
            f"{self.name}: request failed after {attempt + 1} attempt(s): {last}",
            retryable=True,
            retry_after=last.retry_after,
            status=last.status,
        )

    async def _attempt(self, url: str, params: Mapping[str, str]) -> Any:
        await self.bucket.acquire()
        full = {**params, **{k: s.value for k, s in self._secrets.items()}}
        self.counters.requests += 1
        start = time.monotonic()
        try:
            async with self._session.get(url, params=full) as resp:
                status = resp.status
                body = await resp.read()
                if status == 429:
                    self.counters.http_429 += 1
                    wait = parse_retry_after(resp.headers.get("Retry-After"))
                    if wait is not None:
                        self.bucket.pause(wait)
                    raise _Attempt("http_429", "HTTP 429 Too Many Requests", 429, wait)
                if status >= 500:
                    raise _Attempt("http_5xx", f"HTTP {status}", status)
        except (asyncio.TimeoutError, TimeoutError):
            raise _Attempt("timeout", f"timed out after {self.config.timeout_s:g} s") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            msg = self.redact(f"{type(exc).__name__}: {exc}")
            raise _Attempt("connection", msg) from None
        except aiohttp.ClientError as exc:
            msg = self.redact(f"{type(exc).__name__}: {exc}")
            raise BackendError(f"{self.name}: {msg}", retryable=False) from None
        finally:
            self.counters.latencies_s.append(time.monotonic() - start)
        if status >= 400:
            self.counters.errors[f"http_{status}"] += 1
            snippet = self.redact(body[:300].decode("utf-8", "replace"))
            raise BackendError(
                f"{self.name}: HTTP {status}: {snippet}", retryable=False, status=status
            )
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            message = f"response is not valid JSON ({len(body)} bytes)"
            raise _Attempt("malformed", message, status) from None


def schema_error(client: HttpClient, what: str) -> MalformedResponse:
    """A 2xx response whose JSON does not have the expected shape; `what` may quote the
    server's text, so it is redacted. Raised from a `get_json(parse=...)` callback: retried."""
    return MalformedResponse(client.redact(f"{client.name}: unexpected response schema: {what}"))


class HttpBackend(SearchBackend):
    """A `SearchBackend` over one `HttpClient`, `self.http` (set by the subclass's `__init__`):
    `open`/`close` open and close the client and `counters` are the client's."""

    http: HttpClient

    @property
    def counters(self) -> HttpCounters:
        return self.http.counters

    async def open(self) -> None:
        await self.http.open()

    async def close(self) -> None:
        await self.http.close()
