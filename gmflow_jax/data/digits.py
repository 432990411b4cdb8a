"""scikit-learn's bundled 8x8 digits as a small real-image data set (issue 4; layout of `docs/math.md` §0.1).

The 1797 grey-scale digit images of `sklearn.datasets.load_digits` ship inside scikit-learn (no
download). Pixel values are integers 0..16; they are mapped linearly to [-1, 1] (0 -> -1,
16 -> +1) and laid out channel-last as [N, H, W, 1] float32, labels 0..9 as int32.

Optionally the images are upsampled to 16x16 with `jax.image.resize(..., method="linear")`
(bilinear, half-pixel centres, edge samples renormalised). Bilinear weights are non-negative and
sum to one, so the upsampled pixels stay inside [-1, 1] without clipping (bicubic would overshoot).

The split is fixed: HELD_OUT_PER_CLASS = 30 images of every class (300 in all) are held out and
the other 1497 are the training set. Within each class the images are ordered by
`numpy.random.RandomState(SPLIT_SEED).permutation` (a generator whose stream numpy keeps frozen
across versions) and the first 30 of that order are held out; both parts are sorted by their
index in the original data set.

Training batches: the training set is read as an endless stream of epochs, epoch e being the
permutation `jax.random.permutation(fold_in(key, e), 1497)`; batch s is the stream positions
[s B, (s + 1) B), so every batch is full, and a batch may straddle two epochs. The batch of a
step depends only on (key, step, B): `digits_batch(key, step, B)` computes it directly and
`batches(key, B, start_step)` resumes exactly where an uninterrupted iterator would be.

==========================  ==================================================================
name                        what it is
==========================  ==================================================================
`load_digits_images`        all 1797 images [1797, H, W, 1] in [-1, 1] and labels [1797]
`upsample_digits`           bilinear resize [N, 8, 8, 1] -> [N, S, S, 1]
`held_out_indices`          the fixed stratified held-out indices (300)
`DigitsData`                the train / held-out split at one image size
`load_digits`               build `DigitsData` for image_size 8 or 16
`DigitsData.batch`          the (images, labels) batch of one training step
`DigitsData.batches`        infinite iterator of those batches from `start_step`
==========================  ==================================================================
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

NUM_IMAGES = 1797
"""Number of images in scikit-learn's digits data set."""

NUM_CLASSES = 10
"""Digit classes 0..9."""

NATIVE_SIZE = 8
"""Native height and width of the images."""

PIXEL_MAX = 16.0
"""Largest raw pixel value; raw values 0..PIXEL_MAX map to [-1, 1]."""

IMAGE_SIZES = (8, 16)
"""Allowed `image_size` values: native 8x8, or bilinear upsampling to 16x16."""

HELD_OUT_PER_CLASS = 30
"""Held-out images per class; 10 * 30 = 300 held out, 1497 for training."""

SPLIT_SEED = 0
"""Seed of the `numpy.random.RandomState` that orders each class before the split."""

RESIZE_METHOD = "linear"
"""`jax.image.resize` method of the 8 -> 16 upsampling (bilinear: stays inside [-1, 1])."""


def _check_int(name: str, value, minimum: int) -> int:
    """Return `value` as an int, raising ValueError unless it is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be a Python int >= {minimum}, got {value!r}")
    return int(value)


def _check_image_size(image_size) -> int:
    """Return image_size as an int, raising ValueError unless it is one of IMAGE_SIZES."""
    if isinstance(image_size, bool) or image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}")
    return int(image_size)


@functools.cache
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled data set as (raw pixels [1797, 8, 8] float64 in 0..16, labels [1797] int64)."""
    # imported here: scikit-learn takes ~0.6 s to import, and every run imports this module
    # through the task registry; only digits runs pay for it
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target)


def upsample_digits(images, image_size: int) -> np.ndarray:
    """Bilinearly resize images [N, 8, 8, 1] in [-1, 1] to [N, S, S, 1] float32 numpy, S = image_size."""
    image_size = _check_image_size(image_size)
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE, 1):
        raise ValueError(f"images must have shape [N, 8, 8, 1], got {images.shape}")
    if image_size == NATIVE_SIZE:
        return images
    shape = (images.shape[0], image_size, image_size, 1)
    resized = jax.image.resize(jnp.asarray(images), shape, method=RESIZE_METHOD, antialias=False)
    return np.asarray(resized, np.float32)


