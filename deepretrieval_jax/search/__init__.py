"""Search backends (no JAX): PubMed, ClinicalTrials.gov, local BM25, dense, SQL, local service.

Import backends from their modules (`search.pubmed.PubMedBackend`, `search.bm25.BM25Backend`,
...); this package only re-exports the interface so that importing it stays cheap.
"""

from deepretrieval_jax.search.base import BackendError, QueryRejected, SearchBackend, check_query

__all__ = ["BackendError", "QueryRejected", "SearchBackend", "check_query"]
