"""Image-generation metrics of the ADM evaluator and paper Table 2 (`docs/math.md` §7).

Inputs are Inception outputs (see `inception.py`): pool features [N, 2048] and logits [N, 1008].

* FID: Fréchet distance of Gaussian fits of pool features (`frechet.py`, float64).
* Inception Score: exp(E_x KL(p(y|x) || p(y))) of softmax(logits), per split, mean and std over
  `num_splits` contiguous splits (split i = rows [i N / S, (i+1) N / S)); float64. With N = 50,000 and
  10 splits this is ADM's `split_size=5000`; ADM passes `logits_from_pool(pool, include_bias=False)`.
* Improved precision / recall (Kynkäänniemi et al. 2019, k = 3): each set's manifold is the union of
  balls around its points with radius the distance to the k-th nearest other point of the set (the
  (k+1)-th smallest distance counting the point itself, as ADM's np.partition); precision = fraction
  of generated points inside the real manifold, recall = fraction of real points inside the generated
  one; "inside" is distance <= radius. Squared Euclidean distances |u|^2 - 2 u.v + |v|^2 (clamped at
  0) in jitted row x column blocks, so N x N never exists at once (50k x 50k works with block memory
  `row_chunk * col_chunk` floats). Float32 (ADM uses float16 distances with a float32 fallback);
  float64 inputs stay float64 when `jax_enable_x64` is on.
* Saturation (Sadat et al. 2025, paper Table 2): mean over all pixels of the HSV saturation
  S = (max - min) / max of uint8 RGB (S = 0 where max = 0); reported relative to real data,
  `saturation - real_saturation` (the paper's real ImageNet value is `PAPER_REAL_SATURATION`).

==============================  ================================================================
function                        what it computes
==============================  ================================================================
`fid_from_features`             FID between two feature sets [N, D], [M, D]
`fid_from_reference`            FID between features and reference statistics (mu, sigma)
`inception_score`               (mean, std) of the IS over splits
`knn_sq_radii`                  squared k-NN radius of every point of a set
`precision_recall`              (precision, recall) of generated vs real features
`mean_saturation`               mean HSV saturation of uint8 RGB images
`relative_saturation`           mean saturation minus the real data's
`inception_metrics`             FID, IS, precision and recall in one dict
==============================  ================================================================
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from gmflow_jax.eval.frechet import feature_statistics, frechet_distance

Array = jax.Array

PR_NEIGHBOURHOOD = 3
"""k of the k-NN radii of improved precision/recall (ADM's `nhood_sizes=(3,)`)."""

IS_SPLITS = 10
"""Number of splits of the Inception Score."""

PR_ROW_CHUNK = 2048
"""Default rows per distance block of precision/recall."""

PR_COL_CHUNK = 8192
"""Default columns per distance block (a block holds PR_ROW_CHUNK * PR_COL_CHUNK floats, 64 MiB)."""

PAPER_REAL_SATURATION = 0.318
"""Saturation of real ImageNet images in paper Table 2 (the baseline of the relative values)."""


# ------------------------------------------------------------------------------------------------
# FID and IS


def fid_from_features(features_a, features_b) -> float:
    """FID between features [N, D] and [M, D] (Gaussian fits in float64)."""
    mu_a, sigma_a = feature_statistics(features_a)
    mu_b, sigma_b = feature_statistics(features_b)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


def fid_from_reference(features, mu_ref, sigma_ref) -> float:
    """FID between features [N, D] and reference statistics mu [D], sigma [D, D] (e.g. ADM's)."""
    mu, sigma = feature_statistics(features)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


def inception_score(logits, num_splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) over `num_splits` contiguous splits of exp(mean_x KL(softmax(l_x) || mean p))."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape [N, C] with C >= 2, got {logits.shape}")
    if not 1 <= num_splits <= logits.shape[0]:
        raise ValueError(f"num_splits must be in [1, N={logits.shape[0]}], got {num_splits}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits must be finite; got NaN or inf entries")
    n = logits.shape[0]
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for i in range(num_splits):
        part = log_p[i * n // num_splits : (i + 1) * n // num_splits]
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0))
        kl = np.sum(p * (part - log_marginal), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------------
# Precision / recall


def _sq_dists(a: Array, b: Array) -> Array:
    """Squared Euclidean distances [R, C] between rows of a [R, D] and b [C, D], clamped at 0."""
    aa = jnp.sum(a * a, axis=1)[:, None]
    bb = jnp.sum(b * b, axis=1)[None, :]
    ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(aa - 2.0 * ab + bb, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _knn_block(rows: Array, cols: Array, col_valid: Array, k: int) -> Array:
    """(k+1)-th smallest squared distance [R] from each row to the valid columns [nC, C, D]."""

    def step(best, chunk):
        block, valid = chunk
        d = jnp.where(valid[None, :], _sq_dists(rows, block), jnp.inf)
        neg_smallest, _ = jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k + 1)
        return -neg_smallest, None

    init = jnp.full((rows.shape[0], k + 1), jnp.inf, rows.dtype)
    best, _ = jax.lax.scan(step, init, (cols, col_valid))
    return best[:, k]


@jax.jit
def _membership_block(
    rows: Array, row_sq_radii: Array, cols: Array, col_sq_radii: Array
) -> tuple[Array, Array]:
    """Rows inside some column ball [R]; per column chunk, columns inside some row ball [nC, C].

    Padding rows/columns carry radius -inf, so they are in no ball and put no point in theirs.
    """

    def step(rows_in, chunk):
        block, block_radii = chunk
        d = _sq_dists(rows, block)
        rows_in = rows_in | jnp.any(d <= block_radii[None, :], axis=1)
        cols_in = jnp.any(d <= row_sq_radii[:, None], axis=0)
        return rows_in, cols_in

    init = jnp.zeros((rows.shape[0],), bool)
    return jax.lax.scan(step, init, (cols, col_sq_radii))


def _as_features(name: str, x) -> Array:
    """Device array [N, D] of floating dtype (float32 unless float64 under x64)."""
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape [N, D] with N >= 1, got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize < 4:
        x = x.astype(jnp.float32)
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"{name} must be finite; got NaN or inf entries")
    return x


