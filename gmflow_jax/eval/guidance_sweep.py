"""The ImageNet guidance sweep: FID / IS / Precision / Recall / Saturation per setting, then tables.

`docs/math.md` §7 (the evaluation protocol: the probabilistic guidance grid, the (steps, substeps)
pairs); `docs/paper-facts.md` §5 (best FID and best Precision per solver and NFE).

The settings are `eval.sweep.Setting`s (`eval.sweep.sweep_settings`: rows x NFE x w, each with its
`SolverConfig`). Every setting draws `num_samples` samples through an `eval.adm_export.ShardedSampler`
(the same index streams, hence the same labels and noise, for every setting), and each batch goes
straight through the FID Inception on the same mesh: no images are kept.

==============================  ================================================================
name                            what it does
==============================  ================================================================
`reference_features`            pool features of a reference batch's images (cached)
`run_sweep`                     the guidance grid per solver and NFE -> metrics -> tables
`read_results`                  the rows of `sweep_results.jsonl`
`best_settings`                 best-FID and best-Precision setting per solver and NFE (pure)
`sweep_table_markdown`          the markdown table of `best_settings`
`write_sweep_tables`            `sweep_table.md` and `sweep_table.json` from the results
==============================  ================================================================

Files in `out_dir`: `reference_pool.npz` (the reference images' features, computed once),
`sweep_results.jsonl` (one line of metrics per setting; settings already there are skipped when it
resumes), `sweep_table.md` and `sweep_table.json`.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import os
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gmflow_jax import solvers
from gmflow_jax.atomic_file import write_atomic, write_npz_atomic
from gmflow_jax.eval.adm_export import (
    DEFAULT_NUM_SAMPLES,
    ShardedSampler,
    log_progress,
    process_rows,
)
from gmflow_jax.eval.image_metrics import PAPER_REAL_SATURATION, inception_metrics, mean_saturation
from gmflow_jax.eval.inception import FIDInceptionV3, extract_features
from gmflow_jax.eval.reference_batches import iter_reference_images, read_reference_batch
from gmflow_jax.eval.sweep import Setting, sweep_settings
from gmflow_jax.parallel.sharding import batch_sharding
from gmflow_jax.paths import as_path, join, make_dirs
from gmflow_jax.sampling.driver import local_rows, replicate_tree
from gmflow_jax.sampling.streams import check_seed

Array = jax.Array

PAPER_GUIDANCE_GRID: tuple[float, ...] = (
    0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.11, 0.13,
    0.16, 0.19, 0.23, 0.27, 0.33, 0.39, 0.47, 0.55, 0.65, 0.75,
)  # fmt: skip
"""Probabilistic guidance scales w of the paper's sweep (`docs/paper-facts.md` §5, `docs/math.md` §7 and §8.2)."""

PAPER_SWEEP_STEPS: tuple[int, ...] = (8, 32)
"""NFEs of the official test config (substeps 16 and 4 by the ceil(128 / NFE) rule)."""

PAPER_SWEEP_SOLVERS: tuple[str, ...] = ("gm_ode_2", "gm_sde_2")
"""Solvers of the official test config."""

SWEEP_SOLVERS: tuple[str, ...] = tuple(r for r in solvers.CANONICAL_ROWS if r.startswith("gm_"))
"""Sampler rows a sweep accepts (probabilistic guidance needs a GM row; legacy spellings normalize)."""


RESULTS_NAME = "sweep_results.jsonl"
"""One JSON line of metrics per sweep setting."""

TABLE_MD_NAME = "sweep_table.md"
"""Best-FID / best-Precision table (markdown)."""

TABLE_JSON_NAME = "sweep_table.json"
"""Best-FID / best-Precision table (JSON)."""

REFERENCE_CACHE_NAME = "reference_pool.npz"
"""Cached Inception pool features of the reference images."""


# --------------------------------------------------------------------------------------------
# The guidance sweep
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def _inception_program(
    graphdef: nnx.GraphDef, mesh: Mesh, state: Any, images: Array
) -> dict[str, Array]:
    """Pool features and ADM's IS logits (fc without bias) of uint8 images, batch-sharded."""
    net = nnx.merge(graphdef, state)
    pool = net(images).pool
    out = {"pool": pool, "logits": net.logits_from_pool(pool, include_bias=False)}
    sharding = batch_sharding(mesh)
    return {k: jax.lax.with_sharding_constraint(v, sharding) for k, v in out.items()}


