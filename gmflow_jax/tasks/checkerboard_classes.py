"""The class-conditional checkerboard task (`configs/checkerboard.py:classes`, issue 16).

Data (`docs/math.md` §4.8): white cell c = 0..7 is class c, uniform on its cell; batch s is
`labeled_checkerboard_batch(fold_in(data key, s))`, whose points are the unconditional batch's bit for
bit and whose labels are their cells. The train step drops labels to the null label 8 with
probability 1 - `config.train.prob_class` (§4.4). The network is the toy MLP of `config.model` with
`num_classes` = 8 (a label table added to its time embedding): GMFlow (K = 64) or, with `baseline`,
the mean-only flow-matching model with the same trunk.

Evaluation (EMA parameters): the guidance sweep. For every row of the model kind (GM rows of
`config.sample.gm_rows` with probabilistic guidance over `guidance_scales`, and optionally
`gm_cfg_rows` with classic CFG on the GM; baseline rows of `baseline_solvers` with CFG over
`cfg_scales`), every NFE of `guidance_nfes` and every scale, `eval.per_class` samples of each class
(class-major, the same noise for every setting) are scored by the exact metrics of
`eval.guidance_checkerboard` (precision, within-cell TV and coverage, over-shoot, concentration). The
workdir gets `metrics.json` (atomic, with the exact-sample floor), a PNG of sample histograms (rows =
solver rows, columns = guidance scales, at NFE `eval.grid_nfe`) and a printed table.

==============================  ==================================================================
name                            what it is
==============================  ==================================================================
`CheckerboardClassesTask`       the task (`train.task.Task`): labeled batches, the guidance sweep
`NUM_CLASSES`, `NULL_LABEL`     8 classes (the white cells) and the null label 8
`class_labels`                  class-major labels [8 per_class]
`Setting`                       one (row, guidance kind, NFE, w) of the sweep
`sweep_settings`                the settings of a model kind from `config.sample`
`setting_solver_config`         the `SolverConfig` of a setting
`run_sweep`                     sample and score settings (callback per setting; skips done ones)
`format_table`                  the printed table
==============================  ==================================================================
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from gmflow_jax import guidance, solvers
from gmflow_jax.atomic_file import write_json_atomic
from gmflow_jax.data.checkerboard import NUM_WHITE_CELLS, labeled_checkerboard_batch
from gmflow_jax.eval.figures import histogram_grid_png
from gmflow_jax.eval.guidance_checkerboard import METRIC_NAMES, exact_floor, guidance_metrics
from gmflow_jax.models.denoiser import network_functions
from gmflow_jax.sampling.driver import SamplingDriver
from gmflow_jax.sampling.streams import batch_streams
from gmflow_jax.solvers.config import GUIDED_CFG_PLACEHOLDER
from gmflow_jax.tasks.checkerboard import CheckerboardTask
from gmflow_jax.train.task import Batch, BatchLayout

Array = jax.Array
PyTree = Any

NUM_CLASSES = NUM_WHITE_CELLS
"""Classes 0..7: the white cells."""

NULL_LABEL = NUM_CLASSES
"""The unconditional label (the label table's last row, §4.4)."""

POINT_SHAPE = (1, 1, 2)
"""One 2-D point as a 1x1 two-channel image (§0.1)."""

TABLE_COLUMNS = (
    "precision",
    "within_cell_tv",
    "within_cell_tv_floor",
    "within_cell_coverage",
    "overshoot_rate",
    "overshoot_distance",
    "concentration",
)
"""Metrics shown in the printed table (all of them go to metrics.json)."""

FIGURE_EXTENT = 5.0
"""Half-width of the sample-histogram panels: the board (4) plus room to show over-shoot."""


def class_labels(per_class: int) -> np.ndarray:
    """Labels [8 per_class] int32: per_class copies of 0, then of 1, ... (class-major)."""
    if isinstance(per_class, bool) or not isinstance(per_class, int | np.integer) or per_class < 1:
        raise ValueError(f"per_class={per_class!r} must be an integer >= 1")
    return np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), int(per_class))


