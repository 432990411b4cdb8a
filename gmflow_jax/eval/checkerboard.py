"""Metrics of 2-D samples against the checkerboard density (`docs/math.md` §4.8, §7).

The paper shows checkerboard results only as histograms (§4.9); these metrics put numbers on the
same pictures. Every metric takes samples [N, 2] (numpy or jax) and works in float64 numpy (10^6
points take about 3.5 s of CPU time, nearly all of it the sliced W1's sorts). Non-finite samples
(any NaN/inf coordinate) count as off the board: never in a white cell, in the histogram's outside
bin, and in N for the coverage threshold; the sliced W1 leaves them out (it is then the W1 of the
finite samples) and `nonfinite_rate` reports their share.

==========================  ==================================================================
function                    what it computes
==========================  ==================================================================
`in_square_rate`            fraction of samples in a white cell (the test of oracle §9.33)
`exact_bin_masses`          exact probability of rectangular bins under the density
`histogram_tv`              0.5 sum |p_hat - p|, 64x64 bins on [-4.2, 4.2]^2 + one outside bin
`sliced_w1`                 mean over fixed directions of the 1-D W1 to a fresh exact sample
`coverage`                  fraction of the 128 white sub-cells with >= half their share
`nonfinite_rate`            fraction of samples with a NaN/inf coordinate
`checkerboard_metrics`      all of the above in one dict
`exact_sample_floor`        that dict for an exact sample: each metric's finite-N floor
==========================  ==================================================================
"""

from __future__ import annotations

import jax
import numpy as np

from gmflow_jax.data.checkerboard import (
    BOARD_HALF_WIDTH,
    CELL_SIZE,
    CELLS_PER_SIDE,
    NUM_WHITE_CELLS,
    WHITE_CELLS,
    is_in_white_cell,
    sample_checkerboard,
)

HIST_BINS = 64
"""Histogram bins per axis of the TV metric."""

HIST_EXTENT = 4.2
"""The TV histogram covers [-HIST_EXTENT, HIST_EXTENT]^2 (the paper's figure range, §4.9)."""

SLICED_DIRECTIONS = 100
"""Number of random projection directions of the sliced W1."""

SLICED_SEED = 0
"""numpy seed of the sliced-W1 directions (fixed, so scores compare across runs)."""

COVERAGE_SUBDIVISIONS = 4
"""Each white cell is split into COVERAGE_SUBDIVISIONS^2 sub-cells (8 * 16 = 128)."""

COVERAGE_THRESHOLD = 0.5
"""A sub-cell is covered when it holds at least this fraction of its expected count N / 128."""

_W1_CHUNK = 8
"""Directions projected and sorted at a time by the sliced W1 (bounds memory at 10^6 samples)."""

_W1_CLIP = 1e18
"""The sliced W1 clips finite coordinates to +-1e18 so that float32 projections stay finite."""


