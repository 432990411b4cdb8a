"""What the training loop needs from a data set: the `Task` protocol and the batch layout it reads for.

A task owns its data and its evaluation (the network comes from `config.model` through the one model
builder, `gmflow_jax.models.builder`). The loop calls exactly the methods declared here; the
implementations live in `gmflow_jax.tasks` and receive the run's keys (`run_keys`) when they are made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from gmflow_jax.parallel.sharding import batch_sharding

Batch = dict[str, Any]
"""One training batch: {"x0": [B, H, W, C], "labels": [B] (class-conditional tasks), ...}."""


def run_keys(seed: int) -> dict[str, jax.Array]:
    """Independent raw uint32 keys of a run: "init" (model), "train" (the step's noise, folded with
    the step), "data" (batches) and "eval" (evaluation noise)."""
    init, train, data, evaluation = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {"init": init, "train": train, "data": data, "eval": evaluation}


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Where the rows of every global batch live: the mesh, the global batch size, and the rows of
    the global batch that this process's devices hold (sorted; every row of the batch in a single
    process, possibly several blocks on a multi-host slice)."""

    mesh: Mesh
    global_batch_size: int
    rows: np.ndarray

    @property
    def sharding(self) -> NamedSharding:
        """The sharding of every batch array (first dimension over the mesh's batch axes)."""
        return batch_sharding(self.mesh)


class Task(Protocol):
    """The data-set specific side of a run (see the module docstring)."""

    def prepare_workdir(self, workdir: str) -> None:
        """Write the files a run needs before training (e.g. the pipeline's config.json)."""
        ...

    def data_iterator(self, layout: BatchLayout) -> Any | None:
        """A checkpointable iterator (grain) of this process's rows of every global batch, at step 0,
        whose state the loop saves with every checkpoint; None when batch s is a pure function of s
        (then `batches` is used)."""
        ...

    def batches(self, start_step: int, layout: BatchLayout) -> Iterator[Batch]:
        """Batches s = start_step, start_step + 1, ...: this process's rows (`layout.rows`) as numpy
        arrays, or global `jax.Array`s on `layout.sharding` when the batch is made on the devices."""
        ...

    def evaluate(
        self,
        workdir: str,
        graphdef: nnx.GraphDef,
        ema_params: Any,
        train_info: dict[str, Any],
    ) -> dict[str, Any]:
        """Evaluate the EMA parameters; write metrics.json and figures; return the payload."""
        ...

    def evaluate_during_training(
        self, workdir: str, graphdef: nnx.GraphDef, ema_params: Any, step: int
    ) -> tuple[dict[str, float], np.ndarray | None]:
        """A small evaluation of the EMA parameters after `step` steps (`config.eval.every_steps`):
        (scalars, logged as `eval/<name>`; one uint8 RGB image [H, W, 3] of samples, or None).

        Called on process 0 only, with parameters it can read in full; samples on that process's
        devices with the same noise at every call (so the curves show the model change), on a
        budget of `config.eval.periodic_samples`; writes no files except caches its evaluator needs.
        """
        ...
