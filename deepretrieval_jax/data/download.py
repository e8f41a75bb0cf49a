"""Download helpers for public datasets, with sha256 checksums and a cache directory.

Invariants:
- A file reaches its final name in the cache only after its sha256 matched; it is written to
  `<name>.part` first and renamed atomically. A mismatch deletes the partial file and raises
  `ChecksumError` naming the URL, the expected and the actual digest.
- Resumable: an existing `.part` file is continued with an HTTP Range request; a server that
  ignores Range (status 200) restarts the file from byte 0.
- Timeouts: `timeout_s` per connection / read (urllib); no retries (a re-run resumes).
- Cache: `$DEEPRETRIEVAL_CACHE_DIR`, else `~/.cache/deepretrieval_jax`. A cached file whose
  checksum is known is trusted; `expected_sha256=None` skips verification (logged digest).

`fetch(key)` / `source_path("download:squad/dev")`: a packaged resource (SQuAD json, DPR
passages, BEIR zips) as a cached local file; the data CLIs accept `download:<key>` as a path.

`beir_dataset_dir(name, data_dir=None)`: an explicit dir, or `$DEEPRETRIEVAL_DATA_DIR/<name>`,
else the BEIR zip (`BEIR_NAMES[name]`, e.g. msmarco_beir -> msmarco) downloaded and extracted
into the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset"
DOWNLOAD_PREFIX = "download:"  # `download:<RESOURCES key>` where a CLI takes an input file


@dataclasses.dataclass(frozen=True)
class Resource:
    """A downloadable file. sha256 None = not pinned (verification skipped)."""

    url: str
    sha256: str | None
    filename: str


# Public sources. BEIR publishes md5 sums only and these machines are offline, so no sha256 is
# pinned yet: pass `sha256=` (or fill it in here) to make a download verified.
RESOURCES = {
    "beir/scifact": Resource(BEIR_URL.format(name="scifact"), None, "scifact.zip"),
    "beir/nfcorpus": Resource(BEIR_URL.format(name="nfcorpus"), None, "nfcorpus.zip"),
    "beir/fiqa": Resource(BEIR_URL.format(name="fiqa"), None, "fiqa.zip"),
    "beir/hotpotqa": Resource(BEIR_URL.format(name="hotpotqa"), None, "hotpotqa.zip"),
    "beir/fever": Resource(BEIR_URL.format(name="fever"), None, "fever.zip"),
    "beir/msmarco": Resource(BEIR_URL.format(name="msmarco"), None, "msmarco.zip"),
    **{
        f"squad/{split}{v}": Resource(
            f"{SQUAD_URL}/{split}-{ver}.json", None, f"{split}-{ver}.json"
        )
        for split in ("train", "dev")
        for v, ver in (("", "v1.1"), ("_v2", "v2.0"))
    },
    "dpr/psgs_w100": Resource(
        "https://dl.fbaipublicfiles.com/dpr/wikipedia_split/psgs_w100.tsv.gz",
        None,
        "psgs_w100.tsv.gz",
    ),
}


# Datasets fetched from BEIR when absent locally: our dataset name -> BEIR's zip name.
BEIR_NAMES = {
    "scifact": "scifact",
    "nfcorpus": "nfcorpus",
    "fever": "fever",
    "hotpotqa": "hotpotqa",
    "fiqa": "fiqa",
    "msmarco_beir": "msmarco",
}


class ChecksumError(RuntimeError):
    """A downloaded file's sha256 differs from the expected one."""


def cache_dir() -> Path:
    root = os.environ.get("DEEPRETRIEVAL_CACHE_DIR") or Path.home() / ".cache" / "deepretrieval_jax"
    return Path(root)


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(
    url: str,
    expected_sha256: str | None,
    *,
    filename: str | None = None,
    cache: str | os.PathLike | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Returns the cached file for `url`, downloading (or resuming) and verifying it first."""
    target_dir = Path(cache) if cache is not None else cache_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    final = target_dir / (filename or url.rstrip("/").rsplit("/", 1)[-1])
    if final.exists():
        if expected_sha256 is None or sha256_of(final) == expected_sha256:
            return final
        final.unlink()  # a stale or corrupt cache entry: fetch again
    part = final.with_name(final.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            mode = "ab" if offset and resp.status == 206 else "wb"
            with open(part, mode) as f:
                while block := resp.read(1 << 20):
                    f.write(block)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the partial file is already complete
            pass
        else:
            raise OSError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError) as e:
        raise OSError(f"download of {url} failed: {e} (partial file kept at {part})") from None
    actual = sha256_of(part)
    if expected_sha256 is not None and actual != expected_sha256:
        part.unlink()
        raise ChecksumError(
            f"{url}: sha256 mismatch: expected {expected_sha256}, got {actual}; "
            "the download was deleted"
        )
    os.replace(part, final)
    return final


def fetch(key: str, cache: str | os.PathLike | None = None) -> Path:
    """The cached file of `RESOURCES[key]` (e.g. "squad/dev"), downloaded first if needed."""
    if key not in RESOURCES:
        raise KeyError(f"unknown download {key!r}; known: {', '.join(sorted(RESOURCES))}")
    res = RESOURCES[key]
    root = Path(cache) if cache is not None else cache_dir() / "downloads"
    return download(res.url, res.sha256, filename=res.filename, cache=root)


def source_path(arg: str) -> str:
    """A CLI input: a local path, or `download:<key>` -> the cached download (`fetch`)."""
    if arg.startswith(DOWNLOAD_PREFIX):
        return str(fetch(arg[len(DOWNLOAD_PREFIX) :]))
    return arg


def extract_zip(zip_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extracts into `dest` (via a temporary dir renamed at the end); refuses unsafe names."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".extracting")
    for stale in (tmp, dest):
        if stale.exists():
            shutil.rmtree(stale)
    with zipfile.ZipFile(zip_path) as zf:
        for name in zf.namelist():
            if name.startswith("/") or ".." in Path(name).parts:
                raise ValueError(f"{zip_path}: unsafe member name {name!r}")
        zf.extractall(tmp)
    os.replace(tmp, dest)
    return dest


def beir_dataset_dir(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    sha256: str | None = None,
    cache: str | os.PathLike | None = None,
) -> Path:
    """A local BEIR directory (corpus.jsonl, queries.jsonl, qrels/) for dataset `name`.

    Order: `data_dir` if given (must exist), else `$DEEPRETRIEVAL_DATA_DIR/<name>` if present,
    else download `url` (default: the BEIR zip) into the cache and extract it there.
    """
    if data_dir is not None:
        path = Path(data_dir)
        if not (path / "corpus.jsonl").exists():
            raise FileNotFoundError(f"{path}: not a BEIR directory (no corpus.jsonl)")
        return path
    env = os.environ.get("DEEPRETRIEVAL_DATA_DIR")
    if env and (Path(env) / name / "corpus.jsonl").exists():
        return Path(env) / name
    name = BEIR_NAMES.get(name, name)
    root = Path(cache) if cache is not None else cache_dir()
    extracted = root / "beir" / name
    if (extracted / name / "corpus.jsonl").exists():
        return extracted / name
    resource = RESOURCES.get(f"beir/{name}")
    url = url or (resource.url if resource else BEIR_URL.format(name=name))
    sha256 = sha256 or (resource.sha256 if resource else None)
    zip_path = download(url, sha256, filename=f"{name}.zip", cache=root / "downloads")
    extract_zip(zip_path, extracted)
    if not (extracted / name / "corpus.jsonl").exists():
        raise FileNotFoundError(f"{zip_path}: the zip has no {name}/corpus.jsonl")
    return extracted / name
