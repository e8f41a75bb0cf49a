"""A local search service: a BM25 corpus behind the PubMed E-utilities esearch interface.

    python -m deepretrieval_jax.search.serve --corpus DIR --port 8800 [--index_dir DIR]

Point `PubMedConfig(base_url="http://127.0.0.1:8800/entrez/eutils/")` at it and a frozen
corpus snapshot stands in for live PubMed, so training is reproducible offline.

Interface: `GET /entrez/eutils/esearch.fcgi` with `db` (any value), `term`, `retmode=json`,
`retmax` (default 20, at most 10,000), `retstart` (at most 9,998), `datetype`, `mindate`,
`maxdate` (applied when the corpus has per-document dates; on an undated corpus esearch's
`ERROR` explains why, unless the index ignores and counts them), `api_key`, `tool`,
`email` (accepted, ignored). The answer is esearch's JSON: `esearchresult.count` (number of
matches, counted up to 10,000 — esearch never pages past that), `idlist`, `retmax`,
`retstart`. A query the backend rejects (`QueryRejected`, e.g. too long) gets count 0 and the
reason in `warninglist.outputmessages`, as PubMed answers a query it cannot use (field tags
the corpus lacks, e.g. `[pt]`, are such queries: see `search/bm25.py` on PubMed syntax).

Invariants: one search runs per request, in a worker thread (the backend's `search`);
`latency_s` is added to every answer; with `rate_limit` N, a request arriving when N requests
were accepted in the last second is answered 429 with `Retry-After: 1` (as NCBI does).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time

from aiohttp import web

from deepretrieval_jax.search.base import BackendError, QueryRejected, SearchBackend

PATH = "/entrez/eutils/esearch.fcgi"
MAX_WINDOW = 10000
MAX_RETSTART = 9998


def _error(message: str) -> web.Response:
    return web.json_response({"esearchresult": {"ERROR": message}})


def make_app(
    backend: SearchBackend, latency_s: float = 0.0, rate_limit: float | None = None
) -> web.Application:
    """The esearch app over an opened `backend` (whose `search` takes top_k/mindate/maxdate)."""
    accepted: collections.deque[float] = collections.deque()

    async def esearch(request: web.Request) -> web.Response:
        now = time.monotonic()
        if rate_limit is not None:
            while accepted and accepted[0] <= now - 1.0:
                accepted.popleft()
            if len(accepted) >= rate_limit:
                return web.json_response(
                    {"error": "API rate limit exceeded"}, status=429, headers={"Retry-After": "1"}
                )
            accepted.append(now)
        if latency_s:
            await asyncio.sleep(latency_s)
        q = request.query
        if q.get("retmode", "xml") != "json":
            return web.json_response({"error": "only retmode=json is served"}, status=400)
        try:
            retmax = int(q.get("retmax", 20))
            retstart = int(q.get("retstart", 0))
        except ValueError:
            return _error("retmax and retstart must be integers")
        if retstart > MAX_RETSTART or retstart < 0 or retmax < 0:
            return _error(f"retstart must be in [0, {MAX_RETSTART}] and retmax >= 0")
        retmax = min(retmax, MAX_WINDOW - retstart)
        term = q.get("term", "")
        if not term.strip():
            return _error("Empty term and query_key - nothing todo")
        try:
            ids = await backend.search(
                term, top_k=MAX_WINDOW, mindate=q.get("mindate"), maxdate=q.get("maxdate")
            )
            warnings = []
        except QueryRejected as exc:
            ids, warnings = [], [str(exc)]
        except BackendError as exc:
            if not exc.retryable:  # e.g. a date filter on an undated corpus: it cannot work
                return _error(str(exc))
            return web.json_response({"error": str(exc)}, status=503)
        page = ids[retstart : retstart + retmax]
        result = {
            "count": str(len(ids)),
            "retmax": str(len(page)),
            "retstart": str(retstart),
            "idlist": page,
            "translationset": [],
            "querytranslation": term,
        }
        if warnings:
            result["warninglist"] = {"outputmessages": warnings}
        return web.json_response(
            {"header": {"type": "esearch", "version": "0.3"}, "esearchresult": result}
        )

    # Long lines: a 4,000-character term percent-encodes to up to 12 KB of URL.
    app = web.Application(handler_args={"max_line_size": 1 << 16})
    app.router.add_get(PATH, esearch)
    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="BEIR corpus directory (corpus.jsonl)")
    parser.add_argument("--index_dir", default=None, help="saved index: loaded, or built+saved")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8800)
    parser.add_argument("--k1", type=float, default=0.9)
    parser.add_argument("--b", type=float, default=0.4)
    parser.add_argument("--latency_ms", type=float, default=0.0, help="added to every answer")
    parser.add_argument("--rate_limit", type=float, default=None, help="429 above N requests/s")
    args = parser.parse_args(argv)

    from deepretrieval_jax.search.bm25 import BM25Backend, BM25Config, BM25Index

    config = BM25Config(k1=args.k1, b=args.b)
    if args.index_dir:
        index = BM25Index.load_or_build(args.corpus, args.index_dir, config)
    else:
        index = BM25Index.from_beir(args.corpus, config)
    app = make_app(BM25Backend(index), args.latency_ms / 1000.0, args.rate_limit)
    print(
        f"serving {index.num_docs} documents (k1={index.config.k1}, b={index.config.b}) at "
        f"http://{args.host}:{args.port}/entrez/eutils/  (PubMedConfig.base_url)",
        flush=True,
    )
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
