"""Prompt rendering through the tokenizer's chat template, the prompt-length policy, and the
"original query" baseline.

Never hand-writes ChatML: the system and user turns go through the tokenizer's chat template
with a generation prompt, followed by the task's explicit assistant prefix (e.g. "<think>\\n").
A tokenizer is anything with either `render_chat(messages, assistant_prefix)` (our
`deepretrieval_jax.tokenizer.Tokenizer`) or `apply_chat_template(...)` (a `transformers`
tokenizer), plus `encode(text) -> list[int]` for the length policy.

Length policy for prompts over `max_prompt_tokens` (declared in config, never a crash):
  "drop"      skip the example; `PromptStats.dropped` counts it.
  "truncate"  cut the task's `truncate_field` (SQL schema; the whole text for text inputs) to the
              longest prefix that fits; examples that still do not fit are dropped and counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from deepretrieval_jax.data.records import Example
from deepretrieval_jax.data.tasks import PICO_KEYS, TaskSpec

LENGTH_POLICIES = ("drop", "truncate")


class ChatTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def render_input(spec: TaskSpec, inp: Any) -> str:
    """The input block of the user turn (PICO as `P: ...\\nI: ...\\nC: ...\\nO: ...\\n`)."""
    if spec.input_format == "pico":
        if not isinstance(inp, dict):
            raise TypeError(f"task {spec.name}: PICO input must be a dict, got {type(inp)}")
        return "".join(f"{k}: {inp.get(k, '')}\n" for k in PICO_KEYS)
    if spec.input_format == "sql":
        if not isinstance(inp, dict):
            raise TypeError(f"task {spec.name}: SQL input must be a dict, got {type(inp)}")
        return inp["question"]
    if not isinstance(inp, str):
        raise TypeError(f"task {spec.name}: text input must be a string, got {type(inp)}")
    return inp


def user_content(spec: TaskSpec, inp: Any) -> str:
    """The user turn: instruction, [SQL schema block], output format + note, header + input."""
    parts = [spec.instruction]
    if spec.input_format == "sql":
        block = f"Database Schema:\n{inp.get('schema', '')}\n"
        if inp.get("evidence"):
            block += f"External Knowledge: {inp['evidence']}\n"
        parts.append(block.rstrip("\n"))
    parts.append(spec.output_format + ("\n" + spec.note if spec.note else ""))
    parts.append(f"{spec.input_header}\n{render_input(spec, inp)}".rstrip("\n"))
    return "\n\n".join(p for p in parts if p)


def messages_for(spec: TaskSpec, inp: Any) -> list[dict]:
    return [
        {"role": "system", "content": spec.system},
        {"role": "user", "content": user_content(spec, inp)},
    ]


def render_prompt(spec: TaskSpec, inp: Any, tokenizer: Any) -> str:
    """The full prompt text: chat template with generation prompt, then the assistant prefix."""
    messages = messages_for(spec, inp)
    if hasattr(tokenizer, "render_chat"):
        return tokenizer.render_chat(messages, assistant_prefix=spec.assistant_prefix)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + spec.assistant_prefix


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A rendered prompt ready for the sampler."""

    example: Example
    text: str
    num_tokens: int
    truncated: bool


@dataclasses.dataclass
class PromptStats:
    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_ids: list = dataclasses.field(default_factory=list)


def _with_field(spec: TaskSpec, inp: Any, n_chars: int) -> Any:
    field = spec.truncate_field
    if isinstance(inp, str):
        return inp[:n_chars]
    if isinstance(inp, dict) and field in inp:
        return {**inp, field: inp[field][:n_chars]}
    return None


def _truncatable_len(spec: TaskSpec, inp: Any) -> int:
    if isinstance(inp, str):
        return len(inp)
    if isinstance(inp, dict) and isinstance(inp.get(spec.truncate_field), str):
        return len(inp[spec.truncate_field])
    return -1


def fit_prompt(
    spec: TaskSpec, example: Example, tokenizer: Any, max_prompt_tokens: int, policy: str
) -> Prompt | None:
    """The rendered prompt, truncated per `policy` if needed; None when it must be dropped."""
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"length policy {policy!r} not in {LENGTH_POLICIES}")
    text = render_prompt(spec, example.input, tokenizer)
    n = len(tokenizer.encode(text))
    if n <= max_prompt_tokens:
        return Prompt(example, text, n, False)
    full = _truncatable_len(spec, example.input)
    if policy == "drop" or full <= 0:
        return None
    # Longest prefix of the field that fits: binary search over its character length.
    lo, hi, best = 0, full - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        cand = render_prompt(spec, _with_field(spec, example.input, mid), tokenizer)
        m = len(tokenizer.encode(cand))
        if m <= max_prompt_tokens:
            best, lo = (cand, m), mid + 1
        else:
            hi = mid - 1
    if best is None:
        return None
    return Prompt(example, best[0], best[1], True)


def prepare_prompts(
    spec: TaskSpec,
    examples: Iterable[Example],
    tokenizer: Any,
    max_prompt_tokens: int,
    policy: str = "drop",
) -> tuple[list[Prompt], PromptStats]:
    """Renders every example; over-long ones are truncated or dropped and counted in the stats."""
    stats, out = PromptStats(), []
    for ex in examples:
        stats.total += 1
        p = fit_prompt(spec, ex, tokenizer, max_prompt_tokens, policy)
        if p is None:
            stats.dropped += 1
            stats.dropped_ids.append(ex.id)
            continue
        stats.kept += 1
        stats.truncated += int(p.truncated)
        out.append(p)
    return out, stats


def original_query(spec: TaskSpec, inp: Any) -> str:
    """The "original query" baseline: the input itself (PICO terms OR-ed for search engines)."""
    if spec.input_format == "pico":
        terms = [str(inp[k]).strip() for k in PICO_KEYS if str(inp.get(k, "")).strip()]
        return " OR ".join(f"({t})" for t in terms)
    if spec.input_format == "sql":
        raise ValueError(f"task {spec.name}: SQL has no 'original query' baseline")
    return inp


def original_queries(spec: TaskSpec, examples: Sequence[Example]) -> list[str]:
    return [original_query(spec, ex.input) for ex in examples]
