"""PubMed E-utilities esearch backend (JSON), paged up to top-k PMIDs.

Invariants (transport ones are `search/http.py`'s: rate limit before every page, timeouts,
retries with backoff, 429 Retry-After, `BackendError` after the retry budget):
- Requests: `db`, `term` (the model's query, verbatim, as one URL-encoded parameter),
  `retmode=json`, `retmax`, `retstart`, and with a date cutoff `datetype`, `mindate`, `maxdate`;
  `tool`/`email` when configured; `api_key` from config, the file named in config, or env
  `NCBI_API_KEY` (never logged, never in repr, counters or exceptions).
- Paging: pages of `min(page_size, remaining)`; `retstart` never exceeds 9,998 and
  `retstart + retmax` never exceeds 10,000 (esearch's window), so top_k <= 10,000.
  Paging stops at top_k ids, at the reported `count`, or at a short page.
  Ids are de-duplicated keeping the first rank (a live index can shift between pages).
- A response without `esearchresult.idlist` (or with an `ERROR`) is retried like a 5xx, then
  `BackendError` (its server text redacted).
- Empty, whitespace or oversize (`max_query_chars`) queries raise `QueryRejected`; nothing
  is sent.
- Rate: 3 requests/s without a key, 10 with one, unless `rate_per_s` is set.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from deepretrieval_jax.search.base import check_query
from deepretrieval_jax.search.http import (
    HttpBackend,
    HttpClient,
    HttpConfig,
    TokenBucket,
    schema_error,
)

ESEARCH_URL = "https://eutils.ncbi.nlm.nih.gov/entrez/eutils/"
MAX_RETSTART = 9998
MAX_WINDOW = 10000


@dataclasses.dataclass(frozen=True)
class PubMedConfig:
    base_url: str = ESEARCH_URL  # Directory holding esearch.fcgi.
    db: str = "pubmed"
    top_k: int = 3000  # Ids per search (<= 10,000).
    page_size: int = 10000  # retmax per request (<= 10,000).
    datetype: str = "pdat"  # Publication date.
    default_mindate: str = "1970/01/01"  # Used when only maxdate is given.
    api_key: str | None = dataclasses.field(default=None, repr=False)
    api_key_file: str | None = None  # A file whose first line is the key.
    tool: str | None = "deepretrieval_jax"
    email: str | None = None
    rate_per_s: float | None = None  # None: 3/s without a key, 10/s with one.
    max_query_chars: int = 4000
    timeout_s: float = 30.0
    max_retries: int = 4
    backoff_base_s: float = 0.5

    def __post_init__(self):
        if not 1 <= self.top_k <= MAX_WINDOW:
            raise ValueError(f"top_k must be in [1, {MAX_WINDOW}], got {self.top_k}")
        if not 1 <= self.page_size <= MAX_WINDOW:
            raise ValueError(f"page_size must be in [1, {MAX_WINDOW}], got {self.page_size}")


def resolve_api_key(config: PubMedConfig) -> str | None:
    """config.api_key, else the first line of config.api_key_file, else env NCBI_API_KEY."""
    if config.api_key:
        return config.api_key
    if config.api_key_file:
        try:
            with open(config.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as exc:
            raise ValueError(f"cannot read api_key_file {config.api_key_file!r}: {exc}") from None
        if not key:
            raise ValueError(f"api_key_file {config.api_key_file!r} is empty")
        return key
    return os.environ.get("NCBI_API_KEY") or None


class PubMedBackend(HttpBackend):
    """`await backend.search(term, maxdate="2020/01/31")` -> ranked PMIDs (strings)."""

    name = "pubmed"

    def __init__(self, config: PubMedConfig | None = None, *, bucket: TokenBucket | None = None):
        self.config = config = config or PubMedConfig()
        key = resolve_api_key(config)
        self.has_api_key = key is not None
        rate = config.rate_per_s or (10.0 if key else 3.0)
        http_config = HttpConfig(
            base_url=config.base_url,
            rate_per_s=rate,
            timeout_s=config.timeout_s,
            max_retries=config.max_retries,
            backoff_base_s=config.backoff_base_s,
        )
        self.http = HttpClient(
            http_config, secret_params={"api_key": key}, bucket=bucket, name=self.name
        )

    def __repr__(self):
        return (
            f"PubMedBackend(base_url={self.config.base_url!r}, top_k={self.config.top_k}, "
            f"api_key={'set' if self.has_api_key else 'none'})"
        )

    def cache_params(self, **opts: Any) -> Mapping[str, Any]:
        return {
            "db": self.config.db,
            "top_k": opts.get("top_k", self.config.top_k),
            "mindate": opts.get("mindate"),
            "maxdate": opts.get("maxdate"),
        }

    def base_params(
        self, term: str, mindate: str | None = None, maxdate: str | None = None
    ) -> dict[str, str]:
        """The request parameters besides retmax/retstart (no api_key)."""
        cfg = self.config
        params = {"db": cfg.db, "term": term, "retmode": "json"}
        if mindate or maxdate:
            params["datetype"] = cfg.datetype
            params["mindate"] = mindate or cfg.default_mindate
            params["maxdate"] = maxdate or "3000/12/31"
        if cfg.tool:
            params["tool"] = cfg.tool
        if cfg.email:
            params["email"] = cfg.email
        return params

    async def search(
        self,
        query: str,
        *,
        top_k: int | None = None,
        mindate: str | None = None,
        maxdate: str | None = None,
    ) -> list[str]:
        """Returns up to `top_k` PMIDs for `query` published in [mindate, maxdate]."""
        check_query(query, self.config.max_query_chars)
        top_k = self.config.top_k if top_k is None else top_k
        if not 1 <= top_k <= MAX_WINDOW:
            raise ValueError(f"top_k must be in [1, {MAX_WINDOW}], got {top_k}")
        params = self.base_params(query, mindate, maxdate)
        ids: list[str] = []
        seen: set[str] = set()
        retstart = 0
        while len(ids) < top_k and retstart <= MAX_RETSTART:
            retmax = min(self.config.page_size, top_k - len(ids), MAX_WINDOW - retstart)
            page = {**params, "retmax": str(retmax), "retstart": str(retstart)}
            count, page_ids = await self.http.get_json("esearch.fcgi", page, self._parse)
            for pmid in page_ids:
                if pmid not in seen and len(ids) < top_k:
                    seen.add(pmid)
                    ids.append(pmid)
            retstart += retmax
            if len(page_ids) < retmax or retstart >= count:
                break
        return ids

    def _parse(self, body: Any) -> tuple[int, list[str]]:
        result = body.get("esearchresult") if isinstance(body, dict) else None
        if not isinstance(result, dict):
            error = body.get("error") if isinstance(body, dict) else None
            raise schema_error(self.http, f"no 'esearchresult' (error: {error!r})")
        if "ERROR" in result:
            raise schema_error(self.http, f"esearch ERROR: {str(result['ERROR'])[:200]}")
        idlist = result.get("idlist")
        if not isinstance(idlist, list) or not all(isinstance(i, str) for i in idlist):
            raise schema_error(self.http, "'esearchresult.idlist' is not a list of strings")
        try:
            count = int(result.get("count", len(idlist)))
        except (TypeError, ValueError):
            raise schema_error(self.http, "'esearchresult.count' is not an integer") from None
        return count, idlist
