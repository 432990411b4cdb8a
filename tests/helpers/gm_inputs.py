"""The GM inputs of the GM / flow / loss tests: random normalized GMs, a GM with a negligible
component (the extreme-value finite-difference checks), and a uniform GM for trace-time shape errors.

Random GMs are numpy float64 `(means [*batch, K, C], logweights [*batch, K, 1], logstds
[B, 1, ..., 1])` with one log-std per sample, the layout of `gmflow_jax.gm.GM` (`docs/math.md` §0.2).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from gmflow_jax.gm import GM
from helpers.numerics import LOG_W_TINY


def random_gm(
    rng: np.random.Generator,
    batch: tuple[int, ...] = (2, 2, 3),
    k: int = 3,
    c: int = 2,
    *,
    mean_scale: float = 1.0,
    logstd: float | None = None,
    logstd_range: tuple[float, float] = (-1.0, 0.5),
):
    """Random normalized GM: N(0, mean_scale^2) means, log-softmax of N(0, 1.5^2) logits, and a
    per-sample log-std `logstd`, or uniform on `logstd_range` when `logstd` is None."""
    means = mean_scale * rng.normal(size=batch + (k, c))
    logits = 1.5 * rng.normal(size=batch + (k, 1))
    logweights = logits - logsumexp(logits, axis=-2, keepdims=True)
    ls_shape = (batch[0],) + (1,) * (len(batch) + 1)
    if logstd is None:
        logstds = rng.uniform(*logstd_range, size=ls_shape)
    else:
        logstds = np.full(ls_shape, float(logstd))
    return means, logweights, logstds


def gm_with_negligible_component(
    rng: np.random.Generator, logstd: float, *, mean_scale: float = 1.0
):
    """A random `[2, 2, 3]` GM (K=3, C=4) whose component 0 has weight ~1e-30, all log-stds `logstd`.

    The extreme-value finite-difference checks run on it: a near-zero weight, and a tiny (-12) or
    large (4) std, are where log-space formulas lose precision when written naively.
    """
    means, lw, _ = random_gm(rng, batch=(2, 2, 3), k=3, c=4, mean_scale=mean_scale)
    lw[..., 0, :] = LOG_W_TINY
    lw = lw - logsumexp(lw, axis=-2, keepdims=True)
    return means, lw, np.full((2, 1, 1, 1, 1), logstd)


def uniform_gm(k: int = 3, c: int = 4) -> tuple[GM, jnp.ndarray]:
    """A `[2, 3, 3]` GM of K equal-weight components at 0 with unit std, and a zero `[2, 3, 3, C]`
    image: well-formed inputs that the shape-error tests then break one argument of."""
    gm = GM(
        jnp.zeros((2, 3, 3, k, c)),
        jnp.full((2, 3, 3, k, 1), -math.log(k)),
        jnp.zeros((2, 1, 1, 1, 1)),
    )
    return gm, jnp.zeros((2, 3, 3, c))
