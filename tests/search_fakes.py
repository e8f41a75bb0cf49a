"""Fake E-utilities and ClinicalTrials.gov servers (real aiohttp, 127.0.0.1, free port).

Shared by the search and reward tests. Each server records every request (path, parameters as
a list of pairs, arrival time from `time.monotonic()`) and applies injected faults, one per
request, in order:

    async with FakeEutils(total=250) as fake:
        fake.inject(Fault.status(500), Fault.drop(), Fault.status(429, retry_after="1"))
        backend = PubMedBackend(PubMedConfig(base_url=fake.base_url, ...))

The module also writes a tiny BEIR corpus (`write_beir`) for the local BM25 tests.

Faults: `status(code, retry_after=None)` (an error response), `drop()` (headers and half a body
sent, then the connection is closed), `malformed()` (200 with broken JSON), `bad_schema()`
(200 with valid JSON of the wrong shape), `delay(s)` (wait s seconds, then answer normally).
`latency_s` delays every request; `rate_limit` answers 429 (Retry-After: 1) when more than
that many requests arrived in the last second. `violations` lists requests that broke the
real service's limits (retstart > 9,998, retmax > 10,000, pageSize > 1,000, repeated params).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import time
from collections.abc import Callable

from aiohttp import web


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str  # "status" | "drop" | "malformed" | "bad_schema" | "delay"
    code: int = 0  # HTTP status for kind "status".
    retry_after: str | None = None
    delay_s: float = 0.0

    @classmethod
    def status(cls, code: int, retry_after: str | None = None) -> Fault:
        return cls("status", code=code, retry_after=retry_after)

    @classmethod
    def drop(cls) -> Fault:
        return cls("drop")

    @classmethod
    def malformed(cls) -> Fault:
        return cls("malformed")

    @classmethod
    def bad_schema(cls) -> Fault:
        return cls("bad_schema")

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        return cls("delay", delay_s=seconds)


@dataclasses.dataclass
class Recorded:
    path: str
    items: list[tuple[str, str]]  # Every query parameter, in order, repeats kept.
    t: float  # time.monotonic() at arrival (before latency and faults).
    answered: str = "ok"  # "ok" or the fault/limit applied.

    @property
    def params(self) -> dict[str, str]:
        return dict(self.items)


class FakeServer:
    """Base: lifecycle, recording, fault queue, latency, rate limit."""

    routes: tuple[str, ...] = ()

    def __init__(
        self, *, latency_s: float = 0.0, rate_limit: int | None = None, echo_errors: bool = False
    ):
        self.latency_s = latency_s
        self.echo_errors = echo_errors  # Error bodies echo the query string (redaction tests).
        self.rate_limit = rate_limit
        self.requests: list[Recorded] = []
        self.violations: list[str] = []
        self.faults: collections.deque[Fault] = collections.deque()
        self._accepted: collections.deque[float] = collections.deque()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def inject(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeServer:
        app = web.Application()
        for route in self.routes:
            app.router.add_get(route, self._handle)
        # Long lines: a 4,000-character query percent-encodes to up to 12 KB of URL.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=0.1, max_line_size=1 << 20
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rec = Recorded(request.path, list(request.query.items()), time.monotonic())
        self.requests.append(rec)
        keys = [k for k, _ in rec.items]
        if len(keys) != len(set(keys)):
            self.violations.append(f"repeated parameter in {keys}")
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.rate_limit is not None:
            while self._accepted and self._accepted[0] <= rec.t - 1.0:
                self._accepted.popleft()
            if len(self._accepted) >= self.rate_limit:
                rec.answered = "rate_limited"
                return web.json_response(
                    {"error": "API rate limit exceeded"}, status=429, headers={"Retry-After": "1"}
                )
            self._accepted.append(rec.t)
        fault = self.faults.popleft() if self.faults else None
        if fault is not None:
            rec.answered = fault.kind if fault.kind != "status" else f"status_{fault.code}"
            if fault.kind == "status":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                error = (
                    f"injected; request was {request.query_string}"
                    if self.echo_errors
                    else "injected"
                )
                return web.json_response({"error": error}, status=fault.code, headers=headers)
            if fault.kind == "drop":
                resp = web.StreamResponse(
                    status=200,
                    headers={"Content-Type": "application/json", "Content-Length": "4096"},
                )
                await resp.prepare(request)
                await resp.write(b'{"partial": ')
                request.transport.close()
                return resp
            if fault.kind == "malformed":
                return web.Response(
                    text='{"esearchresult": {"idlist": [', content_type="application/json"
                )
            if fault.kind == "bad_schema":
                return web.json_response({"unexpected": []})
            if fault.kind == "delay":
                await asyncio.sleep(fault.delay_s)
        return self.answer(request, rec.params)

    def answer(self, request: web.Request, params: dict[str, str]) -> web.StreamResponse:
        raise NotImplementedError


class FakeEutils(FakeServer):
    """esearch.fcgi at `base_url` (= .../entrez/eutils/), JSON only.

    `results(term) -> ranked ids` (default: `total` ids "10000000", "10000001", ... for any
    term). Honours retstart/retmax like NCBI; records limit violations.
    """

    routes = ("/entrez/eutils/esearch.fcgi",)

    def __init__(
        self, *, total: int = 100, results: Callable[[str], list[str]] | None = None, **kw
    ):
        super().__init__(**kw)
        self.results = results or (lambda term: [str(10_000_000 + i) for i in range(total)])

    @property
    def base_url(self) -> str:
        return self.root + "/entrez/eutils/"

    def answer(self, request, params):
        retstart = int(params.get("retstart", 0))
        retmax = int(params.get("retmax", 20))
        if retstart > 9998:
            self.violations.append(f"retstart={retstart} > 9998")
        if retmax > 10000:
            self.violations.append(f"retmax={retmax} > 10000")
        if params.get("retmode") != "json":
            self.violations.append(f"retmode={params.get('retmode')!r}")
        ids = list(self.results(params.get("term", "")))
        page = ids[retstart : retstart + min(retmax, 10000)]
        body = {
            "header": {"type": "esearch", "version": "0.3"},
            "esearchresult": {
                "count": str(len(ids)),
                "retmax": str(len(page)),
                "retstart": str(retstart),
                "idlist": page,
                "translationset": [],
                "querytranslation": params.get("term", ""),
            },
        }
        return web.json_response(body)


class FakeCTGov(FakeServer):
    """/api/v2/studies at `base_url` (= .../api/v2/) with `fields=NCTId` responses.

    `results(term) -> ranked NCT ids` (default: `total` ids NCT00000000, ...). Page tokens are
    opaque strings; pageSize > 1000 answers 400 like the real service; `reject(term) -> bool`
    answers 400 for terms the real service could not parse.
    """

    routes = ("/api/v2/studies",)

    def __init__(
        self,
        *,
        total: int = 100,
        results: Callable[[str], list[str]] | None = None,
        reject: Callable[[str], bool] | None = None,
        **kw,
    ):
        super().__init__(**kw)
        self.results = results or (lambda term: [f"NCT{i:08d}" for i in range(total)])
        self.reject = reject or (lambda term: False)

    @property
    def base_url(self) -> str:
        return self.root + "/api/v2/"

    def answer(self, request, params):
        term = params.get("query.term", "")
        size = int(params.get("pageSize", 10))
        if size > 1000 or self.reject(term):
            if size > 1000:
                self.violations.append(f"pageSize={size} > 1000")
            return web.Response(status=400, text=f"Bad Request: cannot parse query {term[:50]!r}")
        token = params.get("pageToken")
        start = int(token[len("tok") :]) if token else 0
        ids = list(self.results(term))
        page = ids[start : start + size]
        body: dict = {
            "studies": [{"protocolSection": {"identificationModule": {"nctId": i}}} for i in page]
        }
        if start + size < len(ids):
            body["nextPageToken"] = f"tok{start + size}"
        return web.Response(text=json.dumps(body), content_type="application/json")


# A six-document BEIR corpus for the BM25 and service tests: id -> (title, text, date).
DOCS = {
    "d1": (
        "Aspirin and heart attack",
        "Aspirin reduces the risk of heart attack in adults.",
        "2001/05/01",
    ),
    "d2": ("Heart failure", "Treatment of heart failure with beta blockers.", "2005"),
    "d3": ("Attack from the heart", "A story where the attack came from the heart.", "2010/01/15"),
    "d4": ("Stroke prevention", "Aspirin for stroke prevention.", "2015-07-04"),
    "d5": ("Diabetes", "Insulin therapy for diabetes mellitus.", "2020/12/31"),
    "d6": ("COVID-19 vaccines", "mRNA vaccines against covid-19 infection.", None),
}


def write_beir(path, docs=DOCS, with_dates=True):
    """Writes `docs` as a BEIR corpus.jsonl under `path` (a pathlib.Path); returns str(path)."""
    path.mkdir(exist_ok=True)
    with open(path / "corpus.jsonl", "w") as f:
        for doc_id, (title, text, date) in docs.items():
            meta = {"date": date} if with_dates and date else {}
            f.write(
                json.dumps({"_id": doc_id, "title": title, "text": text, "metadata": meta}) + "\n"
            )
    return str(path)
