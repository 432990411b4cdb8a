"""The progress line: one step axis, compile time apart, pauses excluded, ETA from the same rate."""

import math

import pytest

from gmflow_jax.train.progress import Progress, format_duration


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_rate_excludes_compilation_and_pauses_and_eta_uses_it():
    clock = FakeClock()
    p = Progress(1000, 2000, batch_size=256, flops_per_step=5e14, peak_flops=1e15, clock=clock)
    clock.t += 40.0  # compilation + first step
    assert p.first_step_done(1001) == "compiled in 40.0s (compilation and the first step)"
    assert p.compile_seconds == pytest.approx(40.0)
    assert math.isnan(p.update(1001).steps_per_s)
    clock.t += 9.0  # steps 1002..1010: 9 steps in 9 s
    with p.paused():
        clock.t += 30.0  # an evaluation
    clock.t += 1.0  # steps 1011: one more second
    r = p.update(1010 + 1, {"loss": 0.12345})
    assert r.steps_per_s == pytest.approx(10 / 10.0)
    assert r.eta_s == pytest.approx((2000 - 1011) / 1.0)
    assert r.images_per_s == pytest.approx(256.0)
    assert r.mfu == pytest.approx(5e14 * 1.0 / 1e15)
    assert r.line == "step 1011/2000 | 1 steps/s | 256 img/s | MFU 50.0% | ETA 16m29s | loss 0.1235"


def test_a_pause_before_the_first_step_is_not_compile_time():
    clock = FakeClock()
    p = Progress(0, 10, clock=clock)
    with p.paused():
        clock.t += 5.0
    clock.t += 2.0
    p.first_step_done(1)
    assert p.compile_seconds == pytest.approx(2.0)
    with pytest.raises(ValueError, match="already called"):
        p.first_step_done(2)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="start_step"):
        Progress(11, 10)
    with pytest.raises(ValueError, match="batch_size"):
        Progress(0, 10, batch_size=0)


@pytest.mark.parametrize(
    "seconds,text",
    [(12.34, "12.3s"), (187, "3m07s"), (7500, "2h05m"), (93780, "1d02h03m"), (float("nan"), "?")],
)
def test_durations(seconds, text):
    assert format_duration(seconds) == text
