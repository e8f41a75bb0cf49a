"""The search-backend interface and its two failure classes.

Every backend (PubMed, ClinicalTrials.gov, BM25, dense, SQL) is a `SearchBackend`:
explicit `open()`/`close()` and `async search(query, **opts)` returning a ranked list of
unique ids (result rows for SQL). Two exception types decide who is to blame for a failure:

- `QueryRejected`: the policy's fault (empty or oversize query, SQL that does not compile).
  The reward function scores it with the task's answer penalty.
- `BackendError`: infrastructure (timeout, HTTP 5xx/429, dropped connection, malformed
  response). The sample is marked invalid and left out of the loss; never a penalty.
  `retryable` and `retry_after` (seconds, from a Retry-After header) guide the reward pool.

A third, `DataFileError`, is neither: a file the run depends on (a task database, an index) is
broken. No sample can be scored fairly, so the reward pool lets it stop the run.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any


class QueryRejected(ValueError):
    """The query itself is unusable; the policy is to blame."""


class BackendError(RuntimeError):
    """The search service failed; the sample is invalid, not wrong."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        retry_after: float | None = None,
        status: int | None = None,
    ):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


class DataFileError(RuntimeError):
    """A data file (task database, index) is missing pieces or corrupt; its message names it."""


def check_query(query: Any, max_chars: int) -> str:
    """Returns `query` if it is a usable query string, else raises `QueryRejected`.

    Shared by every backend so that "empty" and "too long" mean the same thing everywhere.
    """
    if not isinstance(query, str):
        raise QueryRejected(f"query must be a string, got {type(query).__name__}")
    if not query.strip():
        raise QueryRejected("query is empty or whitespace")
    if len(query) > max_chars:
        raise QueryRejected(f"query has {len(query)} characters; the limit is {max_chars}")
    return query


class SearchBackend(abc.ABC):
    """A search engine or retriever with an async, ranked-ids interface."""

    #: Short stable name; part of cache keys and metrics.
    name: str = "backend"

    async def open(self) -> None:  # noqa: B027 (optional hook)
        """Acquires resources (HTTP session, index, database). Idempotent."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Releases resources. Idempotent."""

    @abc.abstractmethod
    async def search(self, query: str, **opts: Any) -> list:
        """Returns the ranked, de-duplicated ids for `query` (rows for SQL)."""

    def cache_params(self, **opts: Any) -> Mapping[str, Any]:
        """Everything besides the query that changes the result; part of the cache key."""
        return dict(sorted(opts.items()))

    async def __aenter__(self):
        await self.open()
        return self

    async def __aexit__(self, *exc):
        await self.close()
