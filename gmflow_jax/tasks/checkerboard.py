"""The checkerboard task (configs/checkerboard.py): 2-D checkerboard points, evaluated with exact
histogram metrics (`docs/math.md` §4.8, §4.9, §7).

Batch s is `checkerboard_batch(fold_in(data key, s))`, made on the devices directly in the batch's
sharding (one jitted program; no host round trip), so every process of a job computes its shards of
the same global batch. The network is the §6.4 toy MLP of `config.model` (built by the loop through
`models.builder`). Evaluation: with the EMA parameters, every (solver row, NFE) of `config.sample`
(GMFlow rows for a GM model, baseline rows for a mean-only model) draws `eval.num_samples` points (the
same noise for every row), scored by `eval.checkerboard.checkerboard_metrics`; written to the workdir:
`metrics.json` (atomic), a PNG histogram grid (rows = solver, columns = NFE), and a printed table with
the exact-sample floor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gmflow_jax.data.checkerboard import checkerboard_batch
from gmflow_jax.eval.checkerboard_sweep import evaluate_checkerboard
from gmflow_jax.models.denoiser import network_functions
from gmflow_jax.train.task import Batch, BatchLayout

Array = jax.Array
PyTree = Any

class CheckerboardTask:
    """2-D checkerboard points and the checkerboard evaluation (`train.task.Task`)."""

    def __init__(self, config: ml_collections.ConfigDict, keys: dict[str, Array]):
        """Hold the run config and keys (the checkerboard has no data to open)."""
        self.config = config
        self.keys = keys

    def prepare_workdir(self, workdir: str) -> None:
        """Nothing to prepare."""

    def data_iterator(self, layout: BatchLayout) -> None:
        """None: batch s is a pure function of (data key, s)."""
        return None

    def batches(self, start_step: int, layout: BatchLayout) -> Iterator[Batch]:
        """Batch s = checkerboard points [B, 1, 1, 2] from fold_in(data key, s), s >= start_step,
        as a global array on `layout.sharding`."""
        make = jax.jit(checkerboard_batch, static_argnums=2, out_shardings=layout.sharding)
        step = start_step
        while True:
            yield {"x0": make(self.keys["data"], jnp.int32(step), layout.global_batch_size)}
            step += 1

    def evaluate(
        self,
        workdir: str,
        graphdef: nnx.GraphDef,
        ema_params: PyTree,
        train_info: dict[str, Any],
    ) -> dict[str, Any]:
        """`eval.checkerboard_sweep.evaluate_checkerboard`: every (row, NFE) with the EMA params,
        metrics.json, the PNG grid and the printed table (returned under "table")."""
        denoiser, _ = network_functions(nnx.merge(graphdef, ema_params))
        return evaluate_checkerboard(
            self.config, workdir, denoiser, ema_params, self.keys["eval"], train_info
        )