def reference_features(
    inception: FIDInceptionV3,
    reference_path: str,
    cache_dir: str,
    *,
    batch_size: int = 100,
    log: Callable[[str], None] | None = print,
) -> np.ndarray:
    """Pool features [M, 2048] of the reference batch's images, cached in `cache_dir`.

    The cache records the reference path; another reference recomputes it.
    """
    cache = join(cache_dir, REFERENCE_CACHE_NAME)
    key = os.path.abspath(reference_path)
    if as_path(cache).is_file():
        try:
            # Through the path layer (local or gs://); the cache is [M, 2048] float32.
            with np.load(io.BytesIO(as_path(cache).read_bytes()), allow_pickle=False) as data:
                if str(data["reference"]) == key:
                    return data["pool"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass
    if log is not None:
        log(f"Inception features of the reference images in {reference_path}")
    pool = extract_features(
        inception, iter_reference_images(reference_path, batch_size), batch_size
    )
    pool = np.asarray(pool.pool, np.float32)
    write_npz_atomic(cache, pool=pool, reference=np.asarray(key))
    return pool


def _result_key(row: Mapping[str, Any]) -> tuple:
    """Identity of a sweep setting in `sweep_results.jsonl`."""
    return (
        row["solver"],
        int(row["num_steps"]),
        int(row["num_substeps"]),
        round(float(row["guidance_scale"]), 6),
        int(row["num_samples"]),
        int(row["seed"]),
    )


def read_results(path: str) -> list[dict[str, Any]]:
    """The rows of a `sweep_results.jsonl` (empty when absent; a torn last line is dropped)."""
    if not as_path(path).is_file():
        return []
    rows = []
    for line in as_path(path).read_text().splitlines():  # the path layer: local or gs://
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _finite(value: Any) -> bool:
    """Whether `value` is a finite number."""
    return isinstance(value, int | float) and math.isfinite(value)


def best_settings(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Best-FID (lowest) and best-Precision (highest) row per (solver, NFE, substeps, N).

    Rows whose metric is missing or not finite are left out of that choice; ties go to the smaller
    guidance scale. Groups are ordered by solver, then NFE.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in results:
        key = (row["solver"], int(row["num_steps"]), int(row["num_substeps"]))
        groups.setdefault((*key, int(row["num_samples"])), []).append(row)
    table = []
    for (solver, steps, substeps, n), rows in sorted(groups.items()):
        by_fid = [r for r in rows if _finite(r.get("fid"))]
        by_prec = [r for r in rows if _finite(r.get("precision"))]
        best_fid = min(by_fid, key=lambda r: (r["fid"], r["guidance_scale"]), default=None)
        best_prec = min(by_prec, key=lambda r: (-r["precision"], r["guidance_scale"]), default=None)
        table.append(
            {
                "solver": solver,
                "num_steps": steps,
                "num_substeps": substeps,
                "num_samples": n,
                "num_settings": len(rows),
                "best_fid": None if best_fid is None else dict(best_fid),
                "best_precision": None if best_prec is None else dict(best_prec),
            }
        )
    return table


def _fmt(value: Any, digits: int) -> str:
    """A number with `digits` decimals, or "-" when missing."""
    return f"{value:.{digits}f}" if _finite(value) else "-"


def sweep_table_markdown(table: Sequence[Mapping[str, Any]]) -> str:
    """Markdown of `best_settings`: best-FID and best-Precision settings per solver and NFE."""
    lines = [
        "| solver | NFE | substeps | N | best-FID w | FID | IS | Precision | Recall "
        "| best-Precision w | Precision | Recall | FID | Saturation (vs real) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        f, p = row["best_fid"] or {}, row["best_precision"] or {}
        sat = p.get("saturation_rel")
        lines.append(
            f"| {row['solver']} | {row['num_steps']} | {row['num_substeps']} | "
            f"{row['num_samples']} | {_fmt(f.get('guidance_scale'), 2)} | {_fmt(f.get('fid'), 2)} "
            f"| {_fmt(f.get('inception_score'), 1)} | {_fmt(f.get('precision'), 3)} | "
            f"{_fmt(f.get('recall'), 3)} | {_fmt(p.get('guidance_scale'), 2)} | "
            f"{_fmt(p.get('precision'), 3)} | {_fmt(p.get('recall'), 3)} | "
            f"{_fmt(p.get('fid'), 2)} | {'-' if not _finite(sat) else f'{sat:+.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def write_sweep_tables(out_dir: str, results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Write `sweep_table.md` and `sweep_table.json` from the results; returns the table."""
    table = best_settings(results)
    md = sweep_table_markdown(table).encode()
    js = json.dumps(table, indent=2, sort_keys=True).encode()
    write_atomic(join(out_dir, TABLE_MD_NAME), lambda f: f.write(md))
    write_atomic(join(out_dir, TABLE_JSON_NAME), lambda f: f.write(js))
    return table


def _sweep_features(
    sampler: ShardedSampler,
    inception: tuple[nnx.GraphDef, Any],
    *,
    num_samples: int,
    batch_size: int,
    seed: int,
    guidance_scale: float,
    log: Callable[[str], None],
) -> tuple[np.ndarray, np.ndarray, float]:
    """(pool [N, 2048], IS logits [N, 1008], mean saturation) of N samples at one guidance scale.

    The features are gathered on every process; the saturation sums are reduced over processes.
    """
    rows = process_rows(sampler.mesh, batch_size)
    me = jax.process_index()
    graphdef, state = inception
    pools, logits = [], []
    sat_sum, sat_count = 0.0, 0
    num_batches = math.ceil(num_samples / batch_size)
    t0 = time.perf_counter()
    for b in range(num_batches):
        out = sampler(seed, np.arange(b * batch_size, (b + 1) * batch_size), guidance_scale)
        feats = _inception_program(graphdef, sampler.mesh, state, out["images"])
        keep = min(batch_size, num_samples - b * batch_size)
        pools.append(
            np.asarray(multihost_utils.process_allgather(feats["pool"], tiled=True))[:keep]
        )
        logits.append(
            np.asarray(multihost_utils.process_allgather(feats["logits"], tiled=True))[:keep]
        )
        r0, r1 = rows[me]
        valid = max(0, min(r1, keep) - r0)
        if valid:
            images = local_rows(out["images"], rows[me])[:valid]
            sat_sum += mean_saturation(images) * valid
            sat_count += valid
        log_progress(log, f"w={guidance_scale:g}", b + 1, num_batches, t0)
    totals = np.asarray([sat_sum, sat_count], np.float64)
    if jax.process_count() > 1:
        totals = np.asarray(multihost_utils.process_allgather(totals)).sum(axis=0)
    return np.concatenate(pools), np.concatenate(logits), float(totals[0] / totals[1])


SolverConfigFn = Callable[[str, int, int | None, float], solvers.SolverConfig]
"""`(row, NFE, num_substeps or None, w) -> SolverConfig` (e.g. `GMFlowPipeline.solver_config`)."""


def run_sweep(
    solver_config: SolverConfigFn,
    make_sampler: Callable[[solvers.SolverConfig], ShardedSampler],
    mesh: Mesh,
    *,
    out_dir: str,
    inception: FIDInceptionV3,
    reference_path: str,
    solver_names: Sequence[str] = PAPER_SWEEP_SOLVERS,
    steps_list: Sequence[int] = PAPER_SWEEP_STEPS,
    guidance_grid: Sequence[float] = PAPER_GUIDANCE_GRID,
    num_substeps: int | None = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    batch_size: int,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """The guidance sweep: FID / IS / Precision / Recall / Saturation for every setting, then tables.

    The settings are `eval.sweep.sweep_settings(solver_names, steps_list, guidance_grid, ...)` with
    `solver_config(row, nfe, num_substeps, w)`; `num_substeps` applies to the GM-ODE rows (None:
    ceil(128 / NFE)), GM-SDE runs 1 substep. The settings of one (row, NFE) share a `SolverConfig`
    (w is traced), hence one `make_sampler(cfg)` and one compile. Each setting scores
    `num_samples` samples (same seed for every setting) against the reference batch (its
    `mu`/`sigma` for FID when present, its images for precision/recall). Settings already in
    `sweep_results.jsonl` are skipped. Returns the best-FID / best-Precision table
    (`best_settings`), also written as markdown and JSON.
    """
    seed = check_seed(seed)
    for name in solver_names:
        if solvers.canonical_sampler(name) not in SWEEP_SOLVERS:
            raise ValueError(f"sweep solver {name!r} is not allowed; allowed: {SWEEP_SOLVERS}")
    for w in guidance_grid:
        if not (isinstance(w, int | float) and 0.0 < float(w) < 1.0):
            raise ValueError(f"guidance scale {w!r} of the grid must be in (0, 1)")

    def make_config(row: str, nfe: int, w: float) -> solvers.SolverConfig:
        ode = row.startswith("gm_ode")
        return solver_config(row, nfe, num_substeps if ode else None, w)

    settings = sweep_settings(solver_names, steps_list, guidance_grid, make_config)
    process_rows(mesh, batch_size)  # validates the batch size before any work
    log = log if log is not None and jax.process_index() == 0 else (lambda _: None)
    make_dirs(out_dir)
    results_path = join(out_dir, RESULTS_NAME)

    reference = read_reference_batch(reference_path, load_images=False)
    if reference.num_images == 0:
        raise ValueError(
            f"reference batch {reference_path!r} has no images (arr_0); precision/recall needs them"
        )
    real_pool = None
    if jax.process_index() == 0:
        real_pool = reference_features(inception, reference_path, out_dir, log=log)
    graphdef, state = nnx.split(inception)
    inception_parts = (graphdef, replicate_tree(state, mesh))

    for (row, nfe), group in itertools.groupby(settings, key=lambda s: (s.row, s.nfe)):
        group = list(group)
        sampler = make_sampler(group[0].cfg)
        done_keys = {_result_key(r) for r in read_results(results_path)}
        ids = [_row_id(s, num_samples, seed) for s in group]
        flags = np.asarray([_result_key(r) not in done_keys for r in ids], bool)
        if jax.process_count() > 1:
            flags = np.asarray(multihost_utils.broadcast_one_to_all(flags.astype(np.int32)))
        for row_id, run in zip(ids, flags.astype(bool), strict=True):
            if not run:
                continue
            w = row_id["guidance_scale"]
            pool, logits, saturation = _sweep_features(
                sampler,
                inception_parts,
                num_samples=num_samples,
                batch_size=batch_size,
                seed=seed,
                guidance_scale=w,
                log=log,
            )
            if jax.process_index() == 0:
                metrics = inception_metrics(
                    pool, logits, real_pool, real_mu=reference.mu, real_sigma=reference.sigma
                )
                result = {
                    **row_id,
                    **metrics,
                    "saturation": saturation,
                    "saturation_rel": saturation - PAPER_REAL_SATURATION,
                }
                existing = read_results(results_path)
                text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in [*existing, result])
                write_atomic(results_path, lambda f, t=text.encode(): f.write(t))
                log(
                    f"{row} NFE={nfe} w={w:g}: FID {metrics['fid']:.2f} IS "
                    f"{metrics['inception_score']:.1f} precision {metrics['precision']:.3f} "
                    f"recall {metrics['recall']:.3f}"
                )
    table = []
    if jax.process_index() == 0:
        table = write_sweep_tables(out_dir, read_results(results_path))
        log(sweep_table_markdown(table))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("gmflow_jax.eval.guidance_sweep.run_sweep")
    return table


def _row_id(setting: Setting, num_samples: int, seed: int) -> dict[str, Any]:
    """The identity fields of a setting's line in `sweep_results.jsonl`."""
    return {
        "solver": setting.row,
        "num_steps": setting.nfe,
        "num_substeps": setting.cfg.num_substeps,
        "guidance_scale": float(setting.w),
        "num_samples": num_samples,
        "seed": seed,
    }
