"""The class-conditional checkerboard evaluation (issue 16): rows x NFE x guidance scale through
`eval.sweep`, scored by the exact metrics of `eval.guidance_checkerboard`.

With the EMA parameters, for every row of the model kind and every NFE of `sample.guidance_nfes`:

==============================  ==================================================================
model                           rows and scales
==============================  ==================================================================
GMFlow (a GM head)              `sample.gm_rows` with probabilistic guidance over
                                `sample.guidance_scales` (§5.3), and `sample.gm_cfg_rows` (optional)
                                with classic CFG shifting every component mean over
                                `sample.cfg_scales` (§5.9, Table 4 A3): the same model, the other
                                guidance
baseline (`mean_only`)          `sample.baseline_solvers` with classic CFG over `sample.cfg_scales`
==============================  ==================================================================

`eval.per_class` samples of each class (class-major labels) per setting, the same noise for every
setting and both models. Written to the workdir: `metrics.json` (atomic, with the exact-sample
floor), a PNG of sample histograms of all 8 classes (rows = methods, columns = guidance scales, at
NFE `eval.grid_nfe`) and a printed table.

Random streams: `sweep_key, floor_key = split(eval key)`; the noise is
`sampling.streams.batch_streams(sweep_key, 8 per_class, sample.batch_size, (1, 1, 2))`.

==============================  ==================================================================
name                            what it is
==============================  ==================================================================
`class_labels`                  class-major labels [8 per_class]
`method_name`                   "gm_sde_2", "gm_sde_2+cfg", "euler": a row with its guidance kind
`guidance_settings`             the `eval.sweep.Setting`s of a model kind from `config.sample`
`guidance_streams`              the noise stream of the sweep
`result_key`                    "method|nfe|w" of a result (resumable benchmarks)
`evaluate_guidance_checkerboard`  the whole evaluation (metrics.json, PNG, table)
==============================  ==================================================================
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from gmflow_jax import guidance, solvers
from gmflow_jax.data.checkerboard import NUM_WHITE_CELLS, POINT_SHAPE
from gmflow_jax.eval.figures import histogram_grid_png
from gmflow_jax.eval.guidance_checkerboard import METRIC_NAMES, exact_floor, guidance_metrics
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
from gmflow_jax.sampling.streams import ChunkStreams, batch_streams
from gmflow_jax.solvers.config import GUIDED_CFG_STATIC_SCALE

NUM_CLASSES = NUM_WHITE_CELLS
"""Classes 0..7: the white cells."""

NULL_LABEL = NUM_CLASSES
"""The unconditional label (the label table's last row, §4.4)."""

RESULT_FIELDS = ("row", "solver", "order", "num_substeps", "nfe", "guidance", "w", "guided")
"""Setting fields of a result (`eval.sweep.setting_fields`)."""

TABLE_COLUMNS = tuple(name for name in METRIC_NAMES if name != "nonfinite_rate")
"""Metrics shown in the printed table: all but `nonfinite_rate` (all of them go to metrics.json)."""

TABLE_WIDTH = 22
"""Column width of the printed table (the longest metric name is 20 characters)."""

FIGURE_EXTENT = 5.0
"""Half-width of the sample-histogram panels: the board (4) plus room to show over-shoot."""


def class_labels(per_class: int) -> np.ndarray:
    """Labels [8 per_class] int32: per_class copies of 0, then of 1, ... (class-major)."""
    if isinstance(per_class, bool) or not isinstance(per_class, int | np.integer) or per_class < 1:
        raise ValueError(f"per_class={per_class!r} must be an integer >= 1")
    return np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), int(per_class))


def method_name(row: str, guidance_kind: str) -> str:
    """The row, suffixed "+cfg" when a GM row runs classic CFG instead of probabilistic guidance."""
    return row if guidance_kind == solvers.guidance_kind(row) else f"{row}+{guidance_kind}"


def result_key(result: Mapping[str, Any]) -> str:
    """ "method|nfe|w" of a result (unique within one sweep of both models)."""
    return f"{result['method']}|{result['nfe']}|{result['w']:g}"


def _make_config(
    config: ml_collections.ConfigDict, guidance_kind: str
) -> Callable[[str, int, float], solvers.SolverConfig]:
    """`(row, nfe, w) -> SolverConfig` with guidance `guidance_kind`, no orthogonal projection
    unless `sample.orthogonal_guidance` says so, and the null label 8.

    A GM row with "cfg" is the GM sampler with classic CFG on every component mean (§5.9): the
    row's unguided config with the guidance kind swapped and the CFG static scale.
    """
    s = config.sample
    common = dict(
        null_label=NULL_LABEL,
        substeps_total=int(s.gm_ode_substeps_total),
        shift=float(s.shift),
        orthogonal_guidance=float(s.orthogonal_guidance),
    )

    def make(row: str, nfe: int, w: float) -> solvers.SolverConfig:
        native = solvers.guidance_kind(row)
        if guidance_kind == native:
            return solvers.row_solver_config(row, nfe, w, **common)
        if guidance_kind != "cfg" or native != "probabilistic":
            raise ValueError(
                f"guidance {guidance_kind!r} is not available for row {row!r}; allowed: {native!r}"
                + (" or 'cfg'" if native == "probabilistic" else "")
            )
        guidance.check_guidance_scale(w, "cfg")
        base = solvers.row_solver_config(row, nfe, 0.0, **common)
        static_scale = GUIDED_CFG_STATIC_SCALE if w > 1 else 0.0
        return dataclasses.replace(base, guidance="cfg", guidance_scale=static_scale)

    return make


