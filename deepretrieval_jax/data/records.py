"""The common example record every converter produces and every task consumes.

    Example(id, input, label, search_opts, meta)

- `input`: the user need. A string (question, claim, web query) or a dict (PICO as
  `{"P","I","C","O"}`; SQL as `{"question", "schema", "evidence"}`).
- `label`: what the reward compares against. A list of ids (PMIDs, NCT ids, passage ids), a list
  of answer strings (evidence seeking), a gold SQL string, or for BEIR the graded relevance
  `{doc_id: grade}`.
- `search_opts`: per-example backend options (`maxdate` for PubMed, `db_id` for SQL).
- `meta`: provenance (source file, original index, split); never read by rewards.

Records are JSON-able, so they are stored as one JSON text per example in array_record files.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

Input = str | dict
Label = list | dict | str


class DataFormatError(ValueError):
    """A data file does not have the expected format (names the file, line and field)."""

    def __init__(self, path: Any, line: int | None, field: str | None, problem: str):
        where = f"{path}" + (f", line {line}" if line is not None else "")
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{problem}")
        self.path, self.line, self.field = path, line, field


@dataclasses.dataclass(frozen=True)
class Example:
    """One task example (see the module docstring for the meaning of each field)."""

    id: str
    input: Input
    label: Label
    search_opts: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Example:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        d = json.loads(text)
        return cls(
            id=d["id"],
            input=d["input"],
            label=d["label"],
            search_opts=d.get("search_opts", {}),
            meta=d.get("meta", {}),
        )
