"""Task rewards: ladders, coefficients and the registry keyed by task name.

Four families, with the original DeepRetrieval tables as defaults (reference doc section 3):

| family      | tasks                                   | answer            | total                    |
|-------------|-----------------------------------------|-------------------|--------------------------|
| RecallTask  | pubmed, ctgov                           | recall@3000 ladder| format (+1/-4) + answer  |
| EvidenceTask| nq, triviaqa, squad                     | first-hit rank    | format (+1/-4) + answer  |
| NdcgTask    | scifact, nfcorpus, fever, hotpotqa, ... | NDCG@k            | 0.1 + ndcg if > 0 else 0 |
| SqlTask     | bird, spider                            | execution match   | 0.1 + ans if > 0 else 0  |

Scoring flow (`TaskReward.finish`): broken tags -> format penalty (the query is not run);
broken payload (not JSON, not an object, missing/empty/non-string key) -> the family's answer
penalty (RecallTask/EvidenceTask: format + answer_bad; NdcgTask/SqlTask: format_bad);
`QueryRejected` from the backend -> answer penalty (RecallTask/EvidenceTask: format +
answer_bad; NdcgTask: a total of answer_bad = -2; SqlTask: an execution error, answer 0);
`BackendError` -> an invalid result (valid=False, reward 0.0, never a penalty); otherwise the
family grades the backend results. `score(...)` runs the same flow offline on given results.

Coefficients and ladders are frozen dataclasses; `make_task(name, overrides)` builds one from
the registry defaults plus a dict (or ConfigDict) of overrides, e.g.
`make_task("pubmed", {"reasoning": False, "ladder": {"steps": [[0.5, 3]], "otherwise": -1}})`.
"""

from __future__ import annotations

import abc
import dataclasses
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from deepretrieval_jax.rewards import retrieval_metrics as rm
from deepretrieval_jax.rewards.parsing import ParsedAnswer, parse_completion
from deepretrieval_jax.search.base import BackendError, QueryRejected

SearchFn = Callable[..., Awaitable[list]]  # search(query, **opts) on the task's backend


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """One scored sample. `valid=False` means infrastructure failed: leave it out of the loss."""

    reward: float
    valid: bool
    format_ok: bool
    answer_ok: bool  # The payload was a usable query and the backend ran it.
    query: str | None
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    error: str | None = None
    bucket: str = ""  # Ladder bucket label, for the trainer's reward-bucket ratios.

    @classmethod
    def invalid(cls, error: str, query: str | None = None) -> RewardResult:
        return cls(0.0, False, False, False, query, {}, error, "invalid")


@dataclasses.dataclass(frozen=True)
class Ladder:
    """A step function: the first step whose threshold `x` reaches gives the reward.

    steps: (threshold, reward) pairs, best first. higher_is_better: `x >= threshold` (recall),
    else `x <= threshold` (rank). `x=None` (no hit) or NaN falls through to `otherwise`.
    """

    steps: tuple[tuple[float, float], ...]
    otherwise: float
    higher_is_better: bool = True

    def __post_init__(self):
        steps = tuple((float(t), float(r)) for t, r in self.steps)
        object.__setattr__(self, "steps", steps)
        thresholds = [t for t, _ in steps]
        ordered = sorted(thresholds, reverse=self.higher_is_better)
        if thresholds != ordered or len(set(thresholds)) != len(thresholds):
            raise ValueError(f"ladder thresholds must be strictly monotone, best first: {steps}")

    def __call__(self, x: float | None) -> tuple[float, str]:
        if x is not None:
            for threshold, reward in self.steps:
                if (x >= threshold) if self.higher_is_better else (x <= threshold):
                    sign = ">=" if self.higher_is_better else "<="
                    return reward, f"{sign}{threshold:g}"
        return self.otherwise, "else"

    @classmethod
    def from_config(cls, value: Any) -> Ladder:
        if isinstance(value, Ladder):
            return value
        value = _as_dict(value, "ladder")
        return cls(tuple(tuple(s) for s in value["steps"]), **_without(value, "steps"))


RECALL_LADDER = Ladder(
    ((0.7, 5.0), (0.5, 4.0), (0.4, 3.0), (0.3, 1.0), (0.1, 0.5), (0.05, 0.1)), -3.5
)
RANK_LADDER = Ladder(
    ((5, 5.0), (20, 4.0), (50, 2.0), (100, 1.0), (1000, 0.5), (3000, 0.1)), -3.5, False
)
SQUAD_RANK_LADDER = dataclasses.replace(RANK_LADDER, otherwise=-2.5)


