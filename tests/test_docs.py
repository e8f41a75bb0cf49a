"""Docs as tests: every shell and Python snippet of README.md and docs/*.md (tests/doc_snippets.py).

`run` snippets run as written (at tiny sizes: the docs give tiny commands where a page shows a
workflow end to end); `flags` snippets have the flags of each of their commands parsed (the
config file loaded with every override); `compile` snippets are compiled with their project
imports checked; `skip` snippets show their reason. A new snippet is covered by default.
"""

import ast
import importlib
import os
import subprocess
import sys

import pytest
from doc_snippets import ROOT, all_snippets, commands, python_invocation

SNIPPETS = all_snippets()
CHECK_ARGS = ROOT / "tests" / "doc_check_args.py"
RUN_PAGES = sorted({s.path for s in SNIPPETS if s.mode in ("run", "save")})


def _tiny_corpus(path):
    from tiny_models import write_tiny_scifact

    return write_tiny_scifact(path) / "scifact"


def _tiny_policy(path):
    from tiny_models import save_tiny_policy

    return save_tiny_policy(path)


def _tiny_data(path):
    from tiny_models import write_tiny_scifact

    return write_tiny_scifact(path)


def _tiny_demo_workdir(path):
    """The main job's workdir as serving reads it: config.json (configs/demo.py's resolved
    config, with its prompt protocol) and hf/ (here a tiny random policy)."""
    from tiny_models import save_tiny_policy

    from configs import demo
    from deepretrieval_jax import runtime

    runtime.write_run_config(demo.get_config(), str(path), "deepretrieval_jax.demo:run")
    save_tiny_policy(path / "hf")
    return path


# Stand-ins for the big paths of the docs, for `run sub=PATH=>NAME` snippets.
FIXTURES = {"tiny_corpus": _tiny_corpus, "tiny_data": _tiny_data, "tiny_policy": _tiny_policy,
            "tiny_demo_workdir": _tiny_demo_workdir}  # fmt: skip


def _env():
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "JAX_PLATFORMS": "cpu"}


def _check_imports(code: str, where: str) -> None:
    """Every `from deepretrieval_jax... import name` / `from configs import name` resolves."""
    for node in ast.walk(ast.parse(code, where)):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] not in ("deepretrieval_jax", "configs"):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    importlib.import_module(f"{node.module}.{alias.name}")  # a submodule
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("deepretrieval_jax", "configs"):
                    importlib.import_module(alias.name)


def _flags_ok(argv: list[str], where: str) -> None:
    if argv[0] == "-c":
        _check_imports(argv[1], where)
        return
    out = subprocess.run(
        [sys.executable, str(CHECK_ARGS), *argv], cwd=ROOT, env=_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, f"{where}: {' '.join(argv)}\n{out.stderr[-3000:]}"


@pytest.mark.parametrize(
    "snippet", [s for s in SNIPPETS if s.mode in ("flags", "compile", "skip")], ids=lambda s: s.id
)
def test_snippet(snippet):
    if snippet.mode == "skip":
        pytest.skip(snippet.arg)
    if snippet.mode == "compile":
        sys.path.insert(0, str(ROOT))  # `from configs import ...` as from the repository root
        try:
            _check_imports(snippet.code, snippet.id)
        finally:
            sys.path.remove(str(ROOT))
        return
    checked = 0
    for argv in commands(snippet.code):
        target = python_invocation(argv)
        if target is None or "..." in target or any(t.startswith("<") for t in target):
            continue  # not this project's Python, or a placeholder the reader fills in
        _flags_ok(target, snippet.id)
        checked += 1
    assert checked, f"{snippet.id}: no command to check; mark it (<!-- doctest: skip: why -->)"


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs(page, tmp_path):
    for name in ("configs", "launch"):
        (tmp_path / name).symlink_to(ROOT / name)
    for s in (s for s in SNIPPETS if s.path == page and s.mode in ("run", "save")):
        if s.mode == "save":
            (tmp_path / s.arg).write_text(s.code)
            continue
        code = s.code
        for old, fixture in s.subs:
            assert old in code, f"{s.id}: {old!r} is not in the snippet"
            if fixture in FIXTURES:
                new = str(FIXTURES[fixture](tmp_path / f"fixture_{fixture}"))
            else:  # a literal: a tiny size for a big one
                new = fixture
            code = code.replace(old, new)
        script = tmp_path / f"snippet_{s.line}.{'sh' if s.language == 'bash' else 'py'}"
        script.write_text(code)
        cmd = ["bash", "-eo", "pipefail", str(script)] if s.language == "bash" else [
            sys.executable, str(script)]  # fmt: skip
        out = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                             timeout=600)  # fmt: skip
        assert out.returncode == 0, f"{s.id} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def test_directives_parse_and_every_page_has_snippets_covered():
    modes = {s.mode for s in SNIPPETS}
    assert modes <= {"run", "save", "flags", "compile", "skip"}
    assert RUN_PAGES, "at least one page runs end to end"


def test_the_harness_catches_rot(tmp_path):
    from doc_snippets import snippets

    page = ROOT / "docs" / "_harness_probe.md"
    page.write_text(
        "<!-- doctest: skip: shown only -->\n```bash\nrm -rf /\n```\n\n"
        "```bash\npython launch/eval.py --config=configs/eval_scifact.py --workdir=/w \\\n"
        "    [--config.eval.batch_size=4] [--config.data.taks=x]   # a typo\n```\n"
    )
    try:
        skipped, flagged = snippets(page)
    finally:
        page.unlink()
    assert (skipped.mode, skipped.arg, flagged.mode) == ("skip", "shown only", "flags")
    (argv,) = commands(flagged.code)
    assert argv[-2:] == ["--config.eval.batch_size=4", "--config.data.taks=x"]
    with pytest.raises(AssertionError, match="config.data has no field 'taks'"):
        _flags_ok(python_invocation(argv), "probe")
    _flags_ok(python_invocation(argv[:-1]), "probe")
    with pytest.raises(ImportError, match="no_such_module"):
        _flags_ok(["-c", "from deepretrieval_jax import no_such_module"], "probe")