def guidance_settings(config: ml_collections.ConfigDict, mean_only: bool) -> list[Setting]:
    """The settings of `config.sample` for a mean-only (baseline) or a GM model (see above)."""
    s = config.sample
    nfes = [int(n) for n in s.guidance_nfes]
    if mean_only:
        return sweep_settings(s.baseline_solvers, nfes, s.cfg_scales, _make_config(config, "cfg"))
    settings = sweep_settings(
        s.gm_rows, nfes, s.guidance_scales, _make_config(config, "probabilistic")
    )
    cfg_rows = tuple(s.gm_cfg_rows)
    if cfg_rows:
        settings += sweep_settings(cfg_rows, nfes, s.cfg_scales, _make_config(config, "cfg"))
    return settings


def guidance_streams(key: jax.Array, per_class: int, batch_size: int) -> ChunkStreams:
    """The sweep's noise: `batch_streams(key, 8 per_class, batch_size, (1, 1, 2))`."""
    return batch_streams(key, NUM_CLASSES * int(per_class), int(batch_size), POINT_SHAPE)


def score_settings(
    driver: SamplingDriver,
    settings: list[Setting],
    streams: ChunkStreams,
    per_class: int,
    on_result: Callable[[dict[str, Any], np.ndarray], None] | None = None,
) -> list[dict[str, Any]]:
    """Sample and score `settings` one by one through `eval.sweep.run_sweep`; each result also gets
    "method" and "key", and `on_result(result, samples [N, 2])` runs after each (progress files)."""
    labels = class_labels(per_class)
    n = labels.shape[0]
    out: list[dict[str, Any]] = []
    latest: list[np.ndarray] = []  # the samples of the setting just run

    def keep(_: Setting, x: np.ndarray) -> None:
        latest[:] = [x.reshape(n, 2)]

    for setting in settings:
        (result,) = run_sweep(
            driver,
            [setting],
            streams,
            n,
            lambda x, _: guidance_metrics(x.reshape(n, 2), labels),
            labels=labels,
            fields=RESULT_FIELDS,
            on_samples=keep,
            progress=False,
        )
        result["method"] = method_name(result["row"], result["guidance"])
        result["key"] = result_key(result)
        print(f"{result['key']}: {_summary(result['metrics'])}", flush=True)
        out.append(result)
        if on_result is not None:
            on_result(result, latest[0])
    return out


def _summary(m: Mapping[str, float]) -> str:
    return (
        f"precision {m['precision']:.4f}, cell TV {m['within_cell_tv']:.4f}, "
        f"over-shoot {m['overshoot_rate']:.4f}, concentration {m['concentration']:.3f}"
    )


def evaluate_guidance_checkerboard(
    config: ml_collections.ConfigDict,
    workdir: str,
    denoiser: Callable[..., Any],
    ema_params: Any,
    eval_key: jax.Array,
    train_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The guidance sweep with the EMA params: metrics.json, the PNG and the printed table.

    Returns the metrics.json payload plus the printed "table".
    """
    t_start = time.perf_counter()
    sweep_key, floor_key = jax.random.split(eval_key)
    mean_only = bool(config.model.mean_only)
    per_class = int(config.eval.per_class)
    grid_nfe = int(config.eval.grid_nfe)
    driver = SamplingDriver(denoiser, ema_params)
    streams = guidance_streams(sweep_key, per_class, int(config.sample.batch_size))
    panels: dict[tuple[str, float], np.ndarray] = {}

    def keep_panel(result: dict[str, Any], x: np.ndarray) -> None:
        if result["nfe"] == grid_nfe:
            panels[(result["method"], result["w"])] = x

    settings = guidance_settings(config, mean_only)
    results = score_settings(driver, settings, streams, per_class, keep_panel)
    floor = exact_floor(class_labels(per_class), floor_key)
    kind = model_kind(mean_only)
    if panels:
        methods = list(dict.fromkeys(m for m, _ in panels))
        scales = sorted({w for _, w in panels})
        histogram_grid_png(
            join(workdir, config.eval.figure_file),
            panels,
            methods,
            scales,
            col_labels=[f"w={w:g}" for w in scales],
            title=f"class-conditional checkerboard, {kind}, EMA, NFE={grid_nfe}, all 8 classes",
            panel_px=150,
            extent=FIGURE_EXTENT,
        )
    payload = metrics_payload(
        config,
        kind,
        train_info,
        eval={
            "num_samples": per_class * NUM_CLASSES,
            "per_class": per_class,
            "metric_names": list(METRIC_NAMES),
            "wall_time_s": time.perf_counter() - t_start,
        },
        exact_sample_floor=floor,
        results=results,
    )
    shown = [{**r, "row": r["method"]} for r in results]
    table = format_table(
        shown, TABLE_COLUMNS, references=[("exact samples", floor)], width=TABLE_WIDTH
    )
    return publish(join(workdir, config.eval.metrics_file), payload, table)
