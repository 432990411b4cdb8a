"""A `jax.profiler` trace of a few train steps, written into `workdir/profile`.

`config.profile` selects the steps (`profile_settings` reads and checks it):

    config.profile = ml_collections.ConfigDict()
    config.profile.skip_steps = 5    # steps of this invocation before the trace (compilation, warm-up)
    config.profile.num_steps = 3     # steps traced; 0 turns profiling off (the default)
    config.profile.all_hosts = False # trace every process (one trace per host) or process 0 only

Steps are counted from the first step of this invocation, so a resumed run is profiled after its own
compilation too. The trace is TensorBoard's profile plugin layout
(`workdir/profile/plugins/profile/<run>/<host>.xplane.pb`): open it with
`tensorboard --logdir workdir/profile` (and `pip install tensorboard-plugin-profile`) or Perfetto.
A workdir that is not local (`gs://`): the profiler writes through its own C++ file API (TSL's, with
a GCS client of its own, not the path layer's backends), so the trace is written to a local
temporary folder and copied into `workdir/profile` with `paths.copy_tree` when it stops (then the
temporary folder is removed): one route to the bucket for every workdir file, with one set of
credentials, and testable on the path layer's in-memory bucket.
Each traced step is annotated with its global step number (`StepTraceAnnotation`), which the trace
viewer's step view reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax

from gmflow_jax.paths import copy_tree, is_local, join

PROFILE_DIR = "profile"
"""Subfolder of the workdir that receives the traces."""


@dataclasses.dataclass(frozen=True)
class ProfileSettings:
    """Which steps of an invocation to trace (see module doc)."""

    skip_steps: int = 5
    num_steps: int = 0
    all_hosts: bool = False

    def __post_init__(self):
        """Validate the fields, naming the bad one."""
        if not isinstance(self.skip_steps, int) or self.skip_steps < 0:
            raise ValueError(f"profile.skip_steps must be an int >= 0, got {self.skip_steps!r}")
        if not isinstance(self.num_steps, int) or self.num_steps < 0:
            raise ValueError(f"profile.num_steps must be an int >= 0, got {self.num_steps!r}")

    @property
    def enabled(self) -> bool:
        """Whether any step is traced."""
        return self.num_steps > 0


def profile_settings(section: Mapping[str, Any] | None) -> ProfileSettings:
    """`ProfileSettings` from a config's `profile` section (a mapping or ConfigDict; None: off)."""
    if section is None:
        return ProfileSettings()
    if hasattr(section, "to_dict"):  # an ml_collections.ConfigDict
        section = section.to_dict()
    allowed = {f.name for f in dataclasses.fields(ProfileSettings)}
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"config.profile has unknown fields {unknown}; allowed: {sorted(allowed)}")
    return ProfileSettings(**{k: section[k] for k in section})


class StepProfiler:
    """Starts a trace before step `first + skip_steps` and stops it after `num_steps` steps.

    Loop usage (`step` is the global index of the step about to run):

        profiler = StepProfiler(workdir, settings, first_step=start)
        for step in range(start, num_steps):
            with profiler.step(step):
                state, metrics = train_step(state, batch)
            profiler.after_step(step, metrics)   # syncs on metrics only when the trace ends
        profiler.close()                         # also in a `finally`

    `pause` is a context factory under which starting and stopping (writing) the trace run; the
    loop passes `Progress.paused` so that tracing overhead stays out of the step rate.
    """

    def __init__(
        self,
        workdir: str,
        settings: ProfileSettings,
        first_step: int,
        pause: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ):
        """Trace `settings.num_steps` steps from global step `first_step + settings.skip_steps`."""
        self.settings = settings
        self.pause = pause
        self.log_dir = join(workdir, PROFILE_DIR)
        self._staging: str | None = None  # local folder of a trace bound for a non-local workdir
        self.begin = first_step + settings.skip_steps
        self.end = self.begin + settings.num_steps  # exclusive
        self.active = False
        self.done = False
        self.traced_here = settings.enabled and (settings.all_hosts or jax.process_index() == 0)

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Run one step, starting the trace first when `step` is the first traced one."""
        if self.traced_here and not self.active and not self.done and step == self.begin:
            with self.pause():
                if not is_local(self.log_dir):
                    self._staging = tempfile.mkdtemp(prefix="gmflow_profile_")
                jax.profiler.start_trace(self._staging or self.log_dir)
            self.active = True
        if self.active:
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                yield
        else:
            yield

    def after_step(self, step: int, outputs: Any) -> None:
        """Stop the trace after the last traced step, once `outputs` are computed."""
        if self.active and step + 1 >= self.end:
            jax.block_until_ready(outputs)  # the trace must contain the device work
            self._stop()

    def close(self) -> None:
        """Stop a trace still running (the loop ended or raised inside the window)."""
        if self.active:
            self._stop()

    def _stop(self) -> None:
        with self.pause():
            try:
                jax.profiler.stop_trace()
                if self._staging is not None:
                    copy_tree(self._staging, self.log_dir)
            finally:
                if self._staging is not None:
                    shutil.rmtree(self._staging, ignore_errors=True)
                    self._staging = None
                self.active, self.done = False, True
