"""Host-side bookkeeping of the training loop, in one place: metric history, finiteness, the progress
line, TensorBoard, and the workdir's `train_log.json`.

The loop hands every step's metrics (device scalars) to `TrainReporter.add`; they stay on the device
until the next logging step (every `log_every` steps and the last one), which is the loop's only
periodic host sync: the pending metrics are fetched in one `device_get`, checked
(`check_finite_metrics`), written to TensorBoard and summarized in one progress line
(`progress.Progress`: steps/s on the global-step axis, images/s, MFU when known, ETA). The first step
of an invocation is synced once more: the time up to its end is the compile time, reported once
("compiled in ...", `train/compile_s`) and kept out of every rate, as is time spent inside
`reporter.paused()` (periodic evaluation, tracing, forced checkpoints).

TensorBoard (`workdir/tensorboard`, local or `gs://`: `event_files.summary_writer`): the resolved config as text and hyper-parameters
(`summaries.write_config`), `train/<metric>` per step, `train/steps_per_s`, `train/images_per_s`,
`train/mfu` (when the FLOPs and the peak are known), `train/compile_s`, and `eval/<metric>` scalars
plus the `eval/samples` image of the periodic evaluation. Only process 0 writes files and prints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from gmflow_jax.atomic_file import read_json_or_set_aside, set_aside, write_json_atomic
from gmflow_jax.paths import join
from gmflow_jax.train.event_files import summary_writer
from gmflow_jax.train.health import DEFAULT_MAX_CONSECUTIVE_SKIPS, SkipCounter
from gmflow_jax.train.progress import Progress, ProgressReport
from gmflow_jax.train.summaries import write_config, write_scalars

LOGGED_METRICS = ("loss", "lr", "grad_norm", "skipped", "loss_trans", "loss_spec")
"""Train-step metrics written to TensorBoard (those the step returns)."""

TRAIN_LOG_FILE = "train_log.json"
"""Per-invocation training records (steps, wall time, steps/s, compile time, MFU) kept in the workdir
across resumes."""


def check_finite_metrics(history: Sequence[tuple[int, dict[str, float]]]) -> None:
    """Raise FloatingPointError naming the first step whose loss or grad_norm is non-finite.

    `history` holds (0-based step, host metrics). Steps whose update was skipped (`skipped` = 1, the
    non-finite-gradient skip of §4.6) are allowed a non-finite loss and grad norm.
    """
    for step, metrics in history:
        if metrics.get("skipped", 0.0) > 0:
            continue
        for name in ("loss", "grad_norm"):
            value = metrics.get(name)
            if value is not None and not math.isfinite(value):
                raise FloatingPointError(
                    f"non-finite {name} = {value} at training step {step} (0-based) and the update "
                    "was applied; lower the learning rate, or enable optimizer.skip_nonfinite / "
                    "grad_clip_norm"
                )


def read_train_log(workdir: str) -> list[dict[str, Any]]:
    """The training sessions recorded in the workdir (empty if none; a damaged log is set aside
    with a warning and started anew, so it never blocks the workdir)."""
    path = join(workdir, TRAIN_LOG_FILE)
    record = read_json_or_set_aside(path, {"sessions": []})
    sessions = record.get("sessions") if isinstance(record, dict) else None
    if not isinstance(sessions, list):
        set_aside(path, "no 'sessions' list")
        return []
    return sessions


def record_session(workdir: str, session: dict[str, Any], write: bool) -> list[dict[str, Any]]:
    """Append one invocation's record to `train_log.json` (atomically, when `write`); returns all."""
    sessions = [*read_train_log(workdir), session]
    if write:
        write_json_atomic(join(workdir, TRAIN_LOG_FILE), {"sessions": sessions})
    return sessions


