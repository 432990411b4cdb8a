"""What a run writes to TensorBoard besides the train scalars: config, hyper-parameters, eval metrics
and sample images (tensorboardX).

=========================  ========================================================================
`flatten_config`           a nested config -> {"train.optimizer.lr": 2e-4, ...} of TensorBoard-safe
                           values (tuples and None become strings)
`write_config`             the full resolved config as a text summary ("config") and the flat values
                           as hyper-parameters (HParams tab), in the run's own event file
`write_scalars`            a dict of metrics as `prefix/name` scalars; non-finite values are not
                           written and are returned (and logged) by name
`image_grid`               `[N, H, W, C]` images (float in [-1, 1] or uint8, C = 1 or 3) -> one
                           uint8 `[rows*(H+pad)+pad, cols*(W+pad)+pad, 3]` grid
`write_image_grid`         that grid as an image summary
=========================  ========================================================================
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from tensorboardX.summary import hparams

HPARAM_TYPES = (bool, int, float, str)
"""Value types the HParams plugin stores as they are; others are written as strings."""


def _as_dict(config: Any) -> Mapping[str, Any]:
    """A plain mapping of an `ml_collections.ConfigDict` (or a mapping as it is)."""
    return config.to_dict() if hasattr(config, "to_dict") else config


def flatten_config(config: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """Dotted keys -> values of every leaf of a nested config, sorted; non-scalars as strings."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in _as_dict(config).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or hasattr(value, "to_dict"):
            flat.update(flatten_config(value, name + "."))
        elif isinstance(value, HPARAM_TYPES):
            flat[name] = value
        else:
            flat[name] = str(value)
    return dict(sorted(flat.items()))


def write_config(writer: Any, config: Any, metric_tags: Sequence[str] = (), step: int = 0) -> None:
    """Write `config` as text ("config", at `step`) and as hyper-parameters of this run.

    `metric_tags` are the scalar tags (e.g. "eval/fid") the HParams tab shows next to the values.
    The hyper-parameters go into the writer's own event file (not a sub-run, unlike
    `SummaryWriter.add_hparams`), so one run directory holds everything.
    """
    text = json.dumps(_as_dict(config), indent=2, sort_keys=True, default=str)
    writer.add_text("config", "```\n" + text + "\n```", step)
    exp, ssi, sei = hparams(flatten_config(config), {tag: 0.0 for tag in metric_tags})
    file_writer = writer._get_file_writer()
    for summary in (exp, ssi, sei):
        file_writer.add_summary(summary)


def write_scalars(writer: Any, prefix: str, metrics: Mapping[str, Any], step: int) -> list[str]:
    """Write each finite `metrics[name]` as scalar `prefix/name` at `step`; return the others' names.

    A non-finite value is not written (TensorBoard would draw it as a spike to its axis limit); it
    is logged as a warning and returned, so the caller can fail or record it.
    """
    skipped = []
    for name, value in metrics.items():
        value = float(value)
        if math.isfinite(value):
            writer.add_scalar(f"{prefix}/{name}", value, step)
        else:
            skipped.append(name)
    if skipped:
        logging.warning("step %d: non-finite %s metrics not written: %s", step, prefix, skipped)
    return skipped


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile `[N, H, W, C]` images into one uint8 RGB grid, row-major, `pad` black pixels between.

    Float images are read as [-1, 1] (the model's pixel range) and mapped to round((x + 1) 127.5)
    clipped to [0, 255]; uint8 images are kept. C = 1 is repeated to RGB. `ncols` defaults to
    ceil(sqrt(N)).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be [N>0, H, W, 1 or 3], got shape {images.shape}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if images.dtype != np.uint8:
        if not np.all(np.isfinite(images)):
            raise ValueError("images contain non-finite values")
        images = np.clip(np.round((images.astype(np.float64) + 1.0) * 127.5), 0, 255)
        images = images.astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, _ = images.shape
    cols = ncols or math.ceil(math.sqrt(n))
    if cols <= 0:
        raise ValueError(f"ncols must be > 0, got {ncols}")
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def write_image_grid(
    writer: Any, tag: str, images: np.ndarray, step: int, ncols: int | None = None
) -> np.ndarray:
    """Write `image_grid(images, ncols)` as image `tag` at `step`; returns the grid."""
    grid = image_grid(images, ncols)
    writer.add_image(tag, grid, step, dataformats="HWC")
    return grid
