"""What the class-conditional image tasks share: model from config, solver rows, guided sampling.

=============================  ==================================================================
name                           what it is
=============================  ==================================================================
`gm_dit_config_from`           `GMDiTConfig` from `config.model` (§6.1)
`spectrum_config_from`         `SpectrumConfig` from `config.model.spectrum_net`, or None (§6.3)
`build_image_model`            `ImageDenoiser` (GM-DiT + optional SpectrumMLP), params from a key
`ImageTask`                    base of the image tasks: model, seams, the pipeline's config.json
`GM_ROWS`, `BASELINE_ROWS`     evaluation row names (below)
`row_solver_config`            `SolverConfig` of a row at one NFE (guidance decided by w)
`guidance_kind`                "probabilistic" (GM rows, §5.3) or "cfg" (baseline rows, §5.9)
`sample_images`                samples of one setting in fixed-size jitted chunks (traced w)
=============================  ==================================================================

Row names. GM rows `gm_sde[_2][_nospec]` and `gm_ode[_2][_nosub]`: `_2` = order 2 (§5.5);
GM-SDE uses spectral sampling (§5.7) when the model has a SpectrumMLP, unless `_nospec`; GM-ODE
takes S = ceil(substeps_total / NFE) analytic substeps (§5.6), or 1 with `_nosub`. Baseline rows are
the baseline solver names ("euler", "ddpm_small", "ddpm_large", "dpmpp_2m", "dpmpp_2m_sde") with
classic CFG (§5.9). Guidance is active for probabilistic w > 0 and CFG w > 1; the scale is passed to
the jitted sampler as a traced value, so a sweep compiles once per (row, NFE, guided or not).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gmflow_jax import guidance, solvers
from gmflow_jax.atomic_file import write_json_atomic
from gmflow_jax.models.gm_dit import GMDiTConfig
from gmflow_jax.models.image_denoiser import ImageDenoiser, SpectrumConfig, image_seams

Array = jax.Array

GM_ROWS = (
    "gm_sde",
    "gm_sde_2",
    "gm_sde_nospec",
    "gm_sde_2_nospec",
    "gm_ode",
    "gm_ode_2",
    "gm_ode_nosub",
    "gm_ode_2_nosub",
)
"""GMFlow evaluation rows (module docstring)."""

BASELINE_ROWS = solvers.BASELINE_SOLVERS
"""Flow-matching baseline rows: the baseline solvers, with classic CFG."""

GUIDED_PROBABILISTIC_PLACEHOLDER = 0.5
"""Static guidance scale of a guided GM `SolverConfig`; the traced w replaces it when sampling."""

GUIDED_CFG_PLACEHOLDER = 2.0
"""Static guidance scale of a guided CFG `SolverConfig`; the traced w replaces it when sampling."""

PIPELINE_CONFIG_FILE = "config.json"
"""The run config `gmflow_jax.pipeline.GMFlowPipeline.from_checkpoint` reads from a workdir."""

_GM_DIT_FIELDS = tuple(f.name for f in dataclasses.fields(GMDiTConfig))


def gm_dit_config_from(model_cfg: ml_collections.ConfigDict) -> GMDiTConfig:
    """`GMDiTConfig` from the GM-DiT fields of `config.model` (name "gm_dit")."""
    if model_cfg.name != "gm_dit":
        raise ValueError(
            f"config.model.name must be 'gm_dit' for image tasks, got {model_cfg.name!r}"
        )
    fields = {k: model_cfg[k] for k in _GM_DIT_FIELDS if k in model_cfg}
    return GMDiTConfig(**fields)


def spectrum_config_from(model_cfg: ml_collections.ConfigDict) -> SpectrumConfig | None:
    """`SpectrumConfig` of `config.model.spectrum_net` when enabled, else None."""
    spec = model_cfg.get("spectrum_net")
    if spec is None or not spec.enabled:
        return None
    return SpectrumConfig(
        base_size=tuple(int(s) for s in spec.base_size), layers=tuple(int(n) for n in spec.layers)
    )


def build_image_model(model_cfg: ml_collections.ConfigDict, key: Array) -> ImageDenoiser:
    """The `ImageDenoiser` of `config.model`, parameters initialized from `key`."""
    return ImageDenoiser(
        gm_dit_config_from(model_cfg), spectrum_config_from(model_cfg), rngs=nnx.Rngs(params=key)
    )


def pipeline_config(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The run config of `gmflow_jax.pipeline` (GM-DiT fields and the SpectrumMLP sizes)."""
    cfg = gm_dit_config_from(model_cfg)
    fields = dataclasses.asdict(cfg)
    fields["dtype"] = jnp.dtype(cfg.dtype).name
    out: dict[str, Any] = {"model": fields}
    spec = spectrum_config_from(model_cfg)
    if spec is not None:
        out["spectrum_net"] = {"base_size": list(spec.base_size), "layers": list(spec.layers)}
    return out


