"""Search-result cache: an in-memory LRU over an optional persistent sqlite file.

Invariants:
- Key = sha256 of JSON `[backend name, normalised query, parameters]` where the query is NFC
  normalised with whitespace runs collapsed (case is kept: Boolean operators are upper case)
  and the parameters are the backend's `cache_params(**opts)`, JSON-encoded with sorted keys.
- Stored outcomes: a result list ("ok") or a policy rejection ("rejected", the QueryRejected
  message), so replayed rewards equal recorded ones. Infrastructure failures are never stored.
- Modes (`CacheMode`):
  off         no cache at all;
  read_write  read memory then sqlite; on a miss the backend is called and the outcome stored;
  record      the backend is always called (stored entries are not read, except outcomes this
              process already produced) and every outcome is stored (overwriting);
  replay      never calls a backend: a miss raises `ReplayMiss`, a non-retryable `BackendError`,
              so the sample is invalid, counted as `replay_misses`, and a batch with too many
              misses fails through the pool's invalid-fraction threshold (set it to 0 for strict
              replay).
- sqlite in WAL mode with a 30 s busy timeout, so several processes can share one file. Writes
  are committed by `flush()` (the pool flushes after each batch) and by `close()`. Replay opens
  the file read-only (`mode=ro`): it never changes the recorded cache, not even its journal
  mode. A file that is not a cache (not sqlite, corrupt, no `outcomes` table in replay, a
  stored value that is not JSON) is a `DataFileError` naming it.
- Thread safety: one lock around the LRU and the connection; the pool calls it from its loop.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import json
import os
import re
import sqlite3
import threading
import unicodedata
import urllib.parse
from collections.abc import Mapping
from typing import Any

from deepretrieval_jax.search.base import BackendError, DataFileError

_SPACES = re.compile(r"\s+")


class CacheMode(str, enum.Enum):
    OFF = "off"
    READ_WRITE = "read_write"
    RECORD = "record"
    REPLAY = "replay"


class ReplayMiss(BackendError):
    """A replay found no stored outcome; the sample is invalid (no network is touched)."""

    def __init__(self, message: str):
        super().__init__(message, retryable=False)


def normalise_query(query: str) -> str:
    """NFC, whitespace runs -> one space, stripped. Case and Boolean syntax are kept."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", query)).strip()


def cache_key(backend: str, query: str, params: Mapping[str, Any]) -> str:
    blob = json.dumps(
        [backend, normalise_query(query), dict(params)],
        sort_keys=True,
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


Outcome = tuple[str, Any]  # ("ok", results) or ("rejected", message)


class ResultCache:
    """LRU + sqlite cache of search outcomes. See the module docstring for the modes."""

    def __init__(self, mode: CacheMode | str = "off", path: str | None = None, lru_size=100_000):
        try:
            self.mode = CacheMode(mode)
        except ValueError:
            modes = [m.value for m in CacheMode]
            raise ValueError(f"cache mode must be one of {modes}, got {mode!r}") from None
        if self.mode == CacheMode.REPLAY and not path:
            raise ValueError("cache mode 'replay' needs a cache path (the recorded sqlite file)")
        if self.mode == CacheMode.REPLAY and not os.path.exists(path):
            raise ValueError(f"cache mode 'replay': no recorded cache file at {path!r}")
        self.path = path if self.mode != CacheMode.OFF else None
        self.lru_size = lru_size
        self._lru: collections.OrderedDict[str, Outcome] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if self.path:
            try:
                self._db = self._open(self.path, read_only=self.mode == CacheMode.REPLAY)
            except sqlite3.DatabaseError as exc:
                raise DataFileError(f"{self.path}: not a usable result cache: {exc}") from None

    @staticmethod
    def _open(path: str, read_only: bool) -> sqlite3.Connection:
        if read_only:
            uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
            db = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)
            db.execute("SELECT kind, value FROM outcomes LIMIT 1").fetchall()
            return db
        db = sqlite3.connect(path, timeout=30.0, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS outcomes (key TEXT PRIMARY KEY, backend TEXT,"
            " query TEXT, params TEXT, kind TEXT, value TEXT)"
        )
        db.commit()
        return db

    @property
    def enabled(self) -> bool:
        return self.mode != CacheMode.OFF

    def get(self, key: str) -> Outcome | None:
        """The stored outcome for `key` as this mode allows reading it, or None."""
        if not self.enabled:
            return None
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                return self._lru[key]
            if self._db is None or self.mode == CacheMode.RECORD:
                return None
            try:
                row = self._db.execute(
                    "SELECT kind, value FROM outcomes WHERE key = ?", (key,)
                ).fetchone()
                outcome = None if row is None else (row[0], json.loads(row[1]))
            except (sqlite3.DatabaseError, ValueError, TypeError) as exc:
                raise DataFileError(f"{self.path}: corrupt result cache entry: {exc}") from None
            if outcome is None:
                return None
            self._remember(key, outcome)
            return outcome

    def put(self, key: str, outcome: Outcome, backend: str, query: str, params: Mapping) -> None:
        if not self.enabled or self.mode == CacheMode.REPLAY:
            return
        kind, value = outcome
        with self._lock:
            self._remember(key, (kind, json.loads(json.dumps(value, default=str))))
            if self._db is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        key,
                        backend,
                        normalise_query(query),
                        json.dumps(dict(params), sort_keys=True, default=str),
                        kind,
                        json.dumps(value, default=str),
                    ),
                )

    def _remember(self, key: str, outcome: Outcome) -> None:
        self._lru[key] = outcome
        self._lru.move_to_end(key)
        while len(self._lru) > self.lru_size:
            self._lru.popitem(last=False)

    def flush(self) -> None:
        with self._lock:
            if self._db is not None and self.mode != CacheMode.REPLAY:
                self._db.commit()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                if self.mode != CacheMode.REPLAY:
                    self._db.commit()
                self._db.close()
                self._db = None

    def __len__(self) -> int:
        with self._lock:
            if self._db is None:
                return len(self._lru)
            return self._db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0]
