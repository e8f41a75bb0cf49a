"""Broken files (issue 14 item 7): a BM25 index or result cache that is corrupt is an error
naming the file, never silently wrong results; replay never writes to the recorded cache."""

import hashlib
import os
import sqlite3

import numpy as np
import pytest
from search_fakes import write_beir

from deepretrieval_jax.rewards import PoolConfig, RewardPool, RewardRequest, make_tasks
from deepretrieval_jax.rewards.cache import ResultCache
from deepretrieval_jax.search.base import DataFileError
from deepretrieval_jax.search.bm25 import BM25Index
from deepretrieval_jax.search.manifest import MANIFEST
from deepretrieval_jax.search.sql import SQLBackend


@pytest.fixture
def index_dir(tmp_path):
    index = BM25Index.from_beir(write_beir(tmp_path / "corpus", with_dates=False))
    index.save(str(tmp_path / "index"))
    return tmp_path / "index"


def zero_after_header(path):
    """Zeroes a .npy file's data but keeps its header, so numpy still loads it."""
    raw = bytearray(path.read_bytes())
    header = len(raw) - np.load(path).nbytes
    raw[header:] = bytes(len(raw) - header)
    path.write_bytes(bytes(raw))


def test_intact_index_loads_and_searches(index_dir):
    assert BM25Index.load(str(index_dir)).search("aspirin stroke")[0] == "d4"


@pytest.mark.parametrize("name", ["doc_tokens.npy", "data.csc.index.npy", "doc_offsets.npy"])
def test_zeroed_index_file_is_an_error_naming_it(index_dir, name):
    """A zeroed array loaded fine and returned wrong results silently before the manifest."""
    zero_after_header(index_dir / name)
    assert np.load(index_dir / name).any() == False  # noqa: E712 (still a loadable array)
    with pytest.raises(DataFileError, match=name):
        BM25Index.load(str(index_dir))


def test_truncated_or_garbage_file_names_the_file_without_a_manifest(index_dir, caplog):
    os.remove(index_dir / MANIFEST)  # An index saved by an older version.
    (index_dir / "doc_ids.json").write_bytes(b"\0" * 64)
    with pytest.raises(DataFileError, match="doc_ids.json"):
        BM25Index.load(str(index_dir))
    assert "unverified" in caplog.text
    (index_dir / "doc_ids.json").write_text('["only-one"]')
    with pytest.raises(DataFileError, match="disagree"):
        BM25Index.load(str(index_dir))


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_replay_opens_the_recorded_cache_read_only(tmp_path):
    path = tmp_path / "cache.db"
    recorder = ResultCache("record", str(path))
    recorder.put("k", ("ok", ["1", "2"]), "bm25", "q", {})
    recorder.close()
    conn = sqlite3.connect(path)  # An archived copy: back in rollback-journal mode.
    assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    conn.close()
    before, files = digest(path), sorted(os.listdir(tmp_path))
    replay = ResultCache("replay", str(path))
    assert replay.get("k") == ("ok", ["1", "2"]) and replay.get("other") is None
    replay.put("new", ("ok", []), "bm25", "q2", {})
    replay.flush()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        replay._db.execute("DELETE FROM outcomes")
    replay.close()
    assert digest(path) == before and sorted(os.listdir(tmp_path)) == files


@pytest.mark.parametrize("mode", ["read_write", "record", "replay"])
def test_a_file_that_is_not_a_cache_is_an_error_naming_it(tmp_path, mode):
    path = tmp_path / "not_a_cache.db"
    path.write_bytes(b"this is a text file, not sqlite" * 100)
    with pytest.raises(DataFileError, match="not_a_cache.db"):
        ResultCache(mode, str(path))


def test_corrupt_cache_entry_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "cache.db"
    cache = ResultCache("read_write", str(path))
    cache.put("k", ("ok", ["1"]), "bm25", "q", {})
    cache.close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE outcomes SET value = '[\"1\", trunc'")
    conn.commit()
    conn.close()
    with pytest.raises(DataFileError, match="cache.db"):
        ResultCache("replay", str(path)).get("k")


def test_corrupt_task_database_stops_the_reward_batch_naming_the_file(tmp_path):
    """Issue 14: a corrupt SQL task database was scored as the policy's execution error."""
    good, bad = tmp_path / "good.sqlite", tmp_path / "bad.sqlite"
    conn = sqlite3.connect(good)
    conn.execute("CREATE TABLE t (x INTEGER)")
    conn.commit()
    conn.close()
    bad.write_bytes(b"\0" * 4096)
    completion = '<think>t</think><answer>{"sql": "SELECT x FROM t"}</answer>'
    pool = RewardPool({"sql": SQLBackend()}, make_tasks({"bird": None}), PoolConfig())
    with pool:
        ok = pool.score([RewardRequest("bird", completion, [], {"db_path": str(good)})])
        assert ok[0].valid and ok[0].bucket == "match"
        requests = [RewardRequest("bird", completion, [], {"db_path": str(p)}) for p in (good, bad)]
        with pytest.raises(DataFileError, match="bad.sqlite"):
            pool.score(requests)
