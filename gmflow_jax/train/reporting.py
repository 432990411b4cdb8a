"""Host-side bookkeeping of the training loop, in one place: metric history, finiteness, TensorBoard,
the progress bar, and the workdir's `train_log.json`.

The loop hands every step's metrics (device scalars) to `TrainReporter.add`; they stay on the device
until the next logging step (every `log_every` steps and the last one), which is the loop's only host
sync: the pending metrics are fetched in one `device_get`, checked (`check_finite_metrics`), written to
TensorBoard and shown on the bar. Only process 0 writes files and draws the bar.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm

from gmflow_jax.atomic_file import write_json_atomic

LOGGED_METRICS = ("loss", "lr", "grad_norm", "skipped", "loss_trans", "loss_spec")
"""Train-step metrics written to TensorBoard (those the step returns)."""

TRAIN_LOG_FILE = "train_log.json"
"""Per-invocation training records (steps, wall time, it/s) kept in the workdir across resumes."""


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
    """The training sessions recorded in the workdir (empty if none)."""
    path = os.path.join(workdir, TRAIN_LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["sessions"]


def record_session(workdir: str, session: dict[str, Any], write: bool) -> list[dict[str, Any]]:
    """Append one invocation's record to `train_log.json` (atomically, when `write`); returns all."""
    sessions = [*read_train_log(workdir), session]
    if write:
        write_json_atomic(os.path.join(workdir, TRAIN_LOG_FILE), {"sessions": sessions})
    return sessions


class TrainReporter:
    """Pending step metrics, their periodic host sync, TensorBoard scalars and the progress bar."""

    def __init__(self, workdir: str, start: int, num_steps: int, log_every: int, lead: bool):
        """Open TensorBoard (`workdir/tensorboard`) and the bar on the lead process."""
        self.num_steps = num_steps
        self.log_every = max(1, log_every)
        self.start = start
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if lead else None
        self.bar = tqdm(
            total=num_steps, initial=start, desc="train", unit="it", dynamic_ncols=True,
            disable=not lead,
        )  # fmt: skip
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.last_time, self.last_step = time.perf_counter(), start
        self.steady: list[tuple[int, float]] = []
        self.final_loss = float("nan")

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Record step `step`'s metrics; at a logging step fetch, check and log everything pending."""
        self.pending.append((step, metrics))
        done = step + 1
        if done % self.log_every == 0 or done == self.num_steps:
            self.flush(done)

    def flush(self, done: int) -> None:
        """Fetch the pending metrics (one host sync), check them, log them; `done` steps are done."""
        if not self.pending:
            return
        history = [
            (s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(self.pending)
        ]
        self.pending.clear()
        check_finite_metrics(history)
        now = time.perf_counter()
        rate = (done - self.last_step) / max(now - self.last_time, 1e-9)
        if self.last_step != self.start:  # the first interval includes compilation
            self.steady.append((done - self.last_step, now - self.last_time))
        self.last_time, self.last_step = now, done
        self.final_loss = history[-1][1]["loss"]
        if self.writer is not None:
            for s, m in history:
                for name in LOGGED_METRICS:
                    if name in m:
                        self.writer.add_scalar(f"train/{name}", m[name], s)
            self.writer.add_scalar("train/it_per_s", rate, done)
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix(loss=f"{self.final_loss:.4f}", it_s=f"{rate:.1f}")

    @property
    def it_per_s(self) -> float:
        """Steady-state steps per second (the first logging interval, which compiles, excluded)."""
        steps, secs = sum(n for n, _ in self.steady), sum(t for _, t in self.steady)
        return steps / secs if secs > 0 else float("nan")

    def close(self) -> None:
        """Close the bar and TensorBoard."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
