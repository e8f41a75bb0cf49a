"""Device time of asynchronously dispatched phases, measured without blocking the caller.

The trainer dispatches jitted calls back to back and overlaps them with host work (reward
requests); a `jax.block_until_ready` after each call would serialise that overlap away. Instead
`PhaseTimer.run(name, fn, *args)` stamps the host time just before dispatching `fn` and hands its
outputs to one background thread, which waits for them in dispatch order and stamps each
completion. A phase's time is then

    done_i - max(done_{i-1}, start_i)

(the device runs a step's phases in dispatch order, so phase i starts when both it was dispatched
and phase i - 1 finished). It includes dispatch (and compilation on a first call) and any device
work queued before it that is not itself a phase. Where a backend runs independent calls
concurrently (the CPU client may), overlapping phases share their time.

Invariants: one waiting thread; nothing blocks the caller until `Phases.seconds()`; never mark
outputs that a later call donates (waiting on a deleted buffer raises).

`StepPhaseLog` turns the per-step timers into a few console lines: one for step 1 (which
compiles), then one per tenth of the run with the mean seconds of each phase over its steps.
"""

from __future__ import annotations

import concurrent.futures
import time

import jax
from absl import logging


def _wait(outputs) -> float:
    jax.block_until_ready(outputs)
    return time.perf_counter()


class Phases:
    """One step's phases: `seconds()` waits for them and returns {name: seconds}."""

    def __init__(self, marks):
        self._marks = marks  # [(name, host time before dispatch, future of completion time)]

    def seconds(self) -> dict[str, float]:
        out, prev_done = {}, float("-inf")
        for name, start, done in self._marks:
            done = done.result()
            out[name] = out.get(name, 0.0) + max(done - max(prev_done, start), 0.0)
            prev_done = max(prev_done, done)
        return out


class PhaseTimer:
    """Times dispatched jitted calls by completion fences on a background thread."""

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="phase-timer")
        self._marks = []

    def run(self, name: str, fn, *args, **kwargs):
        """Dispatches `fn(*args, **kwargs)`, marks its outputs as phase `name`, returns them."""
        start = time.perf_counter()
        outputs = fn(*args, **kwargs)
        self.mark(name, start, outputs)
        return outputs

    def mark(self, name: str, start: float, outputs) -> None:
        """Phase `name`, dispatched at host time `start`, is done when `outputs` are ready."""
        self._marks.append((name, start, self._pool.submit(_wait, outputs)))

    def take(self) -> Phases:
        """The phases marked since the last `take` (a step's), to resolve later."""
        marks, self._marks = self._marks, []
        return Phases(marks)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# Per-step phases of the PPO loop in the order they run: (metric key, name in the log line).
STEP_PHASES = (
    ("time/generate_s", "generate"),
    ("time/reward_wait_s", "reward wait"),
    ("time/update_s", "update"),
    ("time/step_s", "step"),
)


class StepPhaseLog:
    """Logs the loop's phase times at INFO: step 1, then every `num_steps // 10` steps (and the
    last), each line the mean per step since the previous line."""

    def __init__(self, num_steps: int, start_step: int = 0, lines: int = 10):
        self.num_steps, self.every = num_steps, max(1, num_steps // lines)
        self._first, self._sums = start_step + 1, {}

    def add(self, step: int, values: dict) -> str | None:
        """Adds step `step`'s metrics; returns (and logs) the line when one is due."""
        for key, _ in STEP_PHASES:
            if values.get(key) is not None:
                self._sums[key] = self._sums.get(key, 0.0) + float(values[key])
        if not (step == 1 or step % self.every == 0 or step == self.num_steps):
            return None
        n = step - self._first + 1
        parts = [f"{name} {self._sums[key] / n:.2f} s" for key, name in STEP_PHASES
                 if key in self._sums]  # fmt: skip
        steps = f"step {step}" if n == 1 else f"steps {self._first}-{step}"
        line = f"{steps}: {', '.join(parts)}" + (" per step (mean)" if n > 1 else "")
        logging.info("%s", line)
        self._first, self._sums = step + 1, {}
        return line
