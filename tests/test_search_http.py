"""PubMed and ClinicalTrials.gov backends against real fake servers on 127.0.0.1."""

import asyncio
import random
import time

import pytest
from search_fakes import FakeCTGov, FakeEutils, Fault

from deepretrieval_jax.search.base import BackendError, QueryRejected
from deepretrieval_jax.search.ctgov import CTGovBackend, CTGovConfig
from deepretrieval_jax.search.http import TokenBucket, parse_retry_after
from deepretrieval_jax.search.pubmed import PubMedBackend, PubMedConfig

FAST = dict(rate_per_s=1000.0, backoff_base_s=0.01, timeout_s=2.0)
KEY = "SeCrEt+Key/0123=456789"  # URL metacharacters: redaction must catch encoded forms.


def run(coro):
    return asyncio.run(coro)


def pubmed(fake, **kw):
    return PubMedBackend(PubMedConfig(base_url=fake.base_url, **{**FAST, **kw}))


def test_paging_assembles_exactly_top_k():
    async def main():
        async with FakeEutils(total=250) as fake, pubmed(fake, page_size=100) as pm:
            ids = await pm.search("cancer", top_k=230)
            assert ids == [str(10_000_000 + i) for i in range(230)]
            pages = [(r.params["retstart"], r.params["retmax"]) for r in fake.requests]
            assert pages == [("0", "100"), ("100", "100"), ("200", "30")]
            fake.requests.clear()
            # More requested than exist: stops at the short page, nothing lost or repeated.
            ids = await pm.search("cancer", top_k=1000)
            assert ids == [str(10_000_000 + i) for i in range(250)]
            assert len(fake.requests) == 3
            assert fake.violations == []

    run(main())


def test_paging_respects_esearch_window():
    async def main():
        async with FakeEutils(total=20_000) as fake, pubmed(fake, page_size=3000) as pm:
            ids = await pm.search("x", top_k=10_000)
            assert len(ids) == len(set(ids)) == 10_000
            for r in fake.requests:
                start, size = int(r.params["retstart"]), int(r.params["retmax"])
                assert start <= 9998 and start + size <= 10_000
            assert fake.violations == []
        with pytest.raises(ValueError, match="top_k"):
            PubMedConfig(top_k=10_001)

    run(main())


def test_retries_500_drop_and_timeout_then_succeed():
    async def main():
        async with FakeEutils(total=5) as fake, pubmed(fake, timeout_s=0.3) as pm:
            fake.inject(Fault.status(500), Fault.drop(), Fault.delay(1.0), Fault.status(503))
            ids = await pm.search("x", top_k=5)
            assert ids == [str(10_000_000 + i) for i in range(5)]
            assert [r.answered for r in fake.requests] == [
                "status_500",
                "drop",
                "delay",
                "status_503",
                "ok",
            ]
            c = pm.counters
            assert c.requests == 5 and c.retries == 4
            assert c.errors == {"http_5xx": 2, "connection": 1, "timeout": 1}

    run(main())


def test_retry_budget_exhausted_raises_never_empty():
    async def main():
        async with FakeEutils(total=5) as fake, pubmed(fake, max_retries=2) as pm:
            fake.inject(*[Fault.status(502)] * 3)
            with pytest.raises(BackendError, match="after 3 attempt") as err:
                await pm.search("x")
            assert err.value.status == 502 and err.value.retryable
            assert len(fake.requests) == 3

    run(main())


def test_429_retry_after_is_honoured():
    async def main():
        async with FakeEutils(total=3) as fake, pubmed(fake) as pm:
            fake.inject(Fault.status(429, retry_after="1"))
            assert len(await pm.search("x")) == 3
            gap = fake.requests[1].t - fake.requests[0].t
            assert gap >= 0.95, f"retried after {gap:.3f} s, Retry-After was 1 s"
            assert pm.counters.http_429 == 1
            # A Retry-After beyond the cap is reported, not waited for.
            fake.inject(Fault.status(429, retry_after="3600"))
            with pytest.raises(BackendError) as err:
                await pm.search("x")
            assert err.value.retry_after == 3600 and err.value.status == 429
            assert len(fake.requests) == 3

    run(main())


def test_parse_retry_after_seconds_and_http_date():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:50 GMT", now=now) == pytest.approx(30.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now=now) == 0.0


