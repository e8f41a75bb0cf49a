"""Console output of long runs: progress bars, phase lines and quiet library logs.

- `bar(total, desc)`: a tqdm bar (key metrics as its postfix, ETA) when stderr is a terminal;
  otherwise plain lines, at most one every `interval_s` seconds plus one at the end, so a log
  file holds no carriage-return frames.
- `phase(name)`: one line when a phase starts and one when it ends, with its duration.
- `quiet_library_logs()`: records below WARNING from other libraries (orbax, jax, absl's own
  internals, tensorboardX, transformers, ...) are dropped; this package's INFO lines stay.
  `--verbosity=1` (or any explicit `--verbosity`) turns the filter off again.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import sys
import time
from collections.abc import Iterator, Mapping

from absl import logging

# Records from files under these directories are ours and pass at every level.
_OWN_DIRS = tuple(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
    for d in ("deepretrieval_jax", "launch", "benchmarks")
)
# Python loggers of libraries that log outside absl.
_LIBRARY_LOGGERS = ("jax", "orbax", "tensorboardX", "transformers", "sentence_transformers",
                    "httpx", "urllib3", "filelock", "etils", "fsspec")  # fmt: skip
DEFAULT_INTERVAL_S = 30.0


class _OwnInfoOnly(py_logging.Filter):
    """Keeps WARNING and above from everyone, lower levels only from this project's files."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or record.pathname.startswith(_OWN_DIRS)


_FILTER = _OwnInfoOnly()


def quiet_library_logs(quiet: bool = True) -> None:
    """Drops other libraries' INFO/DEBUG records (`quiet=False` restores them)."""
    handler = logging.get_absl_handler()
    absl_logger = py_logging.getLogger("absl")
    for target in (handler, absl_logger):
        if quiet:
            target.addFilter(_FILTER)
        else:
            target.removeFilter(_FILTER)
    for name in _LIBRARY_LOGGERS:
        py_logging.getLogger(name).setLevel(py_logging.WARNING if quiet else py_logging.NOTSET)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Logs `name: start` and `name: done in 12.3 s` (or `failed after ...`)."""
    t0 = time.perf_counter()
    logging.info("%s: start", name)
    try:
        yield
    except BaseException:
        logging.info("%s: failed after %s", name, _duration(time.perf_counter() - t0))
        raise
    logging.info("%s: done in %s", name, _duration(time.perf_counter() - t0))


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"


class LineProgress:
    """tqdm's interface (update, set_postfix, write, close, n) as occasional plain lines."""

    def __init__(self, total, desc="", unit="it", initial=0, interval_s=DEFAULT_INTERVAL_S,
                 file=None):  # fmt: skip
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval_s, self.file = interval_s, file or sys.stderr
        self._initial, self._t0 = initial, time.perf_counter()
        self._last_line = self._t0
        self._postfix: dict = {}
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last_line >= self.interval_s:
            self._emit(now)

    def set_postfix(self, values: Mapping | None = None, refresh: bool = True, **kw) -> None:
        self._postfix = {**(values or {}), **kw}

    def write(self, message: str) -> None:
        print(message, file=self.file, flush=True)

    def line(self, now: float | None = None) -> str:
        """`desc: 40/100 step [0:12 elapsed, ETA 0:18] k=v ...`"""
        now = time.perf_counter() if now is None else now
        elapsed = now - self._t0
        done = self.n - self._initial
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        timing = f"{_duration(elapsed)} elapsed"
        if self.total and done > 0:
            timing += f", ETA {_duration(elapsed / done * max(0, self.total - self.n))}"
        post = " ".join(f"{k}={v}" for k, v in self._postfix.items())
        return f"{self.desc + ': ' if self.desc else ''}{count} {self.unit} [{timing}] {post}"

    def _emit(self, now: float) -> None:
        self._last_line = now
        self.write(self.line(now).rstrip())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit(time.perf_counter())


def bar(total: int | None, desc: str = "", unit: str = "it", initial: int = 0, tty=None):
    """A progress bar: tqdm on a terminal, `LineProgress` otherwise (`tty` overrides)."""
    tty = sys.stderr.isatty() if tty is None else tty
    if not tty:
        return LineProgress(total, desc, unit, initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc or None, unit=unit, dynamic_ncols=True)
