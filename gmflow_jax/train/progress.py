"""One progress line for a training run: steps/s, ETA, and the compile time reported once.

The loop counts every rate on one axis, global train steps, and keeps compilation out of it:

* `Progress.first_step_done(step)` is called once, after the first step of this invocation has
  finished on the device (the loop syncs on it once): the time since `Progress` was built is the
  compile time (plus that one step), reported once in `compile_line`;
* `Progress.update(step, metrics)` at each log point (the loop has just synced on the metrics)
  gives steps/s over the steps since the first one, the ETA of the remaining steps at that rate,
  images/s and MFU when the step's size and FLOPs are known;
* time spent inside `with progress.paused():` (evaluation, a forced checkpoint) is taken out of the
  rate, so a periodic evaluation does not make the steps look slower.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping


def format_duration(seconds: float) -> str:
    """`seconds` as "1d02h03m", "2h05m", "3m07s" or "12.3s" ("?" when not finite)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s:02d}s"


@dataclasses.dataclass(frozen=True)
class ProgressReport:
    """One log point: the figures and the line that prints them."""

    step: int
    """Global steps done."""
    steps_per_s: float
    """Steps per second since the first step of this invocation (pauses excluded); nan before."""
    eta_s: float
    """Seconds to `total_steps` at that rate (nan when unknown)."""
    images_per_s: float | None
    """steps_per_s x global batch, when the batch size is known."""
    mfu: float | None
    """Model FLOPs utilization, when the FLOPs per step and the peak are known."""
    line: str
    """"step 1200/200000 | 3.41 steps/s | 13,967 img/s | MFU 41.2% | ETA 16h10m | loss 0.1234"."""


class Progress:
    """Rates and ETA of a run on the global-step axis, compile time kept apart (see module doc)."""

    def __init__(
        self,
        start_step: int,
        total_steps: int,
        *,
        batch_size: int | None = None,
        flops_per_step: float | None = None,
        peak_flops: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        """Start timing now: `start_step` is the first step this invocation runs."""
        if not 0 <= start_step <= total_steps:
            raise ValueError(
                f"start_step must be in [0, total_steps={total_steps}], got {start_step}"
            )
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.start_step = start_step
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
        self._clock = clock
        self._t0 = clock()
        self._paused = 0.0
        self.compile_seconds: float | None = None
        self._first_step: int | None = None
        self._first_time = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside this block does not count toward the step rate."""
        t = self._clock()
        try:
            yield
        finally:
            self._paused += self._clock() - t

    def first_step_done(self, step: int) -> str:
        """Mark the first step of this invocation finished (`step` steps done); the compile line."""
        if self._first_step is not None:
            raise ValueError(f"first_step_done was already called (at step {self._first_step})")
        now = self._clock()
        self.compile_seconds = now - self._t0 - self._paused
        self._first_step, self._first_time, self._paused = step, now, 0.0
        return self.compile_line()

    def compile_line(self) -> str:
        """ "compiled in 41.3s (compilation and the first step)", or "" before `first_step_done`."""
        if self.compile_seconds is None:
            return ""
        return (
            f"compiled in {format_duration(self.compile_seconds)} (compilation and the first step)"
        )

    def steps_per_s(self, step: int) -> float:
        """Steps per second from the first step to `step` (pauses excluded); nan when not yet known."""
        if self._first_step is None or step <= self._first_step:
            return float("nan")
        elapsed = self._clock() - self._first_time - self._paused
        return (step - self._first_step) / elapsed if elapsed > 0 else float("nan")

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> ProgressReport:
        """The report at `step` steps done, with `metrics` (e.g. loss) appended to the line."""
        rate = self.steps_per_s(step)
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        images = rate * self.batch_size if self.batch_size and math.isfinite(rate) else None
        mfu = None
        if self.flops_per_step and self.peak_flops and math.isfinite(rate) and rate > 0:
            mfu = self.flops_per_step * rate / self.peak_flops
        parts = [f"step {step}/{self.total_steps}"]
        parts.append(f"{rate:.3g} steps/s" if math.isfinite(rate) else "- steps/s")
        if images is not None:
            parts.append(f"{images:,.0f} img/s")
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        parts.append(f"ETA {format_duration(eta)}")
        for name, value in (metrics or {}).items():
            parts.append(f"{name} {value:.4g}")
        return ProgressReport(step, rate, eta, images, mfu, " | ".join(parts))
