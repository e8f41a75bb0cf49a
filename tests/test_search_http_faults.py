"""Hostile and broken search servers (issue 14): connection resets and key redaction.

Servers are real aiohttp servers on 127.0.0.1. The redaction test runs the evaluator and the
reward pool, whose own event loops need the fake server on another thread (`ThreadedServer`).
"""

import asyncio
import logging
import os
import threading
import urllib.parse

import pytest
from aiohttp import web
from search_fakes import FakeEutils

from deepretrieval_jax import eval as eval_lib
from deepretrieval_jax import eval_report
from deepretrieval_jax.data.records import Example
from deepretrieval_jax.data.tasks import get_task
from deepretrieval_jax.rewards import (
    PoolConfig,
    RewardBatchError,
    RewardPool,
    RewardRequest,
    make_tasks,
)
from deepretrieval_jax.search.base import BackendError
from deepretrieval_jax.search.pubmed import PubMedBackend, PubMedConfig

FAST = dict(backoff_base_s=0.01, timeout_s=5.0)
KEY = "SeCrEt+Key/0123=456789"  # URL metacharacters: redaction must catch encoded forms.
KEY_FORMS = {KEY, urllib.parse.quote(KEY, safe=""), urllib.parse.quote_plus(KEY), "SeCrEt"}


class ResettingServer:
    """GET /entrez/eutils/esearch.fcgi: the first `resets` arrivals get their connection
    aborted before any byte of a response; later ones get an esearch JSON answer."""

    def __init__(self, resets: int):
        self.resets, self.arrivals = resets, 0
        self._runner = None

    async def _handle(self, request):
        self.arrivals += 1
        if self.arrivals <= self.resets:
            request.transport.abort()
            raise asyncio.CancelledError
        body = {"esearchresult": {"count": "1", "idlist": ["1"]}}
        return web.json_response(body)

    async def __aenter__(self):
        app = web.Application()
        app.router.add_get("/entrez/eutils/esearch.fcgi", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/entrez/eutils/"
        return self

    async def __aexit__(self, *exc):
        await self._runner.cleanup()


@pytest.mark.parametrize("resets", [1, 5])
def test_every_request_after_a_reset_is_counted_and_rate_limited(resets):
    """Issue 14: aiohttp re-sent a GET by itself after a reset, without a token and uncounted
    (31 of 31 resets re-sent within 20 ms). Every arrival must be one counted request."""

    async def main():
        async with ResettingServer(resets) as server:
            config = PubMedConfig(base_url=server.base_url, rate_per_s=1000.0, max_retries=8)
            async with PubMedBackend(dataclasses_replace(config, **FAST)) as pm:
                assert await pm.search("x", top_k=1) == ["1"]
                return server.arrivals, pm.counters

    arrivals, counters = asyncio.run(main())
    assert arrivals == resets + 1
    assert counters.requests == arrivals and counters.retries == resets
    assert counters.errors["connection"] == resets


def dataclasses_replace(config, **kw):
    import dataclasses

    return dataclasses.replace(config, **kw)


class EchoingEutils(FakeEutils):
    """A 200 whose E-utilities error text echoes the request URL (api_key included), as the
    real service does for some errors; the fake's 4xx bodies echo it too (`echo_errors`)."""

    def answer(self, request, params):
        if "error-in-esearchresult" in params.get("term", ""):
            echo = f"Search backend failed: {request.url}"
            return web.json_response({"esearchresult": {"ERROR": echo}})
        return web.json_response({"error": f"API key invalid, {request.url} {request.raw_path}"})


class ThreadedServer:
    """Runs a fake server's event loop on a daemon thread (the code under test owns its own)."""

    def __init__(self, server):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self.server

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_api_key_never_reaches_any_file_log_metric_or_error(tmp_path, caplog, capfd):
    """Issue 14: pubmed.py copied an E-utilities error (which echoes the URL) into the
    exception unredacted, so the key reached stderr and the eval JSON report."""
    caplog.set_level(logging.DEBUG)
    texts = []
    with ThreadedServer(EchoingEutils(echo_errors=True)) as fake:
        config = PubMedConfig(base_url=fake.base_url, api_key=KEY, max_retries=1, **FAST)
        spec = get_task("pubmed")
        examples = [
            Example("e1", {"P": "error-in-esearchresult", "I": "", "C": "", "O": ""}, ["1"]),
            Example("e2", {"P": "adults", "I": "aspirin", "C": "", "O": "stroke"}, ["1"]),
        ]
        report = eval_lib.evaluate(spec, examples, PubMedBackend(config))
        eval_report.write_report(report, tmp_path / "eval")
        assert [r.status for r in report.records] == ["backend_error"] * 2
        logging.getLogger("test").error("eval errors: %s", [r.error for r in report.records])

        pool = RewardPool(
            {"pubmed": PubMedBackend(config)},
            make_tasks({"pubmed": None}),
            PoolConfig(retries=0, cache_mode="read_write", cache_path=str(tmp_path / "c.db")),
        )
        completions = [
            f'<think>t</think><answer>{{"query": "{q}"}}</answer>'
            for q in ("error-in-esearchresult", "anything else")
        ]
        with pool:
            with pytest.raises(RewardBatchError) as err:
                pool.score([RewardRequest("pubmed", c, ["1"]) for c in completions])
            texts += [str(err.value), repr(err.value.results), str(pool.metrics())]
        assert all("echo" not in t for t in texts)  # Sanity: the texts are the errors.
        assert fake.requests and all(r.params.get("api_key") == KEY for r in fake.requests)
    assert "Search backend failed" in report.records[0].error  # Server text kept, key not.
    out, errors = capfd.readouterr()
    # Every log record of the process except the fake server's own access log (the remote
    # service's log, which of course holds the URL it received).
    ours = [
        r for r in caplog.records if not r.name.startswith(("aiohttp.access", "aiohttp.server"))
    ]
    texts += [out, errors, "\n".join(caplog.handler.format(r) for r in ours)]
    for root, _, files in os.walk(tmp_path):
        for name in files:
            texts.append(open(os.path.join(root, name), "rb").read().decode("utf-8", "replace"))
    assert len(texts) >= 8
    for text in texts:
        for form in KEY_FORMS:
            assert form not in text, (form, text[:500])


def test_backend_error_message_is_redacted_in_every_form():
    async def main():
        with_key = PubMedConfig(base_url="http://127.0.0.1:9/", api_key=KEY)
        async with PubMedBackend(with_key) as pm:
            for form in KEY_FORMS - {"SeCrEt"}:
                text = pm.http.redact(f"GET /esearch.fcgi?term=x&api_key={form}&tool=t {form}")
                assert KEY not in text and form not in text and "tool=t" in text
            with pytest.raises(BackendError):
                pm._parse({"error": f"bad api_key={KEY}"})

    asyncio.run(main())