class TrainReporter:
    """Pending step metrics, their periodic host sync, the progress line, TensorBoard (module doc)."""

    def __init__(
        self,
        workdir: str,
        config: Any,
        start: int,
        num_steps: int,
        log_every: int,
        lead: bool,
        *,
        batch_size: int | None = None,
        flops_per_step: float | None = None,
        peak_flops: float | None = None,
        max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ):
        """Open TensorBoard (`workdir/tensorboard`) on the lead process, write `config` there, and
        start the clock (`start` is the first step this invocation runs).

        `flops_per_step` (model FLOPs of one global step) and `peak_flops` (summed peak of the
        job's devices) give MFU; either None: no MFU. More than `max_consecutive_skips` skipped
        steps in a row (non-finite gradients) stop the run (`health.TooManySkippedStepsError`).
        """
        self.num_steps = num_steps
        self.log_every = max(1, log_every)
        self.start = start
        self.lead = lead
        self.writer = summary_writer(join(workdir, "tensorboard")) if lead else None
        if self.writer is not None:
            write_config(self.writer, config, metric_tags=("train/loss",), step=start)
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.final_loss = float("nan")
        self.last_report: ProgressReport | None = None
        self.skips = SkipCounter(max_consecutive_skips)
        # Last: the clock starts here, so opening TensorBoard is not part of the compile time.
        self.progress = Progress(
            start,
            num_steps,
            batch_size=batch_size,
            flops_per_step=flops_per_step,
            peak_flops=peak_flops,
        )

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """A block whose time counts neither as compile time nor toward the step rate."""
        return self.progress.paused()

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Record step `step`'s metrics; after the invocation's first step, sync once and report
        the compile time; at a logging step fetch, check and log everything pending."""
        self.pending.append((step, metrics))
        done = step + 1
        if step == self.start:
            jax.block_until_ready(metrics)  # once: the compile time ends with the first step
            line = self.progress.first_step_done(done)
            self._print(line)
            if self.writer is not None:
                self.writer.add_scalar("train/compile_s", self.progress.compile_seconds, done)
        if done % self.log_every == 0 or done == self.num_steps:
            self.flush(done)

    def flush(self, done: int) -> None:
        """Fetch the pending metrics (one host sync), check them, count skipped steps, log them;
        `done` steps are done."""
        if not self.pending:
            return
        history = [
            (s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(self.pending)
        ]
        self.pending.clear()
        check_finite_metrics(history)
        skipped = self.skips.update(history)
        self.final_loss = history[-1][1]["loss"]
        report = self.progress.update(done, {"loss": self.final_loss})
        if math.isfinite(report.steps_per_s):
            self.last_report = report
        self._print(report.line)
        if skipped:
            self._print(
                f"{skipped} step(s) skipped for non-finite gradients since the last report, "
                f"{self.skips.total} in this invocation"
            )
        if self.writer is not None:
            for s, m in history:
                for name in LOGGED_METRICS:
                    if name in m:
                        self.writer.add_scalar(f"train/{name}", m[name], s)
            self.writer.add_scalar("train/skipped_steps_total", self.skips.total, done)
            if math.isfinite(report.steps_per_s):
                rates = {"steps_per_s": report.steps_per_s}
                if report.images_per_s is not None:
                    rates["images_per_s"] = report.images_per_s
                if report.mfu is not None:
                    rates["mfu"] = report.mfu
                write_scalars(self.writer, "train", rates, done)

    def write_eval(self, done: int, scalars: Mapping[str, float], image: np.ndarray | None) -> None:
        """Log a periodic evaluation after `done` steps: `eval/<name>` scalars (non-finite ones
        are named in a warning, not written), the `eval/samples` image (uint8 [H, W, 3]), and one
        printed line."""
        shown = " | ".join(f"{k} {float(v):.4g}" for k, v in scalars.items())
        self._print(f"eval @ step {done}: {shown}")
        if self.writer is None:
            return
        write_scalars(self.writer, "eval", scalars, done)
        if image is not None:
            self.writer.add_image("eval/samples", np.asarray(image), done, dataformats="HWC")
        self.writer.flush()

    @property
    def compile_s(self) -> float | None:
        """Seconds from the reporter's start to the end of the first step (None before it)."""
        return self.progress.compile_seconds

    @property
    def it_per_s(self) -> float:
        """Steady-state steps per second at the last logging step: from the end of the first
        step (compilation excluded), pauses excluded; nan when fewer than two steps ran."""
        return self.last_report.steps_per_s if self.last_report else float("nan")

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilization at that rate (None when the FLOPs or the peak are unknown)."""
        return self.last_report.mfu if self.last_report else None

    def _print(self, line: str) -> None:
        """Print on the lead process."""
        if self.lead and line:
            print(line, flush=True)

    def close(self) -> None:
        """Close TensorBoard."""
        if self.writer is not None:
            self.writer.close()