@dataclasses.dataclass(frozen=True)
class Setting:
    """One sweep setting: sampler row, guidance kind ("probabilistic" or "cfg"), NFE, scale w."""

    row: str
    guidance: str
    nfe: int
    w: float

    @property
    def method(self) -> str:
        """The row with its guidance kind, e.g. "gm_sde_2", "gm_sde_2+cfg", "euler"."""
        default = solvers.guidance_kind(self.row)
        return self.row if self.guidance == default else f"{self.row}+{self.guidance}"

    @property
    def key(self) -> str:
        """A unique text key ("method|nfe|w")."""
        return f"{self.method}|{self.nfe}|{self.w:g}"


def sweep_settings(config: ml_collections.ConfigDict, mean_only: bool) -> list[Setting]:
    """The settings of `config.sample` for a mean-only (baseline) or a GM model, row-major."""
    s = config.sample
    nfes = [int(n) for n in s.guidance_nfes]
    methods: list[tuple[str, str, Sequence[float]]] = []
    if mean_only:
        methods += [(str(r), "cfg", s.cfg_scales) for r in s.baseline_solvers]
    else:
        methods += [(str(r), "probabilistic", s.guidance_scales) for r in s.gm_rows]
        methods += [(str(r), "cfg", s.cfg_scales) for r in s.get("gm_cfg_rows", ())]
    out = []
    for row, kind, scales in methods:
        solvers.parse_sampler(row)  # an unknown row fails here, before any sampling
        for nfe in nfes:
            out.extend(Setting(row, kind, nfe, float(w)) for w in scales)
    return out


def setting_solver_config(
    setting: Setting, config: ml_collections.ConfigDict
) -> solvers.SolverConfig:
    """The `SolverConfig` of `setting` (guided iff its w is active; w itself is traced).

    A GM row with guidance "cfg" is the same GM sampler with classic CFG shifting every component
    mean (§5.9, Table 4 A3): the probabilistic config with the guidance kind swapped.
    """
    s = config.sample
    kind = solvers.guidance_kind(setting.row)
    common = dict(
        null_label=NULL_LABEL,
        substeps_total=int(s.gm_ode_substeps_total),
        shift=float(s.shift),
        orthogonal_guidance=float(s.orthogonal_guidance),
    )
    if setting.guidance == kind:
        return solvers.row_solver_config(setting.row, setting.nfe, setting.w, **common)
    if setting.guidance != "cfg" or kind != "probabilistic":
        raise ValueError(
            f"guidance={setting.guidance!r} is not available for row {setting.row!r}; allowed: "
            f"{kind!r}" + (" or 'cfg'" if kind == "probabilistic" else "")
        )
    guidance.check_guidance_scale(setting.w, "cfg")
    base = solvers.row_solver_config(setting.row, setting.nfe, 0.0, **common)
    placeholder = GUIDED_CFG_PLACEHOLDER if setting.w > 1 else 0.0
    return dataclasses.replace(base, guidance="cfg", guidance_scale=placeholder)


def run_sweep(
    driver: SamplingDriver,
    config: ml_collections.ConfigDict,
    settings: Iterable[Setting],
    key: Array,
    per_class: int,
    *,
    done: Iterable[str] = (),
    on_result: Callable[[dict[str, Any], np.ndarray], None] | None = None,
) -> list[dict[str, Any]]:
    """Sample and score every setting not in `done` (keys); returns their result dicts.

    Every setting samples `per_class` points of each class (class-major labels) from the same noise
    `batch_streams(key, 8 per_class, config.sample.batch_size, (1, 1, 2))`. A result holds the
    setting, its solver fields, `metrics` (`guidance_metrics`) and `sample_time_s`; `on_result(result,
    samples [N, 2])` is called after each (e.g. to save progress).
    """
    labels = class_labels(per_class)
    n = labels.shape[0]
    streams = batch_streams(key, n, int(config.sample.batch_size), POINT_SHAPE)
    done = set(done)
    todo = [s for s in settings if s.key not in done]
    results = []
    bar = tqdm(total=len(todo), desc="guidance sweep", unit="setting", dynamic_ncols=True)
    for setting in todo:
        bar.set_postfix_str(setting.key)
        cfg = setting_solver_config(setting, config)
        t0 = time.perf_counter()
        x = driver.sample(cfg, streams, n, labels, setting.w if cfg.guided else None)
        sample_time = time.perf_counter() - t0
        x = x.reshape(n, 2)
        result = {
            **dataclasses.asdict(setting),
            "method": setting.method,
            "key": setting.key,
            "solver": cfg.solver,
            "order": cfg.order,
            "num_substeps": cfg.num_substeps,
            "guided": cfg.guided,
            "metrics": guidance_metrics(x, labels),
            "sample_time_s": sample_time,
        }
        results.append(result)
        if on_result is not None:
            on_result(result, x)
        bar.update(1)
    bar.close()
    return results


