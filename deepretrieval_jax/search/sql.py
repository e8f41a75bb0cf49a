"""Execute model-written SQL on sqlite, read-only, with a wall-clock limit and a row cap.

Invariants:
- Each execution opens its own connection (`file:<path>?mode=ro` URI, `PRAGMA query_only`)
  in a worker thread (`asyncio.to_thread`), so the event loop never blocks and concurrent
  queries share nothing. An authorizer allows only SELECT, column reads, functions and
  recursive CTEs: writes, DDL, ATTACH/DETACH, PRAGMA (any), transactions are denied. The
  database file is never modified. Strings/blobs are capped at `max_value_bytes` and no
  database can be attached (sqlite limits), so one query cannot exhaust memory that way.
- Wall-clock limit `timeout_s` through the progress handler (checked every `progress_ops`
  VM instructions, covering both evaluation and fetching).
- Failure policy (the policy wrote the SQL, so its failures are its fault):
  a compile/runtime error or a denied statement -> `QueryRejected` (the task's execution-error
  reward); a query past the time limit -> `SQLTimeout`; more than `max_rows` rows ->
  `SQLResultTooLarge` (both subclasses of `QueryRejected`). A timeout or a cap is never an
  empty result set, so it can never match an empty gold result.
- Gold results (`gold(sql, db)`) are cached in memory by (database path, SQL); a gold query
  that fails is the dataset's problem: `BackendError(retryable=False)`. A missing database
  file raises `FileNotFoundError` naming the path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import time
import urllib.parse
from typing import Any

from deepretrieval_jax.search.base import BackendError, QueryRejected, SearchBackend, check_query

_ALLOWED = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    getattr(sqlite3, "SQLITE_RECURSIVE", 33),
}


class SQLTimeout(QueryRejected):
    """The query ran past the wall-clock limit (a runaway query is the policy's fault)."""


class SQLResultTooLarge(QueryRejected):
    """The query returned more rows than the cap."""


@dataclasses.dataclass(frozen=True)
class SQLConfig:
    db_root: str | None = None  # Resolves db_id: <root>/<id>/<id>.sqlite or <root>/<id>.sqlite.
    timeout_s: float = 5.0  # Wall clock per execution.
    max_rows: int = 10_000  # More rows -> SQLResultTooLarge.
    max_query_chars: int = 10_000
    progress_ops: int = 1000  # VM instructions between deadline checks.
    max_value_bytes: int = 10_000_000  # Largest string/blob a query may build (memory guard).


def _authorizer(action, arg1, arg2, db_name, trigger):
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


def execute(sql: str, db_path: str, config: SQLConfig) -> list[tuple]:
    """Runs one statement read-only; returns all rows. Blocking: call from a thread."""
    check_query(sql, config.max_query_chars)
    if not os.path.isfile(db_path):
        raise FileNotFoundError(f"sqlite database not found: {db_path}")
    uri = f"file:{urllib.parse.quote(os.path.abspath(db_path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    deadline = time.monotonic() + config.timeout_s
    timed_out = False

    def progress():
        nonlocal timed_out
        timed_out = time.monotonic() > deadline
        return 1 if timed_out else 0

    try:
        conn.execute("PRAGMA query_only = ON")
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, config.max_value_bytes)
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.set_authorizer(_authorizer)
        conn.set_progress_handler(progress, config.progress_ops)
        try:
            cursor = conn.execute(sql)
            rows = cursor.fetchmany(config.max_rows + 1)
        except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError) as exc:
            if timed_out:
                raise SQLTimeout(f"SQL timeout: stopped after {config.timeout_s:g} s") from None
            raise QueryRejected(f"SQL error: {type(exc).__name__}: {exc}") from None
        if len(rows) > config.max_rows:
            raise SQLResultTooLarge(f"SQL result has more than {config.max_rows} rows")
        return rows
    finally:
        conn.close()


class SQLBackend(SearchBackend):
    """`await SQLBackend(config).search(sql, db_id="concert_singer")` -> result rows."""

    name = "sql"

    def __init__(self, config: SQLConfig | None = None):
        self.config = config or SQLConfig()
        self._gold: dict[tuple[str, str], list[tuple]] = {}
        self.gold_hits = 0

    def resolve(self, db_id: str | None = None, db_path: str | None = None) -> str:
        if db_path:
            return db_path
        if not (db_id and self.config.db_root):
            raise ValueError("give db_path, or db_id with SQLConfig.db_root set")
        nested = os.path.join(self.config.db_root, db_id, f"{db_id}.sqlite")
        return (
            nested
            if os.path.exists(nested)
            else os.path.join(self.config.db_root, f"{db_id}.sqlite")
        )

    def cache_params(self, **opts: Any) -> dict[str, Any]:
        return {"db": self.resolve(**opts), "max_rows": self.config.max_rows}

    async def search(self, query: str, *, db_id=None, db_path=None) -> list[tuple]:
        path = self.resolve(db_id, db_path)
        return await asyncio.to_thread(execute, query, path, self.config)

    async def gold(self, sql: str, *, db_id=None, db_path=None) -> list[tuple]:
        """The gold query's rows, cached; its failure is `BackendError` (bad data, not policy)."""
        path = self.resolve(db_id, db_path)
        key = (os.path.abspath(path), sql)
        if key in self._gold:
            self.gold_hits += 1
            return self._gold[key]
        try:
            rows = await asyncio.to_thread(execute, sql, path, self.config)
        except QueryRejected as exc:
            raise BackendError(f"gold SQL failed on {path}: {exc}", retryable=False) from None
        self._gold[key] = rows
        return rows
