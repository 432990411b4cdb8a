"""`config.profile`: a jax.profiler trace of the chosen steps lands in workdir/profile."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from gmflow_jax.train.profiling import ProfileSettings, StepProfiler, profile_settings


def _run(workdir, settings, start, stop):
    step_fn = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((16, 16))
    profiler = StepProfiler(str(workdir), settings, first_step=start)
    started = []
    try:
        for step in range(start, stop):
            with profiler.step(step):
                started.append(profiler.active)
                x = step_fn(x)
            profiler.after_step(step, x)
    finally:
        profiler.close()
    return started


def test_the_window_counts_from_this_invocations_first_step(tmp_path):
    settings = profile_settings({"skip_steps": 2, "num_steps": 3})
    started = _run(tmp_path, settings, start=40, stop=50)
    assert started == [False, False, True, True, True, False, False, False, False, False]
    traces = glob.glob(os.path.join(tmp_path, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_profiling_is_off_by_default_and_writes_nothing(tmp_path):
    assert not profile_settings(None).enabled
    assert _run(tmp_path, profile_settings({}), 0, 5) == [False] * 5
    assert not os.path.exists(tmp_path / "profile")


def test_a_run_ending_inside_the_window_closes_the_trace(tmp_path):
    started = _run(tmp_path, ProfileSettings(skip_steps=1, num_steps=10), 0, 4)
    assert started == [False, True, True, True]
    assert glob.glob(os.path.join(tmp_path, "profile", "plugins", "profile", "*", "*.xplane.pb"))


def test_bad_profile_settings_are_named():
    with pytest.raises(ValueError, match="num_steps"):
        profile_settings({"num_steps": -1})
    with pytest.raises(ValueError, match="unknown fields \\['steps'\\]"):
        profile_settings({"steps": 3})
