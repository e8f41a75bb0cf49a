"""The multi-turn search protocol as text: tags, the information block, transcript parsing.

No JAX (the reward pool parses transcripts with it). A transcript is the assistant prefix, then
what the policy generated and what the environment inserted, in order:

    <search>vitamin d fracture elderly</search>
    <information>
    [1] Vitamin D and falls: Supplementation reduced fractures in women over 65 ...
    [2] ...
    </information>
    <answer>vitamin d supplementation fracture risk elderly women</answer>

Rules (`parse_transcript`): `<information>...</information>` spans are the environment's (the
renderer escapes `<` and `>` in document text, so a document cannot close or forge a tag);
between them lie the policy's turns. Every turn but the last must contain exactly one
`<search>...</search>` (in that order, nothing of the answer tags) and nothing after the closing
tag but whitespace; the last turn must contain exactly one `<answer>...</answer>`, no search
tags, and end with `</answer>`. There must be exactly one information block per search, except
that the last search may have none (the row ran out of turns: no answer). A search whose query
is blank is a "bad turn" (not run). Parsing is linear in the text length (str.find only) and
text longer than `MAX_TRANSCRIPT_CHARS` is a format failure.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping, Sequence

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
MAX_TRANSCRIPT_CHARS = 1_000_000


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """The multi-turn rollout (config.agent). Frozen; converted from the ConfigDict."""

    max_turns: int = 3  # generation turns per row: up to max_turns - 1 searches, then answer
    docs_per_search: int = 3  # results shown in each information block
    doc_chars: int = 300  # characters of each shown document (title + text), then "..."
    info_max_tokens: int = 192  # tokens of one inserted block (its width in the token buffer)
    max_turn_tokens: int = 64  # tokens one turn may generate
    # Leave the decode loop (run the searches, insert, resume) once this fraction of the rows
    # waits for a search; 1.0 = only when every row waits or is finished (fewest round trips).
    exit_waiting_fraction: float = 1.0
    reward_task: str = "agent_ndcg"  # rewards.tasks.REGISTRY name: agent_ndcg | agent_qa
    reward_opts: Mapping = dataclasses.field(default_factory=dict)  # its TaskConfig overrides

    def __post_init__(self):
        object.__setattr__(self, "reward_opts", dict(self.reward_opts))
        if self.max_turns < 1:
            raise ValueError(f"agent.max_turns must be >= 1, got {self.max_turns}")
        for name in ("docs_per_search", "doc_chars", "info_max_tokens", "max_turn_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"agent.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.exit_waiting_fraction <= 1.0:
            raise ValueError(
                f"agent.exit_waiting_fraction must be in (0, 1], got {self.exit_waiting_fraction}"
            )


def escape(text: str) -> str:
    """Document text safe inside an information block: no `<` or `>` survives."""
    return html.escape(text, quote=False)


def render_information(docs: Sequence[tuple[str, str]], doc_chars: int, error: str = "") -> str:
    """The information block's body for (title, text) documents (or an error message)."""
    if error:
        lines = [escape(error)]
    elif not docs:
        lines = ["No results."]
    else:
        lines = []
        for i, (title, text) in enumerate(docs, 1):
            body = f"{title}: {text}" if title else text
            body = " ".join(body.split())
            if len(body) > doc_chars:
                body = body[:doc_chars].rstrip() + " ..."
            lines.append(f"[{i}] {escape(body)}")
    return "\n".join(lines)


def information_block(body: str) -> tuple[str, str, str]:
    """(opening, body, closing): the harness truncates the body's tokens, never the tags."""
    return f"\n{INFO_OPEN}\n", body, f"\n{INFO_CLOSE}\n"


def pending_query(transcript: str) -> str | None:
    """The query of a turn that just closed `</search>`: the text of the last `<search>` after
    the last information block (stripped), or None if there is none."""
    start = transcript.rfind(INFO_CLOSE)
    turn = transcript[start + len(INFO_CLOSE) :] if start >= 0 else transcript
    close = turn.rfind(SEARCH_CLOSE)
    if close < 0:
        return None
    opening = turn.rfind(SEARCH_OPEN, 0, close)
    if opening < 0:
        return None
    return turn[opening + len(SEARCH_OPEN) : close].strip()


@dataclasses.dataclass(frozen=True)
class Transcript:
    """A parsed transcript. `queries`: every search, in order ("" = blank, not run)."""

    queries: tuple[str, ...]
    answer: str | None  # None: no well-formed final answer
    error: str | None  # the first format problem, or None
    bad_turns: int  # searches with a blank query

    @property
    def ok(self) -> bool:  # the `ParsedAnswer` interface the reward pool reads
        return self.answer is not None

    @property
    def value(self) -> Transcript:
        return self

    @property
    def tags_ok(self) -> bool:
        return self.ok


def _split_turns(text: str) -> tuple[list[str], int] | str:
    """The policy's turns between information blocks, and the number of blocks (or an error)."""
    turns, blocks, i = [], 0, 0
    while True:
        opening = text.find(INFO_OPEN, i)
        if opening < 0:
            turns.append(text[i:])
            return turns, blocks
        close = text.find(INFO_CLOSE, opening)
        if close < 0:
            return "unclosed information block"
        turns.append(text[i:opening])
        blocks += 1
        i = close + len(INFO_CLOSE)


def _one_span(turn: str, opening: str, closing: str) -> str | None:
    """The content of the turn's single opening...closing span, or None."""
    if turn.count(opening) != 1 or turn.count(closing) != 1:
        return None
    a, b = turn.find(opening), turn.find(closing)
    return turn[a + len(opening) : b] if a < b else None


def parse_transcript(completion: str, prompt_suffix: str = "") -> Transcript:
    """Parses `prompt_suffix + completion` by the module's rules; never raises."""
    text = prompt_suffix + completion
    if len(text) > MAX_TRANSCRIPT_CHARS:
        return Transcript((), None, f"transcript longer than {MAX_TRANSCRIPT_CHARS} chars", 0)
    split = _split_turns(text)
    if isinstance(split, str):
        return Transcript((), None, split, 0)
    turns, blocks = split
    queries, error = [], None
    for turn in turns[:-1]:
        query = _one_span(turn, SEARCH_OPEN, SEARCH_CLOSE)
        if query is None or ANSWER_OPEN in turn or ANSWER_CLOSE in turn:
            error = error or "a turn before an information block is not one <search>...</search>"
            query = ""
        elif turn[turn.find(SEARCH_CLOSE) + len(SEARCH_CLOSE) :].strip():
            error = error or "text after </search> in a searching turn"
        queries.append(query.strip())
    last = turns[-1]
    answer = None
    if SEARCH_OPEN in last or SEARCH_CLOSE in last:
        query = _one_span(last, SEARCH_OPEN, SEARCH_CLOSE)  # out of turns while searching
        queries.append((query or "").strip())
        error = error or "no answer: the last turn searches"
    else:
        content = _one_span(last, ANSWER_OPEN, ANSWER_CLOSE)
        if content is None:
            error = error or "the last turn is not one <answer>...</answer>"
        elif last.rstrip().endswith(ANSWER_CLOSE) is False:
            error = error or "text after </answer>"
        elif not content.strip():
            error = error or "empty answer"
        else:
            answer = content.strip()
    if blocks > len(queries):
        error, answer = error or "more information blocks than searches", None
    if error is not None:
        answer = None
    bad = sum(1 for q in queries if not q)
    return Transcript(tuple(queries), answer, error, bad)
