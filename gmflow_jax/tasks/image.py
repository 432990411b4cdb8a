"""What the class-conditional image tasks share: model from config, sampler rows, the sweep.

=============================  ==================================================================
name                           what it is
=============================  ==================================================================
`ImageTask`                    base of the image tasks: model (`models.builder.build_model`),
                               network functions (`models.denoiser.network_functions`), the
                               pipeline's config.json (`models.builder.pipeline_config`)
`ImageTask.settings`           the evaluation settings of `config.sample` (`eval.sweep`)
`ImageTask.sweep`              every setting sampled by the driver and scored (`eval.sweep`)
`row_solver_config`,           re-exported from `solvers.config` (the sampler-row grammar)
`guidance_kind`
=============================  ==================================================================

Rows are sampler rows of the grammar in `solvers.config` (`gm_sde[_2][_nospec]`,
`gm_ode[_2][_nosub]`, the baseline solvers); GM rows take probabilistic guidance (§5.3), baseline
rows classic CFG (§5.9). Guidance is active for probabilistic w > 0 and CFG w > 1; the scale is
passed to the sampling driver as a traced value, so a sweep compiles once per (row, NFE, guided or
not). Random streams (`sampling.streams.batch_streams`): with `noise_key, solver_key = split(key)`
the noise of all N samples is `normal(noise_key, [N, H, W, C])` (the same for every setting) and
chunk j of `sample.batch_size` samples solves with `fold_in(solver_key, j)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from gmflow_jax import solvers
from gmflow_jax.atomic_file import write_json_atomic
from gmflow_jax.eval.sweep import Setting, run_sweep, sweep_settings
from gmflow_jax.models.builder import (
    abstract_model,
    build_model,
    gm_dit_config_from,
    pipeline_config,
    spectrum_config_from,
)
from gmflow_jax.models.denoiser import DenoiserFn, SpectrumFn, network_functions
from gmflow_jax.models.image_denoiser import ImageDenoiser
from gmflow_jax.paths import join, make_dirs
from gmflow_jax.sampling.driver import SamplingDriver
from gmflow_jax.sampling.streams import batch_streams
from gmflow_jax.solvers.config import guidance_kind, row_solver_config

Array = jax.Array

PIPELINE_CONFIG_FILE = "config.json"
"""The run config `gmflow_jax.pipeline.GMFlowPipeline.from_checkpoint` reads from a workdir."""


class ImageTask:
    """Base of the class-conditional image tasks: GM-DiT (+ SpectrumMLP) from `config.model`."""

    def __init__(self, config: ml_collections.ConfigDict, keys: dict[str, Array]):
        """Validate the model config (building nothing yet); hold the run's keys."""
        self.config = config
        self.keys = keys
        self.model_config = gm_dit_config_from(config.model)
        self.spectrum_config = spectrum_config_from(config.model)

    @property
    def null_label(self) -> int:
        """The unconditional label (the null row of the label table)."""
        return self.model_config.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image / latent."""
        s = self.model_config.sample_size
        return (s, s, self.model_config.in_channels)

    def build_model(self, key: Array) -> ImageDenoiser:
        """The `ImageDenoiser` of `config.model`, parameters from `key`."""
        return build_model(self.config.model, key)

    def seams(self, model: ImageDenoiser) -> tuple[DenoiserFn, SpectrumFn | None]:
        """(denoiser, spectrum or None): `models.denoiser.network_functions` of `model`."""
        return network_functions(model)

    def abstract_seams(self) -> tuple[nnx.GraphDef, DenoiserFn, SpectrumFn | None]:
        """(graphdef, denoiser, spectrum or None) without allocating parameters."""
        abstract = abstract_model(self.config.model)
        denoiser, spectrum = network_functions(abstract)
        return nnx.split(abstract)[0], denoiser, spectrum

    def prepare_workdir(self, workdir: str) -> None:
        """Write `config.json` for `GMFlowPipeline.from_checkpoint` (GM models only)."""
        if self.model_config.mean_only:
            return
        make_dirs(workdir)
        write_json_atomic(join(workdir, PIPELINE_CONFIG_FILE), pipeline_config(self.config.model))

    def row_names(self) -> tuple[list[str], list[int], list[float]]:
        """(rows, NFEs, guidance scales) evaluated for this model kind (`config.sample`)."""
        s = self.config.sample
        if self.model_config.mean_only:
            return (
                [str(r) for r in s.baseline_solvers],
                [int(n) for n in s.baseline_nfes],
                [float(w) for w in s.cfg_scales],
            )
        return (
            [str(r) for r in s.gm_solvers],
            [int(n) for n in s.gm_nfes],
            [float(w) for w in s.guidance_scales],
        )

    def solver_config(self, row: str, nfe: int, w: float) -> solvers.SolverConfig:
        """`solvers.row_solver_config` with this run's substeps, shift, orthogonality, null label."""
        s = self.config.sample
        return row_solver_config(
            row,
            nfe,
            w,
            null_label=self.null_label,
            substeps_total=int(s.gm_ode_substeps_total),
            shift=float(s.shift),
            orthogonal_guidance=float(s.orthogonal_guidance),
            has_spectrum=self.spectrum_config is not None,
        )

    def settings(self) -> list[Setting]:
        """Every (row, NFE, w) of `config.sample` with its `SolverConfig` (bad rows raise here)."""
        return sweep_settings(*self.row_names(), self.solver_config)

    def sweep(
        self,
        graphdef: nnx.GraphDef,
        ema_params: Any,
        labels: np.ndarray,
        metric_fn: Callable[[np.ndarray, Setting], Mapping[str, Any]],
        on_samples: Callable[[Setting, np.ndarray], None] | None = None,
    ) -> list[dict[str, Any]]:
        """`eval.sweep.run_sweep` of every setting: `len(labels)` samples per setting with the EMA
        parameters, the same noise for every setting (module docstring), scored by `metric_fn`."""
        settings = self.settings()
        denoiser, spectrum = network_functions(nnx.merge(graphdef, ema_params))
        driver = SamplingDriver(denoiser, ema_params, spectrum)
        key = jax.random.split(self.keys["eval"], 2)[0]
        labels = np.asarray(labels, np.int32)
        streams = batch_streams(
            key, len(labels), int(self.config.sample.batch_size), self.image_shape
        )
        return run_sweep(
            driver, settings, streams, len(labels), metric_fn, labels=labels, on_samples=on_samples
        )


__all__ = ["ImageTask", "PIPELINE_CONFIG_FILE", "guidance_kind", "row_solver_config"]
