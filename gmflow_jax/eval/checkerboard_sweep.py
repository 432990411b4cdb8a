"""The checkerboard evaluation (docs/math.md §7, extended): every sampler row x NFE through `eval.sweep`.

With the EMA parameters, for each row and NFE of `config.sample` (GMFlow rows `gm_solvers` for a GM
model, baseline rows `baseline_solvers` for a mean-only model; rows in the grammar of
`solvers.config`), draw `eval.num_samples` points with the sampling driver in chunks of
`sample.batch_size`, score them with `eval.checkerboard.checkerboard_metrics`, and write
`metrics.json` (atomic), the PNG histogram grid (rows = sampler, columns = NFE) and a printed table
with the exact-sample floor.

Random streams (fixed; `metrics.json` of a run does not depend on the code path): from the run's
eval key, `noise_key, metric_key, floor_key = split(eval key, 3)`; chunk i of the samples draws
`k_noise, k_solver = split(fold_in(noise_key, i))`, noise `normal(k_noise, [B, 1, 1, 2])`
(`sampling.streams.per_chunk_streams`), the same for every sampler.

`metrics.json`: model, config, train, eval {num_samples, wall_time_s}, exact_sample_floor,
results [{row, solver, order, nfe, num_substeps, metrics, sample_time_s}].
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from gmflow_jax import solvers
from gmflow_jax.data.checkerboard import POINT_SHAPE
from gmflow_jax.eval.checkerboard import checkerboard_metrics, exact_sample_floor
from gmflow_jax.eval.figures import histogram_grid_png
from gmflow_jax.eval.sweep import (
    Setting,
    format_table,
    metrics_payload,
    model_kind,
    publish,
    run_sweep,
    sweep_settings,
)
from gmflow_jax.paths import join
from gmflow_jax.sampling.driver import SamplingDriver
from gmflow_jax.sampling.streams import per_chunk_streams

METRIC_COLUMNS = ("in_square_rate", "histogram_tv", "sliced_w1", "coverage", "nonfinite_rate")
"""Metrics shown in the printed table (all of them go to metrics.json)."""

RESULT_FIELDS = ("row", "solver", "order", "nfe", "num_substeps")
"""Setting fields of a checkerboard result (no guidance: the checkerboard is unconditional)."""


def checkerboard_settings(
    config: ml_collections.ConfigDict,
) -> tuple[list[str], list[int], list[Setting]]:
    """(canonical rows, NFEs, settings) of `config.sample` for the configured model kind.

    GM-ODE rows take S = ceil(sample.gm_ode_substeps_total / NFE) substeps (§5.6).
    """
    s = config.sample
    if config.model.mean_only:
        rows, nfes = list(s.baseline_solvers), [int(n) for n in s.baseline_nfes]
    else:
        rows, nfes = list(s.gm_solvers), [int(n) for n in s.gm_nfes]

    def make_config(row: str, nfe: int, w: float) -> solvers.SolverConfig:
        return solvers.row_solver_config(
            row, nfe, w, substeps_total=int(s.gm_ode_substeps_total), shift=float(s.shift)
        )

    settings = sweep_settings(rows, nfes, (0.0,), make_config)
    return [solvers.canonical_sampler(r) for r in rows], nfes, settings


def evaluate_checkerboard(
    config: ml_collections.ConfigDict,
    workdir: str,
    denoiser: Callable[..., Any],
    ema_params: Any,
    eval_key: jax.Array,
    train_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample every (row, NFE) with the EMA params, score, write metrics.json and the PNG grid.

    `denoiser(params, x, t, labels)` is the model's seam; `eval_key` the run's evaluation key.
    Returns the metrics.json payload plus the printed "table".
    """
    t_start = time.perf_counter()
    noise_key, metric_key, floor_key = jax.random.split(eval_key, 3)
    rows, nfes, settings = checkerboard_settings(config)
    n = int(config.eval.num_samples)
    streams = per_chunk_streams(noise_key, n, int(config.sample.batch_size), POINT_SHAPE)
    driver = SamplingDriver(denoiser, ema_params)
    samples: dict[tuple[str, int], Any] = {}

    def keep(setting: Setting, x: Any) -> None:
        samples[(setting.row, setting.nfe)] = x.reshape(x.shape[0], 2)

    results = run_sweep(
        driver,
        settings,
        streams,
        n,
        lambda x, _: checkerboard_metrics(x.reshape(x.shape[0], 2), metric_key),
        fields=RESULT_FIELDS,
        on_samples=keep,
    )
    floor = exact_sample_floor(n, floor_key)
    kind = model_kind(bool(config.model.mean_only))
    histogram_grid_png(
        join(workdir, config.eval.figure_file),
        samples,
        rows,
        nfes,
        title=f"checkerboard, {kind}, EMA, N={n}",
    )
    payload = metrics_payload(
        config,
        kind,
        train_info,
        eval={"num_samples": n, "wall_time_s": time.perf_counter() - t_start},
        exact_sample_floor=floor,
        results=results,
    )
    table = format_table(
        results, METRIC_COLUMNS, show_w=False, references=[("exact samples", floor)]
    )
    return publish(join(workdir, config.eval.metrics_file), payload, table)
