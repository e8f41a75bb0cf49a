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

`parse_completion` never raises for any input text.
"""

from __future__ import annotations

import dataclasses
import json
import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FENCE_RE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)


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
    """The content of the last `<answer>...</answer>` in `text`, or None."""
    matches = _ANSWER_RE.findall(text)
    return matches[-1] if matches else None


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
    text = text.strip()
    fenced = _FENCE_RE.match(text)
    if fenced:
        text = fenced.group(1).strip()
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
    tags_ok = check_tags(completion, prompt_suffix, reasoning)
    answer = last_answer_span(prompt_suffix + completion)
    if answer is None:
        return ParsedAnswer(tags_ok, None, "no <answer>...</answer> span")
    value, error = extract_payload(answer, key)
    if error is None and not tags_ok:
        error = "tag structure is wrong"
    return ParsedAnswer(tags_ok, value, error)
