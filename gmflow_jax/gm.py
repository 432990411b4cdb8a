"""The per-pixel Gaussian mixture (GM) with one shared isotropic std, and its distribution math.

Reference `docs/math.md`, channel-last layout (§0.1):

=====================================  =====================================================
function                               docs/math.md
=====================================  =====================================================
`GM` (means, log-weights, log-std)     §0.2
`gm_mean`                              §2.1 mean
`gm_to_iso_gaussian`                   §2.2 isotropic moment match
`gm_to_gaussian`                       §2.3 full-covariance moment match
`gm_logprob`, `iso_gaussian_logprob`   §2.4 log-density
`gm_mul_iso_gaussian`                  §2.5 GM times isotropic Gaussian with powers
`iso_gaussian_mul_iso_gaussian`        §2.6 Gaussian times Gaussian with powers (and quotient)
`gm_sample`                            §2.8 ancestral sampling
=====================================  =====================================================

Every function is pure, safe under `jit`, `vmap` and `grad`, and computes in float32 whatever the input
dtype (bf16/fp16 inputs are promoted; float64 inputs stay float64, which the oracle tests use). Shape
mistakes raise `ValueError` at trace time, naming the argument and the expected shape.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
from flax import struct

from gmflow_jax.constants import PRODUCT_EPS, QUOTIENT_EPS

Array = jax.Array

LOG_2PI = math.log(2.0 * math.pi)


UNROLL_MAX = 64
"""Reductions over static axes up to this size are unrolled into element-wise ops (see `axis_sum`)."""

DOT_SUM_MIN = 5
"""On XLA:CPU, sums over axes of at least this size are a dot with a ones vector (see `axis_sum`)."""


def _slices(x: Array, axis: int) -> list[Array]:
    axis %= x.ndim
    return [jax.lax.index_in_dim(x, i, axis, keepdims=True) for i in range(x.shape[axis])]


def _unrolled_sum(x: Array, axis: int) -> Array:
    """Sum over `axis` (kept) as a chain of element-wise adds."""
    return functools.reduce(operator.add, _slices(x, axis))


def axis_sum(x: Array, axis: int, keepdims: bool = False) -> Array:
    """Sum over one short static axis (K components or C channels).

    XLA:CPU runs reductions over short minor axes 4-5x slower than element-wise work, and these sums
    dominate the GM ops (see `benchmarks/gm_ops.py`), so on the CPU backend:

    * axes of 2-4 entries (channels) are unrolled into element-wise adds;
    * longer axes (K components) are a dot with a ones vector at full fp32 precision. An unrolled
      K-term sum is cheap on its own, but XLA fuses it into every consumer that broadcasts it back
      over K (e.g. a GM mean feeding a GM product) and recomputes it per element, a K-fold blowup
      (it made the GM-SDE 2 correction 15x slower); a dot is never duplicated.

    Other backends reduce natively (`jnp.sum`).
    """
    size = x.shape[axis]
    if size > UNROLL_MAX or jax.default_backend() != "cpu":
        return jnp.sum(x, axis=axis, keepdims=keepdims)
    if size >= DOT_SUM_MIN:
        axis %= x.ndim
        ones = jnp.ones((size,), x.dtype)
        out = jax.lax.dot_general(
            x, ones, (((axis,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST
        )
        return jnp.expand_dims(out, axis) if keepdims else out
    out = _unrolled_sum(x, axis)
    return out if keepdims else jnp.squeeze(out, axis)


def axis_logsumexp(x: Array, axis: int, keepdims: bool = False) -> Array:
    """Log-sum-exp over one short static axis, max-shifted (stop-gradient max), unrolled.

    The sum of exponentials stays unrolled at every size: XLA does not duplicate a fusion that
    computes `exp` into its consumers, so the blowup described in `axis_sum` cannot happen here.
    """
    if x.shape[axis] > UNROLL_MAX or jax.default_backend() != "cpu":
        return jax.nn.logsumexp(x, axis=axis, keepdims=keepdims)
    m = functools.reduce(jnp.maximum, _slices(x, axis))
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    out = m + jnp.log(_unrolled_sum(jnp.exp(x - m), axis))
    return out if keepdims else jnp.squeeze(out, axis)


def axis_log_softmax(x: Array, axis: int) -> Array:
    """Log-softmax over one short static axis, built on `axis_logsumexp`."""
    return x - axis_logsumexp(x, axis, keepdims=True)


def to_compute_dtype(x) -> Array:
    """Promote `x` to at least float32 (bf16/fp16 -> float32; float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@struct.dataclass
class GM:
    """A per-pixel Gaussian mixture with K components and a single isotropic std per sample (§0.2).

    Attributes:
      means: component means, `[..., K, C]`.
      logweights: normalized log-weights (log-softmax over K), `[..., K, 1]`.
      logstds: log of the shared std, broadcastable to `means` with size-1 trailing `(K, C)` axes,
        typically `[B, 1, 1, 1, 1]` (one scalar per sample).
    """

    means: Array
    logweights: Array
    logstds: Array

    @property
    def num_components(self) -> int:
        """K, the number of mixture components."""
        return self.means.shape[-2]

    @property
    def num_channels(self) -> int:
        """C, the number of channels per pixel."""
        return self.means.shape[-1]

    def astype_compute(self) -> GM:
        """The same GM with every field promoted to (at least) float32."""
        return GM(
            to_compute_dtype(self.means),
            to_compute_dtype(self.logweights),
            to_compute_dtype(self.logstds),
        )


def check_gm(gm: GM, name: str = "gm") -> None:
    """Raise a ValueError naming `name` unless `gm` has the layout of §0.2."""
    if not isinstance(gm, GM):
        raise ValueError(f"{name} must be a gmflow_jax.gm.GM, got {type(gm).__name__}")
    m, lw, ls = gm.means, gm.logweights, gm.logstds
    if m.ndim < 2:
        raise ValueError(f"{name}.means must have shape [..., K, C], got {m.shape}")
    if lw.shape != m.shape[:-1] + (1,):
        raise ValueError(
            f"{name}.logweights must have shape {m.shape[:-1] + (1,)} ([..., K, 1] matching "
            f"{name}.means {m.shape}), got {lw.shape}"
        )
    if ls.ndim != m.ndim or ls.shape[-2:] != (1, 1):
        raise ValueError(
            f"{name}.logstds must have {m.ndim} dims with trailing (1, 1) (one std shared by all "
            f"components and channels), got {ls.shape} for means {m.shape}"
        )
    try:
        jnp.broadcast_shapes(ls.shape, m.shape)
    except ValueError:
        raise ValueError(
            f"{name}.logstds {ls.shape} does not broadcast to {name}.means {m.shape}"
        ) from None


def check_iso_gaussian(mean: Array, var: Array, name: str = "gaussian") -> None:
    """Raise a ValueError unless `(mean [..., C], var [..., 1])` is an isotropic Gaussian."""
    if var.ndim != mean.ndim or var.shape[-1] != 1:
        raise ValueError(
            f"{name} variance must have shape [..., 1] with the same rank as its mean {mean.shape}, "
            f"got {var.shape}"
        )
    try:
        jnp.broadcast_shapes(var.shape, mean.shape)
    except ValueError:
        raise ValueError(
            f"{name} variance {var.shape} does not broadcast to its mean {mean.shape}"
        ) from None


def check_point(x: Array, gm: GM, name: str) -> None:
    if x.ndim != gm.means.ndim - 1 or x.shape[-1] != gm.num_channels:
        raise ValueError(
            f"{name} must have shape [..., C] = [..., {gm.num_channels}] with rank "
            f"{gm.means.ndim - 1} (the GM means without the K axis), got {x.shape}"
        )


def gm_mean(gm: GM, power: float = 1.0) -> Array:
    """Mean of the GM, sum_k softmax(p l)_k mu_k, shape `[..., C]` (§2.1)."""
    check_gm(gm)
    gm = gm.astype_compute()
    if (
        power == 1.0
    ):  # log-weights are normalized: the same weights as gm_to_iso_gaussian, bit for bit
        w = jnp.exp(gm.logweights)
    else:
        w = jnp.exp(axis_log_softmax(power * gm.logweights, -2))
    return axis_sum(w * gm.means, -2)


def gm_to_iso_gaussian(gm: GM) -> tuple[Array, Array]:
    """Moment-matched isotropic Gaussian `(m [..., C], v [..., 1])`, v per pixel (§2.2)."""
    check_gm(gm)
    gm = gm.astype_compute()
    w = jnp.exp(gm.logweights)
    m = axis_sum(w * gm.means, -2)
    centered = gm.means - m[..., None, :]
    spread = axis_sum(w * axis_sum(centered**2, -1, keepdims=True), -2) / gm.num_channels
    var = spread + jnp.exp(2.0 * gm.logstds[..., 0, :])
    return m, var


def gm_to_gaussian(gm: GM, cov_scale: float = 1.0) -> tuple[Array, Array]:
    """Moment-matched full-covariance Gaussian `(m [..., C], cov [..., C, C])` (§2.3)."""
    check_gm(gm)
    gm = gm.astype_compute()
    w = jnp.exp(gm.logweights)
    m = jnp.sum(w * gm.means, axis=-2)
    centered = gm.means - m[..., None, :]
    cov = jnp.einsum("...kc,...kd->...cd", w * centered, centered)
    eye = jnp.eye(gm.num_channels, dtype=cov.dtype)
    cov = cov + jnp.exp(2.0 * gm.logstds[..., 0, :])[..., None] * eye
    return m, cov * cov_scale


def gm_logprob(gm: GM, x: Array) -> Array:
    """Per-pixel log-density of `x [..., C]` under the GM, shape `[...]` (§2.4)."""
    check_gm(gm)
    check_point(jnp.asarray(x), gm, "x")
    gm = gm.astype_compute()
    x = to_compute_dtype(x)
    c = gm.num_channels
    inv_var = jnp.exp(-2.0 * gm.logstds)
    sq = axis_sum((x[..., None, :] - gm.means) ** 2, -1, keepdims=True)
    logits = gm.logweights - 0.5 * sq * inv_var - c * gm.logstds
    return axis_logsumexp(logits[..., 0], -1) - 0.5 * c * LOG_2PI


def iso_gaussian_logprob(mean: Array, var: Array, x: Array) -> Array:
    """Per-pixel log-density of `x [..., C]` under N(mean, var I), shape `[...]` (§2.4)."""
    mean, var, x = map(to_compute_dtype, (mean, var, x))
    check_iso_gaussian(mean, var)
    c = mean.shape[-1]
    sq = jnp.sum((x - mean) ** 2, axis=-1)
    return -0.5 * sq / var[..., 0] - 0.5 * c * jnp.log(var[..., 0]) - 0.5 * c * LOG_2PI


def gm_mul_iso_gaussian(
    gm: GM,
    mean: Array,
    var: Array,
    gm_power: float = 1.0,
    gaussian_power: float = 1.0,
) -> GM:
    """Normalized product GM(x)^p1 N(x; mean, var I)^p2 as a GM of power p1 (§2.5).

    `mean` is `[..., C]`; `var` must be a per-sample scalar broadcastable as `[B, 1, ..., 1]` (rank of
    `mean`, trailing 1), so that the result keeps a single shared std (§0.2).
    """
    check_gm(gm)
    gm = gm.astype_compute()
    mean, var = to_compute_dtype(mean), to_compute_dtype(var)
    check_iso_gaussian(mean, var)
    check_point(mean, gm, "mean")
    rho = gaussian_power / gm_power
    v = var[..., None, :]  # [..., 1, 1]
    m = mean[..., None, :]  # [..., 1, C]
    s2 = jnp.exp(2.0 * gm.logstds)
    norm = jnp.maximum(v + rho * s2, PRODUCT_EPS)
    means = (v * gm.means + rho * s2 * m) / norm
    sq = axis_sum((gm.means - m) ** 2, -1, keepdims=True)
    logweights = axis_log_softmax(gm.logweights - rho * sq / (2.0 * norm), -2)
    logstds = gm.logstds + 0.5 * jnp.log(v) - 0.5 * jnp.log(norm)
    return GM(means, logweights, logstds)


def iso_gaussian_mul_iso_gaussian(
    mean1: Array,
    var1: Array,
    mean2: Array,
    var2: Array,
    power1: float = 1.0,
    power2: float = 1.0,
) -> tuple[Array, Array]:
    """N(m1, v1)^p1 N(m2, v2)^p2 ∝ N(m, v); with powers (1, -1) the Gaussian quotient (§2.6).

    The clamp is an absolute floor of 1e-6 on the normalizer p1 v2 + p2 v1.
    """
    mean1, var1, mean2, var2 = map(to_compute_dtype, (mean1, var1, mean2, var2))
    check_iso_gaussian(mean1, var1, "gaussian 1")
    check_iso_gaussian(mean2, var2, "gaussian 2")
    norm = jnp.maximum(power1 * var2 + power2 * var1, QUOTIENT_EPS)
    var = var1 * var2 / norm
    mean = (power1 * var2 * mean1 + power2 * var1 * mean2) / norm
    return mean, var


def gm_sample(key: Array, gm: GM, sample_shape: tuple[int, ...] = ()) -> Array:
    """Ancestral samples, shape `sample_shape + [..., C]`: k ~ Cat(w), x = mu_k + s n (§2.8).

    One component index per pixel is shared by all of its channels.
    """
    check_gm(gm)
    gm = gm.astype_compute()
    key_k, key_n = jax.random.split(key)
    batch = gm.means.shape[:-2]
    out_shape = tuple(sample_shape) + batch
    idx = jax.random.categorical(key_k, gm.logweights[..., 0], axis=-1, shape=out_shape)
    means = jnp.broadcast_to(gm.means, tuple(sample_shape) + gm.means.shape)
    chosen = jnp.take_along_axis(means, idx[..., None, None], axis=-2)[..., 0, :]
    noise = jax.random.normal(key_n, chosen.shape, chosen.dtype)
    std = jnp.exp(gm.logstds[..., 0, :])
    return chosen + std * noise
