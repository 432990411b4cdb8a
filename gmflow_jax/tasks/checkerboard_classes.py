"""The class-conditional checkerboard task (`configs/checkerboard.py:classes`, issue 16).

Data (`docs/math.md` §4.8): white cell c = 0..7 is class c, uniform on its cell; batch s is
`labeled_checkerboard_batch(fold_in(data key, s))`, whose points are the unconditional batch's bit
for bit and whose labels are their cells, made on the devices in the batch's sharding. The train
step drops labels to the null label 8 with probability 1 - `config.train.prob_class` (§4.4). The
network is the toy MLP of `config.model` with `num_classes` = 8 (a label table added to its time
embedding, built by the loop through `models.builder`): GMFlow (K = 64) or, with `baseline`, the
mean-only flow-matching model with the same trunk.

Evaluation: `eval.guidance_checkerboard_sweep.evaluate_guidance_checkerboard` (rows x NFE x guidance
scale, exact precision / within-cell fidelity / over-shoot metrics, metrics.json, PNG, table).
During training (`config.eval.every_steps`): the first setting at the largest NFE on
`config.eval.periodic_samples` class-major points, the same metrics and the density image.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gmflow_jax.data.checkerboard import labeled_checkerboard_batch
from gmflow_jax.eval.guidance_checkerboard import guidance_metrics
from gmflow_jax.eval.guidance_checkerboard_sweep import (
    NUM_CLASSES,
    class_labels,
    evaluate_guidance_checkerboard,
    guidance_settings,
    guidance_streams,
)
from gmflow_jax.tasks.checkerboard import CheckerboardTask
from gmflow_jax.train.task import Batch, BatchLayout

Array = jax.Array
PyTree = Any


class CheckerboardClassesTask(CheckerboardTask):
    """Class-conditional checkerboard points and the guidance sweep (`train.task.Task`)."""

    def __init__(self, config: ml_collections.ConfigDict, keys: dict[str, Array]):
        """Check that the model has the 8 classes and that labels are dropped for guidance."""
        super().__init__(config, keys)
        num_classes = int(config.model.get("num_classes", 0))
        if num_classes != NUM_CLASSES:
            raise ValueError(
                f"config.model.num_classes must be {NUM_CLASSES} (the white cells) for "
                f"data.name='checkerboard_classes', got {num_classes}"
            )
        prob_class = float(config.train.get("prob_class", 1.0))
        if not 0.0 < prob_class < 1.0:
            raise ValueError(
                f"config.train.prob_class must be in (0, 1) so that the null label is trained "
                f"(guidance needs it), got {prob_class}"
            )
        if int(config.eval.per_class) < 1:
            raise ValueError(f"config.eval.per_class must be >= 1, got {config.eval.per_class}")

    def batches(self, start_step: int, layout: BatchLayout) -> Iterator[Batch]:
        """Batch s = labeled checkerboard points [B, 1, 1, 2] and labels [B] from fold_in(data key,
        s), s >= start_step, as global arrays on `layout.sharding`."""
        make = jax.jit(
            labeled_checkerboard_batch,
            static_argnums=2,
            out_shardings=(layout.sharding, layout.sharding),
        )
        step = start_step
        while True:
            x0, labels = make(self.keys["data"], jnp.int32(step), layout.global_batch_size)
            yield {"x0": x0, "labels": labels}
            step += 1

    evaluate_sweep = staticmethod(evaluate_guidance_checkerboard)
    """`evaluate` runs the guidance sweep (rows x NFE x guidance scale, exact guidance metrics)."""

    def evaluate_during_training(
        self, workdir: str, graphdef: nnx.GraphDef, ema_params: PyTree, step: int
    ) -> tuple[dict[str, float], np.ndarray]:
        """The sweep's first setting at its largest NFE on `eval.periodic_samples` class-major
        points (8 classes): the guidance metrics and the density image of all points."""
        settings = guidance_settings(self.config, bool(self.config.model.mean_only))
        nfe = max(s.nfe for s in settings)
        setting = next(s for s in settings if s.nfe == nfe)
        per_class = max(1, int(self.config.eval.periodic_samples) // NUM_CLASSES)
        labels = class_labels(per_class)
        sweep_key, _ = jax.random.split(self.keys["eval"])  # as evaluate's
        streams = guidance_streams(sweep_key, per_class, int(self.config.sample.batch_size))
        scale = setting.w if setting.cfg.guided else None
        x = self._sample_points(
            graphdef, ema_params, setting.cfg, streams, len(labels), labels, scale
        )
        return self._periodic_result(guidance_metrics(x, labels), x)
