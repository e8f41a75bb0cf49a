"""Local BM25: Lucene scoring by hand, Boolean semantics, save -> mmap load, dates."""

import asyncio
import math

import numpy as np
import pytest
from search_fakes import write_beir

from deepretrieval_jax.search import query_syntax as qs
from deepretrieval_jax.search.base import QueryRejected
from deepretrieval_jax.search.bm25 import BM25Backend, BM25Config, BM25Index


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return BM25Index.from_beir(write_beir(tmp_path_factory.mktemp("corpus"), with_dates=False))


def lucene_bm25(query, docs, k1, b):
    """Lucene >= 8 BM25 by hand: sum idf * tf / (tf + k1 (1 - b + b dl / avgdl))."""
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    out = []
    for doc in docs:
        score = 0.0
        for term in query:
            df, tf = sum(term in d for d in docs), doc.count(term)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            score += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl)) if tf else 0.0
        out.append(score)
    return out


@pytest.mark.parametrize("k1,b", [(0.9, 0.4), (1.2, 0.75)])
def test_bag_of_words_matches_hand_computed_lucene_bm25(k1, b):
    texts = ["apple banana apple", "banana cherry", "date", "apple cherry cherry date fig", "fig"]
    config = BM25Config(k1=k1, b=b, stopwords="none", stemmer=None)
    idx = BM25Index.build([(f"t{i}", t) for i, t in enumerate(texts)], config)
    query = ["apple", "cherry"]
    expected = lucene_bm25(query, [t.split() for t in texts], k1, b)
    np.testing.assert_allclose(idx.scores(idx.token_ids(" ".join(query))), expected, rtol=1e-5)
    ranked = sorted((i for i, s in enumerate(expected) if s > 0), key=lambda i: -expected[i])
    assert idx.search("apple cherry") == [f"t{i}" for i in ranked]


@pytest.mark.parametrize(
    "query,expected",
    [
        ("aspirin AND heart", {"d1"}),
        ("aspirin OR diabetes", {"d1", "d4", "d5"}),
        ("aspirin NOT stroke", {"d1"}),
        ("NOT aspirin", {"d2", "d3", "d5", "d6"}),
        ('"heart attack" OR zebra', {"d1"}),  # d3 has both words, never consecutive.
        ('"heart attacks" OR "attacked heart"', {"d1"}),  # Phrases are stemmed too.
        ("heart attack AND aspirin", {"d1"}),  # Implicit AND.
        ('"aspirin for stroke" OR zebra', {"d4"}),  # Positions skip stopwords ("for").
        ("(stroke OR diabetes) AND (aspirin OR insulin)", {"d4", "d5"}),
        ("heart AND (failure OR attack)", {"d1", "d2", "d3"}),
        ("heart AND NOT (failure OR aspirin)", {"d3"}),
        ("aspirin[tiab] AND stroke[MeSH Terms]", {"d4"}),  # Field tags ignored.
        ("covid-19 AND vaccines", {"d6"}),  # A multi-token word is a phrase.
        ("infect* AND covid", {"d6"}),  # Truncation dropped; the stem matches.
        ("the AND aspirin", {"d1", "d4"}),  # A stopword operand is dropped.
        ("zebra OR stroke", {"d4"}),  # Unknown words match nothing.
        ("zebra AND stroke", set()),
    ],
)
def test_boolean_candidate_sets(index, query, expected):
    assert set(index.search(query)) == expected


def test_boolean_candidates_ranked_by_positive_terms(index):
    ranked = index.search("heart AND (failure OR attack) NOT insulin")
    scores = index.scores(index.token_ids("heart failure attack"))
    pos = {d: i for i, d in enumerate(index.doc_ids)}
    expected = sorted(["d1", "d2", "d3"], key=lambda d: (-scores[pos[d]], pos[d]))
    assert ranked == expected  # By score, ties (d1, d3 here) in corpus order.
    assert scores[pos["d2"]] > scores[pos["d1"]] == scores[pos["d3"]]


def test_default_operator_or(tmp_path, index):
    index.save(str(tmp_path / "idx"))
    or_index = BM25Index.load(str(tmp_path / "idx"), default_operator="OR")
    assert set(or_index.search("(stroke diabetes) OR zebra")) == {"d4", "d5"}
    assert index.search("(stroke diabetes) OR zebra") == []
    assert set(or_index.search("stroke diabetes AND insulin")) == {"d4", "d5"}


@pytest.mark.parametrize(
    "query,reason",
    [
        ("(aspirin AND heart", "unbalanced '\\('"),
        ("aspirin AND heart)", "unexpected"),
        ("aspirin AND", "right operand"),
        ("OR aspirin heart", "left operand"),
        ('"aspirin AND heart', "unterminated"),
        ("aspirin () AND heart", "empty parentheses"),
    ],
)
def test_malformed_boolean_falls_back_or_rejects(index, tmp_path, query, reason):
    with pytest.raises(qs.MalformedQuery, match=reason):
        qs.parse(query)
    assert index.search(query) == index.search(qs.bag_of_words(query)) != []
    index.save(str(tmp_path / "idx"))
    strict = BM25Index.load(str(tmp_path / "idx"), malformed="reject")
    with pytest.raises(QueryRejected, match="malformed Boolean query"):
        strict.search(query)


