"""The ImageNet-256 latent task: GM-DiT (+ SpectrumMLP) on prepared VAE latents (`docs/math.md` §4, §7, §8.1).

Data (`config.data`): `source="files"` reads the directory `config.data.path` prepared by
`python tools/prepare_imagenet_latents.py`: its ArrayRecord shards (`index.json`,
`gmflow_jax.data.latents`, read by the deterministic grain loader) when present, else the memory-mapped
`latents.npy` / `labels.npy` (`gmflow_jax.data.imagenet_latents`, the tool's `--npy` export); without
either the run stops at once with the command that prepares them. `source="synthetic"` is a small
deterministic stand-in (tests, smoke runs). Either way batch s depends only on (seed, s, B), so a
resumed run reads exactly the batches of an uninterrupted one.

Evaluation (EMA parameters), for every row / NFE / guidance scale of `config.sample` (the §8.1
setting: GM-ODE 2, 16 steps, 8 substeps, w = 0.04): `config.eval.num_samples` latents with labels
drawn per image index i from `numpy.random.default_rng(i)` (uniform over the classes, §7), their
statistics next to the data's (mean, std, non-finite rate), the first `config.eval.save_samples`
latents of each setting in `samples.npz`, and `metrics.json` (both atomic). FID / IS / precision-recall
need the VAE decoder and the Inception network (`gmflow_jax.eval.inception`) and are computed from
saved samples by the evaluation tools, not here.

During training (`config.eval.every_steps`, `evaluate_during_training`): the first (row, w) at the
largest NFE on `config.eval.periodic_samples` latents, their statistics, and the channels of the first
few latents as a grey-scale grid (one row per latent, one column per channel; no VAE decode).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from gmflow_jax.atomic_file import write_npz_atomic
from gmflow_jax.data import latents as shards_lib
from gmflow_jax.data.imagenet_latents import (
    LABELS_FILE,
    LATENTS_FILE,
    PREPARE_COMMAND,
    LatentData,
    open_latents,
    synthetic_latents,
)
from gmflow_jax.eval.sweep import Setting, format_table, sweep_settings, write_metrics
from gmflow_jax.paths import join
from gmflow_jax.sampling.driver import SamplingDriver, local_mesh
from gmflow_jax.sampling.streams import batch_streams
from gmflow_jax.tasks.image import ImageTask
from gmflow_jax.train.summaries import image_grid
from gmflow_jax.train.task import BatchLayout

Array = jax.Array

DATA_SOURCES = ("files", "synthetic")
"""`config.data.source` values."""

REFERENCE_EXAMPLES = 10_000
"""Data latents used for the reference statistics."""

TABLE_COLUMNS = ("mean", "std", "nonfinite_rate")
"""Latent statistics shown in the printed table (all of them go to metrics.json)."""

PERIODIC_GRID_LATENTS = 8
"""Latents shown (one row of channels each) by the evaluation during training."""

PERIODIC_GRID_RANGE = 3.0
"""Latent values in [-3, 3] map to black..white in that grid (clipped beyond)."""


def eval_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """Label of image i drawn uniformly from `numpy.random.default_rng(i)` (§7), int32 [N]."""
    return np.array(
        [np.random.default_rng(i).integers(num_classes) for i in range(num_samples)], np.int32
    )


def latent_statistics(latents: np.ndarray) -> dict[str, float]:
    """Mean, std (over finite values) and the share of latents with a non-finite value."""
    x = np.asarray(latents, np.float64)
    finite = np.isfinite(x)
    values = x[finite]
    return {
        "mean": float(values.mean()) if values.size else float("nan"),
        "std": float(values.std()) if values.size else float("nan"),
        "nonfinite_rate": float(np.mean(~finite.reshape(x.shape[0], -1).all(axis=1))),
    }


class ImageNetLatentsTask(ImageTask):
    """Class-conditional GM-DiT on ImageNet-256 latents (or the synthetic stand-in)."""

    def __init__(self, config: ml_collections.ConfigDict, keys: dict[str, Array]):
        """Open the data first (a missing prepared directory stops the run before any model work)."""
        super().__init__(config, keys)
        d = config.data
        if d.source not in DATA_SOURCES:
            raise ValueError(f"config.data.source must be one of {DATA_SOURCES}, got {d.source!r}")
        num_classes = self.model_config.num_classes
        self.shards: shards_lib.LatentShards | None = None
        self.data: LatentData | None = None
        if d.source == "synthetic":
            self.data = synthetic_latents(
                int(d.num_synthetic), self.image_shape, num_classes, seed=int(config.seed)
            )
        elif d.path and os.path.isfile(os.path.join(d.path, shards_lib.INDEX_FILE)):
            self.shards = shards_lib.open_latent_shards(d.path)
            self.shards.check_num_classes(num_classes)
            if tuple(self.shards.latent_shape) != self.image_shape:
                raise ValueError(
                    f"latents in {d.path!r} have shape {tuple(self.shards.latent_shape)}, the "
                    f"model expects {self.image_shape}"
                )
        elif d.path and os.path.isfile(os.path.join(d.path, LATENTS_FILE)):
            self.data = open_latents(d.path, self.image_shape, num_classes)
        else:
            raise FileNotFoundError(
                f"ImageNet latents not found: config.data.path={d.path!r} holds neither "
                f"{shards_lib.INDEX_FILE} (ArrayRecord shards) nor {LATENTS_FILE} + {LABELS_FILE}. "
                f"Prepare them once with `{PREPARE_COMMAND} --source=folder|tfds ... "
                "--vae_dir=<converted VAE> --output_dir=<dir>` (see its --help), then pass "
                "--config.data.path=<dir>; or use --config.data.source=synthetic for a smoke run."
            )

    @property
    def source(self) -> str:
        """Where the latents come from (directory or "synthetic")."""
        return self.data.source if self.data is not None else os.path.abspath(self.config.data.path)

    @property
    def num_examples(self) -> int:
        """Number of latents."""
        return self.data.num_examples if self.data is not None else self.shards.num_examples

    def data_iterator(self, layout: BatchLayout) -> Any:
        """The checkpointable grain iterator over this process's rows (`layout.rows`) of every
        global batch, at step 0 (ArrayRecord shards only; None for the other sources, whose batch s
        is a pure function of s). With `config.data.include_ids` batches also hold the example
        "ids"."""
        if self.shards is None:
            return None
        dataset = shards_lib.latent_dataset(
            self.shards,
            global_batch_size=layout.global_batch_size,
            seed=int(self.config.seed),
            rows=layout.rows,
            include_ids=bool(self.config.data.get("include_ids", False)),
        )
        return shards_lib.make_iterator(dataset)

    def batches(self, start_step: int, layout: BatchLayout) -> Iterator[dict[str, np.ndarray]]:
        """This process's rows of batch s, s = start_step, ... (in-memory sources: synthetic or
        a latents file; ArrayRecord shards go through `data_iterator`)."""
        if self.shards is not None:
            iterator = self.data_iterator(layout)
            shards_lib.seek(iterator, start_step)
            yield from iterator
            return
        batches = self.data.batches(int(self.config.seed), layout.global_batch_size, start_step)
        for x, y in batches:
            yield {"x0": x[layout.rows], "labels": y[layout.rows]}

    def reference_latents(self, n: int) -> np.ndarray:
        """Up to `n` data latents (the first training batches) for reference statistics."""
        b = int(self.config.train.batch_size)
        # The whole global batch in this process (evaluation runs single-process).
        layout = BatchLayout(local_mesh(), b, np.arange(b))
        chunks, count = [], 0
        for batch in self.batches(0, layout):
            chunks.append(np.asarray(batch["x0"], np.float32))
            count += chunks[-1].shape[0]
            if count >= min(n, self.num_examples):
                break
        return np.concatenate(chunks)[:n]

    def evaluate(
        self,
        workdir: str,
        graphdef: nnx.GraphDef,
        ema_params: Any,
        train_info: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Sample every (row, NFE, w) (`ImageTask.sweep`); write latent statistics, samples.npz
        and metrics.json; print a table."""
        t_start = time.perf_counter()
        e = self.config.eval
        labels = eval_labels(int(e.num_samples), self.model_config.num_classes)
        reference = latent_statistics(self.reference_latents(REFERENCE_EXAMPLES))
        keep = int(e.save_samples)
        saved = {"labels": labels[:keep]}

        def save(setting: Setting, x: np.ndarray) -> None:
            saved[f"{setting.row}_nfe{setting.nfe}_w{setting.w:g}"] = x[:keep].astype(np.float16)

        results = self.sweep(
            graphdef, ema_params, labels, lambda x, _: latent_statistics(x), on_samples=save
        )
        write_npz_atomic(join(workdir, e.samples_file), **saved)
        payload = {
            "model": "flow_matching_baseline" if self.model_config.mean_only else "gmflow",
            "config": json.loads(self.config.to_json_best_effort()),
            "train": train_info or {},
            "data": {"source": self.source, "num_examples": self.num_examples},
            "reference": reference,
            "eval": {
                "num_samples": int(e.num_samples),
                "wall_time_s": time.perf_counter() - t_start,
            },
            "results": results,
        }
        write_metrics(join(workdir, e.metrics_file), payload)
        table = format_table(results, TABLE_COLUMNS, references=[("data", reference)], width=11)
        print(table, flush=True)
        payload["table"] = table
        return payload

    def evaluate_during_training(
        self, workdir: str, graphdef: nnx.GraphDef, ema_params: Any, step: int
    ) -> tuple[dict[str, float], np.ndarray]:
        """The first (row, w) at the largest NFE on `eval.periodic_samples` latents (labels as
        `evaluate`'s, the final sweep's noise key): latent statistics and the channel grid."""
        rows, nfes, scales = self.row_names()
        (setting,) = sweep_settings([rows[0]], [max(nfes)], [scales[0]], self.solver_config)
        n = int(self.config.eval.periodic_samples)
        labels = eval_labels(n, self.model_config.num_classes)
        key = jax.random.split(self.keys["eval"], 2)[0]  # as `ImageTask.sweep`'s
        streams = batch_streams(key, n, int(self.config.sample.batch_size), self.image_shape)
        denoiser, spectrum = self.seams(nnx.merge(graphdef, ema_params))
        driver = SamplingDriver(denoiser, ema_params, spectrum)
        scale = setting.w if setting.cfg.guided else None
        x = driver.sample(setting.cfg, streams, n, labels, scale)
        shown = x[:PERIODIC_GRID_LATENTS]  # [k, H, W, C] -> one tile per (latent, channel)
        k, h, w, c = shown.shape
        tiles = np.nan_to_num(
            shown.transpose(0, 3, 1, 2).reshape(k * c, h, w, 1) / PERIODIC_GRID_RANGE
        )
        up = max(1, 64 // h)
        tiles = tiles.repeat(up, axis=1).repeat(up, axis=2)
        return latent_statistics(x), image_grid(tiles, ncols=c)
