"""Task definitions: one `TaskSpec` per family, dataset and variant, chosen by name in config.

Names: `<dataset>` (reasoning, the default backend), `<dataset>_no_reason`, and for BEIR and the
MS MARCO domain subsets `<dataset>_dense` / `<dataset>_dense_no_reason`. `get_task(name,
**overrides)` returns the spec with any field replaced (instruction texts included), so a config
can change a prompt without code. `list_tasks()` gives every name.

Families (reference sections 1-3):
  publication_search  PubMed, PICO -> PMIDs, Recall@3000
  trial_search        ClinicalTrials.gov, PICO -> NCT ids, Recall@3000
  evidence            NQ / TriviaQA / SQuAD over DPR Wikipedia with BM25, hit@{1,5,20,50,100}
  beir                SciFact, NFCorpus, FEVER, HotpotQA, FiQA, MS MARCO (BM25 or dense), NDCG@10
  msmarco_domain      MS MARCO health / science / tech subsets (BM25 or dense), NDCG@10
  sql                 BIRD, Spider over sqlite, execution accuracy
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

from deepretrieval_jax.data import prompts as P

FAMILIES = (
    "publication_search",
    "trial_search",
    "evidence",
    "beir",
    "msmarco_domain",
    "sql",
)
VARIANTS = ("reasoning", "no_reasoning")
INPUT_FORMATS = ("text", "pico", "sql")
PICO_KEYS = ("P", "I", "C", "O")
# Backend options fixed when the backend is built (BM25 parameters, dense encoder, SQL limits);
# the rest of `TaskSpec.backend_opts` (top_k, ...) are passed to every `search` call.
INDEX_OPTS = ("k1", "b", "model", "timeout_s", "max_rows", "base_url")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything that defines a task except its data.

    The user turn is `instruction`, then `output_format` + `note`, then `input_header` and the
    rendered input (SQL puts the schema and evidence block right after the instruction). The
    assistant turn starts with `assistant_prefix`, which the reward parser must prepend to the
    completion (it is `RewardRequest.prompt_suffix`); `finish_completion` applies
    `answer_suffix` to completions that stopped on a stop string.
    """

    name: str
    family: str  # one of FAMILIES
    dataset: str  # "pubmed", "scifact", "bird", ...
    variant: str  # "reasoning" | "no_reasoning"
    system: str
    instruction: str
    output_format: str
    note: str  # appended to output_format after a newline; "" for none
    input_header: str
    input_format: str  # "text" | "pico" | "sql": how `Example.input` is rendered
    assistant_prefix: str  # "<think>\n" (reasoning), "<answer>\n" or "" (no reasoning)
    answer_key: str  # JSON key of the answer: "query" or "sql"
    backend: str  # search backend name: "pubmed", "ctgov", "bm25", "dense", "sql"
    backend_opts: Mapping[str, Any]  # e.g. {"k1": 1.2, "b": 0.75, "top_k": 1000}
    corpus: str  # local corpus / database collection name; "" for web engines
    reward_task: str  # key of `rewards.tasks.REGISTRY` (its defaults hold the original ladders)
    reward_opts: Mapping[str, Any]  # overrides for `rewards.tasks.make_task` ({"reasoning": False})
    eval_metrics: tuple[str, ...]  # e.g. ("ndcg@10", "recall@100")
    truncate_field: str = ""  # input field cut by the "truncate" length policy ("" = whole text)
    # Appended by the harness to a completion that ended on a sampler stop string (the text is
    # cut right after the stop string first): e.g. "</answer>" after a prefilled answer opening.
    answer_suffix: str = ""

    def __post_init__(self):
        # Frozen all the way down: variants share these mappings, so none may be mutated.
        for field in ("backend_opts", "reward_opts"):
            object.__setattr__(self, field, types.MappingProxyType(dict(getattr(self, field))))
        checks = [
            ("family", self.family, FAMILIES),
            ("variant", self.variant, VARIANTS),
            ("input_format", self.input_format, INPUT_FORMATS),
            ("answer_key", self.answer_key, ("query", "sql")),
        ]
        for field, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"TaskSpec {self.name!r}: {field}={value!r} not in {allowed}")

    @property
    def reasoning(self) -> bool:
        return self.variant == "reasoning"

    def index_opts(self) -> dict[str, Any]:
        """Options for building / loading the backend's index (BM25 k1 and b, encoder)."""
        return {k: v for k, v in self.backend_opts.items() if k in INDEX_OPTS}

    def search_opts(self) -> dict[str, Any]:
        """Options for each `backend.search(query, **opts)` call (e.g. top_k)."""
        return {k: v for k, v in self.backend_opts.items() if k not in INDEX_OPTS}

    def replace(self, **overrides: Any) -> TaskSpec:
        return dataclasses.replace(self, **overrides)


