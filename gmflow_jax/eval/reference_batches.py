"""Readers for ADM reference batches (the .npz files of openai/guided-diffusion's evaluator, `docs/math.md` §7).

A reference batch is an .npz holding images, `arr_0` uint8 [N, H, W, 3], and/or precomputed
Inception statistics: `mu` [2048], `sigma` [2048, 2048] (pool features, for FID) and optionally
`mu_s`, `sigma_s` (the 2023-d spatial features of sFID). ADM's ImageNet 256x256 file,
`VIRTUAL_imagenet256_labeled.npz`, has all five: 10,000 images (for precision/recall) and the
statistics of the reference set (for FID).

==============================  ================================================================
name                            what it does
==============================  ================================================================
`ReferenceBatch`                what a file holds (images optional, statistics optional)
`read_reference_batch`          read a file (images loaded or only their shape)
`iter_reference_images`         stream `arr_0` in batches without loading it whole
==============================  ================================================================
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

IMAGES_KEY = "arr_0"
"""Key of the images in a reference .npz (np.savez's default name of the first array)."""

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
"""Keys of the precomputed statistics."""


@dataclass(frozen=True)
class ReferenceBatch:
    """Contents of a reference .npz; absent entries are None.

    `images` is None also when the file has images that were not loaded; `image_shape` then still
    gives their shape [N, H, W, 3].
    """

    path: str
    images: np.ndarray | None
    image_shape: tuple[int, ...] | None
    mu: np.ndarray | None
    sigma: np.ndarray | None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None

    @property
    def has_statistics(self) -> bool:
        """Whether the file holds pool statistics (mu, sigma)."""
        return self.mu is not None

    @property
    def has_spatial_statistics(self) -> bool:
        """Whether the file holds spatial statistics (mu_s, sigma_s)."""
        return self.mu_s is not None

    @property
    def num_images(self) -> int:
        """Number of images in the file (0 when it has none)."""
        return 0 if self.image_shape is None else self.image_shape[0]


def _npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an open .npy stream, leaving it at the data."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    raise ValueError(f"unsupported .npy format version {version}")


def _check_image_header(path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """ValueError unless the images are uint8 [N, H, W, 3]."""
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"{path}: {IMAGES_KEY} must be uint8 images [N, H, W, 3], got {dtype} {shape}"
        )


def _check_stats(path: str, name: str, mu, sigma) -> None:
    """ValueError unless mu is [D] and sigma is [D, D], or both are absent."""
    if (mu is None) != (sigma is None):
        raise ValueError(f"{path}: has only one of mu{name} / sigma{name}")
    if mu is not None and (mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0])):
        raise ValueError(
            f"{path}: mu{name} must be [D] and sigma{name} [D, D], got {mu.shape}, {sigma.shape}"
        )


def read_reference_batch(path: str, *, load_images: bool = True) -> ReferenceBatch:
    """Read an ADM reference .npz (images `arr_0` and/or statistics `mu`, `sigma`, `mu_s`, `sigma_s`).

    With `load_images=False` only the images' shape is read (a 10k x 256 x 256 x 3 file is 2 GB).
    """
    with np.load(path) as data:
        keys = set(data.files)
        if IMAGES_KEY not in keys and "mu" not in keys:
            raise ValueError(
                f"{path}: a reference batch needs {IMAGES_KEY!r} (images) or 'mu'/'sigma' "
                f"(statistics); it has {sorted(keys)}"
            )
        stats = {k: np.asarray(data[k], np.float64) if k in keys else None for k in STAT_KEYS}
        images, image_shape = None, None
        if IMAGES_KEY in keys:
            if load_images:
                images = data[IMAGES_KEY]
                _check_image_header(path, images.shape, images.dtype)
                image_shape = tuple(images.shape)
            else:
                with zipfile.ZipFile(path) as archive:
                    with archive.open(f"{IMAGES_KEY}.npy") as member:
                        shape, _, dtype = _npy_header(member)
                _check_image_header(path, shape, dtype)
                image_shape = tuple(shape)
    _check_stats(path, "", stats["mu"], stats["sigma"])
    _check_stats(path, "_s", stats["mu_s"], stats["sigma_s"])
    return ReferenceBatch(path=path, images=images, image_shape=image_shape, **stats)


def iter_reference_images(path: str, batch_size: int = 256) -> Iterator[np.ndarray]:
    """Yield the images `arr_0` of a reference .npz in uint8 batches [<=batch_size, H, W, 3].

    Reads the archive member sequentially, so memory holds one batch (compressed files included).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with zipfile.ZipFile(path) as archive:
        if f"{IMAGES_KEY}.npy" not in archive.namelist():
            raise ValueError(f"{path}: has no {IMAGES_KEY!r} (images)")
        with archive.open(f"{IMAGES_KEY}.npy") as member:
            shape, fortran_order, dtype = _npy_header(member)
            _check_image_header(path, shape, dtype)
            if fortran_order:
                raise ValueError(
                    f"{path}: {IMAGES_KEY} is stored in Fortran order; rewrite it in C order"
                )
            per_image = int(np.prod(shape[1:]))
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                buffer = member.read(count * per_image)
                if len(buffer) != count * per_image:
                    raise ValueError(f"{path}: {IMAGES_KEY} ends early (truncated file)")
                yield np.frombuffer(buffer, np.uint8).reshape(count, *shape[1:])