def load_digits_images(image_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """All images [1797, S, S, 1] float32 in [-1, 1] (raw 0 -> -1, 16 -> 1) and labels [1797] int32."""
    image_size = _check_image_size(image_size)
    raw, labels = _raw_digits()
    images = (raw * (2.0 / PIXEL_MAX) - 1.0).astype(np.float32)[..., None]
    return upsample_digits(images, image_size), labels.astype(np.int32)


def held_out_indices() -> np.ndarray:
    """Sorted indices [300] of the held-out images: the first 30 of each class in a seeded order."""
    _, labels = _raw_digits()
    order = np.random.RandomState(SPLIT_SEED).permutation(NUM_IMAGES)
    chosen = [order[labels[order] == c][:HELD_OUT_PER_CLASS] for c in range(NUM_CLASSES)]
    return np.sort(np.concatenate(chosen))


def _check_key(key) -> Array:
    """Return key as a jax PRNG key (typed or raw uint32[2]), raising ValueError otherwise."""
    key = jnp.asarray(key)
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not (typed and key.ndim == 0) and not (key.dtype == jnp.uint32 and key.shape == (2,)):
        raise ValueError(
            f"key must be one jax PRNG key (typed, or raw uint32[2]), got {key.dtype}{key.shape}"
        )
    return key


@dataclasses.dataclass(frozen=True, eq=False)
class DigitsData:
    """The fixed train / held-out split of the digits at one image size (numpy arrays).

    Images are [N, S, S, 1] float32 in [-1, 1], labels [N] int32 in 0..9; N = 1497 for training,
    300 held out (30 per class).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    held_out_images: np.ndarray
    held_out_labels: np.ndarray
    image_size: int

    @property
    def num_train(self) -> int:
        """Number of training images."""
        return int(self.train_images.shape[0])

    def batch_indices(self, key, step: int, batch_size: int) -> np.ndarray:
        """Training-set indices [B] of the batch of `step`: stream positions [step B, (step + 1) B)."""
        key = _check_key(key)
        step = _check_int("step", step, 0)
        batch_size = _check_int("batch_size", batch_size, 1)
        return self._stream_indices(step, batch_size, lambda e: self._epoch_permutation(key, e))

    def _stream_indices(
        self, step: int, batch_size: int, permutation: Callable[[int], np.ndarray]
    ) -> np.ndarray:
        """Indices [B] at stream positions [step B, (step + 1) B), epoch e ordered by permutation(e)."""
        positions = step * batch_size + np.arange(batch_size)
        epochs = positions // self.num_train
        indices = np.empty(batch_size, np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            indices[where] = permutation(int(epoch))[positions[where] % self.num_train]
        return indices

    def _epoch_permutation(self, key: Array, epoch: int) -> np.ndarray:
        """Order [N_train] of the training set in `epoch`: permutation(fold_in(key, epoch))."""
        return np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), self.num_train))

    def batch(self, key, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The training batch of `step`: images [B, S, S, 1] float32 and labels [B] int32 (numpy)."""
        idx = self.batch_indices(key, step, batch_size)
        return self.train_images[idx], self.train_labels[idx]

    def batches(
        self, key, batch_size: int, start_step: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Infinite iterator of `batch(key, s, batch_size)` for s = start_step, start_step + 1, ...

        Equal, batch for batch, to an uninterrupted iterator from step 0 with its first
        `start_step` batches skipped. Each epoch's permutation is computed once and reused.
        """
        key = _check_key(key)
        batch_size = _check_int("batch_size", batch_size, 1)
        step = _check_int("start_step", start_step, 0)
        cache: dict[int, np.ndarray] = {}

        def permutation(epoch: int) -> np.ndarray:
            if epoch not in cache:
                cache[epoch] = self._epoch_permutation(key, epoch)
            return cache[epoch]

        while True:
            first_epoch = step * batch_size // self.num_train
            for epoch in [e for e in cache if e < first_epoch]:
                del cache[epoch]
            idx = self._stream_indices(step, batch_size, permutation)
            yield self.train_images[idx], self.train_labels[idx]
            step += 1


def load_digits(image_size: int = 8) -> DigitsData:
    """The digits at `image_size` (8 or 16) split into 1497 training and 300 held-out images."""
    images, labels = load_digits_images(image_size)
    held = np.zeros(NUM_IMAGES, bool)
    held[held_out_indices()] = True
    return DigitsData(
        train_images=images[~held],
        train_labels=labels[~held],
        held_out_images=images[held],
        held_out_labels=labels[held],
        image_size=int(image_size),
    )