def _as_dict(value: Any, where: str) -> dict:
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def _without(d: Mapping, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Coefficients shared by all families; subclasses add their own."""

    backend: str = "bm25"  # Key into the pool's backends.
    reasoning: bool = True  # False: only the <answer> tags are checked.
    k: int = 1000  # Metric cutoff; also the number of results requested.
    k_option: str = "top_k"  # Name of the search option that carries k ("" to not send it).
    search_opts: Mapping[str, Any] = dataclasses.field(
        default_factory=dict
    )  # Defaults under request opts.
    format_ok: float = 1.0
    format_bad: float = -4.0
    answer_bad: float = -4.0  # Broken payload or QueryRejected (tags fine).
    ladder: Ladder = RECALL_LADDER

    def __post_init__(self):
        object.__setattr__(self, "search_opts", types.MappingProxyType(dict(self.search_opts)))
        object.__setattr__(self, "ladder", Ladder.from_config(self.ladder))
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def override(self, values: Any, where: str = "task config") -> TaskConfig:
        values = _as_dict(values, where)
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(self, **values)


@dataclasses.dataclass(frozen=True)
class NdcgConfig(TaskConfig):
    format_ok: float = 0.1
    format_bad: float = -2.0
    answer_bad: float = -2.0  # Total for a QueryRejected (as for a broken payload).
    zero: float = 0.0  # Total when NDCG is 0 and the format is fine.
    eval_k: int = 10  # Also reported as ndcg@eval_k.


@dataclasses.dataclass(frozen=True)
class SqlConfig(TaskConfig):
    backend: str = "sql"
    k_option: str = ""
    format_ok: float = 0.1
    format_bad: float = -2.0
    match: float = 1.0
    mismatch: float = 0.3  # BIRD 0.3, Spider 0.0.
    exec_error: float = 0.0
    zero: float = 0.0


class TaskReward(abc.ABC):
    """Knows its backend, how to parse, what to search for, and how to grade the results."""

    answer_key = "query"
    config_cls: type[TaskConfig] = TaskConfig
    # True: a broken payload costs format_bad instead of format_ok + answer_bad.
    payload_is_format = False
    grade_in_thread = False  # True: grading is CPU-heavy; the pool runs it off its event loop.

    def __init__(self, name: str, config: TaskConfig):
        self.name, self.config = name, config

    @property
    def backend(self) -> str:
        return self.config.backend

    def parse(self, completion: str, prompt_suffix: str = "") -> ParsedAnswer:
        return parse_completion(
            completion, prompt_suffix, reasoning=self.config.reasoning, key=self.answer_key
        )

    def search_opts(self, request_opts: Mapping[str, Any]) -> dict[str, Any]:
        opts = dict(self.config.search_opts)
        if self.config.k_option:
            opts[self.config.k_option] = self.config.k
        opts.update(request_opts)
        return opts

    def check_label(self, label: Any) -> None:
        """Raises ValueError for a label this task cannot score."""
        if isinstance(label, (str, bytes)) or not isinstance(label, (Sequence, Mapping)):
            raise ValueError(f"{self.name}: label must be a sequence of ids, got {label!r:.80}")
        if not label:
            raise ValueError(f"{self.name}: label is empty")

    async def retrieve(self, query: str, label: Any, opts: Mapping[str, Any], search: SearchFn):
        return await search(query, **opts)

    @abc.abstractmethod
    def grade(self, parsed: ParsedAnswer, results: Any, label: Any) -> RewardResult: ...

    def broken(self, parsed: ParsedAnswer) -> RewardResult:
        c = self.config
        if not parsed.tags_ok or self.payload_is_format:
            return RewardResult(
                c.format_bad, True, False, False, parsed.value, {}, parsed.error, "format_bad"
            )
        reward = c.format_ok + c.answer_bad
        return RewardResult(reward, True, True, False, None, {}, parsed.error, "answer_bad")

    def reject(self, parsed: ParsedAnswer, message: str) -> RewardResult:
        reward = self.config.format_ok + self.config.answer_bad
        return RewardResult(reward, True, True, False, parsed.value, {}, message, "answer_bad")

    def finish(self, parsed: ParsedAnswer, label: Any, outcome: Any) -> RewardResult:
        """outcome: the backend results, a QueryRejected or a BackendError (see module doc)."""
        if not parsed.ok:
            return self.broken(parsed)
        if isinstance(outcome, BackendError):
            return RewardResult.invalid(f"{type(outcome).__name__}: {outcome}", parsed.value)
        if isinstance(outcome, QueryRejected):
            return self.reject(parsed, f"QueryRejected: {outcome}")
        return self.grade(parsed, outcome, label)

    def score(self, completion: str, label: Any, outcome: Any = None, prompt_suffix: str = ""):
        """Offline scoring of one completion against given backend results (no I/O)."""
        return self.finish(self.parse(completion, prompt_suffix), label, outcome)

    def _graded(self, parsed, answer: float, bucket: str, metrics: dict) -> RewardResult:
        reward = self.config.format_ok + answer
        return RewardResult(reward, True, True, True, parsed.value, metrics, None, bucket)


class RecallTask(TaskReward):
    """Publication and trial search: recall@k of the label ids -> ladder."""

    def grade(self, parsed, results, label):
        recall = rm.recall_at_k(results, label, self.config.k)
        answer, bucket = self.config.ladder(recall)
        return self._graded(parsed, answer, bucket, {"recall": recall, "retrieved": len(results)})


class EvidenceTask(TaskReward):
    """NQ / TriviaQA / SQuAD: rank of the first passage containing an answer -> ladder.

    Passage texts come from the retrieved items themselves when they are `(id, text)` pairs or
    dicts with a "text" key, else from `passages[id]` (any Mapping, e.g. a sqlite-backed one).
    A missing passage text is a configuration error and makes the sample invalid.
    """

    hits_at = (1, 5, 20, 50, 100)
    grade_in_thread = True  # Tokenising up to k passages.

    def __init__(self, name, config, passages: Mapping[Any, str] | None = None):
        super().__init__(name, config)
        self.passages = passages

    def check_label(self, label):
        if isinstance(label, str):
            label = [label]
        super().check_label(label)
        if not all(isinstance(a, str) for a in label):
            raise ValueError(f"{self.name}: answers must be strings, got {label!r:.80}")

    def text_of(self, item: Any) -> str:
        if isinstance(item, Mapping) and "text" in item:
            return str(item["text"])
        if isinstance(item, (tuple, list)) and len(item) == 2:
            return str(item[1])
        if self.passages is None:
            raise LookupError(f"{self.name}: results are ids but no passages lookup was given")
        try:
            return self.passages[item]
        except KeyError:
            raise LookupError(f"{self.name}: no passage text for id {item!r}") from None

    def grade(self, parsed, results, label):
        answers = [label] if isinstance(label, str) else list(label)
        ids = [
            item["id"] if isinstance(item, Mapping) and "id" in item else item for item in results
        ]
        keyed: dict[str, Any] = {}  # unique ids, first rank kept
        for key, item in zip(map(str, ids), results, strict=True):
            keyed.setdefault(key, item)
        rank = rm.first_hit_rank(
            list(keyed), lambda i: self.text_of(keyed[i]), answers, self.config.k
        )
        answer, bucket = self.config.ladder(rank)
        metrics = {f"hit@{n}": float(rank is not None and rank <= n) for n in self.hits_at}
        if rank is not None:
            metrics["rank"] = float(rank)
        return self._graded(parsed, answer, bucket, metrics)


class NdcgTask(TaskReward):
    """BEIR sparse/dense and MS MARCO: 0.1 + NDCG@k when NDCG > 0, else 0 (format fine)."""

    config_cls = NdcgConfig
    payload_is_format = True

    def check_label(self, label):
        super().check_label(label)
        try:
            grades = rm.graded_labels(label)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{self.name}: cannot read graded label {label!r:.80}: {exc}"
            ) from None
        if not any(g > 0 for g in grades.values()):
            raise ValueError(f"{self.name}: label has no relevant (grade > 0) document")

    def reject(self, parsed, message):
        reward = self.config.answer_bad  # The total, like a broken payload (format_bad).
        return RewardResult(reward, True, True, False, parsed.value, {}, message, "answer_bad")

    def grade(self, parsed, results, label):
        grades = rm.graded_labels(label)
        ndcg = rm.ndcg_at_k(results, grades, self.config.k)
        metrics = {
            "ndcg": ndcg,
            f"ndcg@{self.config.eval_k}": rm.ndcg_at_k(results, grades, self.config.eval_k),
        }
        if ndcg > 0:
            return self._graded(parsed, ndcg, "ndcg>0", metrics)
        return RewardResult(
            self.config.zero, True, True, True, parsed.value, metrics, None, "ndcg=0"
        )


class SqlTask(TaskReward):
    """BIRD / Spider: execution match of result rows as sets. Label: gold SQL or gold rows.

    The backend's search(sql, **opts) returns result rows and raises QueryRejected when the SQL
    does not run (an execution error: answer 0). A failing gold SQL makes the sample invalid.
    """

    answer_key = "sql"
    config_cls = SqlConfig
    payload_is_format = True

    def check_label(self, label):
        if isinstance(label, str):
            if not label.strip():
                raise ValueError(f"{self.name}: gold SQL is empty")
        elif not isinstance(label, Sequence):
            raise ValueError(f"{self.name}: label must be gold SQL or rows, got {label!r:.80}")

    async def retrieve(self, query, label, opts, search):
        predicted = await search(query, **opts)
        if not isinstance(label, str):
            return predicted, label
        try:
            gold = await search(label, **opts)
        except QueryRejected as exc:
            raise BackendError(f"gold SQL failed: {exc}", retryable=False) from None
        return predicted, gold

    def reject(self, parsed, message):
        return self._total(parsed, self.config.exec_error, "exec_error", message)

    def grade(self, parsed, results, label):
        predicted, gold = results
        if rm.execution_match(predicted, gold):
            return self._total(parsed, self.config.match, "match", None)
        return self._total(parsed, self.config.mismatch, "mismatch", None)

    def _total(self, parsed, answer, bucket, error):
        c = self.config
        reward = c.format_ok + answer if answer > 0 else c.zero
        ran = bucket != "exec_error"
        metrics = {"exec_match": float(bucket == "match")}
        return RewardResult(reward, True, True, ran, parsed.value, metrics, error, bucket)


# name -> (family, overrides of the family defaults). Dense BEIR runs use k=1000 (NFCorpus 100).
REGISTRY: dict[str, tuple[type[TaskReward], dict[str, Any]]] = {
    "pubmed": (RecallTask, {"backend": "pubmed", "k": 3000}),
    "ctgov": (RecallTask, {"backend": "ctgov", "k": 3000}),
    "nq": (EvidenceTask, {"k": 3000, "ladder": RANK_LADDER}),
    "triviaqa": (EvidenceTask, {"k": 3000, "ladder": RANK_LADDER}),
    # The original's squad.py: -3 for a broken payload (total -2), where nq/triviaqa use -4.
    "squad": (EvidenceTask, {"k": 3000, "ladder": SQUAD_RANK_LADDER, "answer_bad": -3.0}),
    "bird": (SqlTask, {"mismatch": 0.3}),
    "spider": (SqlTask, {"mismatch": 0.0}),
}
for _name, _k in {"scifact": 50, "nfcorpus": 1000, "fever": 1000, "msmarco_beir": 1000,
                  "fiqa": 1000, "hotpotqa": 3000}.items():  # fmt: skip
    REGISTRY[_name] = (NdcgTask, {"k": _k})
    REGISTRY[f"{_name}_dense"] = (
        NdcgTask,
        {"backend": "dense", "k": 100 if _name == "nfcorpus" else 1000},
    )
for _domain in ("health", "science", "tech"):
    REGISTRY[f"msmarco_{_domain}"] = (NdcgTask, {"k": 10})


def make_task(name: str, overrides: Any = None, *, passages: Mapping | None = None) -> TaskReward:
    """Builds the registered task `name` with config `overrides` (dict or ConfigDict)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered: {sorted(REGISTRY)}")
    family, defaults = REGISTRY[name]
    config = family.config_cls(**defaults)
    if overrides is not None:
        config = config.override(overrides, where=f"tasks.{name}")
    if family is EvidenceTask or getattr(family, "uses_passages", False):
        return family(name, config, passages=passages)
    return family(name, config)


def make_tasks(config: Any, *, passages: Mapping | None = None) -> dict[str, TaskReward]:
    """{task name: overrides or None} (dict or ConfigDict) -> {task name: TaskReward}."""
    config = _as_dict(config, "tasks")
    return {name: make_task(name, over, passages=passages) for name, over in config.items()}
