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

==============================  =================================================================
name                            what it is
==============================  =================================================================
`DigitsTask`                    the task (`tasks.Task`): data, model, evaluation
`class_labels`                  class-major labels [num_classes * per_class]
`format_table`                  the printed table of evaluation results
==============================  =================================================================
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from gmflow_jax.atomic_file import write_json_atomic
from gmflow_jax.data.digits import NUM_CLASSES, load_digits
from gmflow_jax.eval.digits import DigitsEvaluator
from gmflow_jax.eval.image_grid import class_mosaic, panel_grid_png
from gmflow_jax.tasks.image import ImageTask, guidance_kind, sample_images
from gmflow_jax.train.loop import run_keys

Array = jax.Array

TABLE_COLUMNS = ("accuracy", "fd", "mean_abs", "frac_saturated", "nonfinite_rate")
"""Metrics shown in the printed table (all of them go to metrics.json)."""


def class_labels(num_classes: int, per_class: int) -> np.ndarray:
    """Labels [num_classes * per_class] int32: per_class copies of 0, then of 1, ..."""
    if num_classes < 1 or per_class < 1:
        raise ValueError(f"need num_classes, per_class >= 1, got {num_classes}, {per_class}")
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def format_table(results: Sequence[dict[str, Any]], real: dict[str, float]) -> str:
    """A plain-text table: one line per (row, NFE, w) and a last line for the held-out digits."""
    header = f"{'solver':<18}{'NFE':>5}{'w':>7}" + "".join(f"{c:>16}" for c in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    for r in results:
        values = "".join(f"{r['metrics'][c]:>16.4f}" for c in TABLE_COLUMNS)
        lines.append(f"{r['row']:<18}{r['nfe']:>5}{r['w']:>7.3g}" + values)
    ref = [real["accuracy"], real["fd_train"], real["mean_abs"], real["frac_saturated"], 0.0]
    lines.append(f"{'real digits':<18}{'':>5}{'':>7}" + "".join(f"{v:>16.4f}" for v in ref))
    return "\n".join(lines)


class DigitsTask(ImageTask):
    """scikit-learn digits with a class-conditional GM-DiT (+ SpectrumMLP) or the K = 1 baseline."""

    def __init__(self, config: ml_collections.ConfigDict):
        """Check that the model fits the digits and load the fixed train / held-out split."""
        super().__init__(config)
        size = int(config.data.image_size)
        mc = self.model_config
        if (mc.sample_size, mc.in_channels, mc.num_classes) != (size, 1, NUM_CLASSES):
            raise ValueError(
                f"config.model must have sample_size={size} (config.data.image_size), "
                f"in_channels=1 and num_classes={NUM_CLASSES} for digits; got sample_size="
                f"{mc.sample_size}, in_channels={mc.in_channels}, num_classes={mc.num_classes}"
            )
        self.data = load_digits(size)

    def batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        """Batch s = `DigitsData.batch(data key, s, B)` as {"x0", "labels"}, s >= start_step."""
        key = run_keys(self.config.seed)["data"]
        for images, labels in self.data.batches(key, self.config.train.batch_size, start_step):
            yield {"x0": images, "labels": labels}

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
        """(images [10 per_class, S, S, 1], labels, setting description) of one row / NFE / w."""
        cfg = self.solver_config(row, nfe, w)
        labels = class_labels(NUM_CLASSES, per_class)
        images = sample_images(
            denoiser,
            spectrum,
            params,
            cfg,
            w,
            key,
            labels,
            self.image_shape,
            int(self.config.sample.batch_size),
        )
        setting = {
            "row": row,
            "solver": cfg.solver,
            "order": cfg.order,
            "spectral": cfg.spectral,
            "num_substeps": cfg.num_substeps,
            "nfe": nfe,
            "guidance": guidance_kind(row),
            "w": w,
            "guided": cfg.guided,
        }
        return images, labels, setting

    def evaluate(
        self,
        workdir: str,
        graphdef: nnx.GraphDef,
        ema_params: Any,
        train_info: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Sample every (row, NFE, w), score, write metrics.json and the PNG grid, print a table."""
        t_start = time.perf_counter()
        e = self.config.eval
        evaluator = self.evaluator(workdir)
        model = nnx.merge(graphdef, ema_params)
        denoiser, spectrum = self.seams(model)
        key = jax.random.split(run_keys(self.config.seed)["eval"], 2)[0]
        rows, nfes, scales = self.row_names()
        per_class = int(e.per_class)
        results, panels = [], {}
        bar = tqdm(total=len(rows) * len(nfes) * len(scales), desc="eval", dynamic_ncols=True)
        for row in rows:
            for nfe in nfes:
                for w in scales:
                    bar.set_postfix_str(f"{row} NFE={nfe} w={w}")
                    t0 = time.perf_counter()
                    images, labels, setting = self.sample_setting(
                        denoiser, spectrum, ema_params, row, nfe, w, key, per_class
                    )
                    sample_time = time.perf_counter() - t0
                    metrics = evaluator.evaluate(images, labels)
                    results.append({**setting, "metrics": metrics, "sample_time_s": sample_time})
                    panels[(f"{row} w={w:g}", f"NFE {nfe}")] = class_mosaic(
                        images, labels, NUM_CLASSES, int(e.grid_per_class)
                    )
                    bar.update(1)
        bar.close()
        kind = "flow_matching_baseline" if self.model_config.mean_only else "gmflow"
        size = self.data.image_size
        panel_grid_png(
            os.path.join(workdir, e.figure_file),
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
            "eval": {
                "num_images": per_class * NUM_CLASSES,
                "wall_time_s": time.perf_counter() - t_start,
            },
            "real": real,
            "results": results,
        }
        write_json_atomic(os.path.join(workdir, e.metrics_file), payload)
        table = format_table(results, real)
        print(table, flush=True)
        payload["table"] = table
        return payload
