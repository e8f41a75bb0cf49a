"""The local esearch service over a fixture corpus, queried by the real PubMed backend."""

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web
from search_fakes import write_beir

from deepretrieval_jax.search.bm25 import BM25Backend, BM25Config, BM25Index
from deepretrieval_jax.search.pubmed import PubMedBackend, PubMedConfig
from deepretrieval_jax.search.serve import make_app

WORDS = "aspirin heart attack stroke insulin diabetes failure therapy risk trial".split()


@pytest.fixture(scope="module")
def index():
    # 300 extra documents so that paging has something to page through.
    extra = [
        (f"x{i}", " ".join(WORDS[j % len(WORDS)] for j in range(i % 7, i % 7 + 1 + i % 5)), 0)
        for i in range(300)
    ]
    return BM25Index.build(extra, BM25Config(k1=1.2, b=0.75))


async def start(app):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/entrez/eutils/"


def pubmed(url, **kw):
    return PubMedBackend(PubMedConfig(base_url=url, **{"rate_per_s": 1000.0, **kw}))


def test_served_results_equal_direct_bm25(index):
    queries = ["aspirin risk", "heart AND (attack OR failure)", '"insulin diabetes"', "NOT heart"]

    async def main():
        runner, url = await start(make_app(BM25Backend(index)))
        try:
            async with pubmed(url, page_size=40) as pm:
                for q in queries:
                    expected = index.search(q, top_k=10_000)
                    assert len(expected) > 40, q  # Paging happens.
                    assert await pm.search(q, top_k=10_000) == expected
                    assert await pm.search(q, top_k=55) == expected[:55]
                # Oversize for the service's backend but not for the client: count 0, warning.
                async with aiohttp.ClientSession() as s:
                    params = {"term": "aspirin " * 600, "retmode": "json", "retmax": "5"}
                    async with s.get(url + "esearch.fcgi", params=params) as r:
                        body = await r.json()
                assert body["esearchresult"]["idlist"] == []
                assert "limit is 4000" in body["esearchresult"]["warninglist"]["outputmessages"][0]
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_date_filter_is_served(tmp_path):
    index = BM25Index.from_beir(write_beir(tmp_path))

    async def main():
        runner, url = await start(make_app(BM25Backend(index)))
        try:
            async with pubmed(url) as pm:
                got = await pm.search("heart OR aspirin OR insulin", maxdate="2005/12/31")
        finally:
            await runner.cleanup()
        return got

    assert asyncio.run(main()) == index.search("heart OR aspirin OR insulin", maxdate="2005/12/31")
    assert set(asyncio.run(main())) == {"d1", "d2"}


def test_latency_and_rate_limit_options(index):
    async def main():
        runner, url = await start(make_app(BM25Backend(index), latency_s=0.2))
        try:
            async with pubmed(url) as pm:
                start_t = time.monotonic()
                await pm.search("aspirin")
                assert time.monotonic() - start_t >= 0.2
        finally:
            await runner.cleanup()
        runner, url = await start(make_app(BM25Backend(index), rate_limit=2))
        try:
            async with aiohttp.ClientSession() as s:
                statuses, retry_after = [], None
                for _ in range(3):
                    params = {"term": "aspirin", "retmode": "json"}
                    async with s.get(url + "esearch.fcgi", params=params) as r:
                        statuses.append(r.status)
                        retry_after = r.headers.get("Retry-After", retry_after)
                assert statuses == [200, 200, 429] and retry_after == "1"
            # The backend rides through the 429s by honouring Retry-After.
            async with pubmed(url) as pm:
                results = await asyncio.gather(*[pm.search("aspirin") for _ in range(3)])
                assert pm.counters.http_429 >= 1
            assert all(r == results[0] != [] for r in results)
        finally:
            await runner.cleanup()

    asyncio.run(main())