def test_parser_precedence():
    tree = qs.parse("a OR b c NOT d")
    assert tree == qs.Or((qs.Term("a"), qs.And((qs.Term("b"), qs.Term("c"), qs.Not(qs.Term("d"))))))
    assert not qs.is_boolean("aspirin[tiab] stroke, and or not") and qs.is_boolean("a NOT b")
    assert not qs.is_boolean('Apolipoprotein E4 (APOE4) "allele"')


@pytest.mark.parametrize(
    "query",
    [
        "(" * 1000 + "aspirin AND heart" + ")" * 1000,
        "NOT " * 995 + "heart",  # Within max_query_chars (4,000).
        "aspirin AND " + "(NOT " * 600 + "heart" + ")" * 600,
    ],
)
def test_deep_nesting_is_a_malformed_query_not_a_recursion_error(index, tmp_path, query):
    """Issue 14: ~1,000 nested parentheses or NOTs raised RecursionError (scored as an
    infrastructure failure); they are the policy's malformed query."""
    with pytest.raises(qs.MalformedQuery, match="nested deeper"):
        qs.parse(query)
    assert index.search(query) == index.search(qs.bag_of_words(query))
    index.save(str(tmp_path / "idx"))
    with pytest.raises(QueryRejected, match="nested deeper"):
        BM25Index.load(str(tmp_path / "idx"), malformed="reject").search(query)
    depth = qs.MAX_DEPTH - 1  # Nesting within the bound still parses.
    assert qs.parse("(" * depth + "a AND b" + ")" * depth) == qs.And((qs.Term("a"), qs.Term("b")))


def test_plain_text_is_bag_of_words_and_stopwords_only_is_empty(index):
    assert index.search("aspirin stroke")[0] == "d4"
    # Parentheses and quotes without an operator: still bag-of-words.
    assert index.search('(aspirin) "stroke"') == index.search("aspirin stroke")
    assert set(index.search("aspirin stroke")) == {"d1", "d4"}
    assert index.search("the of and") == []
    with pytest.raises(QueryRejected, match="empty"):
        index.search("  ")


def test_save_then_mmap_load_gives_identical_results(tmp_path, index):
    index.save(str(tmp_path / "idx"))
    loaded = BM25Index.load(str(tmp_path / "idx"), mmap=True)
    assert isinstance(loaded.retriever.scores["data"], np.memmap)
    assert isinstance(loaded.tokens, np.memmap)
    for query in ["aspirin heart attack", '"heart attack" OR stroke', "NOT aspirin", "covid-19"]:
        assert loaded.search(query) == index.search(query)
    np.testing.assert_array_equal(
        loaded.scores(loaded.token_ids("heart attack")),
        index.scores(index.token_ids("heart attack")),
    )
    assert loaded.search_many(["aspirin heart", "zebra"], top_k=3) == [
        index.search("aspirin heart", top_k=3),
        [],
    ]


def test_load_or_build(tmp_path):
    corpus = write_beir(tmp_path / "corpus")
    built = BM25Index.load_or_build(corpus, str(tmp_path / "idx"), BM25Config(k1=1.2, b=0.75))
    assert isinstance(built.tokens, np.memmap)
    again = BM25Index.load_or_build(
        corpus, str(tmp_path / "idx"), BM25Config(k1=1.2, b=0.75, default_operator="OR")
    )
    assert again.config.default_operator == "OR"  # Query-time options may change ...
    assert again.search("stroke aspirin") == built.search("stroke aspirin")
    with pytest.raises(ValueError, match="other settings \\(k1\\)"):  # ... the index may not.
        BM25Index.load_or_build(corpus, str(tmp_path / "idx"), BM25Config(k1=0.9, b=0.75))


def test_date_filter(tmp_path):
    idx = BM25Index.from_beir(write_beir(tmp_path / "dated"))
    assert set(idx.search("heart OR aspirin OR insulin")) == {"d1", "d2", "d3", "d4", "d5"}
    assert set(idx.search("heart OR aspirin OR insulin", maxdate="2005")) == {"d1", "d2"}
    assert set(idx.search("heart OR aspirin", mindate="2002/01/01", maxdate="2010/01/15")) == {
        "d2",
        "d3",
    }
    assert idx.search("vaccines", maxdate="2030") == []  # d6 has no date.
    undated = BM25Index.from_beir(write_beir(tmp_path / "undated", with_dates=False))
    assert undated.search("vaccines", maxdate="2000") == ["d6"]  # No dates: filter ignored.


def test_async_backend(tmp_path, index):
    index.save(str(tmp_path / "idx"))

    async def main():
        async with BM25Backend(index_dir=str(tmp_path / "idx")) as backend:
            results = await asyncio.gather(*[backend.search("stroke", top_k=1) for _ in range(4)])
            with pytest.raises(QueryRejected):
                await backend.search("x" * 5000)
        return results

    assert asyncio.run(main()) == [["d4"]] * 4
    with pytest.raises(FileNotFoundError, match="corpus.jsonl"):
        BM25Index.from_beir(str(tmp_path))