class ImageTask:
    """Base of the class-conditional image tasks: GM-DiT (+ SpectrumMLP) from `config.model`."""

    def __init__(self, config: ml_collections.ConfigDict):
        """Validate the model config (building nothing yet)."""
        self.config = config
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
        return build_image_model(self.config.model, key)

    def seams(self, model: ImageDenoiser) -> tuple[Callable[..., Any], Callable[..., Array] | None]:
        """(denoiser seam, spectrum seam or None), see `models.image_denoiser.image_seams`."""
        return image_seams(model)

    def abstract_seams(
        self,
    ) -> tuple[nnx.GraphDef, Callable[..., Any], Callable[..., Array] | None]:
        """(graphdef, denoiser seam, spectrum seam) without allocating parameters."""
        abstract = nnx.eval_shape(lambda: self.build_model(jax.random.PRNGKey(0)))
        denoiser, spectrum = self.seams(abstract)
        return nnx.split(abstract)[0], denoiser, spectrum

    def prepare_workdir(self, workdir: str) -> None:
        """Write `config.json` for `GMFlowPipeline.from_checkpoint` (GM models only)."""
        if self.model_config.mean_only:
            return
        os.makedirs(workdir, exist_ok=True)
        write_json_atomic(
            os.path.join(workdir, PIPELINE_CONFIG_FILE), pipeline_config(self.config.model)
        )

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
        """`row_solver_config` with this run's substeps, shift, orthogonality and null label."""
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


def _parse_gm_row(row: str) -> tuple[str, int, bool, bool]:
    """(solver, order, spectral allowed, substeps allowed) of a GM row name."""
    if row not in GM_ROWS:
        raise ValueError(
            f"solver row {row!r} is unknown; allowed: {', '.join(GM_ROWS + BASELINE_ROWS)}"
        )
    solver = row[:6]
    tokens = row[7:].split("_") if len(row) > 6 else []
    return solver, 2 if "2" in tokens else 1, "nospec" not in tokens, "nosub" not in tokens


def guidance_kind(row: str) -> str:
    """ "probabilistic" for GM rows (w in [0, 1)), "cfg" for baseline rows (active when w > 1)."""
    if row in GM_ROWS:
        return "probabilistic"
    if row in BASELINE_ROWS:
        return "cfg"
    raise ValueError(
        f"solver row {row!r} is unknown; allowed: {', '.join(GM_ROWS + BASELINE_ROWS)}"
    )


def row_solver_config(
    row: str,
    nfe: int,
    w: float,
    *,
    null_label: int,
    substeps_total: int = 128,
    shift: float = 1.0,
    orthogonal_guidance: float = 1.0,
    has_spectrum: bool = False,
) -> solvers.SolverConfig:
    """The `SolverConfig` of evaluation row `row` at `nfe` network evaluations and guidance w.

    The config is guided iff w is active (probabilistic w > 0, CFG w > 1); its static scale is a
    stand-in value: pass w as `sample_images(..., w)` (the traced override).
    """
    kind = guidance_kind(row)
    guidance.check_guidance_scale(w, kind)
    if kind == "probabilistic":
        solver, order, spectral_ok, substeps_ok = _parse_gm_row(row)
        substeps = math.ceil(substeps_total / nfe) if solver == "gm_ode" and substeps_ok else 1
        return solvers.SolverConfig(
            solver=solver,
            num_steps=nfe,
            num_substeps=max(1, substeps),
            order=order,
            guidance_scale=GUIDED_PROBABILISTIC_PLACEHOLDER if w > 0 else 0.0,
            guidance="probabilistic",
            orthogonal_guidance=orthogonal_guidance,
            null_label=null_label,
            shift=shift,
            spectral=solver == "gm_sde" and spectral_ok and has_spectrum,
        )
    return solvers.SolverConfig(
        solver=row,
        num_steps=nfe,
        guidance_scale=GUIDED_CFG_PLACEHOLDER if w > 1 else 0.0,
        guidance="cfg",
        orthogonal_guidance=orthogonal_guidance,
        null_label=null_label,
        shift=shift,
    )


def sample_images(
    denoiser: Callable[..., Any],
    spectrum: Callable[..., Array] | None,
    params: Any,
    cfg: solvers.SolverConfig,
    w: float,
    key: Array,
    labels,
    image_shape: tuple[int, int, int],
    batch_size: int,
) -> np.ndarray:
    """Samples `[N, H, W, C]` float32 numpy for `labels` `[N]` with sampler `cfg` at guidance w.

    With `noise_key, sample_key = split(key)`, the initial noise is `normal(noise_key, [N, H, W, C])`
    (so every setting sees the same noise) and chunk j of `batch_size` images uses
    `fold_in(sample_key, j)`; the last chunk is padded to full size (one compilation per cfg).
    """
    labels = np.asarray(labels, np.int32)
    n = labels.shape[0]
    if labels.ndim != 1 or n < 1:
        raise ValueError(f"labels must have shape [N], N >= 1, got {labels.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = min(batch_size, n)
    noise_key, sample_key = jax.random.split(key)
    noise = np.asarray(jax.random.normal(noise_key, (n, *image_shape), jnp.float32))
    scale = jnp.float32(w) if cfg.guided else None
    chunks = []
    for j, start in enumerate(range(0, n, batch_size)):
        x = noise[start : start + batch_size]
        y = labels[start : start + batch_size]
        pad = batch_size - x.shape[0]
        if pad:
            x = np.concatenate([x, np.zeros((pad, *image_shape), np.float32)])
            y = np.concatenate([y, np.zeros((pad,), np.int32)])
        out = solvers.sample(
            denoiser,
            params,
            jax.random.fold_in(sample_key, j),
            jnp.asarray(x),
            jnp.asarray(y),
            cfg,
            guidance_scale=scale,
            spectrum=spectrum if cfg.spectral else None,
        )
        chunks.append(np.asarray(jax.device_get(out))[: batch_size - pad])
    return np.concatenate(chunks)
