"""The checkerboard task: an adapter over the checkerboard functions of `gmflow_jax.train.loop`.

Batch s is `checkerboard_batch(fold_in(data key, s))` (spec §4.8); the model is the §6.4 toy MLP;
evaluation is `train.loop.evaluate` (histogram metrics and the Fig. 2 grid). Nothing here changes what
a checkerboard run computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gmflow_jax.train import loop
from gmflow_jax.train.state import NNXDenoiser

Array = jax.Array


class CheckerboardTask:
    """2-D checkerboard points, the toy MLP denoiser and the checkerboard evaluation."""

    def __init__(self, config: ml_collections.ConfigDict):
        """Hold the run config (the checkerboard has no data to open)."""
        self.config = config

    def build_model(self, key: Array) -> nnx.Module:
        """The §6.4 toy MLP of `config.model`."""
        return loop.build_model(self.config.model, key)

    def seams(self, model: nnx.Module) -> tuple[Callable[..., Any], None]:
        """(NNXDenoiser of the model, no spectrum)."""
        return NNXDenoiser(nnx.split(model)[0]), None

    def batches(self, start_step: int) -> Iterator[dict[str, Array]]:
        """Batch s = checkerboard points [B, 1, 1, 2] from fold_in(data key, s), s >= start_step."""
        data_key = loop.run_keys(self.config.seed)["data"]
        batch_size = self.config.train.batch_size
        step = start_step
        while True:
            yield {"x0": loop.checkerboard_step_batch(data_key, jnp.int32(step), batch_size)}
            step += 1

    def prepare_workdir(self, workdir: str) -> None:
        """Nothing to prepare."""

    def evaluate(
        self,
        workdir: str,
        graphdef: nnx.GraphDef,
        ema_params: Any,
        train_info: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """`train.loop.evaluate`: histogram metrics, metrics.json and the PNG grid."""
        return loop.evaluate(self.config, workdir, graphdef, ema_params, train_info)
