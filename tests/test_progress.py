"""Console output: plain progress lines off a terminal, phase lines, quiet library logs."""

import io
import logging as py_logging
import math

import numpy as np
import pytest
from absl import logging

from deepretrieval_jax import metrics, progress


def test_line_progress_prints_no_frames_only_occasional_lines():
    out = io.StringIO()
    bar = progress.LineProgress(100, "train", unit="step", initial=20, interval_s=math.inf,
                                file=out)  # fmt: skip
    for _ in range(30):
        bar.update(1)
        bar.set_postfix({"reward/mean": "0.25"})
    assert out.getvalue() == ""  # the interval has not passed: nothing yet
    line = bar.line(now=bar._t0 + 15.0)  # 30 steps in 15 s: 50 more take 25 s
    assert line == "train: 50/100 step [15.0 s elapsed, ETA 25.0 s] reward/mean=0.25"
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("train: 50/100 step [")
        and "\r" not in out.getvalue()
    )
    every = progress.LineProgress(3, "x", interval_s=0.0, file=out)
    every.update(1)
    assert out.getvalue().splitlines()[-1].startswith("x: 1/3 it [")


def test_bar_is_tqdm_only_on_a_terminal():
    assert isinstance(progress.bar(5, "a", tty=False), progress.LineProgress)
    tty_bar = progress.bar(5, "a", tty=True)
    from tqdm import tqdm

    assert isinstance(tty_bar, tqdm)
    tty_bar.close()


def test_metrics_writer_off_a_terminal_ends_with_one_line_with_the_key_metric(tmp_path, capsys):
    w = metrics.MetricsWriter(tmp_path, total_steps=4, enabled=True, tensorboard=False, desc="sft")
    w.write(1, {"sft/loss": 2.5})
    w.write(2, {"sft/loss": 1.25})
    w.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.strip().splitlines()[-1].startswith("sft: 2/4 step [")
    assert err.strip().endswith("sft/loss=1.25")


def test_phase_lines_and_quiet_library_logs(tmp_path, caplog):
    from deepretrieval_jax.checkpoint import CheckpointManager

    def save():
        with CheckpointManager(tmp_path / "c", async_save=False) as mgr:
            mgr.save(mgr.latest_step() + 1 if mgr.latest_step() else 1, {"w": np.ones(2)})

    logging.set_verbosity(logging.INFO)
    progress.quiet_library_logs()
    try:
        with caplog.at_level(py_logging.INFO):
            with progress.phase("save"):
                save()
        quiet = [(r.pathname, r.getMessage()) for r in caplog.records]
        caplog.clear()
        progress.quiet_library_logs(False)
        with caplog.at_level(py_logging.INFO):
            save()
        loud = [r.pathname for r in caplog.records]
    finally:
        progress.quiet_library_logs(False)
    assert [m for _, m in quiet][0] == "save: start"
    assert [m for _, m in quiet][-1].startswith("save: done in ")
    assert all("orbax" not in path for path, _ in quiet), quiet
    assert any("orbax" in path for path in loud)  # --verbosity restores them


def test_eval_and_dense_indexing_show_progress(capsys):
    from deepretrieval_jax import eval as ev
    from deepretrieval_jax.data import tasks
    from deepretrieval_jax.data.records import Example
    from deepretrieval_jax.search.dense import DenseConfig, DenseIndex

    class Encoder:
        def __call__(self, texts):
            return np.eye(4, dtype=np.float32)[[len(t) % 4 for t in texts]]

    index = DenseIndex.build([(f"d{i}", "x" * i) for i in range(40)], DenseConfig(batch_size=1),
                             encoder=Encoder())  # fmt: skip
    assert index.embeddings.shape == (40, 4)

    class Backend:
        async def open(self):
            pass

        async def close(self):
            pass

        async def search(self, query, **opts):
            return ["d1"]

        def cache_params(self, **opts):
            return opts

    spec = tasks.get_task("scifact")
    exs = [Example(f"e{i}", {"claim": "c"}, ["d1"], {}) for i in range(3)]
    ev.asyncio.run(ev.run_queries(spec, exs, ["a", "b", None], Backend()))
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("dense index: encode: 40/40 doc [") for line in err), err
    assert any(line.startswith("eval: search: 2/2 query [") for line in err), err


@pytest.fixture(autouse=True)
def _restore_absl_verbosity():
    level = logging.get_verbosity()
    yield
    logging.set_verbosity(level)
