"""The Boolean query language the prompts ask for, parsed into a small tree.

Syntax (PubMed-like):
- `AND`, `OR`, `NOT` are operators only in upper case; `and`/`or`/`not` are ordinary words.
- Precedence: NOT > AND > OR; parentheses group. Adjacent operands without an operator are
  joined by the *default operator* (AND, like PubMed; configurable). `a NOT b` is `a AND NOT b`
  (PubMed's binary NOT); a leading `NOT b` means "every document except b".
- `"quoted text"` is a phrase. A trailing `*` (truncation) is dropped: the stemmer already joins
  most inflections.
- Field tags in square brackets (`[MeSH]`, `[tiab]`, `[Title/Abstract]`, `[mh:noexp]`) are
  ignored: a local corpus has one text field.
- A query is Boolean only when it contains an operator (`is_boolean`); otherwise it is
  bag-of-words, whatever parentheses or quotes it holds.
- Malformed input (unbalanced parentheses or quotes, an operator without an operand, empty
  parentheses, parentheses or NOTs nested deeper than `MAX_DEPTH`) raises `MalformedQuery`; the BM25 backend then falls back to bag-of-words over
  `bag_of_words(query)` or rejects the query, as configured.
"""

from __future__ import annotations

import dataclasses
import re

OPERATORS = ("AND", "OR", "NOT")
# Nesting bound of the recursive parser (and of the tree the backends walk recursively): deeper
# input is the policy's malformed query, never a RecursionError (an infrastructure failure).
MAX_DEPTH = 64
_TAG = re.compile(r"\[[^\]]*\]")
_OPERATOR_WORD = re.compile(r"\b(?:AND|OR|NOT)\b")


class MalformedQuery(ValueError):
    """The text uses Boolean syntax but is not a valid expression."""


@dataclasses.dataclass(frozen=True)
class Term:
    text: str


@dataclasses.dataclass(frozen=True)
class Phrase:
    text: str


@dataclasses.dataclass(frozen=True)
class And:
    children: tuple


@dataclasses.dataclass(frozen=True)
class Or:
    children: tuple


@dataclasses.dataclass(frozen=True)
class Not:
    child: object


Node = Term | Phrase | And | Or | Not


def tokenize(query: str) -> list[tuple[str, str]]:
    """Splits `query` into (kind, text) tokens; kinds: word, phrase, op, lparen, rparen."""
    tokens, i, n = [], 0, len(query)
    while i < n:
        c = query[i]
        if c.isspace():
            i += 1
        elif c in "()":
            tokens.append(("lparen" if c == "(" else "rparen", c))
            i += 1
        elif c == '"':
            end = query.find('"', i + 1)
            if end < 0:
                raise MalformedQuery("unterminated quoted phrase")
            tokens.append(("phrase", query[i + 1 : end]))
            i = end + 1
        elif c == "[":
            end = query.find("]", i + 1)
            if end < 0:
                raise MalformedQuery("unterminated field tag '['")
            i = end + 1  # Field tags are ignored.
        else:
            j = i
            while j < n and not query[j].isspace() and query[j] not in '()"[':
                j += 1
            word = query[i:j]
            if word in OPERATORS:
                tokens.append(("op", word))
            elif word.rstrip("*"):
                tokens.append(("word", word.rstrip("*")))
            i = j
    return tokens


def is_boolean(query: str) -> bool:
    """True when the query uses an operator (AND, OR, NOT) outside field tags.

    Parentheses and quotes alone do not make a query Boolean: natural text has parentheses
    ("Apolipoprotein E4 (APOE4) allele"), and treating them as syntax would turn plain text
    into a strict conjunction. Such a query is bag-of-words.
    """
    return bool(_OPERATOR_WORD.search(_TAG.sub(" ", query)))


def bag_of_words(query: str) -> str:
    """The query's words with field tags, operators, quotes and parentheses removed."""
    text = _TAG.sub(" ", query)
    text = _OPERATOR_WORD.sub(" ", text)
    return re.sub(r'[()"\[\]*]', " ", text)


def parse(query: str, default_operator: str = "AND") -> Node | None:
    """Parses a Boolean query; None when it holds no operand at all."""
    if default_operator not in ("AND", "OR"):
        raise ValueError(f"default_operator must be 'AND' or 'OR', got {default_operator!r}")
    parser = _Parser(tokenize(query), default_operator)
    if not parser.tokens:
        return None
    node = parser.parse_or()
    if parser.pos != len(parser.tokens):
        kind, text = parser.tokens[parser.pos]
        raise MalformedQuery(f"unexpected {text!r} at token {parser.pos}")
    return node


class _Parser:
    """Recursive descent: or := and (OR and)*; and := unary ([AND] unary)*; unary := NOT unary
    | '(' or ')' | word | phrase."""

    def __init__(self, tokens, default_operator):
        self.tokens, self.pos, self.default = tokens, 0, default_operator
        self.depth = 0  # Open parentheses and NOTs around the current token.

    def nested(self, parse):
        """parse() one level deeper; past MAX_DEPTH the query is malformed."""
        if self.depth >= MAX_DEPTH:
            raise MalformedQuery(f"parentheses or NOTs nested deeper than {MAX_DEPTH}")
        self.depth += 1
        try:
            return parse()
        finally:
            self.depth -= 1

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)

    def parse_or(self):
        children = [self.parse_and()]
        while self.peek() == ("op", "OR"):
            self.pos += 1
            children.append(self.parse_and())
        return children[0] if len(children) == 1 else Or(tuple(children))

    def parse_and(self):
        groups, current = [], [self.parse_unary()]
        while True:
            kind, text = self.peek()
            if kind == "op" and text == "AND":
                self.pos += 1
                current.append(self.parse_unary())
            elif kind == "op" and text == "NOT":
                current.append(self.parse_unary())  # a NOT b == a AND NOT b
            elif kind in ("word", "phrase", "lparen"):
                operand = self.parse_unary()
                if self.default == "AND":
                    current.append(operand)
                else:  # Implicit OR binds loosest among adjacent operands of this level.
                    groups.append(current)
                    current = [operand]
            else:
                break
        groups.append(current)
        nodes = [g[0] if len(g) == 1 else And(tuple(g)) for g in groups]
        return nodes[0] if len(nodes) == 1 else Or(tuple(nodes))

    def parse_unary(self):
        kind, text = self.peek()
        if kind is None:
            raise MalformedQuery("an operator is missing its right operand")
        self.pos += 1
        if kind == "op" and text == "NOT":
            return Not(self.nested(self.parse_unary))
        if kind == "op":
            raise MalformedQuery(f"{text} is missing its left operand")
        if kind == "word":
            return Term(text)
        if kind == "phrase":
            return Phrase(text)
        if kind == "rparen":
            raise MalformedQuery("unbalanced ')'")
        if self.peek()[0] == "rparen":
            raise MalformedQuery("empty parentheses")
        node = self.nested(self.parse_or)
        if self.peek()[0] != "rparen":
            raise MalformedQuery("unbalanced '('")
        self.pos += 1
        return node
