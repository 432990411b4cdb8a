"""THE evaluation sweep: rows x NFE x guidance scales -> samples -> metrics -> metrics.json + table.

Every task evaluates through `run_sweep`: for each `Setting` (a sampler row of the grammar in
`solvers.config`, an NFE, a guidance scale w and its `SolverConfig`), the sampling driver draws
`num_samples` samples from the task's stream (the same stream for every setting, so every setting
sees the same noise), the task's metric function scores them, and the result is one entry of the
results list. `write_metrics` writes `metrics.json` atomically; `format_table` prints the task's
columns.

==============================  ==================================================================
name                            what it is
==============================  ==================================================================
`Setting`                       (row, NFE, w, SolverConfig) of one evaluation
`sweep_settings`                rows x NFE x w -> settings (rows in canonical spelling)
`setting_fields`                the result fields of a setting (row, solver, order, nfe, ...)
`run_sweep`                     settings -> samples via the driver -> metrics -> results list
`write_metrics`                 `metrics.json` (atomic, strict JSON: non-finite -> null)
`model_kind`                    "gmflow" or "flow_matching_baseline" (metrics.json "model")
`metrics_payload`               the metrics.json payload: model kind, run config, train info, ...
`publish`                       write the payload, print the table; the payload plus "table"
`format_table`                  the printed table: one line per setting + reference lines
==============================  ==================================================================
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from gmflow_jax import solvers
from gmflow_jax.atomic_file import write_json_atomic
from gmflow_jax.sampling.driver import SamplingDriver
from gmflow_jax.sampling.streams import ChunkStreams

ALL_FIELDS = (
    "row",
    "solver",
    "order",
    "spectral",
    "num_substeps",
    "nfe",
    "guidance",
    "w",
    "guided",
)
"""Every setting field a result can record, in this order (a task picks a subset)."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One evaluation setting: sampler row (canonical), NFE, guidance scale and its config."""

    row: str
    nfe: int
    w: float
    cfg: solvers.SolverConfig


def sweep_settings(
    rows: Sequence[str],
    nfes: Sequence[int],
    scales: Sequence[float],
    make_config: Callable[[str, int, float], solvers.SolverConfig],
) -> list[Setting]:
    """Every (row, NFE, w), row-major, rows canonicalized; `make_config(row, nfe, w)` gives the
    config (bad rows or scales raise here, before any sampling)."""
    out = []
    for row in rows:
        name = solvers.canonical_sampler(row)
        for nfe in nfes:
            for w in scales:
                out.append(Setting(name, int(nfe), float(w), make_config(name, int(nfe), float(w))))
    return out


def setting_fields(setting: Setting, fields: Sequence[str] = ALL_FIELDS) -> dict[str, Any]:
    """The result fields `fields` of `setting` (see `ALL_FIELDS`)."""
    cfg = setting.cfg
    values = {
        "row": setting.row,
        "solver": cfg.solver,
        "order": cfg.order,
        "spectral": cfg.spectral,
        "num_substeps": cfg.num_substeps,
        "nfe": setting.nfe,
        "guidance": cfg.guidance,
        "w": setting.w,
        "guided": cfg.guided,
    }
    unknown = [f for f in fields if f not in values]
    if unknown:
        raise ValueError(f"setting fields {unknown} are unknown; allowed: {', '.join(ALL_FIELDS)}")
    return {f: values[f] for f in fields}


def run_sweep(
    driver: SamplingDriver,
    settings: Sequence[Setting],
    streams: ChunkStreams,
    num_samples: int,
    metric_fn: Callable[[np.ndarray, Setting], Mapping[str, Any]],
    *,
    labels: Any = None,
    fields: Sequence[str] = ALL_FIELDS,
    on_samples: Callable[[Setting, np.ndarray], None] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Sample and score every setting; returns one result per setting, in order.

    A result is `{**setting_fields(setting, fields), "metrics": metric_fn(samples, setting),
    "sample_time_s": seconds of sampling}`. `on_samples(setting, samples)` sees every setting's
    samples (figures, saved samples). `labels` [N] are the class labels of the N samples.
    """
    results = []
    bar = tqdm(
        total=len(settings), desc="eval", unit="run", dynamic_ncols=True, disable=not progress
    )
    try:
        for s in settings:
            w_text = f" w={s.w:g}" if "w" in fields else ""
            bar.set_postfix_str(f"{s.row} NFE={s.nfe}{w_text}")
            t0 = time.perf_counter()
            x = driver.sample(s.cfg, streams, num_samples, labels, s.w if s.cfg.guided else None)
            sample_time = time.perf_counter() - t0
            metrics = dict(metric_fn(x, s))
            results.append(
                {**setting_fields(s, fields), "metrics": metrics, "sample_time_s": sample_time}
            )
            if on_samples is not None:
                on_samples(s, x)
            bar.update(1)
    finally:
        bar.close()
    return results


def write_metrics(path: str, payload: Mapping[str, Any]) -> None:
    """Write the metrics payload as strict JSON atomically (non-finite numbers become null)."""
    write_json_atomic(path, dict(payload))


def model_kind(mean_only: bool) -> str:
    """The "model" of a metrics.json: "flow_matching_baseline" for a mean-only model, else "gmflow"."""
    return "flow_matching_baseline" if mean_only else "gmflow"


def metrics_payload(
    config: Any, kind: str, train_info: Mapping[str, Any] | None, **entries: Any
) -> dict[str, Any]:
    """The metrics.json payload of an evaluation: "model" (`kind`, see `model_kind`), "config" (the
    run's ConfigDict as JSON), "train" (`train_info`, or {}), then `entries` in the order given (the
    task's "eval", references, "results", ...)."""
    return {
        "model": kind,
        "config": json.loads(config.to_json_best_effort()),
        "train": train_info or {},
        **entries,
    }


def publish(path: str, payload: dict[str, Any], table: str) -> dict[str, Any]:
    """Write `payload` to `path` (`write_metrics`) and print `table`; returns the payload with the
    table under "table" (what a task's `evaluate` returns)."""
    write_metrics(path, payload)
    print(table, flush=True)
    payload["table"] = table
    return payload


def format_table(
    results: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    show_w: bool = True,
    references: Sequence[tuple[str, Mapping[str, float]]] = (),
    width: int = 16,
) -> str:
    """A plain-text table: one line per result (row, NFE[, w], the metric `columns`), then one
    line per reference (label, {column: value}; missing columns are left blank)."""
    names = [str(r["row"]) for r in results] + [label for label, _ in references]
    name_width = max([14, *(len(n) + 2 for n in names)])
    w_head = f"{'w':>7}" if show_w else ""
    header = f"{'solver':<{name_width}}{'NFE':>5}{w_head}" + "".join(
        f"{c:>{width}}" for c in columns
    )
    lines = [header, "-" * len(header)]
    for r in results:
        values = "".join(f"{r['metrics'][c]:>{width}.4f}" for c in columns)
        w_text = f"{r['w']:>7.3g}" if show_w else ""
        lines.append(f"{r['row']:<{name_width}}{r['nfe']:>5}{w_text}" + values)
    for label, ref in references:
        values = "".join(f"{ref[c]:>{width}.4f}" if c in ref else f"{'':>{width}}" for c in columns)
        pad = " " * (5 + (7 if show_w else 0))
        lines.append(f"{label:<{name_width}}{pad}" + values)
    return "\n".join(lines)
