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
