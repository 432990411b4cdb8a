"""A run: the task of `config.data.name`, trained by the one loop, then evaluated.

`train_and_evaluate(config, workdir)` is what `python -m gmflow_jax.main` calls:

1. join the `jax.distributed` job (`parallel.distributed.start_distributed`) before anything touches a
   device;
2. make the task (`tasks.make_task`, which opens its data set, so missing data stop the run at once)
   with the run's keys (`train.task.run_keys`);
3. train or resume (`train.loop.train`);
4. evaluate the EMA parameters with the task's evaluation (`config.eval.enabled`), except after a
   preemption (the run exits 0 and resumes when rerun) and in a multi-process job (evaluate the
   checkpoint on one host).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from gmflow_jax import tasks
from gmflow_jax.parallel.distributed import start_distributed
from gmflow_jax.train.loop import train
from gmflow_jax.train.task import run_keys


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (resuming if possible), then evaluate; returns the evaluation payload (or {"train": info}
    when evaluation does not run)."""
    start_distributed(config)
    keys = run_keys(config.seed)
    task = tasks.make_task(config, keys)
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
