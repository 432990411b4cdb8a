"""Sample grids of generated images as PNG files (one row per class; panels per solver setting).

===========================  ====================================================================
function                     what it does
===========================  ====================================================================
`to_uint8`                   images in [low, high] -> uint8 (clipped; NaN -> mid-grey)
`class_mosaic`               [N, H, W, C] images with labels -> one row per class, uint8 mosaic
`write_png_atomic`           uint8 [H, W] or [H, W, 3] -> PNG, atomic (`atomic_file`), local or gs://
`panel_grid_png`             mosaics keyed by (row, column) -> one labelled PNG
===========================  ====================================================================
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gmflow_jax.atomic_file import write_atomic
from gmflow_jax.paths import PathLike, as_path, make_dirs

PAD_VALUE = 255
"""Grey level of the padding between images and panels."""

LABEL_HEIGHT_PX = 14
"""Height of a text line of the default bitmap font, with a margin."""


def to_uint8(images, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Map images from [low, high] to uint8 0..255 (clipped; NaN pixels become mid-grey)."""
    if not high > low:
        raise ValueError(f"need high > low, got low={low}, high={high}")
    x = np.asarray(images, np.float64)
    x = np.nan_to_num(x, nan=(low + high) / 2, posinf=high, neginf=low)
    x = (np.clip(x, low, high) - low) / (high - low)
    return np.round(x * 255.0).astype(np.uint8)


def class_mosaic(
    images, labels, num_classes: int, per_class: int, pad: int = 1, low: float = -1.0
) -> np.ndarray:
    """One row per class c = 0..num_classes-1 of its first `per_class` images, uint8 [H', W'(, 3)].

    `images` `[N, H, W, C]` (C = 1 or 3) in [low, -low]; `labels` `[N]`. Missing images of a class
    leave blank (padding-coloured) cells.
    """
    x = np.asarray(images)
    labels = np.asarray(labels)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape [N, H, W, 1 or 3], got {x.shape}")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape [{x.shape[0]}], got {labels.shape}")
    if num_classes < 1 or per_class < 1 or pad < 0:
        raise ValueError(
            f"need num_classes >= 1, per_class >= 1, pad >= 0; got {num_classes}, {per_class}, {pad}"
        )
    pixels = to_uint8(x, low, -low)
    _, h, w, c = pixels.shape
    out = np.full(
        (num_classes * (h + pad) + pad, per_class * (w + pad) + pad, c), PAD_VALUE, np.uint8
    )
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)[:per_class]
        for j, i in enumerate(members):
            top, left = pad + cls * (h + pad), pad + j * (w + pad)
            out[top : top + h, left : left + w] = pixels[i]
    return out[..., 0] if c == 1 else out


def write_png_atomic(path: PathLike, pixels: np.ndarray) -> None:
    """Write uint8 `pixels` [H, W] or [H, W, 3] to `path` (local or `gs://`) as PNG, atomically
    (`atomic_file.write_atomic`), creating its folder."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(
            f"pixels must be uint8 [H, W] or [H, W, 3], got {pixels.dtype}{pixels.shape}"
        )
    make_dirs(as_path(path).parent)
    write_atomic(path, lambda f: Image.fromarray(pixels).save(f, format="PNG"), ".png")


def panel_grid_png(
    path: PathLike,
    panels: Mapping[tuple[Hashable, Hashable], np.ndarray],
    rows: Sequence[Hashable],
    columns: Sequence[Hashable],
    *,
    scale: int = 1,
    title: str = "",
    gap: int = 6,
) -> None:
    """Write panels (uint8 mosaics) on a labelled rows x columns grid to `path` (atomic PNG).

    Each panel is upscaled by the integer `scale` (nearest neighbour); a missing (row, column) is
    left blank. Row labels go on the left, column labels on top, `title` above them.
    """
    if scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale}")
    if not panels:
        raise ValueError("panels is empty")
    shapes = {np.asarray(p).shape[:2] for p in panels.values()}
    ph = max(s[0] for s in shapes) * scale
    pw = max(s[1] for s in shapes) * scale
    font = ImageFont.load_default()
    left = 8 + max(6 * len(str(r)) for r in rows)
    top = LABEL_HEIGHT_PX + (LABEL_HEIGHT_PX if title else 0) + 4
    width = left + len(columns) * (pw + gap) + gap
    height = top + len(rows) * (ph + gap) + gap
    canvas = Image.new("RGB", (width, height), (PAD_VALUE,) * 3)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    for j, col in enumerate(columns):
        draw.text(
            (left + j * (pw + gap), top - LABEL_HEIGHT_PX), str(col), fill=(0, 0, 0), font=font
        )
    for i, row in enumerate(rows):
        y = top + i * (ph + gap)
        draw.text((4, y + ph // 2 - 6), str(row), fill=(0, 0, 0), font=font)
        for j, col in enumerate(columns):
            if (row, col) not in panels:
                continue
            panel = np.asarray(panels[(row, col)])
            if panel.ndim == 2:
                panel = np.repeat(panel[..., None], 3, axis=-1)
            panel = np.repeat(np.repeat(panel, scale, axis=0), scale, axis=1)
            canvas.paste(Image.fromarray(panel), (left + j * (pw + gap), y))
    write_png_atomic(path, np.asarray(canvas))
