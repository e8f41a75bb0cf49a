"""Query rewriting with a policy: task input -> prompt -> completion -> query -> search results.

Shared by `launch/rewrite.py` (batch, synchronous generation) and the HTTP service (one
request at a time through the scheduler). The pieces:
- `parse_input(spec, raw)`: the user's input in the task's shape (text; PICO as a dict with
  P/I/C/O keys, a JSON object, or "P: ..." lines; SQL as {"question", "schema", "evidence"}),
  raising `InputError` with a message fit for a 400 response.
- `interpret(spec, completion)`: the query (last `<answer>` JSON, `rewards.parsing` rules),
  the reasoning (text before `</think>` in reasoning variants) and the parse error, if any.
- `Searcher`: the task's backend (`data.backends.task_backend`) plus document titles where a local
  corpus has them; `search(query, top_k)` returns `[{"rank", "id", "title"?}]`.
  Invariants: one backend per task, opened once and closed by `close()`; a failing search is
  reported in the result (`search_error`), never raised to the caller; the query is passed to
  the backend as a value (never pasted into a URL).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepretrieval_jax.data import render
from deepretrieval_jax.data.tasks import PICO_KEYS, TaskSpec, finish_completion
from deepretrieval_jax.rewards.parsing import THINK_CLOSE, THINK_OPEN, parse_completion
from deepretrieval_jax.search import query_syntax
from deepretrieval_jax.search.base import BackendError, QueryRejected

_PICO_NAMES = {
    "p": "P", "population": "P", "patient": "P", "problem": "P",
    "i": "I", "intervention": "I", "c": "C", "comparison": "C", "o": "O", "outcome": "O",
}  # fmt: skip
_PICO_LINE = re.compile(r"^\s*([PICO])\s*:\s*(.*)$")
STOP_AFTER_ANSWER = ("</answer>",)


class InputError(ValueError):
    """The user's input does not fit the task (a 400 in the service)."""


def _pico(raw: Any) -> dict[str, str]:
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("{"):
            try:
                raw = json.loads(text)
            except ValueError as e:
                raise InputError(f"PICO input is not valid JSON: {e}") from None
        else:
            fields: dict[str, str] = {}
            for line in text.splitlines():
                m = _PICO_LINE.match(line)
                if m:
                    fields[m.group(1)] = m.group(2).strip()
            raw = fields
    if not isinstance(raw, Mapping):
        raise InputError("PICO input must be an object with keys P, I, C, O (or 'P: ...' lines)")
    out = {k: "" for k in PICO_KEYS}
    for key, value in raw.items():
        name = _PICO_NAMES.get(str(key).lower())
        if name is None:
            raise InputError(f"PICO input: unknown key {key!r}; expected P, I, C, O")
        if not isinstance(value, str):
            raise InputError(f"PICO input: {key!r} must be a string")
        out[name] = value.strip()
    if not any(out.values()):
        raise InputError("PICO input: every field is empty")
    return out


def parse_input(spec: TaskSpec, raw: Any) -> Any:
    """The input in the shape `data.render` expects for `spec`; raises `InputError`."""
    if spec.input_format == "pico":
        return _pico(raw)
    if spec.input_format == "sql":
        if isinstance(raw, str):
            raw = {"question": raw}
        if not isinstance(raw, Mapping) or not isinstance(raw.get("question"), str):
            raise InputError("SQL input must be an object with a string 'question' (+ 'schema')")
        extra = set(raw) - {"question", "schema", "evidence", "db_id"}
        if extra or any(not isinstance(v, str) for v in raw.values()):
            raise InputError("SQL input: only string fields question, schema, evidence, db_id")
        return {"schema": "", **raw}
    if not isinstance(raw, str):
        raise InputError(f"task {spec.name} takes a text input (a JSON string)")
    if not raw.strip():
        raise InputError("input is empty")
    return raw


def render_prompt(spec: TaskSpec, inp: Any, tokenizer) -> str:
    return render.render_prompt(spec, inp, tokenizer)


