"""SQL backend on real sqlite files: read-only, time limit, row cap, gold cache."""

import asyncio
import hashlib
import os
import sqlite3
import time

import pytest

from deepretrieval_jax.search.base import BackendError, DataFileError, QueryRejected
from deepretrieval_jax.search.sql import (
    SQLBackend,
    SQLConfig,
    SQLResultTooLarge,
    SQLTimeout,
)

RUNAWAY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "shop" / "shop.sqlite"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, age INTEGER);
        INSERT INTO people VALUES (1, 'ann', 31), (2, 'bob', 45), (3, 'cy', 31);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, person INTEGER, total REAL);
        INSERT INTO orders VALUES (1, 1, 9.5), (2, 1, 20.0), (3, 2, 3.25);
        """
    )
    conn.commit()
    conn.close()
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(coro):
    return asyncio.run(coro)


def test_select_and_join(db):
    backend = SQLBackend(SQLConfig(db_root=str(db.parent.parent)))
    rows = run(
        backend.search(
            "SELECT p.name, sum(o.total) FROM people p JOIN orders o ON o.person = p.id "
            "GROUP BY p.name ORDER BY p.name",
            db_id="shop",
        )
    )
    assert rows == [("ann", 29.5), ("bob", 3.25)]
    assert run(backend.search("SELECT name FROM people WHERE age > 99", db_path=str(db))) == []


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE people",
        "INSERT INTO people VALUES (9, 'eve', 1)",
        "UPDATE people SET age = 0",
        "DELETE FROM people",
        "CREATE TABLE t (x)",
        "ATTACH DATABASE 'evil.sqlite' AS evil",
        "PRAGMA user_version = 7",
        "PRAGMA journal_mode = WAL",
        "PRAGMA table_info(people)",
        "BEGIN IMMEDIATE",
        "VACUUM",
        "SELECT 1; DROP TABLE people",
        "REPLACE INTO people VALUES (1, 'x', 2)",
    ],
)
def test_writes_attach_and_pragma_fail_and_file_is_unchanged(db, sql):
    before, files = digest(db), sorted(os.listdir(db.parent))
    with pytest.raises(QueryRejected, match="SQL error"):
        run(SQLBackend().search(sql, db_path=str(db)))
    assert digest(db) == before
    assert sorted(os.listdir(db.parent)) == files
    assert run(SQLBackend().search("SELECT count(*) FROM people", db_path=str(db))) == [(3,)]


def test_runaway_query_is_a_timeout_not_an_empty_result(db):
    backend = SQLBackend(SQLConfig(timeout_s=0.3))
    start = time.monotonic()
    with pytest.raises(SQLTimeout, match="timeout") as err:
        run(backend.search(RUNAWAY, db_path=str(db)))
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 2.0, elapsed
    assert isinstance(err.value, QueryRejected)


def test_row_cap(db):
    fifty = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 50) SELECT x FROM c"
    )
    assert len(run(SQLBackend(SQLConfig(max_rows=50)).search(fifty, db_path=str(db)))) == 50
    with pytest.raises(SQLResultTooLarge, match="more than 49 rows"):
        run(SQLBackend(SQLConfig(max_rows=49)).search(fifty, db_path=str(db)))


def test_errors_are_rejections_and_config_errors_are_clear(db):
    backend = SQLBackend()
    too_big = "SELECT length(randomblob(50000000))"  # 50 MB > the 10 MB value cap.
    for bad in [
        "SELEC name FROM people",
        "SELECT nope FROM people",
        "SELECT * FROM missing",
        too_big,
    ]:
        with pytest.raises(QueryRejected, match="SQL error"):
            run(backend.search(bad, db_path=str(db)))
    with pytest.raises(QueryRejected, match="empty"):
        run(backend.search("  ", db_path=str(db)))
    with pytest.raises(FileNotFoundError, match="nowhere.sqlite"):
        run(backend.search("SELECT 1", db_path=str(db.parent / "nowhere.sqlite")))
    with pytest.raises(ValueError, match="db_root"):
        run(backend.search("SELECT 1", db_id="shop"))


def test_gold_is_cached_and_gold_failure_is_backend_error(db):
    async def main():
        backend = SQLBackend(SQLConfig(timeout_s=0.2))
        gold = "SELECT name FROM people WHERE age = 31 ORDER BY id"
        first = await backend.gold(gold, db_path=str(db))
        second = await backend.gold(gold, db_path=str(db))
        assert first == second == [("ann",), ("cy",)] and backend.gold_hits == 1
        with pytest.raises(BackendError, match="gold SQL failed") as err:
            await backend.gold(RUNAWAY, db_path=str(db))
        assert not err.value.retryable
        # Concurrent executions in threads do not interfere.
        results = await asyncio.gather(
            *[
                backend.search(f"SELECT {i} + count(*) FROM people", db_path=str(db))
                for i in range(8)
            ]
        )
        assert results == [[(i + 3,)] for i in range(8)]

    run(main())


# Issue 14: hard bounds on hostile SQL, WAL databases, broken files -----------------------


def test_printf_bomb_is_rejected_at_once_and_printf_still_works(db):
    backend = SQLBackend(SQLConfig(timeout_s=0.5))
    bomb = "SELECT " + ", ".join(["length(printf('%.*c', 200000000, 'x'))"] * 3)
    start = time.monotonic()
    with pytest.raises(QueryRejected, match="SQL error"):
        run(backend.search(bomb, db_path=str(db)))
    assert time.monotonic() - start < 0.5  # 2 s per call before the width bound.
    ok = "SELECT printf('%.2f|%5d|%-3s|%%|%*d', 3.14159, 42, 'a', 4, 7), format('%s!', name) FROM people"
    rows = run(backend.search(ok + " WHERE id = 1", db_path=str(db)))
    assert rows == [("3.14|   42|a  |%|   7", "ann!")]
    with pytest.raises(QueryRejected, match="not authorized"):
        run(backend.search("SELECT length(zeroblob(100))", db_path=str(db)))


def test_timer_stops_a_query_the_progress_handler_does_not_see(db):
    """The progress handler is only checked every `progress_ops` VM instructions; the timer's
    interrupt() stops the statement at the deadline anyway."""
    backend = SQLBackend(SQLConfig(timeout_s=0.3, progress_ops=2_000_000_000))
    start = time.monotonic()
    with pytest.raises(SQLTimeout):
        run(backend.search(RUNAWAY, db_path=str(db)))
    assert time.monotonic() - start < 2.0


def test_result_byte_cap(db):
    wide = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 100)"
        " SELECT x, printf('%5000c', 'y') FROM c"
    )
    assert len(run(SQLBackend().search(wide, db_path=str(db)))) == 100
    with pytest.raises(SQLResultTooLarge, match="larger than 100000 bytes"):
        run(SQLBackend(SQLConfig(max_result_bytes=100_000)).search(wide, db_path=str(db)))


def test_wal_database_grows_no_side_files(db):
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    conn.close()
    before, files = digest(db), sorted(os.listdir(db.parent))
    assert files == ["shop.sqlite"]
    assert run(SQLBackend().search("SELECT count(*) FROM people", db_path=str(db))) == [(3,)]
    assert sorted(os.listdir(db.parent)) == files and digest(db) == before


@pytest.mark.parametrize("content", [b"", b"\0" * 8192, b"definitely not sqlite" * 100])
def test_broken_database_is_a_data_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.sqlite"
    path.write_bytes(content)
    with pytest.raises(DataFileError, match="broken.sqlite"):
        run(SQLBackend().search("SELECT * FROM people", db_path=str(path)))


def test_corrupt_page_is_a_data_error(db):
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE big (t TEXT)")
    conn.executemany("INSERT INTO big VALUES (?)", [("x" * 500,)] * 200)
    conn.commit()
    conn.close()
    data = bytearray(db.read_bytes())
    data[-4096 * 8 :] = b"\xff" * (4096 * 8)  # Trash the last pages (the big table's data).
    db.write_bytes(bytes(data))
    with pytest.raises(DataFileError, match="shop.sqlite"):
        run(SQLBackend().search("SELECT count(*), max(t) FROM big", db_path=str(db)))
