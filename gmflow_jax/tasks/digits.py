"""The digits task: class-conditional GM-DiT on scikit-learn's 8x8 (or 16x16) digits (issue 4).

Training batches: `DigitsData.batches(data key, B, start_step)` (`gmflow_jax.data.digits`): batch s
depends only on (key, s, B), so a resumed run reads exactly the batches an uninterrupted one would.
Images are `[B, S, S, 1]` in [-1, 1], labels 0..9; the null label is 10.

Evaluation (EMA parameters): for every row of `config.sample` (GM rows for a GM model, baseline rows
with CFG for the K = 1 mean-only model; see `tasks.image`), every NFE and every guidance scale,
`config.eval.per_class` samples of each class (the same noise for every setting) are scored by
`DigitsEvaluator` (classifier accuracy, Fréchet distance to the held-out digits, saturation next to
the real digits'). Written to the workdir: `metrics.json` (atomic), a PNG grid (atomic; one panel per
setting, one row per class inside a panel), and a printed table.

During training (`config.eval.every_steps`, `evaluate_during_training`): the first (row, w) at the
largest NFE on `config.eval.periodic_samples` class-major images, the evaluator's metrics and a
class-major sample grid (one row per digit).

==============================  =================================================================
name                            what it is
==============================  =================================================================
`DigitsTask`                    the task (`tasks.Task`): data, model, evaluation
`class_labels`                  class-major labels [num_classes * per_class]
==============================  =================================================================
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from gmflow_jax.data.digits import NUM_CLASSES, load_digits
from gmflow_jax.eval.digits import DigitsEvaluator
from gmflow_jax.eval.image_grid import class_mosaic, panel_grid_png
from gmflow_jax.eval.sweep import (
    Setting,
    format_table,
    setting_fields,
    sweep_settings,
    write_metrics,
)
from gmflow_jax.paths import join
from gmflow_jax.sampling.driver import SamplingDriver
from gmflow_jax.sampling.streams import batch_streams
from gmflow_jax.solvers.config import canonical_sampler
from gmflow_jax.tasks.image import ImageTask
from gmflow_jax.train.summaries import image_grid
from gmflow_jax.train.task import BatchLayout

Array = jax.Array

TABLE_COLUMNS = ("accuracy", "fd", "mean_abs", "frac_saturated", "nonfinite_rate")
"""Metrics shown in the printed table (all of them go to metrics.json)."""

PERIODIC_GRID_PX = 32
"""Digits of the evaluation during training are upscaled to at least this many pixels a side."""


def class_labels(num_classes: int, per_class: int) -> np.ndarray:
    """Labels [num_classes * per_class] int32: per_class copies of 0, then of 1, ..."""
    if num_classes < 1 or per_class < 1:
        raise ValueError(f"need num_classes, per_class >= 1, got {num_classes}, {per_class}")
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


class DigitsTask(ImageTask):
    """scikit-learn digits with a class-conditional GM-DiT (+ SpectrumMLP) or the K = 1 baseline."""

    def __init__(self, config: ml_collections.ConfigDict, keys: dict[str, Array]):
        """Check that the model fits the digits and load the fixed train / held-out split."""
        super().__init__(config, keys)
        size = int(config.data.image_size)
        mc = self.model_config
        if (mc.sample_size, mc.in_channels, mc.num_classes) != (size, 1, NUM_CLASSES):
            raise ValueError(
                f"config.model must have sample_size={size} (config.data.image_size), "
                f"in_channels=1 and num_classes={NUM_CLASSES} for digits; got sample_size="
                f"{mc.sample_size}, in_channels={mc.in_channels}, num_classes={mc.num_classes}"
            )
        self.data = load_digits(size)
        self._periodic_evaluator: DigitsEvaluator | None = None

    def data_iterator(self, layout: BatchLayout) -> None:
        """None: batch s is a pure function of (data key, s)."""
        return None

    def batches(self, start_step: int, layout: BatchLayout) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of batch s = `DigitsData.batch(data key, s, B)` as {"x0", "labels"},
        s >= start_step."""
        batches = self.data.batches(self.keys["data"], layout.global_batch_size, start_step)
        for images, labels in batches:
            yield {"x0": images[layout.rows], "labels": labels[layout.rows]}

    def evaluator(self, workdir: str) -> DigitsEvaluator:
        """The digits evaluator; its classifier is cached in `config.eval.classifier_dir` or `workdir`."""
        e = self.config.eval
        return DigitsEvaluator.from_workdir(
            e.classifier_dir or workdir, self.data.image_size, seed=int(e.classifier_seed)
        )

    def sample_setting(
        self,
        denoiser: Callable[..., Any],
        spectrum: Callable[..., Array] | None,
        params: Any,
        row: str,
        nfe: int,
        w: float,
        key: Array,
        per_class: int,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(images [10 per_class, S, S, 1], labels, setting fields) of one row / NFE / w, drawn by
        the sampling driver from the evaluation streams of `key` (as `evaluate` draws them)."""
        (setting,) = sweep_settings([row], [nfe], [w], self.solver_config)
        labels = class_labels(NUM_CLASSES, per_class)
        streams = batch_streams(
            key, len(labels), int(self.config.sample.batch_size), self.image_shape
        )
        driver = SamplingDriver(denoiser, params, spectrum)
        scale = setting.w if setting.cfg.guided else None
        images = driver.sample(setting.cfg, streams, len(labels), labels, scale)
        return images, labels, setting_fields(setting)

    def evaluate(
        self,
        workdir: str,
        graphdef: nnx.GraphDef,
        ema_params: Any,
        train_info: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Sample every (row, NFE, w) (`ImageTask.sweep`), score, write metrics.json and the PNG
        grid, print a table."""
        t_start = time.perf_counter()
        e = self.config.eval
        evaluator = self.evaluator(workdir)
        rows, nfes, scales = self.row_names()
        rows = [canonical_sampler(r) for r in rows]
        labels = class_labels(NUM_CLASSES, int(e.per_class))
        panels = {}

        def keep_panel(setting: Setting, images: np.ndarray) -> None:
            panels[(f"{setting.row} w={setting.w:g}", f"NFE {setting.nfe}")] = class_mosaic(
                images, labels, NUM_CLASSES, int(e.grid_per_class)
            )

        results = self.sweep(
            graphdef,
            ema_params,
            labels,
            lambda images, _: evaluator.evaluate(images, labels),
            on_samples=keep_panel,
        )
        kind = "flow_matching_baseline" if self.model_config.mean_only else "gmflow"
        size = self.data.image_size
        panel_grid_png(
            join(workdir, e.figure_file),
            panels,
            [f"{r} w={w:g}" for r in rows for w in scales],
            [f"NFE {n}" for n in nfes],
            scale=max(1, 32 // size),
            title=f"digits {size}x{size}, {kind}, EMA; one row per class 0-9",
        )
        real = {
            "accuracy": evaluator.real_accuracy,
            "fd_train": evaluator.real_fd_train,
            "mean_abs": evaluator.real_saturation["mean_abs"],
            "frac_saturated": evaluator.real_saturation["frac_saturated"],
        }
        payload = {
            "model": kind,
            "config": json.loads(self.config.to_json_best_effort()),
            "train": train_info or {},
            "eval": {"num_images": len(labels), "wall_time_s": time.perf_counter() - t_start},
            "real": real,
            "results": results,
        }
        write_metrics(join(workdir, e.metrics_file), payload)
        reference = {**real, "fd": real["fd_train"], "nonfinite_rate": 0.0}
        table = format_table(results, TABLE_COLUMNS, references=[("real digits", reference)])
        print(table, flush=True)
        payload["table"] = table
        return payload

    def evaluate_during_training(
        self, workdir: str, graphdef: nnx.GraphDef, ema_params: Any, step: int
    ) -> tuple[dict[str, float], np.ndarray]:
        """The first (row, w) at the largest NFE on `eval.periodic_samples` images (class-major, the
        final sweep's noise key): the evaluator's metrics and a grid with one row per digit."""
        if self._periodic_evaluator is None:  # trains and caches the classifier on first use
            self._periodic_evaluator = self.evaluator(workdir)
        rows, nfes, scales = self.row_names()
        per_class = max(2, int(self.config.eval.periodic_samples) // NUM_CLASSES)
        denoiser, spectrum = self.seams(nnx.merge(graphdef, ema_params))
        key = jax.random.split(self.keys["eval"], 2)[0]  # as `ImageTask.sweep`'s
        images, labels, _ = self.sample_setting(
            denoiser, spectrum, ema_params, rows[0], max(nfes), scales[0], key, per_class
        )
        metrics = self._periodic_evaluator.evaluate(images, labels)
        scalars = {k: v for k, v in metrics.items() if not k.startswith("real_")}
        scalars.pop("num_images", None)
        shown = min(per_class, int(self.config.eval.grid_per_class))
        s = self.data.image_size
        grid = images.reshape(NUM_CLASSES, per_class, s, s, 1)[:, :shown]
        up = max(1, PERIODIC_GRID_PX // s)
        grid = np.nan_to_num(grid, nan=0.0).repeat(up, axis=2).repeat(up, axis=3)
        return scalars, image_grid(grid.reshape(-1, s * up, s * up, 1), ncols=shown)