def stop_strings(stop: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The run's stop strings (`serving.protocol`), then `</answer>`."""
    return tuple(dict.fromkeys((*stop, *STOP_AFTER_ANSWER)))


def close_answer(spec: TaskSpec, text: str, stop: tuple[str, ...] = ()) -> str:
    """The completion as training's reward parser saw it: cut after a run stop string and closed
    with the task's `answer_suffix` (`data.tasks.finish_completion`); else cut after
    `</answer>`."""
    if any(s in text for s in stop):
        return finish_completion(spec, text, True, stop)
    ends = [text.find(s) + len(s) for s in STOP_AFTER_ANSWER if s in text]
    return text[: min(ends)] if ends else text


@dataclasses.dataclass(frozen=True)
class Interpretation:
    query: str | None  # None when the answer is missing or broken
    reasoning: str | None  # reasoning variants only
    error: str | None  # parse error (tags or payload), None when the answer is fine


def interpret(spec: TaskSpec, completion: str) -> Interpretation:
    parsed = parse_completion(
        completion, spec.assistant_prefix, reasoning=spec.reasoning, key=spec.answer_key
    )
    reasoning = None
    if spec.reasoning:
        text = spec.assistant_prefix + completion
        head = text.split(THINK_CLOSE, 1)[0] if THINK_CLOSE in text else text.split("<answer>")[0]
        reasoning = head.replace(THINK_OPEN, "", 1).strip() or None
    return Interpretation(parsed.value, reasoning, parsed.error)


def _titles(corpus: Path) -> dict[str, str]:
    from deepretrieval_jax.data.converters import iter_beir_corpus

    return {i: t for i, t, _ in iter_beir_corpus(corpus) if t}


class Searcher:
    """The task's search backend, opened lazily, with titles from a local BEIR corpus."""

    def __init__(self, spec: TaskSpec, data_dir: str | None = None, titles: bool = True):
        from deepretrieval_jax.data.backends import task_backend

        self.spec = spec
        root = Path(data_dir).expanduser() if data_dir else None
        self.backend = task_backend(spec, root)
        corpus = root / spec.corpus / "corpus.jsonl" if root and spec.corpus else None
        self.titles = _titles(corpus) if titles and corpus and corpus.is_file() else {}
        self._opened = False

    async def search(self, query: str, top_k: int, **opts) -> tuple[list[dict], str | None]:
        """(results, error): ranked `{"rank", "id", "title"}` rows; error text on failure.
        `opts` go to the backend (e.g. `db_id` for SQL, `maxdate` for PubMed)."""
        if not self._opened:
            await self.backend.open()
            self._opened = True
        if self.spec.family != "sql":  # SQL returns every row; others page to top_k
            opts = {"top_k": top_k, **opts}
        opts = {**self.spec.search_opts(), **opts}
        try:
            found = await self.backend.search(query, **opts)
        except (QueryRejected, BackendError) as e:
            return [], f"{type(e).__name__}: {e}"
        except Exception as e:  # a missing database or index file: reported, not raised
            return [], f"{type(e).__name__}: {e}"
        if self.spec.family == "sql":  # result rows, not ids
            return [{"rank": r + 1, "row": list(row)} for r, row in enumerate(found[:top_k])], None
        rows = []
        for r, doc in enumerate(found[:top_k]):
            row = {"rank": r + 1, "id": str(doc)}
            if str(doc) in self.titles:
                row["title"] = self.titles[str(doc)]
            rows.append(row)
        return rows, None

    async def close(self) -> None:
        if self._opened:
            await self.backend.close()
            self._opened = False


async def finish(
    spec: TaskSpec,
    inp: Any,
    completion: str,
    searcher: Searcher | None,
    top_k: int,
    fallback: str = "none",
) -> dict:
    """The result record of one rewrite: query, reasoning, error and (optionally) results.

    `fallback="original"` searches with the task's "original query" (the input itself) when
    the policy's answer is broken; `query_source` then says "original".
    """
    if fallback not in ("none", "original"):
        raise InputError(f"fallback must be 'none' or 'original', got {fallback!r}")
    info = interpret(spec, completion)
    query, source = info.query, "policy" if info.query is not None else None
    if query is None and fallback == "original" and spec.input_format != "sql":
        query, source = render.original_query(spec, inp), "original"
        if spec.backend == "bm25":  # plain text is not Boolean syntax (as in `eval`)
            query = query_syntax.bag_of_words(query)
    out = {
        "task": spec.name,
        "query": info.query,
        "reasoning": info.reasoning,
        "completion": completion,
        "error": info.error,
        "query_source": source,
        "searched_query": query if searcher is not None else None,
        "results": [],
        "search_error": None,
    }
    if searcher is not None and query is not None:
        opts = {"db_id": inp["db_id"]} if isinstance(inp, dict) and "db_id" in inp else {}
        out["results"], out["search_error"] = await searcher.search(query, top_k, **opts)
    return out


# ------------------------------------------------------------------------------ batch (CLI)
def read_inputs(lines) -> list[tuple[str, Any]]:
    """(id, raw input) per non-empty line: a JSON value (an object with "input" may carry an
    "id"), or else the line as text."""
    out = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        ident, raw = str(len(out)), line
        if line[0] in '{["':
            try:
                raw = json.loads(line)
            except ValueError:
                raw = line
            if isinstance(raw, dict) and "input" in raw:
                ident, raw = str(raw.get("id", ident)), raw["input"]
        out.append((ident, raw))
    return out


async def rewrite_batch(
    policy,
    spec: TaskSpec,
    items: list[tuple[str, Any]],
    settings,
    max_tokens: int,
    searcher: Searcher | None = None,
    top_k: int = 10,
    fallback: str = "none",
    stop: tuple[str, ...] = (),
) -> list[dict]:
    """Rewrites every (id, raw input) with `policy.generate` in batches of `policy.max_batch`;
    an input that does not fit the task (or is too long) gives a record with its error.
    `stop`: the run's stop strings (`serving.protocol.resolve`)."""
    records: list[dict | None] = [None] * len(items)
    todo = []
    for k, (ident, raw) in enumerate(items):
        try:
            inp = parse_input(spec, raw)
            tokens = policy.encode(render_prompt(spec, inp, policy.tokenizer))
            if len(tokens) > policy.max_prompt_tokens:
                raise InputError(
                    f"prompt has {len(tokens)} tokens; the limit is {policy.max_prompt_tokens}"
                )
            todo.append((k, inp, tokens))
        except InputError as e:
            records[k] = {"id": ident, "task": spec.name, "input": raw, "error": str(e)}
    settings = dataclasses.replace(settings, stop=stop_strings(stop))
    for start in range(0, len(todo), policy.max_batch):
        chunk = todo[start : start + policy.max_batch]
        rows = [t for _, _, t in chunk]
        completions = policy.generate(rows, settings, [max_tokens] * len(rows))
        for (k, inp, _), c in zip(chunk, completions, strict=True):
            text = close_answer(spec, c.text, stop)
            rec = await finish(spec, inp, text, searcher, top_k, fallback)
            usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}
            records[k] = {"id": items[k][0], "input": inp, **rec,
                          "finish_reason": c.finish_reason, "usage": usage}  # fmt: skip
    return records