def _pad_rows(x: Array, multiple: int, value: float = 0.0) -> Array:
    """x padded along axis 0 with `value` to a multiple of `multiple` rows."""
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, widths, constant_values=value)


def _chunk_columns(x: Array, col_chunk: int) -> tuple[Array, Array]:
    """x [N, D] as [nC, C, D] zero-padded column chunks and their validity mask [nC, C]."""
    n = x.shape[0]
    cols = _pad_rows(x, col_chunk).reshape(-1, col_chunk, x.shape[1])
    valid = (jnp.arange(cols.shape[0] * col_chunk) < n).reshape(-1, col_chunk)
    return cols, valid


def _check_chunks(row_chunk: int, col_chunk: int) -> None:
    """ValueError unless both chunk sizes are positive."""
    if row_chunk < 1 or col_chunk < 1:
        raise ValueError(f"row_chunk and col_chunk must be >= 1, got {row_chunk}, {col_chunk}")


def knn_sq_radii(
    features,
    k: int = PR_NEIGHBOURHOOD,
    *,
    row_chunk: int = PR_ROW_CHUNK,
    col_chunk: int = PR_COL_CHUNK,
) -> np.ndarray:
    """Squared distance [N] from each point to its k-th nearest other point of the set."""
    x = _as_features("features", features)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}")
    _check_chunks(row_chunk, col_chunk)
    row_chunk, col_chunk = min(row_chunk, n), min(col_chunk, n)
    cols, valid = _chunk_columns(x, col_chunk)
    rows = _pad_rows(x, row_chunk)
    radii = [
        _knn_block(rows[i : i + row_chunk], cols, valid, k)
        for i in range(0, rows.shape[0], row_chunk)
    ]
    return np.asarray(jnp.concatenate(radii)[:n])


