"""DPR / pyserini answer matching (`retrieval_metrics.has_answer`, `first_hit_rank`) against
Unicode probes and against pyserini's `has_answers` written out as the reference."""

import unicodedata

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from deepretrieval_jax.rewards import retrieval_metrics as rm


class PyseriniTokenizer:
    """pyserini.eval.evaluate_dpr_retrieval.SimpleTokenizer, as pyserini writes it."""

    ALPHA_NUM = r"[\p{L}\p{N}\p{M}]+"
    NON_WS = r"[^\p{Z}\p{C}]"

    def __init__(self):
        self._regexp = regex.compile(
            "(%s)|(%s)" % (self.ALPHA_NUM, self.NON_WS),  # noqa: UP031
            flags=regex.IGNORECASE + regex.UNICODE + regex.MULTILINE,
        )

    def words(self, text):
        return [m.group().lower() for m in self._regexp.finditer(text)]


def pyserini_has_answers(text, answers, tokenizer=PyseriniTokenizer()):
    text = tokenizer.words(unicodedata.normalize("NFD", text))
    for answer in answers:
        answer = tokenizer.words(unicodedata.normalize("NFD", answer))
        if not answer:
            continue  # deliberate difference: pyserini matches an empty answer everywhere
        for i in range(0, len(text) - len(answer) + 1):
            if answer == text[i : i + len(answer)]:
                return True
    return False


PROBES = [
    # (text, answer, expected): combining marks stay inside their word ...
    ("हिन्दी भाषा", "ह", False),  # Devanagari vowel sign and virama (Mc, Mn)
    ("שָׁלוֹם עליכם", "ש", False),  # Hebrew vowel points (Mn)
    # ... zero-width space and soft hyphen are not tokens ...
    ("New\u200bYork", "New York", True),
    ("Mont\u00adreal", "mont real", True),
    # ... and the cases that always agreed.
    ("Café de Flore", "Café", True),
    ("Café de Flore", "cafe", False),
]


@pytest.mark.parametrize("text, answer, expected", PROBES)
def test_unicode_probes_match_pyserini(text, answer, expected):
    assert pyserini_has_answers(text, [answer]) is expected
    assert rm.has_answer(text, [answer]) is expected
    passages = {"p1": "nothing here", "p2": text}
    assert rm.first_hit_rank(["p1", "p2"], passages.get, [answer]) == (2 if expected else None)


def test_tokens_keep_marks_and_drop_invisible_characters():
    assert rm.dpr_tokens("हिन्दी") == [unicodedata.normalize("NFD", "हिन्दी")]
    assert rm.dpr_tokens("a\u200bb\u00adc\u2060d") == ["a", "b", "c", "d"]
    assert rm.dpr_tokens("U.S. $5") == ["u", ".", "s", ".", "$", "5"]


_ALPHABET = st.sampled_from(
    list("aAéz09 .-,$") + ["\u0301", "\u093f", "\u094d", "\u05b8", "\u200b", "\u00ad", "\u2060"]
    + ["ह", "ש", "\u3000", "\t", "\n", "ß", "İ"]
)  # fmt: skip
_TEXT = st.lists(_ALPHABET, max_size=20).map("".join)


@settings(max_examples=300, deadline=None)
@given(_TEXT, st.lists(_TEXT, min_size=1, max_size=3))
def test_has_answer_equals_pyserini(text, answers):
    assert rm.has_answer(text, answers) == pyserini_has_answers(text, answers)
