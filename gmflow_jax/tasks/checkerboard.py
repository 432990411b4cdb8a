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

During training (`config.eval.every_steps`, `evaluate_during_training`): the first configured row at
its largest NFE draws `config.eval.periodic_samples` points (the same noise at every call, from the
evaluation key), scored by the same metrics, shown as a 2-D density image.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from flax import nnx

from gmflow_jax.data.checkerboard import BOARD_HALF_WIDTH, POINT_SHAPE, checkerboard_batch
from gmflow_jax.eval.checkerboard import HIST_EXTENT, checkerboard_metrics
from gmflow_jax.eval.checkerboard_sweep import checkerboard_settings, evaluate_checkerboard
from gmflow_jax.models.denoiser import network_functions
from gmflow_jax.sampling.driver import SamplingDriver
from gmflow_jax.sampling.streams import ChunkStreams, per_chunk_streams
from gmflow_jax.solvers.config import SolverConfig
from gmflow_jax.train.task import Batch, BatchLayout

Array = jax.Array
PyTree = Any

DENSITY_BINS = 64
"""Bins per axis of the density image of the evaluation during training."""

DENSITY_UPSCALE = 4
"""Pixels per bin of that image (64 bins -> 256 x 256 pixels)."""


def density_image(points: np.ndarray, bins: int = DENSITY_BINS) -> np.ndarray:
    """uint8 RGB [bins x DENSITY_UPSCALE]^2 viridis image of points [N, 2] on [-4.2, 4.2]^2, y up.

    Counts are divided by twice a white bin's expected count under the data (density 1/32 on the
    white cells), so the data density shows at mid-scale and a 2x over-concentration saturates;
    non-finite points are dropped (their mass shows as missing density).
    """
    x = np.asarray(points, np.float64)
    x = x[np.isfinite(x).all(axis=1)]
    r = HIST_EXTENT
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=bins, range=[[-r, r], [-r, r]])
    white_area = 8 * BOARD_HALF_WIDTH**2 / 4  # 8 of the 16 cells of the [-4, 4]^2 board
    expected = len(points) * (2 * r / bins) ** 2 / white_area
    values = np.clip(counts.T[::-1] / (2 * expected), 0.0, 1.0)  # row 0 = top (largest y)
    rgb = matplotlib.colormaps["viridis"](values)[..., :3]
    rgb = np.repeat(np.repeat(rgb, DENSITY_UPSCALE, axis=0), DENSITY_UPSCALE, axis=1)
    return np.round(rgb * 255).astype(np.uint8)


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

    evaluate_sweep = staticmethod(evaluate_checkerboard)
    """The evaluation `evaluate` runs: `(config, workdir, denoiser, ema_params, eval_key,
    train_info) -> metrics.json payload plus "table"` (a subclass swaps in its own sweep)."""

    def evaluate(
        self,
        workdir: str,
        graphdef: nnx.GraphDef,
        ema_params: PyTree,
        train_info: dict[str, Any],
    ) -> dict[str, Any]:
        """`evaluate_sweep` (`eval.checkerboard_sweep.evaluate_checkerboard`: every (row, NFE))
        with the EMA params: metrics.json, the PNG grid and the printed table (under "table")."""
        denoiser, _ = network_functions(nnx.merge(graphdef, ema_params))
        return self.evaluate_sweep(
            self.config, workdir, denoiser, ema_params, self.keys["eval"], train_info
        )

    def evaluate_during_training(
        self, workdir: str, graphdef: nnx.GraphDef, ema_params: PyTree, step: int
    ) -> tuple[dict[str, float], np.ndarray]:
        """The first row at its largest NFE on `eval.periodic_samples` points: the checkerboard
        metrics and the density image (module docstring)."""
        _, nfes, settings = checkerboard_settings(self.config)
        setting = next(s for s in settings if s.nfe == max(nfes))
        n = int(self.config.eval.periodic_samples)
        noise_key, metric_key, _ = jax.random.split(self.keys["eval"], 3)  # as evaluate's
        streams = per_chunk_streams(noise_key, n, int(self.config.sample.batch_size), POINT_SHAPE)
        x = self._sample_points(graphdef, ema_params, setting.cfg, streams, n)
        return self._periodic_result(checkerboard_metrics(x, metric_key), x)

    @staticmethod
    def _sample_points(
        graphdef: nnx.GraphDef,
        ema_params: PyTree,
        cfg: SolverConfig,
        streams: ChunkStreams,
        n: int,
        labels: np.ndarray | None = None,
        guidance_scale: float | None = None,
    ) -> np.ndarray:
        """`n` points [n, 2] drawn by solver `cfg` with the EMA params (class `labels` and the
        guidance scale for a class-conditional model)."""
        denoiser, _ = network_functions(nnx.merge(graphdef, ema_params))
        driver = SamplingDriver(denoiser, ema_params)
        return driver.sample(cfg, streams, n, labels, guidance_scale).reshape(n, 2)

    @staticmethod
    def _periodic_result(
        metrics: dict[str, Any], x: np.ndarray
    ) -> tuple[dict[str, float], np.ndarray]:
        """`evaluate_during_training`'s (scalars, image): the metrics less "num_samples" (not a
        scalar to log) and the density image of the points [n, 2]."""
        metrics.pop("num_samples")
        return metrics, density_image(x)
