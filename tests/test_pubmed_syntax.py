"""PubMed syntax in the local engines (search/bm25.py, the E-utilities stand-in): field tags,
truncation and date filters are honoured or refused, never silently dropped."""

import asyncio

import pytest
from search_fakes import write_beir

from deepretrieval_jax.search import query_syntax as qs
from deepretrieval_jax.search.base import BackendError, QueryRejected
from deepretrieval_jax.search.bm25 import BM25Backend, BM25Config, BM25Index

DOCS = {
    "r1": ("A review of statins", "Statins lower cholesterol.", "2015"),
    "r2": ("Statin trial", "This review of the trial found fewer deaths.", "2016"),
    "c1": ("Cardiology clinics", "Outcomes in cardiology.", "2017"),
    "c2": ("Cardiovascular risk", "Risk factors.", "2018"),
    "c3": ("Heart muscle", "Cardiomyopathy in children.", "2019"),
    "c4": ("Cardio fitness", "Exercise.", "2020"),
}


def index(tmp_path, dated=True, **config):
    corpus = write_beir(tmp_path / ("dated" if dated else "undated"), DOCS, with_dates=dated)
    return BM25Index.from_beir(corpus, BM25Config(**config))


def test_title_and_abstract_are_separate_fields(tmp_path):
    idx = index(tmp_path)
    assert set(idx.search("review[ti]")) == {"r1"}
    assert set(idx.search("review[ab]")) == {"r2"}
    assert set(idx.search("review[tiab]")) == set(idx.search("review[tw]")) == {"r1", "r2"}
    assert set(idx.search('"review of the trial"[ab] OR cardiology[ti]')) == {"r2", "c1"}
    assert set(idx.search("statin* [Title] NOT review [Title/Abstract]")) == set()
    assert set(idx.search("statin*[ti] NOT review[ti]")) == {"r2"}


def test_a_field_the_corpus_lacks_is_refused_or_counted(tmp_path):
    strict = index(tmp_path)
    # PubMed would drop reviews by publication type; without that field, never drop "review".
    with pytest.raises(QueryRejected, match=r"field tag \[pt\] is not supported"):
        strict.search("statins NOT review[pt]")
    with pytest.raises(QueryRejected, match=r"\[mh:noexp\]"):
        strict.search("cardiology[mh:noexp]")
    lenient = index(tmp_path, unsupported="ignore")
    # Lenient: searched as plain text ("review" anywhere), and counted.
    assert lenient.search("statins NOT review[pt]") == [] and lenient.ignored["field[pt]"] == 1


def test_truncation_is_a_prefix_search(tmp_path):
    idx = index(tmp_path)
    assert set(idx.search("cardio*")) == {"c1", "c2", "c3", "c4"}  # not just "cardio"
    assert set(idx.search("cardio")) == {"c4"}
    assert set(idx.search("cardio*[ti]")) == {"c1", "c2", "c4"}
    assert idx.search("zzz*") == []
    capped = index(tmp_path, max_prefix_terms=2)
    assert len(capped.search("cardio*")) < 4 and capped.ignored["prefix_capped"] == 1


def test_date_filter_on_an_undated_corpus_is_refused_or_counted(tmp_path):
    assert set(index(tmp_path).search("cardio*", maxdate="2018")) == {"c1", "c2"}
    with pytest.raises(BackendError, match="corpus without dates") as info:
        index(tmp_path, dated=False).search("cardio*", maxdate="2018")
    assert not info.value.retryable
    lenient = index(tmp_path, dated=False, unsupported="ignore")
    assert len(lenient.search("cardio*", maxdate="2018")) == 4
    assert lenient.ignored["date_filter"] == 1


def test_tags_parse_onto_their_terms():
    assert qs.parse('a[tiab] AND (b [ti] OR "c d"[ab])') == qs.And(
        (qs.Term("a[tiab]"), qs.Or((qs.Term("b[ti]"), qs.Phrase("c d[ab]"))))
    )
    assert qs.split_field("cardio*[Title/Abstract]") == ("cardio", "title/abstract", True)
    assert qs.field_name("mh:noexp") == "mesh" and qs.field_name("tiab") == "tiab"
    for bad in ("[tiab] a", "a AND [ti]", "(a)[ti]"):
        with pytest.raises(qs.MalformedQuery, match="does not follow a term"):
            qs.parse(bad)


def test_backend_rejection_reaches_the_pool_as_the_policys_fault(tmp_path):
    backend = BM25Backend(index(tmp_path))

    async def main():
        async with backend:
            with pytest.raises(QueryRejected):
                await backend.search("statins NOT review[pt]")
            return await backend.search("review[ab]")

    assert asyncio.run(main()) == ["r2"]


def test_stand_in_refuses_dates_on_an_undated_corpus(tmp_path):
    from aiohttp import web

    from deepretrieval_jax.search import serve
    from deepretrieval_jax.search.pubmed import PubMedBackend, PubMedConfig

    async def main():
        runner = web.AppRunner(serve.make_app(BM25Backend(index(tmp_path, dated=False))))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/entrez/eutils/"
        try:
            async with PubMedBackend(PubMedConfig(base_url=url, rate_per_s=100.0)) as pubmed:
                found = await pubmed.search("cardio*[ti]")
                with pytest.raises(BackendError, match="corpus without dates"):
                    await pubmed.search("cardio*", maxdate="2018/01/01")
                return found, await pubmed.search("statins NOT review[pt]")
        finally:
            await runner.cleanup()

    found, rejected = asyncio.run(main())
    assert set(found) == {"c1", "c2", "c4"} and rejected == []  # [pt]: count 0 + a warning
