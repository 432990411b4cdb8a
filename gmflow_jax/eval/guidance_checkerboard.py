"""Exact guidance metrics on the class-conditional checkerboard (issue 16; data: docs/math.md §4.8).

Class c = 0..7 is uniform on white cell c (`data.checkerboard.WHITE_CELLS[c]`, side 2), so every
quantity a guidance method trades off is measured against a known density, without a classifier:

==============================  ==================================================================
metric (key)                    what it measures
==============================  ==================================================================
`precision`                     fraction of samples inside the requested cell (half-open, as the
                                data); the exact class has 1
`within_cell_tv`                fidelity inside the cell: TV between the histogram of the samples
                                that landed in the requested cell (CELL_BINS^2 equal bins) and the
                                uniform 1 / CELL_BINS^2, per class, averaged over classes
`within_cell_tv_floor`          the expected `within_cell_tv` of exactly uniform in-cell samples
                                with the same per-class in-cell counts (binning noise alone;
                                multinomial Monte Carlo, fixed seed): the TV a perfect in-cell
                                shape would score at this precision
`within_cell_coverage`          fraction of the cell's SUBCELLS^2 = 16 sub-cells holding at least
                                COVERAGE_THRESHOLD of their share of the in-cell samples, per
                                class, averaged
`overshoot_rate`                fraction of samples beyond the data's bounding box [-4, 4]^2 (the
                                2-D analogue of saturation; the exact class has 0)
`overshoot_distance`            mean Euclidean distance to the box of the samples beyond it (0
                                when none is)
`concentration`                 RMS distance of the in-cell samples to their cell's centre over
                                the uniform's, CELL_SIZE / sqrt(6): < 1 means pulled toward the
                                centre (mode-seeking), 1 for the exact class
`nonfinite_rate`                fraction of samples with a NaN / inf coordinate
`precision_per_class`,          lists [8]: precision and over-shoot rate of each requested class
`overshoot_rate_per_class`      (nan for a class without samples): where the errors come from
==============================  ==================================================================

Within-cell TV, coverage and concentration are conditional on landing in the requested cell, so they
measure the shape of the in-cell distribution separately from `precision` (the two axes of the
precision / fidelity frontier). Non-finite samples are outside every cell and beyond the box, and
left out of `overshoot_distance` (reported by `nonfinite_rate`). Every metric has a finite-sample
floor: `exact_floor` scores an exact sample of the same labels (TV > 0 from binning noise alone).

==============================  ==================================================================
function                        what it is
==============================  ==================================================================
`guidance_metrics`              all metrics of samples [N, 2] with requested labels [N]
`exact_floor`                   `guidance_metrics` of an exact class-conditional sample
`uniform_histogram_tv_floor`    E[TV] of n uniform samples binned into equal bins (Monte Carlo)
`pareto_frontier`               indices of the settings not dominated in (precision up, TV down)
`frontier_precision_at`         best precision with within-cell TV <= each level (the frontier)
`frontier_tv_at`                best within-cell TV with precision >= each level
==============================  ==================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np

from gmflow_jax.data.checkerboard import (
    BOARD_HALF_WIDTH,
    CELL_SIZE,
    NUM_WHITE_CELLS,
    sample_checkerboard_class,
    white_cell_bounds,
)

CELL_BINS = 8
"""Histogram bins per axis inside a cell for the within-cell TV (side 0.25; 64 bins per cell)."""

SUBCELLS = 4
"""Coverage sub-cells per axis inside a cell (16 sub-cells of side 0.5, as the unconditional
coverage's 128 = 8 x 16)."""

TV_FLOOR_DRAWS = 64
"""Multinomial draws per class averaged by `within_cell_tv_floor` (its Monte Carlo error is below
0.1 of the floor's own spread)."""

TV_FLOOR_SEED = 0
"""numpy seed of those draws (fixed, so a setting's floor is a function of its counts)."""

COVERAGE_THRESHOLD = 0.5
"""A sub-cell is covered when it holds at least this fraction of its share n_in / 16."""

UNIFORM_RMS_RADIUS = CELL_SIZE / math.sqrt(6.0)
"""RMS distance to the centre of the uniform density on a square of side L: sqrt(2 L^2 / 12)."""

METRIC_NAMES = (
    "precision",
    "within_cell_tv",
    "within_cell_tv_floor",
    "within_cell_coverage",
    "overshoot_rate",
    "overshoot_distance",
    "concentration",
    "nonfinite_rate",
)
"""Keys of `guidance_metrics` (plus `num_samples`)."""


def _prepare(samples, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float64 samples [N, 2], int labels [N], finite mask [N]); ValueError on bad input."""
    x = np.asarray(samples)
    if x.ndim != 2 or x.shape[1] != 2 or x.shape[0] < 1:
        raise ValueError(f"samples must have shape [N, 2] with N >= 1, got {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"samples must hold real numbers, got dtype {x.dtype}")
    y = np.asarray(labels)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"labels must be integers of shape [{x.shape[0]}] (one per sample), got "
            f"{y.dtype} {y.shape}"
        )
    if y.min() < 0 or y.max() >= NUM_WHITE_CELLS:
        raise ValueError(
            f"labels must be classes in 0..{NUM_WHITE_CELLS - 1} (the null label has no cell), "
            f"got values in [{y.min()}, {y.max()}]"
        )
    x = x.astype(np.float64, copy=False)
    return x, y.astype(np.int64), np.isfinite(x).all(axis=1)


def _cell_coordinates(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u [N, 2] = (x - corner) / CELL_SIZE, in-cell mask [N]); in cell iff u in [0, 1)^2.

    The mask compares x with the cell's borders directly (no rounding in the division).
    """
    lower, upper = white_cell_bounds(y)
    with np.errstate(invalid="ignore"):
        inside = np.all((x >= lower) & (x < upper), axis=1)
    return (x - lower) / CELL_SIZE, inside


def uniform_histogram_tv_floor(n: int, bins: int = CELL_BINS**2) -> float:
    """E[TV] between the histogram of n uniform samples over `bins` equal bins and uniform.

    Monte Carlo over `TV_FLOOR_DRAWS` multinomial draws with the fixed `TV_FLOOR_SEED`.
    """
    if n < 1 or bins < 1:
        raise ValueError(f"need n >= 1 and bins >= 1, got n={n}, bins={bins}")
    rng = np.random.default_rng(TV_FLOOR_SEED)
    counts = rng.multinomial(n, np.full(bins, 1.0 / bins), size=TV_FLOOR_DRAWS)
    return float(np.mean(0.5 * np.abs(counts / n - 1.0 / bins).sum(axis=1)))


def _per_class_histogram_scores(
    u: np.ndarray, inside: np.ndarray, y: np.ndarray
) -> tuple[float, float, float]:
    """Means over classes of (within-cell TV, its floor at the class's in-cell count, coverage).

    A class with no sample in its cell scores TV 1, floor 1 and coverage 0. Classes absent from `y`
    are skipped.
    """
    tvs, floors, covs = [], [], []
    for c in np.unique(y):
        uc = u[inside & (y == c)]
        n_in = uc.shape[0]
        if n_in == 0:
            tvs.append(1.0)
            floors.append(1.0)
            covs.append(0.0)
            continue
        floors.append(uniform_histogram_tv_floor(n_in))
        # u in [0, 1); the clip guards the float64 division against landing on exactly 1.
        fine = np.minimum((uc * CELL_BINS).astype(np.int64), CELL_BINS - 1)
        counts = np.bincount(fine[:, 0] * CELL_BINS + fine[:, 1], minlength=CELL_BINS**2)
        tvs.append(0.5 * float(np.abs(counts / n_in - 1.0 / CELL_BINS**2).sum()))
        coarse = np.minimum((uc * SUBCELLS).astype(np.int64), SUBCELLS - 1)
        sub = np.bincount(coarse[:, 0] * SUBCELLS + coarse[:, 1], minlength=SUBCELLS**2)
        covs.append(float(np.mean(sub >= COVERAGE_THRESHOLD * n_in / SUBCELLS**2)))
    return float(np.mean(tvs)), float(np.mean(floors)), float(np.mean(covs))


def _box_distance(x: np.ndarray) -> np.ndarray:
    """Euclidean distance [N] of finite points to the closed box [-4, 4]^2 (0 inside)."""
    excess = np.clip(np.abs(x) - BOARD_HALF_WIDTH, 0.0, None)
    return np.sqrt((excess**2).sum(axis=1))


def guidance_metrics(samples, labels) -> dict[str, float]:
    """The metrics of the module docstring for samples [N, 2] drawn for requested classes [N].

    Float64 numpy; `labels` are classes 0..7. Keys: `METRIC_NAMES` and `num_samples` (floats), and
    the per-class lists `precision_per_class`, `overshoot_rate_per_class`.
    """
    x, y, finite = _prepare(samples, labels)
    u, inside = _cell_coordinates(x, y)
    tv, tv_floor, cov = _per_class_histogram_scores(u, inside, y)
    beyond = ~finite
    distance = np.zeros(x.shape[0])
    distance[finite] = _box_distance(x[finite])
    beyond |= distance > 0
    n_beyond_finite = int(np.count_nonzero(finite & (distance > 0)))
    overshoot_distance = float(distance[finite & (distance > 0)].mean()) if n_beyond_finite else 0.0
    if np.any(inside):
        offsets = (u[inside] - 0.5) * CELL_SIZE
        rms = math.sqrt(float(np.mean((offsets**2).sum(axis=1))))
        concentration = rms / UNIFORM_RMS_RADIUS
    else:
        concentration = float("nan")  # no sample in its cell: no in-cell spread to compare
    per_class = [y == c for c in range(NUM_WHITE_CELLS)]
    return {
        "precision": float(np.mean(inside)),
        "within_cell_tv": tv,
        "within_cell_tv_floor": tv_floor,
        "within_cell_coverage": cov,
        "overshoot_rate": float(np.mean(beyond)),
        "overshoot_distance": overshoot_distance,
        "concentration": concentration,
        "nonfinite_rate": float(1.0 - np.mean(finite)),
        "num_samples": float(x.shape[0]),
        "precision_per_class": [
            float(np.mean(inside[m])) if m.any() else float("nan") for m in per_class
        ],
        "overshoot_rate_per_class": [
            float(np.mean(beyond[m])) if m.any() else float("nan") for m in per_class
        ],
    }


def exact_floor(labels, key: jax.Array) -> dict[str, float]:
    """`guidance_metrics` of exact samples of `labels`: each metric's finite-sample floor.

    Precision 1, overshoot 0 and concentration near 1 hold for any N; within-cell TV is the binning
    noise of N / 8 samples per class (about 0.5 * 64 * sqrt(2 / (pi * 64 n)) for n per class).
    """
    labels = np.asarray(labels)
    return guidance_metrics(np.asarray(sample_checkerboard_class(key, labels)), labels)


def _points(precision: Sequence[float], tv: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Float64 arrays of equal length >= 1 (ValueError otherwise)."""
    p, t = np.asarray(precision, np.float64), np.asarray(tv, np.float64)
    if p.ndim != 1 or p.shape != t.shape or p.shape[0] < 1:
        raise ValueError(
            f"precision and tv must be 1-D of equal length >= 1, got {p.shape}, {t.shape}"
        )
    return p, t


def pareto_frontier(precision: Sequence[float], tv: Sequence[float]) -> list[int]:
    """Indices of the non-dominated settings (higher precision, lower within-cell TV), by TV.

    Setting j dominates i when p_j >= p_i and t_j <= t_i with one strict. Non-finite points are
    never on the frontier. Ties (equal p and t) keep the first index.
    """
    p, t = _points(precision, tv)
    ok = np.isfinite(p) & np.isfinite(t)
    order = sorted(np.flatnonzero(ok), key=lambda i: (t[i], -p[i], i))
    frontier, best = [], -np.inf
    for i in order:
        if p[i] > best:
            frontier.append(int(i))
            best = p[i]
    return frontier


def frontier_precision_at(
    precision: Sequence[float], tv: Sequence[float], tv_levels: Sequence[float]
) -> np.ndarray:
    """For each level tau: max precision over settings with within-cell TV <= tau (nan if none)."""
    p, t = _points(precision, tv)
    out = []
    for tau in np.asarray(tv_levels, np.float64):
        ok = np.isfinite(p) & (t <= tau)
        out.append(float(p[ok].max()) if np.any(ok) else float("nan"))
    return np.asarray(out)


def frontier_tv_at(
    precision: Sequence[float], tv: Sequence[float], precision_levels: Sequence[float]
) -> np.ndarray:
    """For each level pi: min within-cell TV over settings with precision >= pi (nan if none)."""
    p, t = _points(precision, tv)
    out = []
    for level in np.asarray(precision_levels, np.float64):
        ok = np.isfinite(t) & (p >= level)
        out.append(float(t[ok].min()) if np.any(ok) else float("nan"))
    return np.asarray(out)