def format_table(
    results: Sequence[dict[str, Any]],
    floor: dict[str, float],
    columns: Sequence[str] = TABLE_COLUMNS,
) -> str:
    """A plain-text table: one line per setting and a last line for the exact-sample floor."""
    header = f"{'method':<18}{'NFE':>5}{'w':>7}" + "".join(f"{c[:14]:>15}" for c in columns)
    lines = [header, "-" * len(header)]
    for r in results:
        values = "".join(f"{r['metrics'][c]:>15.4f}" for c in columns)
        lines.append(f"{r['method']:<18}{r['nfe']:>5}{r['w']:>7.3g}" + values)
    lines.append(
        f"{'exact samples':<18}{'':>5}{'':>7}" + "".join(f"{floor[c]:>15.4f}" for c in columns)
    )
    return "\n".join(lines)


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

    def evaluate(
        self,
        workdir: str,
        graphdef: nnx.GraphDef,
        ema_params: PyTree,
        train_info: dict[str, Any],
    ) -> dict[str, Any]:
        """Run the guidance sweep with the EMA params; write metrics.json, the PNG and the table.

        Returns the metrics.json payload (plus the printed table under "table").
        """
        config = self.config
        t_start = time.perf_counter()
        sweep_key, floor_key = jax.random.split(self.keys["eval"])
        denoiser, _ = network_functions(nnx.merge(graphdef, ema_params))
        driver = SamplingDriver(denoiser, ema_params)
        mean_only = bool(config.model.mean_only)
        per_class = int(config.eval.per_class)
        grid_nfe = int(config.eval.grid_nfe)
        panels: dict[tuple[str, float], np.ndarray] = {}

        def keep_panel(result: dict[str, Any], x: np.ndarray) -> None:
            if result["nfe"] == grid_nfe:
                panels[(result["method"], result["w"])] = x

        settings = sweep_settings(config, mean_only)
        results = run_sweep(driver, config, settings, sweep_key, per_class, on_result=keep_panel)
        floor = exact_floor(class_labels(per_class), floor_key)
        kind = "flow_matching_baseline" if mean_only else "gmflow"
        if panels:
            methods = list(dict.fromkeys(m for m, _ in panels))
            scales = sorted({w for _, w in panels})
            histogram_grid_png(
                os.path.join(workdir, config.eval.figure_file),
                panels,
                methods,
                scales,
                col_labels=[f"w={w:g}" for w in scales],
                title=f"class-conditional checkerboard, {kind}, EMA, NFE={grid_nfe}, all 8 classes",
                panel_px=150,
                extent=FIGURE_EXTENT,
            )
        payload = {
            "model": kind,
            "config": json.loads(config.to_json_best_effort()),
            "train": train_info or {},
            "eval": {
                "num_samples": per_class * NUM_CLASSES,
                "per_class": per_class,
                "metric_names": list(METRIC_NAMES),
                "wall_time_s": time.perf_counter() - t_start,
            },
            "exact_sample_floor": floor,
            "results": results,
        }
        write_json_atomic(os.path.join(workdir, config.eval.metrics_file), payload)
        table = format_table(results, floor)
        print(table, flush=True)
        payload["table"] = table
        return payload