def format_text(rec: dict) -> str:
    """A human-readable block for one record."""
    lines = [f"[{rec['id']}] {rec.get('task')}"]
    if rec.get("query") is None and "completion" not in rec:
        return "\n".join(lines + [f"  error: {rec['error']}"])
    lines.append(f"  query: {rec['query'] if rec['query'] is not None else '(none)'}")
    if rec.get("error"):
        lines.append(f"  answer error: {rec['error']}")
    if rec.get("reasoning"):
        lines.append("  reasoning: " + rec["reasoning"].replace("\n", "\n    "))
    if rec.get("query_source") == "original":
        lines.append(f"  searched with the original query: {rec['searched_query']}")
    if rec.get("search_error"):
        lines.append(f"  search error: {rec['search_error']}")
    for r in rec.get("results", []):
        title = f"  {r['title']}" if r.get("title") else ""
        lines.append(f"  {r['rank']:>3}. {r.get('id', r.get('row'))}{title}")
    return "\n".join(lines)


def gather_inputs(text: str | None, file: str | None, pico: dict[str, str]) -> list:
    """(id, raw input) pairs from exactly one of: a text, a file ("-" = stdin), PICO fields."""
    import sys

    if sum(x is not None for x in (text, file, pico or None)) != 1:
        raise InputError("give exactly one of --input, --input_file and the --pico_* flags")
    if file is not None:
        if file == "-":
            return read_inputs(sys.stdin)
        with open(file, encoding="utf-8") as f:
            return read_inputs(f)
    return [("0", pico or text)]


def run(policy, spec, items, settings, max_tokens, data_dir=None, search=True, **kw) -> list:
    """`rewrite_batch` with the task's searcher opened and closed around it."""
    import asyncio

    searcher = Searcher(spec, data_dir) if search else None

    async def go():
        try:
            return await rewrite_batch(policy, spec, items, settings, max_tokens, searcher, **kw)
        finally:
            if searcher is not None:
                await searcher.close()

    return asyncio.run(go())
