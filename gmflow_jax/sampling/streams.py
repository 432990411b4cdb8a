"""Random streams of the sampling driver: where each sample's noise, label and solver key come from.

A stream fixes the random numbers of a sampling run, independently of how the driver chunks and
shards it. Three streams, one per kind of caller (each keeps its callers' numbers bit for bit):

==============================  ==================================================================
stream                          definition
==============================  ==================================================================
`per_chunk_streams`             chunk i of B samples: `noise_key, solver_key = split(fold_in(key,
                                i))`, noise `normal(noise_key, [B, *shape])` (the checkerboard
                                evaluation; the last chunk is drawn in full and cut)
`batch_streams`                 `noise_key, solver_key = split(key)`, noise `normal(noise_key,
                                [N, *shape])` for all N samples, chunk j solves with
                                `fold_in(solver_key, j)` (image tasks, `GMFlowPipeline`)
`IndexStreams`                  per sample index i: `k_i = fold_in(PRNGKey(seed), i)`, `(k_label,
                                k_noise, k_solver) = split(k_i, 3)`; label `randint(k_label, (),
                                0, num_classes)`, noise `normal(k_noise, shape)`, and the solver
                                runs on sample i alone with `k_solver` (`tools/sample.py`: sample
                                i is the same on any device count, batch or host)
==============================  ==================================================================

`ChunkStreams` (noise `[N, ...]` + chunk size + chunk key function) is what the driver consumes
for the first two; `IndexStreams` produces per-sample keys for the driver's per-sample mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

LABEL_DTYPE = np.int64
"""dtype of `sample_labels` (ADM's `image_sample.py` saves int64 labels)."""

LABEL_CHUNK = 4096
"""`sample_labels` runs on chunks of this many indices (zero-padded: one compiled shape)."""


@dataclasses.dataclass(frozen=True)
class ChunkStreams:
    """Noise of all N samples and the solver key of each chunk of `chunk_size` samples.

    `chunk_key(j)` is the solver key of chunk j (samples [j B, (j + 1) B)); `noise` may hold more
    rows than the samples asked for (a per-chunk stream draws its last chunk in full).
    """

    noise: np.ndarray
    chunk_size: int
    chunk_key: Callable[[int], Array]


def per_chunk_streams(
    key: Array, num_samples: int, chunk_size: int, shape: tuple[int, ...]
) -> ChunkStreams:
    """Chunk i: `noise_key, solver_key = split(fold_in(key, i))`, noise `normal(noise_key, [B, *shape])`.

    The checkerboard evaluation's stream (every solver sees the same noise); chunk size
    B = min(chunk_size, num_samples).
    """
    _check_count("num_samples", num_samples)
    _check_count("chunk_size", chunk_size)
    b = min(chunk_size, num_samples)
    num_chunks = -(-num_samples // b)
    keys = [jax.random.split(jax.random.fold_in(key, i)) for i in range(num_chunks)]
    # One eager normal() per chunk, exactly as the stream is defined (no fused re-derivation).
    noise = np.concatenate(
        [np.asarray(jax.random.normal(k[0], (b, *shape), jnp.float32)) for k in keys]
    )
    return ChunkStreams(noise, b, lambda j: keys[j][1])


def batch_streams(
    key: Array, num_samples: int, chunk_size: int, shape: tuple[int, ...]
) -> ChunkStreams:
    """`noise_key, solver_key = split(key)`; noise `normal(noise_key, [N, *shape])`; chunk j
    solves with `fold_in(solver_key, j)` (image tasks and the pipeline)."""
    _check_count("num_samples", num_samples)
    _check_count("chunk_size", chunk_size)
    noise_key, solver_key = jax.random.split(key)
    noise = np.asarray(jax.random.normal(noise_key, (num_samples, *shape), jnp.float32))
    return ChunkStreams(
        noise, min(chunk_size, num_samples), lambda j: jax.random.fold_in(solver_key, j)
    )


def _check_count(name: str, value: Any) -> int:
    """`value` as an int >= 1, else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return int(value)


# --------------------------------------------------------------------------------------------
# Per-index streams
# --------------------------------------------------------------------------------------------


def check_index_array(indices: Any) -> np.ndarray:
    """`indices` as int32 [n], each in [0, 2^31), else ValueError."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= 2**31):
        raise ValueError(f"indices must lie in [0, 2^31), got [{idx.min()}, {idx.max()}]")
    return idx.astype(np.int32)


def check_seed(seed: Any) -> int:
    """`seed` as an int in [0, 2^32), else ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2^32)")
    return int(seed)


def index_keys(root: Array, indices: Array) -> Array:
    """Keys [n, 3, 2] (label, noise, solver) of sample `indices` under the root key."""
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(root, i), 3))(indices)


def labels_from_keys(keys: Array, num_classes: int | Array) -> Array:
    """int32 labels [n], uniform on [0, num_classes), from the label keys [n, 2]."""
    return jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes, jnp.int32))(keys)


def noise_from_keys(keys: Array, shape: tuple[int, ...]) -> Array:
    """float32 N(0, I) noise [n, *shape] from the noise keys [n, 2]."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


@jax.jit
def _labels_jit(root: Array, indices: Array, num_classes: Array) -> Array:
    """Jitted labels of `indices`."""
    return labels_from_keys(index_keys(root, indices)[:, 0], num_classes)


def _chunked(fn: Callable[[Array], Array], idx: np.ndarray, chunk: int) -> np.ndarray:
    """`fn` over `idx` in zero-padded chunks of one length (one compiled shape), concatenated."""
    parts = []
    for start in range(0, max(idx.size, 1), chunk):
        part = idx[start : start + chunk]
        padded = np.concatenate([part, np.zeros(chunk - part.size, idx.dtype)])
        parts.append(np.asarray(fn(jnp.asarray(padded)))[: part.size])
    return np.concatenate(parts)


def sample_labels(seed: int, indices: Any, num_classes: int) -> np.ndarray:
    """int64 labels [n] of sample `indices`: `randint(k_label(i), (), 0, num_classes)`."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 1")
    idx = check_index_array(indices)
    root = jax.random.PRNGKey(check_seed(seed))
    k = jnp.int32(num_classes)
    labels = _chunked(lambda i: _labels_jit(root, i, k), idx, LABEL_CHUNK)
    return labels.astype(LABEL_DTYPE)


@dataclasses.dataclass(frozen=True)
class IndexStreams:
    """The per-index streams of `seed` for latents of `shape` and `num_classes` labels."""

    seed: int
    shape: tuple[int, ...]
    num_classes: int

    def __post_init__(self):
        check_seed(self.seed)
        _check_count("num_classes", self.num_classes)

    def draw(self, indices: Array) -> tuple[Array, Array, Array]:
        """(noise [n, *shape], int32 labels [n], solver keys [n, 2]) of `indices` (traceable)."""
        keys = index_keys(jax.random.PRNGKey(self.seed), indices)
        labels = labels_from_keys(keys[:, 0], self.num_classes)
        return noise_from_keys(keys[:, 1], self.shape), labels, keys[:, 2]
