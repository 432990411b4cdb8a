"""Figures of 2-D samples: the paper's grid of checkerboard histograms (`docs/math.md` §4.9).

======================  ======================================================================
function                docs/math.md
======================  ======================================================================
`histogram_image`       §4.9 200 bins on [-4.2, 4.2]^2, counts / 160 clipped to [0, 1]
`histogram_grid_png`    §4.9, paper Fig. 2: rows = solvers, columns = NFE, viridis
======================  ======================================================================

Drawing uses matplotlib's object API with the Agg canvas (no pyplot state, safe in any process), and
PNGs are written atomically through the path layer (`atomic_file.write_atomic`: a temporary file and
a rename locally, one upload on `gs://`).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gmflow_jax.atomic_file import write_atomic

FIGURE_BINS = 200
"""Histogram bins per axis of the figure (§4.9)."""

FIGURE_EXTENT = 4.2
"""The figure shows [-FIGURE_EXTENT, FIGURE_EXTENT]^2 (§4.9)."""

FIGURE_COUNT_SCALE = 160.0
"""Counts are divided by this at 10^6 samples (times N / 10^6 otherwise), then clipped to [0, 1]."""

FIGURE_REFERENCE_N = 1_000_000
"""The sample size at which the count scale is exactly FIGURE_COUNT_SCALE (§4.9)."""

_LABEL_LEFT_PX = 110
"""Left margin of the grid, in pixels, holding the row labels."""

_LABEL_TOP_PX = 30
"""Top margin of the grid, in pixels, holding the column labels."""

_TITLE_PX = 30
"""Extra top margin when a title is given."""


def histogram_image(samples, bins: int = FIGURE_BINS, extent: float = FIGURE_EXTENT) -> np.ndarray:
    """Normalized 2-D histogram [bins_y, bins_x] (row 0 = lowest y) of samples [N, 2], in [0, 1].

    counts / (160 N / 10^6) clipped to [0, 1] (§4.9); N counts every sample, non-finite ones (which
    are dropped from the histogram) included, so missing mass shows as missing density.
    """
    x = np.asarray(samples, np.float64)
    if x.ndim != 2 or x.shape[1] != 2 or x.shape[0] < 1:
        raise ValueError(f"samples must have shape [N, 2] with N >= 1, got {x.shape}")
    if bins < 1 or not extent > 0:
        raise ValueError(f"need bins >= 1 and extent > 0, got bins={bins}, extent={extent}")
    finite = x[np.isfinite(x).all(axis=1)]
    counts, _, _ = np.histogram2d(
        finite[:, 0], finite[:, 1], bins=bins, range=[[-extent, extent], [-extent, extent]]
    )
    scale = FIGURE_COUNT_SCALE * x.shape[0] / FIGURE_REFERENCE_N
    return np.clip(counts.T / scale, 0.0, 1.0)


def histogram_grid_png(
    path: str | os.PathLike,
    grid: Mapping[tuple[Hashable, Hashable], object],
    rows: Sequence[Hashable],
    cols: Sequence[Hashable],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    panel_px: int = 200,
    dpi: int = 100,
    bins: int = FIGURE_BINS,
    extent: float = FIGURE_EXTENT,
) -> tuple[int, int]:
    """Write a PNG grid of `histogram_image` panels; return its (width, height) in pixels.

    grid[(row, col)] holds samples [N, 2] (e.g. row = solver name, col = NFE); a missing pair
    leaves its panel blank. Row labels default to str(row), column labels to f"NFE={col}". The
    image is 110 + len(cols) * panel_px pixels wide and 30 (+ 30 with a title) + len(rows) *
    panel_px high; the default 200 px panel shows the 200 bins one pixel each.
    """
    rows, cols = list(rows), list(cols)
    if not rows or not cols:
        raise ValueError(f"rows and cols must be non-empty, got rows={rows}, cols={cols}")
    row_labels = [str(r) for r in rows] if row_labels is None else list(row_labels)
    col_labels = [f"NFE={c}" for c in cols] if col_labels is None else list(col_labels)
    if len(row_labels) != len(rows) or len(col_labels) != len(cols):
        raise ValueError(
            f"need one label per row and column: {len(row_labels)} row labels for {len(rows)} "
            f"rows, {len(col_labels)} column labels for {len(cols)} columns"
        )
    unknown = [k for k in grid if k[0] not in rows or k[1] not in cols]
    if unknown:
        raise ValueError(f"grid keys {unknown} are not (row, col) pairs of {rows} x {cols}")
    if panel_px < 16 or dpi < 10:
        raise ValueError(f"need panel_px >= 16 and dpi >= 10, got panel_px={panel_px}, dpi={dpi}")

    top_px = _LABEL_TOP_PX + (_TITLE_PX if title else 0)
    width, height = _LABEL_LEFT_PX + len(cols) * panel_px, top_px + len(rows) * panel_px
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    fontsize = max(6.0, 0.06 * panel_px * 72 / dpi)
    for r, row in enumerate(rows):
        y0 = (height - top_px - (r + 1) * panel_px) / height
        fig.text(
            (_LABEL_LEFT_PX - 6) / width,
            y0 + 0.5 * panel_px / height,
            row_labels[r],
            ha="right",
            va="center",
            fontsize=fontsize,
        )
        for c, col in enumerate(cols):
            x0 = (_LABEL_LEFT_PX + c * panel_px) / width
            ax = fig.add_axes((x0, y0, panel_px / width, panel_px / height))
            ax.set_xticks([])
            ax.set_yticks([])
            if (row, col) in grid:
                ax.imshow(
                    histogram_image(grid[(row, col)], bins, extent),
                    cmap="viridis",
                    vmin=0.0,
                    vmax=1.0,
                    origin="lower",
                    extent=(-extent, extent, -extent, extent),
                )
            else:
                ax.set_axis_off()
            if r == 0:
                ax.set_title(col_labels[c], fontsize=fontsize, pad=4)
    if title:
        fig.suptitle(title, y=1.0 - 4 / height, va="top", fontsize=fontsize * 1.2)

    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi), ".png")
    return width, height
