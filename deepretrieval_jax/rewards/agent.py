"""Rewards of the multi-turn search agent (`deepretrieval_jax/agent/protocol.py` transcripts).

Pure functions plus two `TaskReward` families registered in `rewards.tasks.REGISTRY`:

| task        | answer graded as                                  | total (well-formed)                  |
|-------------|---------------------------------------------------|--------------------------------------|
| agent_qa    | exact match and F1 (SQuAD normalisation) of the   | format_ok + em * EM + f1 * F1        |
|             | final answer against the label's answer strings   | + retrieval * [a shown passage holds |
|             |                                                   | an answer] + per-turn terms          |
| agent_ndcg  | NDCG@k of the final answer run as a query         | format_ok + NDCG (if > 0, else zero) |
|             | (`source="final"`) or of the union of every       | + per-turn terms                     |
|             | search's results (`source="union"`)               |                                      |

Per-turn terms: `search_cost` per search run and `bad_turn` per search with a blank or rejected
query (both usually <= 0). A transcript without a well-formed final answer scores `format_bad`
(the total). The searches are re-run through the pool's `search` (cache and rate limits apply;
with the cache on they are the rollout's own searches, not new requests). A `BackendError` on
any search makes the sample invalid (never a penalty).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from deepretrieval_jax.agent.protocol import Transcript, parse_transcript
from deepretrieval_jax.rewards import retrieval_metrics as rm
from deepretrieval_jax.rewards.tasks import REGISTRY, RewardResult, TaskConfig, TaskReward
from deepretrieval_jax.search.base import QueryRejected

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1, the maximum over the answers (0.0 when either side has no tokens)."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def interleave(rankings: Sequence[Sequence[Any]]) -> list[Any]:
    """Round-robin union of ranked lists (rank 1 of every list, then rank 2, ...), de-duplicated."""
    out = []
    for i in range(max((len(r) for r in rankings), default=0)):
        out.extend(r[i] for r in rankings if i < len(r))
    return rm.dedupe(out)


def result_overlap(rankings: Sequence[Sequence[Any]], shown: int) -> float:
    """How much the shown results (top `shown` of each ranking) repeat across searches:
    1 - |union| / sum of sizes. 0 = every search showed new documents; with two searches
    showing the same 3 documents, 0.5; searches that showed nothing, 0. Needs two or more rankings."""
    if len(rankings) < 2:
        raise ValueError(f"result_overlap needs two or more rankings, got {len(rankings)}")
    sets = [{str(i) for i in r[:shown]} for r in rankings]
    total = sum(map(len, sets))
    return 1.0 - len(set().union(*sets)) / total if total else 0.0  # nothing shown: no repeats


@dataclasses.dataclass(frozen=True)
class AgentConfig(TaskConfig):
    format_ok: float = 0.1  # a well-formed transcript with a final answer
    format_bad: float = -1.0  # total for a transcript without a well-formed answer
    bad_turn: float = -0.2  # per search with a blank or rejected query
    search_cost: float = 0.0  # per search run (e.g. -0.05 to prefer fewer searches)
    shown: int = 3  # results per search the policy saw (agent.docs_per_search)


@dataclasses.dataclass(frozen=True)
class AgentQAConfig(AgentConfig):
    em: float = 1.0  # weight of exact match
    f1: float = 0.0  # weight of token F1
    retrieval: float = 0.0  # weight of "a shown passage contains an answer"


@dataclasses.dataclass(frozen=True)
class AgentNdcgConfig(AgentConfig):
    source: str = "final"  # "final": the answer as a query | "union": every search's results
    zero: float = 0.0  # total when NDCG is 0 (well-formed)

    def __post_init__(self):
        super().__post_init__()
        if self.source not in ("final", "union"):
            raise ValueError(f"agent_ndcg: source must be 'final' or 'union', got {self.source!r}")


@dataclasses.dataclass(frozen=True)
class Searched:
    """What the searches of a transcript returned: per query, ids or a rejection message."""

    results: tuple[Any, ...]  # list of ids, or a str (QueryRejected message), or None (blank)
    final: Any = None  # the final answer's results (agent_ndcg, source="final")


class _AgentTask(TaskReward):
    uses_passages = False

    def parse(self, completion: str, prompt_suffix: str = "") -> Transcript:
        return parse_transcript(completion, prompt_suffix)

    def broken(self, parsed: Transcript) -> RewardResult:
        c = self.config
        return RewardResult(c.format_bad, True, False, False, None, {}, parsed.error, "format_bad")

    async def retrieve(self, transcript: Transcript, label, opts, search) -> Searched:
        results = []
        for query in transcript.queries:
            if not query:
                results.append(None)
                continue
            try:
                results.append(list(await search(query, **opts)))
            except QueryRejected as exc:
                results.append(f"QueryRejected: {exc}")
        return Searched(tuple(results))

    def turn_terms(self, searched: Searched) -> tuple[float, dict]:
        """Per-turn reward terms and the per-turn metrics."""
        c = self.config
        run = [r for r in searched.results if isinstance(r, list)]
        bad = len(searched.results) - len(run)
        metrics = {"searches": float(len(searched.results)), "bad_turns": float(bad)}
        if len(run) > 1:
            metrics["result_overlap"] = result_overlap(run, c.shown)
        return c.search_cost * len(run) + c.bad_turn * bad, metrics

    def shown_ids(self, searched: Searched) -> list:
        return rm.dedupe(
            i for r in searched.results if isinstance(r, list) for i in r[: self.config.shown]
        )


class AgentQATask(_AgentTask):
    """QA: EM / F1 of the final answer (+ whether a shown passage holds an answer)."""

    config_cls = AgentQAConfig
    uses_passages = True

    def __init__(self, name, config, passages: Mapping[Any, str] | None = None):
        super().__init__(name, config)
        self.passages = passages

    def check_label(self, label):
        label = [label] if isinstance(label, str) else label
        if (
            not isinstance(label, Sequence)
            or not label
            or not all(isinstance(a, str) for a in label)
        ):
            raise ValueError(f"{self.name}: label must be answer strings, got {label!r:.80}")

    def grade(self, transcript: Transcript, searched: Searched, label) -> RewardResult:
        c = self.config
        answers = [label] if isinstance(label, str) else list(label)
        em, f1 = exact_match(transcript.answer, answers), f1_score(transcript.answer, answers)
        turn, metrics = self.turn_terms(searched)
        metrics.update(em=em, f1=f1)
        reward = c.format_ok + c.em * em + c.f1 * f1 + turn
        if c.retrieval or self.passages is not None:
            texts = (
                [self.passages.get(str(i), "") for i in self.shown_ids(searched)]
                if (self.passages is not None)
                else []
            )
            hit = float(any(rm.has_answer(t, answers) for t in texts))
            metrics["gold_retrieved"] = hit
            reward += c.retrieval * hit
        bucket = "em" if em else ("f1>0" if f1 > 0 else "wrong")
        return RewardResult(reward, True, True, True, transcript.answer, metrics, None, bucket)


class AgentNdcgTask(_AgentTask):
    """BEIR: NDCG@k of the final answer as a query, or of the union of the searches' results."""

    config_cls = AgentNdcgConfig

    def check_label(self, label):
        super().check_label(label)
        if not any(g > 0 for g in rm.graded_labels(label).values()):
            raise ValueError(f"{self.name}: label has no relevant (grade > 0) document")

    async def retrieve(self, transcript, label, opts, search):
        searched = await super().retrieve(transcript, label, opts, search)
        if self.config.source != "final":
            return searched
        try:
            final = list(await search(transcript.answer, **opts))
        except QueryRejected as exc:
            final = f"QueryRejected: {exc}"
        return dataclasses.replace(searched, final=final)

    def grade(self, transcript: Transcript, searched: Searched, label) -> RewardResult:
        c = self.config
        grades = rm.graded_labels(label)
        turn, metrics = self.turn_terms(searched)
        if c.source == "final":
            ranking = searched.final
            if not isinstance(ranking, list):  # the final query was rejected by the backend
                metrics["ndcg"] = 0.0
                return RewardResult(
                    c.answer_bad + turn, True, True, False, transcript.answer, metrics,
                    ranking, "answer_bad",
                )  # fmt: skip
        else:
            ranking = interleave([r for r in searched.results if isinstance(r, list)])
        ndcg = rm.ndcg_at_k(ranking, grades, c.k)
        metrics["ndcg"] = ndcg
        metrics["ndcg@10"] = rm.ndcg_at_k(ranking, grades, 10)
        base = c.format_ok + ndcg if ndcg > 0 else c.zero
        bucket = "ndcg>0" if ndcg > 0 else "ndcg=0"
        return RewardResult(base + turn, True, True, True, transcript.answer, metrics, None, bucket)


REGISTRY["agent_qa"] = (AgentQATask, {"k": 20})
REGISTRY["agent_ndcg"] = (AgentNdcgTask, {"k": 50, "answer_bad": -1.0})
