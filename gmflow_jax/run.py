"""A run: the task of `config.data.name`, trained by the one loop, then evaluated.

`train_and_evaluate(config, workdir)` is what `python -m gmflow_jax.main` calls:

1. check the whole config (`config_validation.validate_config`: every bad value refused with a
   one-line error naming the field, before any work), then join the `jax.distributed` job
   (`parallel.distributed.start_distributed`) before anything touches a device;
2. make the task (`tasks.make_task`, which opens its data set, so missing data stop the run at once)
   with the run's keys (`train.task.run_keys`);
3. take the workdir's lock (`workdir_lock.WorkdirLock`, process 0, local filesystems): a second run
   on the same workdir is refused, naming the holder;
4. train or resume (`train.loop.train`);
5. evaluate the EMA parameters with the task's evaluation (`config.eval.enabled`), except after a
   preemption (the run exits 0 and resumes when rerun) and in a multi-process job (evaluate the
   checkpoint on one host).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import ml_collections
from absl import logging

from gmflow_jax import tasks
from gmflow_jax.config_validation import validate_config
from gmflow_jax.parallel.distributed import start_distributed
from gmflow_jax.paths import is_local
from gmflow_jax.train.loop import train
from gmflow_jax.train.task import run_keys
from gmflow_jax.workdir_lock import WorkdirLock


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (resuming if possible), then evaluate; returns the evaluation payload (or {"train": info}
    when evaluation does not run)."""
    validate_config(config)
    start_distributed(config)
    keys = run_keys(config.seed)
    # The task opens its data set before the workdir is touched: missing data stop the run first.
    task = tasks.make_task(config, keys)
    with _workdir_lock(workdir):
        return _train_and_evaluate(config, workdir, task, keys)


def _workdir_lock(workdir: str) -> contextlib.AbstractContextManager[Any]:
    """The workdir's exclusive lock on process 0 of a job with a local workdir, else no lock.

    Why not on object stores: a lock needs an atomic create-if-absent, which `gs://` through the
    path layer does not offer; a run there relies on the launcher starting one job per workdir.
    """
    if jax.process_index() != 0:
        return contextlib.nullcontext()
    if not is_local(workdir):
        logging.warning(
            "workdir %s is not on a local filesystem: no workdir lock is taken", workdir
        )
        return contextlib.nullcontext()
    return WorkdirLock(workdir)


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, task: tasks.Task, keys: dict[str, jax.Array]
) -> dict[str, Any]:
    graphdef, state, info = train(config, workdir, task, keys)
    print(
        f"training: steps {info['start_step']}->{info['steps']} in {info['wall_time_s']:.1f} s"
        + (f", {info['it_per_s']:.2f} it/s" if "it_per_s" in info else " (already finished)"),
        flush=True,
    )
    if info["preempted"]:
        print(f"preempted: checkpointed step {int(state.step)}; rerun to resume", flush=True)
        return {"train": info}
    if jax.process_count() > 1:
        print("multi-process run: evaluation skipped (evaluate the checkpoint on one host)")
        return {"train": info}
    if not config.eval.enabled:
        return {"train": info}
    return task.evaluate(workdir, graphdef, state.ema_params, info)
