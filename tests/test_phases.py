"""rl/phases.py: device phase timings by completion fences on a background thread."""

import time

import jax
import jax.numpy as jnp

from deepretrieval_jax.rl.phases import PhaseTimer


def test_phases_are_timed_in_dispatch_order_and_summed_by_name():
    timer = PhaseTimer()
    f = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((64, 64))
    t0 = time.perf_counter()
    y = timer.run("a", f, x)
    z = timer.run("b", f, y)
    start = time.perf_counter()
    timer.mark("a", start, f(z))  # a repeated name adds up
    phases = timer.take()
    assert timer.take().seconds() == {}  # take() starts a new step
    seconds = phases.seconds()
    wall = time.perf_counter() - t0
    timer.close()
    assert list(seconds) == ["a", "b"]
    assert all(v >= 0.0 for v in seconds.values())
    assert sum(seconds.values()) <= wall  # phases do not overlap in the accounting


def test_step_phase_log_writes_step_one_then_a_mean_line_per_tenth(caplog, request):
    from absl import logging

    from deepretrieval_jax.rl.phases import StepPhaseLog

    # A test that parsed absl flags earlier in this worker leaves absl at WARNING.
    previous = logging.get_verbosity()
    logging.set_verbosity(logging.INFO)
    request.addfinalizer(lambda: logging.set_verbosity(previous))

    log = StepPhaseLog(num_steps=25)  # every 2 steps; step 1 compiles, so it has its own line
    times = {"time/generate_s": 1.0, "time/reward_wait_s": 0.5, "time/update_s": 2.0}
    lines = []
    with caplog.at_level("INFO"):
        for step in range(1, 26):
            lines.append(log.add(step, {**times, "time/step_s": float(step)}))
    written = [line for line in lines if line is not None]
    assert len(written) == 1 + 12 + 1  # step 1, steps 2, 4, ..., 24, and the last (25)
    assert written[0] == "step 1: generate 1.00 s, reward wait 0.50 s, update 2.00 s, step 1.00 s"
    assert written[1] == "step 2: generate 1.00 s, reward wait 0.50 s, update 2.00 s, step 2.00 s"
    assert written[2] == (
        "steps 3-4: generate 1.00 s, reward wait 0.50 s, update 2.00 s, step 3.50 s per step (mean)"
    )
    assert written[-1].startswith("step 25:")
    assert [r.getMessage() for r in caplog.records if r.getMessage() in written] == written

    resumed = StepPhaseLog(num_steps=20, start_step=10)  # a resumed run's first line
    assert resumed.add(11, times) is None
    assert resumed.add(12, times).startswith("steps 11-12:")
