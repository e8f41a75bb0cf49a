"""Execute model-written SQL on sqlite, read-only, with hard time, memory and result bounds.

Invariants:
- Each execution opens its own connection (`file:<path>?mode=ro&immutable=1` URI, `PRAGMA
  query_only`) in a worker thread (`asyncio.to_thread`), so the event loop never blocks and
  concurrent queries share nothing. `immutable=1`: no locks and no `-wal`/`-shm` files are
  created beside the database, even one in WAL mode (task databases are static files).
  An authorizer allows only SELECT, column reads, recursive CTEs and functions other than
  `_DENIED_FUNCTIONS`: writes, DDL, ATTACH/DETACH, PRAGMA (any), transactions are denied. The
  database file is never modified.
- Memory: strings/blobs are capped at `max_value_bytes` (SQLITE_LIMIT_LENGTH), no database can
  be attached, `zeroblob`/`randomblob` are denied, rows are fetched one at a time and the result
  is capped at `max_rows` rows and `max_result_bytes` bytes (text/blob lengths, 8 per number).
  `printf`/`format` run SQLite's own printf, but a width or precision above
  `max_printf_width` is an error: one `printf('%.*c', 2000000000, 'x')` call otherwise loops
  for seconds inside a single VM instruction, where no time check can stop it.
- Time: `timeout_s` is a hard wall-clock stop: a timer calls `Connection.interrupt()` at the
  deadline, and the progress handler (every `progress_ops` VM instructions) checks it too.
  The longest single VM instruction left (no denied function, printf bounded) is far shorter.
- Failure policy (the policy wrote the SQL, so its failures are its fault):
  a compile/runtime error or a denied statement -> `QueryRejected` (the task's execution-error
  reward); a query past the time limit -> `SQLTimeout`; more than `max_rows` rows or
  `max_result_bytes` -> `SQLResultTooLarge` (both subclasses of `QueryRejected`). A timeout or
  a cap is never an empty result set, so it can never match an empty gold result.
- A database file that is not a database or is corrupt (SQLITE_NOTADB, SQLITE_CORRUPT) is not
  the policy's fault: `DataFileError` naming the file, which stops the run (the reward pool does
  not turn it into an invalid sample).
- Gold results (`gold(sql, db)`) are cached in memory by (database path, SQL); a gold query
  that fails is the dataset's problem: `BackendError(retryable=False)`. A missing database
  file raises `FileNotFoundError` naming the path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sqlite3
import threading
import urllib.parse
from typing import Any

from deepretrieval_jax.search.base import (
    BackendError,
    DataFileError,
    QueryRejected,
    SearchBackend,
    check_query,
)

_ALLOWED = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    getattr(sqlite3, "SQLITE_RECURSIVE", 33),
}
# Memory bombs (capped by SQLITE_LIMIT_LENGTH, but needless in a query) and file access.
_DENIED_FUNCTIONS = {"zeroblob", "randomblob", "load_extension", "readfile", "writefile"}
_BROKEN_FILE_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB (primary result codes).
# One printf conversion: %[flags][width][.precision][length]type (SQLite's printf grammar).
_PRINTF_SPEC = re.compile(r"%([-+ #0,!]*)(\*|\d+)?(?:\.(\*|\d+))?(?:ll|l)?(.?)")


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
    max_value_bytes: int = 100_000  # Largest string/blob a query may build (memory guard).
    max_result_bytes: int = 50_000_000  # Result size cap (text/blob bytes, 8 per number).
    max_printf_width: int = 10_000  # Largest printf/format width or precision.


def _authorizer(action, arg1, arg2, db_name, trigger):
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if arg2.lower() in _DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


_plain = threading.local()  # Per-thread connection that still has SQLite's built-in printf.


def _bounded_printf(max_width: int):
    """SQLite's printf/format, with widths and precisions (literal or `*`) at most max_width."""

    def printf(fmt, *args):
        if fmt is None:
            return None
        fmt, arg = str(fmt), 0
        for spec in _PRINTF_SPEC.finditer(fmt):
            if spec.group(4) == "%":
                continue
            for size in spec.group(2, 3):
                if size == "*":
                    value = args[arg] if arg < len(args) else 0
                    arg += 1
                    size = value if isinstance(value, (int, float)) else 0
                if size is not None and abs(int(size)) > max_width:
                    raise ValueError(f"printf width/precision above {max_width}")
            arg += 1
        if not hasattr(_plain, "conn"):
            _plain.conn = sqlite3.connect(":memory:", check_same_thread=False)
        marks = ", ".join("?" * (len(args) + 1))
        return _plain.conn.execute(f"SELECT printf({marks})", (fmt, *args)).fetchone()[0]

    return printf


def _row_bytes(row: tuple) -> int:
    return sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row)


def execute(sql: str, db_path: str, config: SQLConfig) -> list[tuple]:
    """Runs one statement read-only; returns all rows. Blocking: call from a thread."""
    check_query(sql, config.max_query_chars)
    if not os.path.isfile(db_path):
        raise FileNotFoundError(f"sqlite database not found: {db_path}")
    uri = f"file:{urllib.parse.quote(os.path.abspath(db_path))}?mode=ro&immutable=1"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    stop = threading.Event()  # Set at the deadline; the timer also interrupts the statement.

    def deadline():
        stop.set()
        try:
            conn.interrupt()
        except sqlite3.ProgrammingError:  # Closed at the same moment: nothing left to stop.
            pass

    timer = threading.Timer(config.timeout_s, deadline)
    try:
        try:
            (tables,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as exc:
            raise DataFileError(f"{db_path}: not a readable sqlite database: {exc}") from None
        if not tables:  # An empty (e.g. truncated) file opens as an empty database.
            raise DataFileError(f"{db_path}: sqlite database has no tables (empty file?)")
        conn.execute("PRAGMA query_only = ON")
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, config.max_value_bytes)
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        printf = _bounded_printf(config.max_printf_width)
        for name in ("printf", "format"):
            conn.create_function(name, -1, printf)
        conn.set_authorizer(_authorizer)
        conn.set_progress_handler(lambda: 1 if stop.is_set() else 0, config.progress_ops)
        timer.start()
        rows, size = [], 0
        try:
            for row in conn.execute(sql):
                rows.append(row)
                size += _row_bytes(row)
                if len(rows) > config.max_rows:
                    raise SQLResultTooLarge(f"SQL result has more than {config.max_rows} rows")
                if size > config.max_result_bytes:
                    raise SQLResultTooLarge(
                        f"SQL result is larger than {config.max_result_bytes} bytes"
                    )
        except QueryRejected:
            raise
        except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError) as exc:
            if stop.is_set():
                raise SQLTimeout(f"SQL timeout: stopped after {config.timeout_s:g} s") from None
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code in _BROKEN_FILE_CODES:
                raise DataFileError(f"{db_path}: corrupt sqlite database: {exc}") from None
            raise QueryRejected(f"SQL error: {type(exc).__name__}: {exc}") from None
        return rows
    finally:
        timer.cancel()
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
