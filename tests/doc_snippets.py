"""The code snippets of README.md and docs/*.md, with how the docs test treats each one.

A fenced block of `bash`/`sh`/`shell` or `python` is a snippet. An HTML comment on the line
just before its fence says what the test does with it (invisible when the page is rendered):

    <!-- doctest: run -->                 run it (bash with `bash -eo pipefail`, python as a
                                          script), in order with the page's other `run`
                                          snippets, in one scratch directory per page
    <!-- doctest: run sub=/runs/x/hf=>tiny_policy -->
                                          ... after replacing a path of the text by a fixture
                                          that tests/test_docs.py builds (a tiny model, ...),
                                          or text by other text (sub=steps=500=>steps=5)
    <!-- doctest: save=my_task.py -->     write it to that file in the page's scratch directory
    <!-- doctest: flags -->               (bash default) parse the flags of every `python
                                          launch/*.py ...` / `python -m deepretrieval_jax...`
                                          command without running it; `python -c` code is
                                          compiled; a snippet with no such command must be marked
    <!-- doctest: compile -->             (python default) compile it and check that every name
                                          it imports from this project exists
    <!-- doctest: skip: REASON -->        nothing, with the reason shown in the test report

Scratch directories hold links to the repository's configs/ and launch/, so commands read as
in the docs (from the repository root).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
MODES = ("run", "save", "flags", "compile", "skip")
_FENCE = re.compile(r"^```(\w*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*doctest:\s*(.*?)\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Snippet:
    path: Path  # the markdown file
    line: int  # 1-based line of the opening fence
    language: str  # "bash" | "python"
    code: str
    mode: str  # one of MODES
    arg: str = ""  # the file name of `save`, the reason of `skip`
    subs: tuple[tuple[str, str], ...] = ()  # (text in the snippet, fixture name) for `run`

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _directive(text: str, where: str) -> tuple[str, str]:
    if text.startswith("skip"):
        reason = text[len("skip") :].lstrip(":").strip()
        if not reason:
            raise ValueError(f"{where}: a skipped snippet needs a reason (doctest: skip: WHY)")
        return "skip", reason
    if text.startswith("save="):
        return "save", text[len("save=") :].strip()
    if text in ("flags", "compile"):
        return text, ""
    if text.split()[0] == "run":
        subs = []
        for item in text.split()[1:]:
            old, sep, fixture = item.removeprefix("sub=").partition("=>")
            if not item.startswith("sub=") or not sep:
                raise ValueError(f"{where}: expected sub=TEXT=>FIXTURE, got {item!r}")
            subs.append((old, fixture))
        return "run", tuple(subs)
    raise ValueError(f"{where}: unknown doctest directive {text!r}; one of {MODES}")


def snippets(path: Path) -> list[Snippet]:
    """The snippets of one markdown file (other fenced blocks are not code to run)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        language = LANGUAGES.get(m.group(1).lower())
        if language:
            where = f"{path.relative_to(ROOT)}:{i + 1}"
            d = _DIRECTIVE.match(lines[i - 1]) if i else None
            if d:
                mode, arg = _directive(d.group(1), where)
            else:
                mode, arg = ("flags" if language == "bash" else "compile"), ""
            subs = arg if mode == "run" else ()
            arg = "" if mode == "run" else arg
            code = "\n".join(lines[i + 1 : end]) + "\n"
            out.append(Snippet(path, i + 1, language, code, mode, arg, subs))
        i = end + 1
    return out


def all_snippets() -> list[Snippet]:
    return [s for p in doc_files() for s in snippets(p)]


def commands(code: str) -> list[list[str]]:
    """Each simple command of a bash snippet as argv (continuations joined, comments dropped,
    pipelines and `&&` / `;` split; optional `[--flag=v]` brackets removed)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: a multi-line string, not a command line
            continue
        current: list[str] = []
        optional = False  # inside "[--flag value]"
        for t in [*tokens, "|"]:
            if t in ("|", "||", "&&", ";"):
                if current:
                    out.append(current)
                current = []
                continue
            if t.startswith("[--"):
                t, optional = t[1:], True
            if optional and t.endswith("]"):
                t, optional = t[:-1], False
            current.append(t)
    return out


def python_invocation(argv: list[str]) -> list[str] | None:
    """For a command that runs this project's Python (directly or through a launcher such as
    `bash launch/tpu_pod.sh launch/train.py ...`): the target and its arguments, i.e.
    ["launch/x.py", args...], ["-m", "module", args...] or ["-c", code]; else None."""
    for k, t in enumerate(argv):
        if t.startswith("launch/") and t.endswith(".py"):
            return argv[k:]
        if t in ("python", "python3") and k + 1 < len(argv):
            nxt = argv[k + 1]
            if nxt == "-m" and k + 2 < len(argv) and argv[k + 2].startswith("deepretrieval_jax"):
                return argv[k + 1 :]
            if nxt == "-c" and k + 2 < len(argv):
                return argv[k + 1 :]
            if nxt.endswith(".py"):
                return argv[k + 1 :]
    return None
