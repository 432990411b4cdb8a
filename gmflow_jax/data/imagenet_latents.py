"""ImageNet-256 VAE latents (`docs/math.md` §4.8) as memory-mapped .npy files, or a synthetic stand-in.

The primary on-disk format is the ArrayRecord shards of `gmflow_jax.data.latents`; this module reads
the simpler layout that `python tools/prepare_imagenet_latents.py --npy` also exports (and that any
other tool can write with `numpy.save`): a directory holding

===============  =====================================================================================
file             content
===============  =====================================================================================
`latents.npy`    `[N, 32, 32, 4]` float16 or float32, channel-last: the SD-VAE (ft-EMA) posterior sample
                 of the center-cropped, once-flipped image times the scaling factor 0.18215 (§4.8)
`labels.npy`     `[N]` integer class labels 0..999
===============  =====================================================================================

`latents.npy` is memory-mapped (`numpy.load(mmap_mode="r")`), so the whole set (about 10 GB in
float16) never has to fit in memory; a batch reads its rows and converts them to float32.

Batches: the set is read as an endless stream of epochs; epoch e is ordered by
`numpy.random.default_rng((seed, DATA_STREAM, e)).permutation(N)` and batch s is the stream positions
[s B, (s + 1) B) (a batch may straddle two epochs). A batch depends only on (seed, s, B), so a resumed
run reads what an uninterrupted one would. With several processes, process p of P reads rows
[p B/P, (p + 1) B/P) of the global batch.

The synthetic source (`synthetic_latents`) makes a small deterministic set with class-dependent
structure, for tests and smoke runs on machines without ImageNet.

==============================  ==================================================================
name                            what it is
==============================  ==================================================================
`PREPARE_COMMAND`               the command that prepares the files
`LatentData`                    latents + labels with the deterministic batch stream
`open_latents`                  the prepared files of a directory (clear error when absent)
`synthetic_latents`             the synthetic stand-in
==============================  ==================================================================
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

from gmflow_jax.data.latents import LatentDataError

LATENTS_FILE = "latents.npy"
"""Latents file name inside the prepared directory."""

LABELS_FILE = "labels.npy"
"""Labels file name inside the prepared directory."""

PREPARE_COMMAND = "python tools/prepare_imagenet_latents.py"
"""The tool that writes the prepared directory (see its --help for the ImageNet source options)."""

DATA_STREAM = 0x1A7E
"""Constant mixed into the epoch-permutation seed, so data order is independent of other streams."""


@dataclasses.dataclass(frozen=True, eq=False)
class LatentData:
    """Latents `[N, H, W, C]` (numpy array or memmap) and labels `[N]` int, with a batch stream."""

    latents: np.ndarray
    labels: np.ndarray
    source: str

    def __post_init__(self) -> None:
        """Check the shapes agree."""
        if self.latents.ndim != 4:
            raise ValueError(f"latents must have shape [N, H, W, C], got {self.latents.shape}")
        if self.labels.shape != (self.latents.shape[0],):
            raise ValueError(
                f"labels must have shape [{self.latents.shape[0]}], got {self.labels.shape}"
            )
        if self.latents.shape[0] < 1:
            raise ValueError("the latent set is empty")

    @property
    def num_examples(self) -> int:
        """N."""
        return int(self.latents.shape[0])

    def _epoch_permutation(self, seed: int, epoch: int) -> np.ndarray:
        """Order of the set in `epoch`."""
        rng = np.random.default_rng((int(seed), DATA_STREAM, int(epoch)))
        return rng.permutation(self.num_examples)

    def _indices(self, positions: np.ndarray, permutation) -> np.ndarray:
        """Set indices of stream positions, epoch e ordered by permutation(e)."""
        n = self.num_examples
        epochs = positions // n
        out = np.empty(positions.shape, np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = permutation(int(epoch))[positions[where] % n]
        return out

    def _rows(
        self, step: int, batch_size: int, process_index: int, process_count: int
    ) -> np.ndarray:
        """Stream positions of this process's rows of global batch `step`."""
        if batch_size < 1 or step < 0:
            raise ValueError(f"need batch_size >= 1 and step >= 0, got {batch_size}, {step}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index/count {process_index}/{process_count}")
        if batch_size % process_count:
            raise ValueError(
                f"global batch_size {batch_size} must be divisible by process_count {process_count}"
            )
        local = batch_size // process_count
        return step * batch_size + process_index * local + np.arange(local)

    def _gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(latents float32, labels int32) of set indices `idx` (sorted reads from a memmap).

        A latent with a NaN or inf raises `LatentDataError` naming the file and the example index
        (why not skip it: a skipped example silently changes the data; one check per batch, since
        scanning the whole memory-mapped file at open would read all of it).
        """
        order = np.argsort(idx)
        x = np.empty((idx.shape[0], *self.latents.shape[1:]), np.float32)
        x[order] = self.latents[idx[order]]
        bad = np.flatnonzero(~np.isfinite(x.reshape(idx.shape[0], -1)).all(axis=1))
        if bad.size:
            values = x[bad[0]]
            raise LatentDataError(
                f"{os.path.join(self.source, LATENTS_FILE)}: example {int(idx[bad[0]])} has a "
                f"non-finite latent ({int(np.isnan(values).sum())} NaN and "
                f"{int(np.isinf(values).sum())} inf of {values.size} values)"
            )
        return x, self.labels[idx].astype(np.int32)

    def batch(
        self, seed: int, step: int, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """This process's part of global batch `step`: latents `[B/P, H, W, C]` float32, labels."""
        rows = self._rows(step, batch_size, process_index, process_count)
        return self._gather(self._indices(rows, lambda e: self._epoch_permutation(seed, e)))

    def batches(
        self,
        seed: int,
        batch_size: int,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`batch(seed, s, ...)` for s = start_step, start_step + 1, ... (epoch orders cached)."""
        cache: dict[int, np.ndarray] = {}

        def permutation(epoch: int) -> np.ndarray:
            if epoch not in cache:
                for old in [e for e in cache if e < epoch - 1]:
                    del cache[old]
                cache[epoch] = self._epoch_permutation(seed, epoch)
            return cache[epoch]

        step = start_step
        while True:
            rows = self._rows(step, batch_size, process_index, process_count)
            yield self._gather(self._indices(rows, permutation))
            step += 1


def open_latents(
    path: str, image_shape: tuple[int, int, int] | None = None, num_classes: int = 1000
) -> LatentData:
    """The prepared latents of directory `path` (memory-mapped), checked against `image_shape`.

    Raises FileNotFoundError, naming the preparation command, when the files are absent.
    """
    files = [os.path.join(path or "", name) for name in (LATENTS_FILE, LABELS_FILE)]
    missing = [f for f in files if not os.path.isfile(f)]
    if not path or missing:
        raise FileNotFoundError(
            f"ImageNet latents not found: config.data.path={path!r} must be a directory holding "
            f"{LATENTS_FILE} and {LABELS_FILE} (missing: {missing or files}). Prepare them once "
            f"with `{PREPARE_COMMAND} --output_dir=<dir>` (see its --help for the ImageNet source "
            "options), then pass --config.data.path=<dir>; or use --config.data.source=synthetic "
            "for a smoke run."
        )
    latents = np.load(files[0], mmap_mode="r")
    labels = np.asarray(np.load(files[1]))
    if image_shape is not None and tuple(latents.shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"{files[0]} holds latents of shape {latents.shape[1:]}, the model expects "
            f"{tuple(image_shape)}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{files[1]} must hold integer labels, got {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise LatentDataError(
            f"{files[1]}: example {int(bad[0])} has label {int(labels[bad[0]])}; labels must lie in "
            f"0..{num_classes - 1} ({num_classes} is the null label of classifier-free guidance, "
            f"never a data label); {bad.size} labels are out of range"
        )
    return LatentData(latents, labels, source=os.path.abspath(path))


def synthetic_latents(
    num_examples: int, image_shape: tuple[int, int, int], num_classes: int, seed: int = 0
) -> LatentData:
    """A deterministic stand-in: latent i = smooth class pattern of label i % num_classes + noise.

    Values have roughly unit variance, like scaled SD-VAE latents.
    """
    if num_examples < 1 or num_classes < 1:
        raise ValueError(f"need num_examples, num_classes >= 1, got {num_examples}, {num_classes}")
    h, w, c = image_shape
    rng = np.random.default_rng((int(seed), DATA_STREAM))
    labels = (np.arange(num_examples) % num_classes).astype(np.int32)
    yy, xx = np.meshgrid(np.linspace(0, np.pi, h), np.linspace(0, np.pi, w), indexing="ij")
    freqs = rng.integers(1, 4, size=(num_classes, c, 2))
    phases = rng.uniform(0, 2 * np.pi, size=(num_classes, c))
    patterns = np.sin(
        freqs[:, None, None, :, 0] * yy[None, :, :, None]
        + freqs[:, None, None, :, 1] * xx[None, :, :, None]
        + phases[:, None, None, :]
    )
    noise = rng.normal(size=(num_examples, h, w, c))
    latents = (0.9 * patterns[labels] + 0.4 * noise).astype(np.float32)
    return LatentData(latents, labels, source="synthetic")