def _as_samples(samples) -> tuple[np.ndarray, np.ndarray]:
    """Return samples as float64 [N, 2], N >= 1, and the [N] mask of all-finite rows."""
    x = np.asarray(samples)
    if x.ndim != 2 or x.shape[1] != 2 or x.shape[0] < 1:
        raise ValueError(f"samples must have shape [N, 2] with N >= 1, got {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"samples must hold real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    return x, np.isfinite(x).all(axis=1)


def _bin_index(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Index k of the half-open bin [edges[k], edges[k+1]) holding x; -1 or len-1 when outside."""
    return np.searchsorted(edges, x, side="right") - 1  # NaN sorts last: outside


def _interval_overlap(edges: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Length of [edges[a], edges[a+1]] ∩ [lo[c], hi[c]], shape [len(edges) - 1, len(lo)]."""
    left = np.maximum(edges[:-1, None], lo[None, :])
    right = np.minimum(edges[1:, None], hi[None, :])
    return np.clip(right - left, 0.0, None)


def exact_bin_masses(edges_x, edges_y) -> np.ndarray:
    """Exact checkerboard probability [nx, ny] of the bins [ex_a, ex_a+1] x [ey_b, ey_b+1].

    The density is 1/32 on the white cells, so a bin's mass is its overlap area with the white
    cells over 32; each overlap is separable, (x-overlap)(y-overlap). float64; edges increase.
    """
    ex = np.asarray(edges_x, np.float64)
    ey = np.asarray(edges_y, np.float64)
    for name, e in (("edges_x", ex), ("edges_y", ey)):
        if e.ndim != 1 or e.shape[0] < 2 or not np.all(np.diff(e) > 0):
            raise ValueError(f"{name} must be 1-D, strictly increasing, >= 2 edges; got {e}")
    lo = -BOARD_HALF_WIDTH + CELL_SIZE * np.arange(CELLS_PER_SIDE)
    hi = lo + CELL_SIZE
    white = np.zeros((CELLS_PER_SIDE, CELLS_PER_SIDE))
    white[WHITE_CELLS[:, 0], WHITE_CELLS[:, 1]] = 1.0
    white_area = NUM_WHITE_CELLS * CELL_SIZE**2
    return _interval_overlap(ex, lo, hi) @ white @ _interval_overlap(ey, lo, hi).T / white_area


def histogram_edges(num_bins: int = HIST_BINS, extent: float = HIST_EXTENT) -> np.ndarray:
    """The num_bins + 1 float64 edges over [-extent, extent] of the TV histogram (both axes)."""
    if num_bins < 1 or not extent > 0:
        raise ValueError(f"need num_bins >= 1 and extent > 0, got {num_bins}, {extent}")
    return np.linspace(-extent, extent, num_bins + 1)


def sliced_w1_directions(
    num_directions: int = SLICED_DIRECTIONS, seed: int = SLICED_SEED
) -> np.ndarray:
    """The fixed unit projection directions [D, 2] of `sliced_w1` (isotropic, numpy seed)."""
    if num_directions < 1:
        raise ValueError(f"num_directions must be >= 1, got {num_directions}")
    d = np.random.default_rng(seed).standard_normal((num_directions, 2))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _in_square_rate(x: np.ndarray) -> float:
    """`in_square_rate` of prepared float64 samples."""
    return float(np.mean(is_in_white_cell(x)))


def _histogram_tv(x: np.ndarray, num_bins: int, extent: float) -> float:
    """`histogram_tv` of prepared float64 samples."""
    edges = histogram_edges(num_bins, extent)
    ix, iy = _bin_index(x[:, 0], edges), _bin_index(x[:, 1], edges)
    inside = (ix >= 0) & (ix < num_bins) & (iy >= 0) & (iy < num_bins)
    flat = np.where(inside, ix * num_bins + iy, num_bins * num_bins)  # last bin: outside
    p_hat = np.bincount(flat, minlength=num_bins * num_bins + 1) / x.shape[0]
    p = np.append(exact_bin_masses(edges, edges).ravel(), 0.0)  # no mass off [-4, 4]^2
    return float(0.5 * np.abs(p_hat - p).sum())


def _sorted_projection_w1(a: np.ndarray, b: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Per direction [D], the 1-D W1 between projections of equal-size finite sets a, b [n, 2].

    Sorting is in float32 (about 3x faster than float64; relative error ~1e-7). Coordinates are
    clipped to +-_W1_CLIP first, so absurd but finite samples give a huge W1, not inf - inf.
    """
    at = np.ascontiguousarray(np.clip(a, -_W1_CLIP, _W1_CLIP).T, dtype=np.float32)
    bt = np.ascontiguousarray(np.clip(b, -_W1_CLIP, _W1_CLIP).T, dtype=np.float32)
    d = directions.astype(np.float32)
    out = []
    for start in range(0, d.shape[0], _W1_CHUNK):
        dc = d[start : start + _W1_CHUNK]
        pa = dc[:, 0:1] * at[0] + dc[:, 1:2] * at[1]
        pb = dc[:, 0:1] * bt[0] + dc[:, 1:2] * bt[1]
        pa.sort(axis=1)
        pb.sort(axis=1)
        np.subtract(pa, pb, out=pa)
        np.abs(pa, out=pa)
        out.append(pa.mean(axis=1, dtype=np.float64))
    return np.concatenate(out)


def _sliced_w1(x: np.ndarray, finite: np.ndarray, key: jax.Array, directions: np.ndarray) -> float:
    """`sliced_w1` of prepared float64 samples."""
    x = x[finite]
    if x.shape[0] == 0:
        return float("inf")
    reference = np.asarray(sample_checkerboard(key, x.shape[0]))
    return float(_sorted_projection_w1(x, reference, directions).mean())


def _coverage(x: np.ndarray, subdivisions: int, threshold: float) -> float:
    """`coverage` of prepared float64 samples."""
    per_side = CELLS_PER_SIDE * subdivisions
    edges = np.linspace(-BOARD_HALF_WIDTH, BOARD_HALF_WIDTH, per_side + 1)
    ix, iy = _bin_index(x[:, 0], edges), _bin_index(x[:, 1], edges)
    inside = (ix >= 0) & (ix < per_side) & (iy >= 0) & (iy < per_side)
    counts = np.bincount((ix * per_side + iy)[inside], minlength=per_side**2)
    cell = np.arange(per_side) // subdivisions
    white = ((cell[:, None] + cell[None, :]) % 2 == 0).ravel()
    expected = x.shape[0] / (NUM_WHITE_CELLS * subdivisions**2)
    return float(np.mean(counts[white] >= threshold * expected))


def in_square_rate(samples) -> float:
    """Fraction of samples [N, 2] in a white cell (off [-4, 4)^2 or non-finite: not in one)."""
    return _in_square_rate(_as_samples(samples)[0])


def histogram_tv(samples, num_bins: int = HIST_BINS, extent: float = HIST_EXTENT) -> float:
    """TV distance 0.5 sum |p_hat - p| between the sample histogram and the exact bin masses.

    Bins: num_bins^2 half-open squares over [-extent, extent)^2 plus one bin for everything else
    (points off the grid and non-finite samples; its exact mass is 0).
    """
    return _histogram_tv(_as_samples(samples)[0], num_bins, extent)


def sliced_w1(
    samples,
    key: jax.Array,
    num_directions: int = SLICED_DIRECTIONS,
    seed: int = SLICED_SEED,
    directions=None,
) -> float:
    """Sliced W1: mean over directions of the 1-D W1 to a fresh exact sample of equal size.

    The 1-D W1 of two equal-size samples is the mean absolute difference of their sorted values.
    Directions: `sliced_w1_directions(num_directions, seed)`, or `directions` [D, 2] (unit rows).
    Non-finite samples are dropped first (the exact sample matches the finite count); inf if none
    is finite.
    """
    x, finite = _as_samples(samples)
    if directions is None:
        directions = sliced_w1_directions(num_directions, seed)
    directions = np.asarray(directions, np.float64)
    if directions.ndim != 2 or directions.shape[1] != 2 or directions.shape[0] < 1:
        raise ValueError(f"directions must have shape [D, 2], D >= 1, got {directions.shape}")
    if not np.allclose(np.linalg.norm(directions, axis=1), 1.0):
        raise ValueError("directions must be unit vectors")
    return _sliced_w1(x, finite, key, directions)


def coverage(
    samples, subdivisions: int = COVERAGE_SUBDIVISIONS, threshold: float = COVERAGE_THRESHOLD
) -> float:
    """Fraction of the 8 s^2 white sub-cells (s = subdivisions) holding >= threshold N / (8 s^2).

    N counts every sample, non-finite ones included. Sub-cells are half-open like the cells.
    """
    if subdivisions < 1 or not threshold > 0:
        raise ValueError(f"need subdivisions >= 1, threshold > 0; got {subdivisions}, {threshold}")
    return _coverage(_as_samples(samples)[0], subdivisions, threshold)


def nonfinite_rate(samples) -> float:
    """Fraction of samples [N, 2] with a NaN or infinite coordinate."""
    return float(1.0 - np.mean(_as_samples(samples)[1]))


def checkerboard_metrics(samples, key: jax.Array) -> dict[str, float]:
    """All checkerboard metrics of samples [N, 2], default settings; `key` seeds the W1 reference.

    Keys: in_square_rate, histogram_tv, sliced_w1, coverage, nonfinite_rate, num_samples.
    """
    x, finite = _as_samples(samples)
    return {
        "in_square_rate": _in_square_rate(x),
        "histogram_tv": _histogram_tv(x, HIST_BINS, HIST_EXTENT),
        "sliced_w1": _sliced_w1(x, finite, key, sliced_w1_directions()),
        "coverage": _coverage(x, COVERAGE_SUBDIVISIONS, COVERAGE_THRESHOLD),
        "nonfinite_rate": float(1.0 - np.mean(finite)),
        "num_samples": float(x.shape[0]),
    }


def exact_sample_floor(n: int, key: jax.Array) -> dict[str, float]:
    """`checkerboard_metrics` of n exact samples: the finite-N score of a perfect model."""
    key_sample, key_metric = jax.random.split(key)
    return checkerboard_metrics(sample_checkerboard(key_sample, n), key_metric)