def test_malformed_json_and_bad_schema_are_retried_like_5xx():
    """Issue 14: a 200 with a broken body was not retried (63/300 samples lost to one)."""

    async def main():
        async with FakeEutils(total=5) as fake, pubmed(fake, max_retries=2) as pm:
            fake.inject(Fault.malformed(), Fault.bad_schema())
            assert len(await pm.search("x")) == 5
            assert pm.counters.errors["malformed"] == 2 and pm.counters.retries == 2
            fake.inject(*[Fault.malformed()] * 3)
            with pytest.raises(BackendError, match="not valid JSON") as err:
                await pm.search("x")
            assert err.value.retryable
            fake.inject(*[Fault.bad_schema()] * 3)
            with pytest.raises(BackendError, match="schema"):
                await pm.search("x")
            assert pm.counters.errors["malformed"] == 8 and len(fake.requests) == 9

    run(main())


def _max_in_window(times, window=1.0):
    return max(sum(1 for u in times if t <= u < t + window) for t in times)


def test_rate_limit_holds_across_concurrent_paged_searches():
    # 15 searches x 2 pages at 20 requests/s (burst 1): the bucket spaces sends >= 50 ms apart,
    # so any 1-second window of sends holds at most 20. Server arrival times add jitter on a
    # loaded machine; tolerance: 22 per window (an unthrottled client sends all 30 in ~50 ms).
    async def main():
        async with FakeEutils(total=20) as fake:
            pm = pubmed(fake, rate_per_s=20.0, page_size=10)
            async with pm:
                results = await asyncio.gather(*[pm.search(f"q{i}", top_k=20) for i in range(15)])
            assert all(len(r) == 20 for r in results)
            times = [r.t for r in fake.requests]
            assert len(times) == 30
            assert _max_in_window(times) <= 22
            assert times[-1] - times[0] >= 29 / 20 * 0.9
        assert PubMedBackend(PubMedConfig()).http.bucket.interval == pytest.approx(1 / 3)
        assert PubMedBackend(PubMedConfig(api_key=KEY)).http.bucket.interval == pytest.approx(0.1)

    run(main())


INJECTIONS = [
    "a&retmax=1&db=protein",
    "cancer#fragment",
    "x=1&retstart=9999",
    "line1\nline2\r\n&maxdate=2030/01/01",
    '("heart attack"[MeSH] OR infarct*) AND %26 %20 + ; ?',
]


def test_injection_term_arrives_verbatim_as_one_parameter():
    async def main():
        async with FakeEutils(total=3) as fake, pubmed(fake, api_key=KEY) as pm:
            for term in INJECTIONS:
                await pm.search(term, top_k=3, maxdate="2020/01/31")
            expected_keys = {"db", "term", "retmode", "datetype", "mindate", "maxdate", "tool"}
            for term, r in zip(INJECTIONS, fake.requests, strict=True):
                keys = [k for k, _ in r.items]
                assert sorted(keys) == sorted(expected_keys | {"retmax", "retstart", "api_key"})
                assert r.params["term"] == term
                assert r.params["db"] == "pubmed" and r.params["retmax"] == "3"
                assert r.params["maxdate"] == "2020/01/31" and r.params["api_key"] == KEY
            assert fake.violations == []
        async with (
            FakeCTGov(total=3) as fake,
            CTGovBackend(CTGovConfig(base_url=fake.base_url, rate_per_s=1000.0)) as ct,
        ):
            for term in INJECTIONS:
                await ct.search(term, top_k=3)
            assert [r.params["query.term"] for r in fake.requests] == INJECTIONS
            assert all(len(r.items) == 4 for r in fake.requests)

    run(main())


def test_fuzzed_terms_arrive_verbatim():
    # 200 seeded random strings over URL metacharacters, controls and non-ASCII text.
    rng = random.Random(0)
    alphabet = list("&#=%+;?/ \n\r\t\\\"'()[]*:,.$@!~") + ["\x00", "é", "Ω", "中", "🧪", "a", "1"]
    terms = ["".join(rng.choices(alphabet, k=rng.randint(1, 60))) for _ in range(200)]
    terms = [t for t in terms if t.strip()]

    async def main():
        async with FakeEutils(total=1) as fake, pubmed(fake) as pm:
            for term in terms:
                await pm.search(term, top_k=1)
            assert [r.params["term"] for r in fake.requests] == terms
            assert {len(r.items) for r in fake.requests} == {6}
            assert fake.violations == []

    run(main())


