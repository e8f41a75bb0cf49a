"""Parse a policy completion: tag format check and the JSON answer payload.

Rules (reference doc sections 2 and 7.8), applied to the response only: `prompt_suffix +
completion`, where `prompt_suffix` is the assistant prefix the prompt already supplied (for
example "<think>\\n", or "<answer>\\n" in no-reasoning prompts). The rest of the prompt (whose
instructions show example tags) is never looked at, and no "Assistant:" header is needed.

- The answer is the LAST `<answer>...</answer>` span (DOTALL) of the response.
- Reasoning variants: `<think>`, `</think>`, `<answer>`, `</answer>` each occur exactly once
  in the response, in that order.
- No-reasoning variants: only `<answer>` and `</answer>` are checked (once each, in order).
- The payload must be a JSON object whose `query` (or `sql`) value is a non-empty,
  non-whitespace string. A JSON list, string, number, null, a missing key, a non-string value or
  an empty query is a broken payload, never an exception. Markdown code fences around the JSON
  are tolerated, as is prose around a single `{...}` object.

`parse_completion` never raises for any input text, and its time is linear in the text's
length: it uses `str.find`/`str.count` scans and `json.loads` only (no regular expression that
can backtrack), and a response longer than `MAX_RESPONSE_CHARS` is a format failure without
being scanned. It runs on the reward pool's event loop, so this bound is what keeps one hostile
completion from stalling a batch (measured worst cases: docs/architecture.md, threat model).
"""

from __future__ import annotations

import dataclasses
import json

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

FENCE = "```"
# Far above any sampled completion (a 4,096-token completion of 128-space tokens is 524,288
# characters); longer text is a format failure, so parsing time has a hard ceiling.
MAX_RESPONSE_CHARS = 1_000_000


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
    """What a completion says, and what is wrong with it.

    tags_ok: the tag structure rule of the variant holds.
    value: the non-empty `query`/`sql` string (stripped), or None when the payload is broken.
    error: None when both tags and payload are fine, else a short reason.
    """

    tags_ok: bool
    value: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.tags_ok and self.value is not None


def last_answer_span(text: str) -> str | None:
    """The content of the last `<answer>...</answer>` in `text`, or None.

    Spans are the non-overlapping, leftmost, shortest ones (what the regex
    `<answer>(.*?)</answer>` with DOTALL finds), found by a single left-to-right scan.
    """
    last, pos = None, 0
    while True:
        start = text.find(ANSWER_OPEN, pos)
        if start < 0:
            return last
        end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
        if end < 0:
            return last
        last = text[start + len(ANSWER_OPEN) : end]
        pos = end + len(ANSWER_CLOSE)


def _unfence(text: str) -> str:
    """The body of a markdown code fence ```lang ... ``` spanning all of (stripped) `text`."""
    if len(text) < 2 * len(FENCE) or not (text.startswith(FENCE) and text.endswith(FENCE)):
        return text
    i = len(FENCE)
    while i < len(text) - len(FENCE) and text[i].isascii() and text[i].isalpha():
        i += 1  # The language tag, e.g. ```json.
    return text[i : len(text) - len(FENCE)].strip()


def _in_order(text: str, tags: tuple[str, ...]) -> bool:
    if any(text.count(tag) != 1 for tag in tags):
        return False
    positions = [text.find(tag) for tag in tags]
    return positions == sorted(positions)


def check_tags(completion: str, prompt_suffix: str = "", reasoning: bool = True) -> bool:
    """The tag structure rule (see module docstring)."""
    text = prompt_suffix + completion
    if reasoning:
        return _in_order(text, (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE))
    return _in_order(text, (ANSWER_OPEN, ANSWER_CLOSE))


def _load_json(text: str):
    """Decodes `text` (optionally fenced, or prose around one object); raises ValueError."""
    text = _unfence(text.strip())
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
    except ValueError:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            raise
        try:
            return json.loads(text[start : end + 1])
        except RecursionError as exc:
            raise ValueError("JSON nested too deeply") from exc


def extract_payload(answer: str, key: str = "query") -> tuple[str | None, str | None]:
    """Returns (value, error): the non-empty string under `key` of a JSON object, or an error."""
    try:
        payload = _load_json(answer)
    except ValueError:
        return None, "answer is not valid JSON"
    if not isinstance(payload, dict):
        return None, f"answer JSON is a {type(payload).__name__}, not an object"
    if key not in payload:
        return None, f"answer JSON has no {key!r} key"
    value = payload[key]
    if not isinstance(value, str):
        return None, f"{key!r} is a {type(value).__name__}, not a string"
    if not value.strip():
        return None, f"{key!r} is empty"
    return value.strip(), None


def parse_completion(
    completion: str, prompt_suffix: str = "", *, reasoning: bool = True, key: str = "query"
) -> ParsedAnswer:
    """Checks tags and extracts the payload of the last answer. Never raises on any text."""
    if not isinstance(completion, str) or not isinstance(prompt_suffix, str):
        return ParsedAnswer(False, None, "completion is not text")
    if len(prompt_suffix) + len(completion) > MAX_RESPONSE_CHARS:
        return ParsedAnswer(False, None, f"response longer than {MAX_RESPONSE_CHARS} characters")
    tags_ok = check_tags(completion, prompt_suffix, reasoning)
    answer = last_answer_span(prompt_suffix + completion)
    if answer is None:
        return ParsedAnswer(tags_ok, None, "no <answer>...</answer> span")
    value, error = extract_payload(answer, key)
    if error is None and not tags_ok:
        error = "tag structure is wrong"
    return ParsedAnswer(tags_ok, value, error)
