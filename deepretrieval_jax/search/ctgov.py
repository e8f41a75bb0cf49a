"""ClinicalTrials.gov API v2 backend (`/api/v2/studies`), paged up to top-k NCT ids.

Invariants (transport ones are `search/http.py`'s: rate limit before every page, timeouts,
retries with backoff, 429 Retry-After, `BackendError` after the retry budget):
- Requests: `query.term` (the model's query, verbatim, one URL-encoded parameter),
  `pageSize` (<= 1000), `pageToken` (from the previous page), `fields=NCTId`, `format=json`.
- Date cutoff: `filter.advanced=AREA[StudyFirstPostDate]RANGE[<mindate or MIN>,<maxdate>]`.
  It is a separate parameter (not appended to query.term) so that the model's text, however
  unbalanced, cannot change or escape the cutoff. Dates may be given as YYYY/MM/DD or
  YYYY-MM-DD.
- Paging follows `nextPageToken` until top_k ids or no token; ids de-duplicated, first rank kept.
- HTTP 400 means ClinicalTrials.gov could not parse `query.term` (e.g. unbalanced parentheses
  or a bad AREA[] expression): the policy wrote it, so it is `QueryRejected`, with the
  service's message. Other failures are `BackendError`; a failure is never an empty list.
- Default rate 0.8 requests/s with a burst of 3 (the service asks for ~50 requests/minute per
  IP); configurable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from deepretrieval_jax.search.base import BackendError, QueryRejected, check_query
from deepretrieval_jax.search.http import (
    HttpBackend,
    HttpClient,
    HttpConfig,
    TokenBucket,
    schema_error,
)

CTGOV_URL = "https://clinicaltrials.gov/api/v2/"
MAX_PAGE_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class CTGovConfig:
    base_url: str = CTGOV_URL  # Directory holding `studies`.
    top_k: int = 3000
    page_size: int = MAX_PAGE_SIZE  # <= 1000
    rate_per_s: float = 0.8
    burst: int = 3
    max_query_chars: int = 4000
    timeout_s: float = 30.0
    max_retries: int = 4
    backoff_base_s: float = 0.5

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be in [1, {MAX_PAGE_SIZE}], got {self.page_size}")


def _iso_date(value: str) -> str:
    return value.strip().replace("/", "-")


def date_filter(mindate: str | None, maxdate: str | None) -> str | None:
    """The `filter.advanced` expression for a StudyFirstPostDate cutoff, or None."""
    if not (mindate or maxdate):
        return None
    low = _iso_date(mindate) if mindate else "MIN"
    high = _iso_date(maxdate) if maxdate else "MAX"
    return f"AREA[StudyFirstPostDate]RANGE[{low},{high}]"


class CTGovBackend(HttpBackend):
    """`await backend.search(term, maxdate="2020/01/31")` -> ranked NCT ids."""

    name = "ctgov"

    def __init__(self, config: CTGovConfig | None = None, *, bucket: TokenBucket | None = None):
        self.config = config = config or CTGovConfig()
        http_config = HttpConfig(
            base_url=config.base_url,
            rate_per_s=config.rate_per_s,
            burst=config.burst,
            timeout_s=config.timeout_s,
            max_retries=config.max_retries,
            backoff_base_s=config.backoff_base_s,
        )
        self.http = HttpClient(http_config, bucket=bucket, name=self.name)

    def __repr__(self):
        return f"CTGovBackend(base_url={self.config.base_url!r}, top_k={self.config.top_k})"

    def cache_params(self, **opts: Any) -> Mapping[str, Any]:
        return {
            "top_k": opts.get("top_k", self.config.top_k),
            "mindate": opts.get("mindate"),
            "maxdate": opts.get("maxdate"),
        }

    async def search(
        self,
        query: str,
        *,
        top_k: int | None = None,
        mindate: str | None = None,
        maxdate: str | None = None,
    ) -> list[str]:
        """Returns up to `top_k` NCT ids for `query`, first posted in [mindate, maxdate]."""
        check_query(query, self.config.max_query_chars)
        top_k = self.config.top_k if top_k is None else top_k
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        params = {"query.term": query, "fields": "NCTId", "format": "json"}
        cutoff = date_filter(mindate, maxdate)
        if cutoff:
            params["filter.advanced"] = cutoff
        ids: list[str] = []
        seen: set[str] = set()
        token = None
        while len(ids) < top_k:
            page = {**params, "pageSize": str(min(self.config.page_size, top_k - len(ids)))}
            if token:
                page["pageToken"] = token
            try:
                token, page_ids = await self.http.get_json("studies", page, self._parse)
            except BackendError as exc:
                if exc.status == 400:
                    raise QueryRejected(f"ClinicalTrials.gov rejected the query: {exc}") from None
                raise
            for nct in page_ids:
                if nct not in seen and len(ids) < top_k:
                    seen.add(nct)
                    ids.append(nct)
            if not token or not page_ids:
                break
        return ids

    def _parse(self, body: Any) -> tuple[str | None, list[str]]:
        studies = body.get("studies") if isinstance(body, dict) else None
        if not isinstance(studies, list):
            raise schema_error(self.http, "no 'studies' list")
        ids = []
        for study in studies:
            try:
                nct = study["protocolSection"]["identificationModule"]["nctId"]
            except (KeyError, TypeError):
                raise schema_error(self.http, "a study without protocolSection...nctId") from None
            if not isinstance(nct, str):
                raise schema_error(self.http, "nctId is not a string")
            ids.append(nct)
        token = body.get("nextPageToken")
        if token is not None and not isinstance(token, str):
            raise schema_error(self.http, "'nextPageToken' is not a string")
        return token, ids
