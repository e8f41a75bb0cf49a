"""Downloader against a local HTTP server on 127.0.0.1 (no network): checksums, cache, resume."""

import hashlib
import http.server
import io
import json
import threading
import zipfile
from functools import partial

import pytest

from deepretrieval_jax.data import download


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, honouring `Range: bytes=N-` with 206 (enough to test resuming)."""

    requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        RangeHandler.requests.append((self.path, self.headers.get("Range")))
        path = self.translate_path(self.path)
        try:
            data = open(path, "rb").read()
        except OSError:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][6:].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    RangeHandler.requests = []
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(RangeHandler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()
    httpd.server_close()


def beir_zip(name="tiny"):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(
            f"{name}/corpus.jsonl", json.dumps({"_id": "d1", "title": "", "text": "x"}) + "\n"
        )
        zf.writestr(f"{name}/queries.jsonl", json.dumps({"_id": "q1", "text": "x"}) + "\n")
        zf.writestr(f"{name}/qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return buf.getvalue()


def test_download_verifies_and_caches(server, tmp_path):
    root, url = server
    data = beir_zip()
    (root / "tiny.zip").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    path = download.download(f"{url}/tiny.zip", digest, cache=cache)
    assert path == cache / "tiny.zip" and path.read_bytes() == data
    assert download.download(f"{url}/tiny.zip", digest, cache=cache) == path
    assert len(RangeHandler.requests) == 1  # the second call was served from the cache


def test_checksum_mismatch_leaves_nothing_in_cache(server, tmp_path):
    root, url = server
    (root / "tiny.zip").write_bytes(beir_zip())
    cache = tmp_path / "cache"
    with pytest.raises(
        download.ChecksumError, match=r"tiny.zip: sha256 mismatch: expected 0+, got"
    ):
        download.download(f"{url}/tiny.zip", "0" * 64, cache=cache)
    assert list(cache.iterdir()) == []


def test_resume_from_partial_file(server, tmp_path):
    root, url = server
    data = bytes(range(256)) * 50
    (root / "blob.bin").write_bytes(data)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "blob.bin.part").write_bytes(data[:1000])
    path = download.download(f"{url}/blob.bin", hashlib.sha256(data).hexdigest(), cache=cache)
    assert path.read_bytes() == data
    assert RangeHandler.requests == [("/blob.bin", "bytes=1000-")]
    assert not (cache / "blob.bin.part").exists()


def test_http_error_is_clear(server, tmp_path):
    _, url = server
    with pytest.raises(OSError, match="HTTP 404"):
        download.download(f"{url}/missing.zip", None, cache=tmp_path)


def test_beir_dataset_dir_explicit_env_and_download(server, tmp_path, monkeypatch):
    root, url = server
    data = beir_zip("tiny")
    (root / "tiny.zip").write_bytes(data)
    monkeypatch.delenv("DEEPRETRIEVAL_DATA_DIR", raising=False)
    cache = tmp_path / "cache"
    got = download.beir_dataset_dir(
        "tiny", url=f"{url}/tiny.zip", sha256=hashlib.sha256(data).hexdigest(), cache=cache
    )
    assert got == cache / "beir" / "tiny" / "tiny" and (got / "qrels" / "test.tsv").exists()
    assert download.beir_dataset_dir("tiny", got) == got  # explicit directory
    monkeypatch.setenv("DEEPRETRIEVAL_DATA_DIR", str(cache / "beir" / "tiny"))
    assert download.beir_dataset_dir("tiny") == got  # $DEEPRETRIEVAL_DATA_DIR/<name>
    with pytest.raises(FileNotFoundError, match="not a BEIR directory"):
        download.beir_dataset_dir("tiny", tmp_path)


def test_unsafe_zip_member_is_refused(tmp_path):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(ValueError, match="unsafe member"):
        download.extract_zip(path, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("task, beir_name", [("nfcorpus", "nfcorpus"), ("msmarco_beir", "msmarco")])
def test_beir_tasks_download_their_data_when_absent(server, tmp_path, monkeypatch, task, beir_name):
    """docs/tasks.md: a listed BEIR set missing from the data root is downloaded on first use,
    for the examples (rl.task_data.load_examples) and the backend's corpus alike."""
    import asyncio

    from configs import scifact
    from deepretrieval_jax.data import backends, task_data

    root, url = server
    (root / f"{beir_name}.zip").write_bytes(beir_zip(beir_name))
    resource = download.Resource(f"{url}/{beir_name}.zip", None, f"{beir_name}.zip")
    monkeypatch.setitem(download.RESOURCES, f"beir/{beir_name}", resource)
    monkeypatch.setenv("DEEPRETRIEVAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DEEPRETRIEVAL_DATA_DIR", raising=False)
    data = tmp_path / "data"
    data.mkdir()  # an empty data root
    cfg = scifact.get_config()
    cfg.data.task, cfg.data.data_dir = task, str(data)
    spec = task_data.task_spec(cfg)
    (example,) = task_data.load_examples(cfg, spec, "test")
    backend = backends.task_backend(spec, data)

    async def search():
        async with backend:
            return await backend.search(example.input)

    assert example.label == {"d1": 1} and asyncio.run(search())[0] == "d1"
    assert RangeHandler.requests == [(f"/{beir_name}.zip", None)]  # downloaded once, cached