def test_token_bucket_spacing_burst_and_pause():
    async def main():
        loop = asyncio.get_running_loop()
        bucket = TokenBucket(rate_per_s=50.0, burst=3)
        times = []
        for _ in range(6):
            await bucket.acquire()
            times.append(loop.time())
        assert times[2] - times[0] < 0.03  # The burst of 3 goes at once (else >= 0.04) ...
        for k in range(3, 6):  # ... then one every 20 ms, counted from the first.
            assert times[k] - times[0] >= 0.02 * (k - 2) - 0.001, (k, times[k] - times[0])
        bucket.pause(0.2)
        start = loop.time()
        await bucket.acquire()
        assert loop.time() - start >= 0.19

    run(main())


def test_oversize_and_empty_queries_rejected_before_sending():
    async def main():
        async with FakeEutils(total=3) as fake, pubmed(fake) as pm:
            with pytest.raises(QueryRejected, match="102400 characters; the limit is 4000"):
                await pm.search("a" * 102_400)
            for bad in ["", "   \n\t"]:
                with pytest.raises(QueryRejected, match="empty"):
                    await pm.search(bad)
            # Exactly at the cap is sent (and percent-encodes to 12 KB of URL).
            await pm.search("&" * 4000, top_k=3)
            assert [r.params["term"] for r in fake.requests] == ["&" * 4000]

    run(main())


def test_api_key_never_in_repr_counters_or_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("NCBI_API_KEY", KEY)

    async def main():
        async with FakeEutils(total=3, echo_errors=True) as fake:
            pm = pubmed(fake, max_retries=1)
            async with pm:
                fake.inject(Fault.status(400))
                with pytest.raises(BackendError) as e400:
                    await pm.search("x")
                fake.inject(*[Fault.status(500)] * 2)
                with pytest.raises(BackendError) as e500:
                    await pm.search("x")
            assert fake.requests[0].params["api_key"] == KEY
            assert "request was" in str(e400.value)  # The server echoed the key; it was redacted.
            texts = [str(e400.value), str(e500.value), repr(e400.value), repr(e500.value)]
            return pm, texts + [repr(pm), repr(pm.http), repr(pm.config)]

    pm, texts = run(main())
    texts.append(str(pm.counters.snapshot()))
    assert pm.has_api_key
    for text in texts:
        assert KEY not in text and "SeCrEt" not in text, text  # Raw or URL-encoded.
    key_file = tmp_path / "ncbi.key"
    key_file.write_text("FILEKEY\n")
    monkeypatch.delenv("NCBI_API_KEY")
    from_file = PubMedBackend(PubMedConfig(api_key_file=str(key_file)))
    assert from_file.has_api_key and "FILEKEY" not in repr(from_file)
    assert not PubMedBackend(PubMedConfig()).has_api_key


def test_search_before_open_is_a_clear_error():
    with pytest.raises(RuntimeError, match="open"):
        run(PubMedBackend(PubMedConfig()).search("x"))


def test_ctgov_paging_dates_and_rejection():
    async def main():
        reject = lambda term: term.count("(") != term.count(")")  # noqa: E731
        async with FakeCTGov(total=2500, reject=reject) as fake:
            config = CTGovConfig(base_url=fake.base_url, rate_per_s=1000.0)
            async with CTGovBackend(config) as ct:
                ids = await ct.search("diabetes", top_k=2200, maxdate="2020/01/31")
                assert ids == [f"NCT{i:08d}" for i in range(2200)]
                sizes = [r.params["pageSize"] for r in fake.requests]
                assert sizes == ["1000", "1000", "200"]
                assert [r.params.get("pageToken") for r in fake.requests] == [
                    None,
                    "tok1000",
                    "tok2000",
                ]
                advanced = {r.params["filter.advanced"] for r in fake.requests}
                assert advanced == {"AREA[StudyFirstPostDate]RANGE[MIN,2020-01-31]"}
                assert all(r.params["fields"] == "NCTId" for r in fake.requests)
                assert len(await ct.search("diabetes")) == 2500
                with pytest.raises(QueryRejected, match="rejected the query"):
                    await ct.search("(diabetes OR")
                fake.inject(Fault.drop(), Fault.status(500))
                assert len(await ct.search("x", top_k=5)) == 5
                assert ct.counters.retries == 2
            assert fake.violations == []

    run(main())


def test_measured_latency_is_recorded():
    async def main():
        async with FakeEutils(total=3, latency_s=0.1) as fake, pubmed(fake) as pm:
            start = time.monotonic()
            await pm.search("x")
            assert time.monotonic() - start >= 0.1
            assert pm.counters.snapshot()["latency_p50_s"] >= 0.1

    run(main())