def finish_completion(spec: TaskSpec, text: str, stopped: bool, stop: tuple[str, ...]) -> str:
    """The completion the reward parser sees: cut after the first stop string and closed with
    `spec.answer_suffix` when the sampler stopped on one; otherwise `text` unchanged."""
    if not stopped or not stop:
        return text
    ends = [text.find(s) + len(s) for s in stop if s in text]
    if ends:
        text = text[: min(ends)]
    return text + spec.answer_suffix


_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    if spec.name in _TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    _TASKS[spec.name] = spec
    return spec


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, **overrides: Any) -> TaskSpec:
    """The registered task `name`, with `overrides` replacing fields (e.g. `instruction=...`)."""
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; registered tasks: {', '.join(list_tasks())}")
    spec = _TASKS[name]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TaskSpec)}
    if unknown:
        raise KeyError(f"task {name!r}: unknown TaskSpec fields in overrides: {sorted(unknown)}")
    return spec.replace(**overrides) if overrides else spec


# --- Definitions ----------------------------------------------------------------------------------

_SEARCH_ENGINE_METRICS = ("recall@3000",)
_EVIDENCE_METRICS = ("hit@1", "hit@5", "hit@20", "hit@50", "hit@100")
_BEIR_METRICS = ("ndcg@10", "recall@100")
_SQL_METRICS = ("execution_accuracy",)


# The no-reasoning twin of a query-writing task: answer tags only, no <think>.
_NO_REASONING_QUERY = dict(
    variant="no_reasoning",
    system=P.SYSTEM_NO_REASONING,
    output_format=P.FORMAT_QUERY_NO_REASONING,
    assistant_prefix=P.PREFIX_ANSWER,
)


def _variants(base: dict, no_reason: dict) -> None:
    """Registers the reasoning task `base` and its no-reasoning twin (base updated by no_reason).

    The no-reasoning twin scores with the same reward task, told to check only <answer> tags.
    """
    register_task(TaskSpec(**base))
    reward_opts = {**base["reward_opts"], "reasoning": False}
    name = base["name"] + "_no_reason"
    register_task(TaskSpec(**{**base, **no_reason, "name": name, "reward_opts": reward_opts}))


def _define_search_engines() -> None:
    for dataset, family, backend, opts in (
        # base_url "" = the public service; a local stand-in's URL otherwise (docs/offline.md).
        ("pubmed", "publication_search", "pubmed", {"top_k": 3000, "base_url": ""}),
        ("ctgov", "trial_search", "ctgov", {"top_k": 3000, "base_url": ""}),
    ):
        _variants(
            dict(
                name=dataset,
                family=family,
                dataset=dataset,
                variant="reasoning",
                system=P.SYSTEM_PICO_REASONING,
                instruction=P.INSTRUCTION_PICO,
                output_format=P.FORMAT_PICO_REASONING,
                note=P.NOTE_BOOLEAN,
                input_header=P.HEADER_PICO,
                input_format="pico",
                assistant_prefix=P.PREFIX_THINK,
                answer_key="query",
                backend=backend,
                backend_opts=opts,
                corpus="",
                reward_task=dataset,
                reward_opts={},
                eval_metrics=_SEARCH_ENGINE_METRICS,
            ),
            dict(
                variant="no_reasoning",
                system=P.SYSTEM_DIRECT,
                output_format=P.FORMAT_QUERY_DIRECT,
                note=P.NOTE_DIRECT,
                input_header=P.HEADER_USER_QUERY,
                assistant_prefix=P.PREFIX_NONE,
            ),
        )


def _define_evidence() -> None:
    for dataset in ("nq", "triviaqa", "squad"):
        _variants(
            dict(
                name=dataset,
                family="evidence",
                dataset=dataset,
                variant="reasoning",
                system=P.SYSTEM_REASONING,
                instruction=P.INSTRUCTION_WIKI_BM25,
                output_format=P.FORMAT_QUERY_REASONING,
                note=P.NOTE_BOOLEAN,
                input_header=P.HEADER_USER_QUERY,
                input_format="text",
                assistant_prefix=P.PREFIX_THINK,
                answer_key="query",
                backend="bm25",
                backend_opts={"k1": 0.9, "b": 0.4, "top_k": 3000},
                corpus="wikipedia_dpr",
                reward_task=dataset,
                reward_opts={},
                eval_metrics=_EVIDENCE_METRICS,
            ),
            _NO_REASONING_QUERY,
        )