def precision_recall(
    real_features,
    fake_features,
    k: int = PR_NEIGHBOURHOOD,
    *,
    row_chunk: int = PR_ROW_CHUNK,
    col_chunk: int = PR_COL_CHUNK,
) -> tuple[float, float]:
    """Improved (precision, recall) of fake vs real features [N, D], [M, D] with k-NN balls."""
    real = _as_features("real_features", real_features)
    fake = _as_features("fake_features", fake_features)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape}, fake {fake.shape}")
    real_r = jnp.asarray(knn_sq_radii(real, k, row_chunk=row_chunk, col_chunk=col_chunk))
    fake_r = jnp.asarray(knn_sq_radii(fake, k, row_chunk=row_chunk, col_chunk=col_chunk))
    real_r, fake_r = real_r.astype(real.dtype), fake_r.astype(fake.dtype)

    n_fake, n_real = fake.shape[0], real.shape[0]
    row_chunk, col_chunk = min(row_chunk, n_fake), min(col_chunk, n_real)
    cols, _ = _chunk_columns(real, col_chunk)
    col_radii = _pad_rows(real_r, col_chunk, -jnp.inf).reshape(cols.shape[:2])
    rows = _pad_rows(fake, row_chunk)
    row_radii = _pad_rows(fake_r, row_chunk, -jnp.inf)
    fake_in, real_in = [], jnp.zeros(cols.shape[:2], bool)
    for i in range(0, rows.shape[0], row_chunk):
        rows_in, cols_in = _membership_block(
            rows[i : i + row_chunk], row_radii[i : i + row_chunk], cols, col_radii
        )
        fake_in.append(rows_in)
        real_in = real_in | cols_in
    precision = int(jnp.sum(jnp.concatenate(fake_in)[:n_fake])) / n_fake
    recall = int(jnp.sum(real_in.reshape(-1)[:n_real])) / n_real
    return precision, recall


# ------------------------------------------------------------------------------------------------
# Saturation


@jax.jit
def _saturation_sums(images: Array) -> Array:
    """Per-image sum [B] of the HSV saturation of uint8 RGB images [B, H, W, 3]."""
    x = images.astype(jnp.float32)
    high, low = jnp.max(x, axis=-1), jnp.min(x, axis=-1)
    sat = jnp.where(high > 0, (high - low) / jnp.where(high > 0, high, 1.0), 0.0)
    return jnp.sum(sat, axis=(1, 2))


def mean_saturation(images: np.ndarray | Iterable[np.ndarray], batch_size: int = 256) -> float:
    """Mean HSV saturation (max - min) / max (0 where max = 0) over all pixels of uint8 RGB images.

    `images`: [N, H, W, 3] uint8, or an iterable of such batches (sizes may differ).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, np.ndarray | jax.Array):
        batches: Iterable = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    else:
        batches = images
    total, count = 0.0, 0
    for batch in batches:
        batch = np.asarray(batch)
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 RGB [N, H, W, 3], got {batch.dtype} {batch.shape}"
            )
        total += float(np.sum(np.asarray(_saturation_sums(batch), np.float64)))
        count += batch.shape[0] * batch.shape[1] * batch.shape[2]
    if count == 0:
        raise ValueError("images holds no pixel")
    return total / count


def relative_saturation(
    images: np.ndarray | Iterable[np.ndarray], real_saturation: float, batch_size: int = 256
) -> float:
    """Saturation relative to real data, mean_saturation(images) - real_saturation (paper Table 2)."""
    return mean_saturation(images, batch_size) - real_saturation


# ------------------------------------------------------------------------------------------------
# All Inception metrics


def inception_metrics(
    fake_pool,
    fake_logits,
    real_pool,
    *,
    real_mu=None,
    real_sigma=None,
    k: int = PR_NEIGHBOURHOOD,
    num_splits: int = IS_SPLITS,
    row_chunk: int = PR_ROW_CHUNK,
    col_chunk: int = PR_COL_CHUNK,
) -> dict[str, float]:
    """FID, IS (mean, std), precision and recall of generated vs real Inception outputs.

    FID uses `real_mu`/`real_sigma` when given (ADM reference statistics), else the fit of
    `real_pool`; precision/recall always use `real_pool` (ADM: the reference batch's images).
    """
    if (real_mu is None) != (real_sigma is None):
        raise ValueError("give both real_mu and real_sigma, or neither")
    if real_mu is None:
        fid = fid_from_features(fake_pool, real_pool)
    else:
        fid = fid_from_reference(fake_pool, real_mu, real_sigma)
    is_mean, is_std = inception_score(fake_logits, num_splits)
    precision, recall = precision_recall(
        real_pool, fake_pool, k, row_chunk=row_chunk, col_chunk=col_chunk
    )
    return {
        "fid": fid,
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "precision": precision,
        "recall": recall,
    }