# dataset -> (instruction, input header, BM25 (k1, b), train NDCG k sparse, train NDCG k dense)
_BEIR = {
    "scifact": (P.INSTRUCTION_SCIFACT, P.HEADER_SCIENTIFIC_CLAIM, (1.2, 0.75), 50, 1000),
    "nfcorpus": (P.INSTRUCTION_NFCORPUS, P.HEADER_QUESTION, (0.9, 0.4), 1000, 100),
    "fever": (P.INSTRUCTION_FEVER, P.HEADER_CLAIM, (0.9, 0.4), 1000, 1000),
    "hotpotqa": (P.INSTRUCTION_HOTPOTQA, P.HEADER_QUESTION, (0.9, 0.4), 3000, 1000),
    "fiqa": (P.INSTRUCTION_FIQA, P.HEADER_FINANCIAL_QUESTION, (0.9, 0.4), 1000, 1000),
    # The original said "Here's the claim:" for MS MARCO queries; a query is not a claim.
    "msmarco_beir": (P.INSTRUCTION_MSMARCO_BEIR, P.HEADER_USER_QUERY, (0.9, 0.4), 1000, 1000),
}
DENSE_ENCODER = "BAAI/bge-base-en-v1.5"
CONTRIEVER = "facebook/contriever"


def _retrieval_task(
    name,
    family,
    dataset,
    instruction,
    header,
    note,
    backend,
    opts,
    ndcg_k,
    reward_task,
    reward_opts,
):
    _variants(
        dict(
            name=name,
            family=family,
            dataset=dataset,
            variant="reasoning",
            system=P.SYSTEM_REASONING,
            instruction=instruction,
            output_format=P.FORMAT_QUERY_REASONING,
            note=note,
            input_header=header,
            input_format="text",
            assistant_prefix=P.PREFIX_THINK,
            answer_key="query",
            backend=backend,
            backend_opts={**opts, "top_k": max(ndcg_k, 100)},
            corpus=dataset,
            reward_task=reward_task,
            reward_opts=reward_opts,
            eval_metrics=_BEIR_METRICS,
        ),
        _NO_REASONING_QUERY,
    )


def _define_retrieval() -> None:
    for dataset, (instruction, header, (k1, b), k_sparse, k_dense) in _BEIR.items():
        bm25 = {"k1": k1, "b": b}
        _retrieval_task(
            dataset,
            "beir",
            dataset,
            instruction,
            header,
            P.NOTE_BOOLEAN,
            "bm25",
            bm25,
            k_sparse,
            dataset,
            {},
        )
        # Boolean syntax means nothing to a bi-encoder, so the dense variant drops that note.
        dense = {"model": DENSE_ENCODER}
        _retrieval_task(
            dataset + "_dense",
            "beir",
            dataset,
            instruction,
            header,
            "",
            "dense",
            dense,
            k_dense,
            dataset + "_dense",
            {},
        )
    for domain in ("health", "science", "tech"):
        dataset = f"msmarco_{domain}"
        _retrieval_task(
            dataset,
            "msmarco_domain",
            dataset,
            P.INSTRUCTION_MSMARCO_SPARSE,
            P.HEADER_USER_QUERY,
            P.NOTE_SPARSE,
            "bm25",
            {"k1": 0.9, "b": 0.4},
            1000,
            dataset,
            {},
        )
        _retrieval_task(
            dataset + "_dense",
            "msmarco_domain",
            dataset,
            P.INSTRUCTION_MSMARCO_DENSE,
            P.HEADER_USER_QUERY,
            "",
            "dense",
            {"model": CONTRIEVER},
            1000,
            dataset,
            {"backend": "dense", "k": 1000},
        )


def _define_sql() -> None:
    for dataset in ("bird", "spider"):
        _variants(
            dict(
                name=dataset,
                family="sql",
                dataset=dataset,
                variant="reasoning",
                system=P.SYSTEM_REASONING,
                instruction=P.INSTRUCTION_SQL,
                output_format=P.FORMAT_SQL_REASONING,
                note="",
                input_header=P.HEADER_USER_QUERY,
                input_format="sql",
                assistant_prefix=P.PREFIX_THINK,
                answer_key="sql",
                backend="sql",
                backend_opts={"timeout_s": 10.0, "max_rows": 10000},
                corpus=dataset,
                reward_task=dataset,
                reward_opts={},
                eval_metrics=_SQL_METRICS,
                truncate_field="schema",
            ),
            dict(
                variant="no_reasoning",
                system=P.SYSTEM_NO_REASONING,
                output_format=P.FORMAT_SQL_NO_REASONING,
                assistant_prefix=P.PREFIX_ANSWER,
            ),
        )


_define_search_engines()
_define_evidence()
_define_retrieval()
_define_sql()
