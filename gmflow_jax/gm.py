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
`tilted_mean`                          §2.5 / §3.4 mean of a GM times an isotropic Gaussian
`iso_gaussian_mul_iso_gaussian`        §2.6 Gaussian times Gaussian with powers (and quotient)
`gm_sample` (`_draws`, `_from_draws`)  §2.8 ancestral sampling
=====================================  =====================================================

Every function is pure, safe under `jit`, `vmap` and `grad`, and computes in float32 whatever the input
dtype (bf16/fp16 inputs are promoted; float64 inputs stay float64, which the oracle tests use). Shape
mistakes raise `ValueError` at trace time, naming the argument and the expected shape.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator

import jax
import jax.numpy as jnp
from flax import struct

from gmflow_jax import cpu_kernels
from gmflow_jax.constants import PRODUCT_EPS, QUOTIENT_EPS

Array = jax.Array

LOG_2PI = math.log(2.0 * math.pi)


UNROLL_MAX = 64
"""Reductions over static axes up to this size are unrolled into element-wise ops (see `axis_sum`)."""


_FORMS_OVERRIDE: list[bool] = []
"""A stack set by `forced_forms` (tests); empty: the backend decides."""


def cpu_reformulations() -> bool:
    """The one switch for the XLA:CPU-specific forms of the K- and C-axis math in this package.

    True on the CPU backend: short-axis sums, weighted sums and log-sum-exps are unrolled into
    element-wise ops or written as dots, per-component quantities keep the component axis minor,
    and channel sums read channel slices of their inputs (`axis_sum`, `weighted_sum`,
    `axis_logsumexp`, `axis_softmax`, `component_weights`, `sq_distance`). Why: XLA:CPU (jax
    0.10) hands a native reduction over the K axis of `[..., K, C]` to its YNNPACK fusion, which at
    the latent shape runs ~10x slower than the same sum unrolled into element-wise adds (gm_mean's
    weighted sum: 7.3 ms against 0.6 ms), does not vectorize `exp` over a size-1 minor axis, and
    re-reads or re-computes what a reduction's consumers share. With these forms the GM operations
    run 2-3x faster than with the straightforward ones (`benchmarks/gm_ops.py`: gm_mean 2.1 -> 1.0
    ms, gm_to_iso_gaussian 4.7 -> 1.4-1.9 ms); XLA:CPU still compiles them to scalar, not vector,
    loops (README "Performance"), so for the latent GM (K = 8, C = 4) the K-axis passes go one step
    further, to native vectorized kernels (`native_kernels_apply`, `cpu_kernels`).
    Other backends (GPU, TPU) reduce natively and keep the straightforward lowering. The choice
    is made while tracing; `forced_forms` overrides it (tests compare both forms on the CPU).
    """
    if _FORMS_OVERRIDE:
        return _FORMS_OVERRIDE[-1]
    return jax.default_backend() == "cpu"


@contextlib.contextmanager
def forced_forms(cpu: bool):
    """Trace with the CPU forms on (`cpu=True`) or off, whatever the backend.

    Only functions traced inside the block see it: a function jitted before keeps its trace.
    """
    _FORMS_OVERRIDE.append(bool(cpu))
    try:
        yield
    finally:
        _FORMS_OVERRIDE.pop()


def native_kernels_apply(means: Array) -> bool:
    """Whether the GM operations run the native CPU kernels of `cpu_kernels` for these means.

    The kernels are the CPU form of the K-axis passes of `gm_mean`, `gm_to_iso_gaussian`,
    `gm_logprob`, `gm_mul_iso_gaussian` and `tilted_mean` (so `flow.retarget_mean`): one vectorized
    pass where XLA:CPU needs one to three scalar ones. They apply under `cpu_reformulations()`, to float32
    means `[..., 8, 4]` (the latent GM of the paper's models), once built
    (`cpu_kernels.available()`), and on a single-device CPU backend. Why the last condition: XLA's
    SPMD partitioner cannot split a custom call, so in a program over several devices (the fake CPU
    devices of the pod tests) it would gather a sharded GM onto every device; those programs keep
    the XLA forms. `cpu_kernels.forced` overrides the device count (and turns the kernels off).
    """
    forced = cpu_kernels.forced_setting()
    if forced is False or not cpu_reformulations() or not cpu_kernels.shapes_supported(means):
        return False
    if forced is None and jax.device_count() > 1:
        return False
    return cpu_kernels.available()


def _slices(x: Array, axis: int) -> list[Array]:
    axis %= x.ndim
    return [jax.lax.index_in_dim(x, i, axis, keepdims=True) for i in range(x.shape[axis])]


def _unrolled_sum(x: Array, axis: int) -> Array:
    """Sum over `axis` (kept) as a chain of element-wise adds."""
    return functools.reduce(operator.add, _slices(x, axis))


DOT_SUM_MIN = 5
"""Under `cpu_reformulations()`, sums over axes of at least this size are dots (see `axis_sum`)."""


def axis_sum(x: Array, axis: int, keepdims: bool = False, broadcast_back: bool = True) -> Array:
    """Sum over one short static axis (K components or C channels).

    XLA:CPU runs reductions over short minor axes 4-5x slower than element-wise work, and these sums
    dominate the GM ops (see `benchmarks/gm_ops.py`), so under `cpu_reformulations()`:

    * axes of 2-4 entries (channels) are unrolled into element-wise adds;
    * longer axes (K components) are a dot with a ones vector at full fp32 precision. An unrolled
      K-term sum is cheap on its own, but XLA fuses it into every consumer that broadcasts it back
      over K (e.g. a GM mean feeding a GM product) and recomputes it per element, a K-fold blowup
      (it made the GM-SDE 2 correction 15x slower); a dot is never duplicated. (An optimization
      barrier does not help: XLA:CPU removes barriers before fusion.)

    A caller whose sum is not broadcast back over the axis passes `broadcast_back=False` and gets
    the unrolled sum at every size up to `UNROLL_MAX` (the dot materializes its operand: the GM
    spread of `gm_to_iso_gaussian` took 15% longer as a dot).

    Other backends reduce natively (`jnp.sum`).
    """
    size = x.shape[axis]
    if size > UNROLL_MAX or not cpu_reformulations():
        return jnp.sum(x, axis=axis, keepdims=keepdims)
    if size >= DOT_SUM_MIN and broadcast_back:
        axis %= x.ndim
        ones = jnp.ones((size,), x.dtype)
        out = jax.lax.dot_general(
            x, ones, (((axis,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST
        )
        return jnp.expand_dims(out, axis) if keepdims else out
    out = _unrolled_sum(x, axis)
    return out if keepdims else jnp.squeeze(out, axis)


WEIGHTED_SUM_UNROLL_MAX = 8
"""Under `cpu_reformulations()`, `weighted_sum` unrolls K-term sums up to this K (see there)."""


def weighted_sum(w: Array, x: Array) -> Array:
    """sum_k w_k x_k over the K axis: `w [..., K]`, `x [..., K, C]` -> `[..., C]`.

    Under `cpu_reformulations()` and for K <= 8 the products are formed per component slice and
    added element-wise (gm_mean at the latent shape: 0.46 ms for the sum with `w [..., K]`, 0.62 ms
    with `w [..., K, 1]`, 7 ms for `jnp.sum`). XLA fuses this sum into consumers that broadcast it
    back over K and recomputes it there; up to K = 8 that costs less than a dot (a GM mean feeding a
    GM product: 6.9 ms of CPU against 8.9 ms), beyond it the K-fold recompute dominates, so larger
    K are a dot with a ones vector (`axis_sum`).
    """
    k = x.shape[-2]
    if k > WEIGHTED_SUM_UNROLL_MAX or not cpu_reformulations():
        return axis_sum(w[..., None] * x, -2)
    terms = [w[..., i, None] * x[..., i, :] for i in range(k)]
    return functools.reduce(operator.add, terms)


def component_weights(logweights: Array) -> Array:
    """The mixture weights exp(l_k) as `[..., K]` (the component axis minor) from `[..., K, 1]`.

    Why the barrier: XLA:CPU's loop emitter vectorizes along the minor dimension, and `exp` over a
    `[..., K, 1]` array (minor size 1) runs ~5x slower than over `[..., K]` (1.4 ms against 0.25 ms
    for the latent shape's 1M weights). Squeezing first is not enough: XLA's reshape mover sinks the
    squeeze of a parameter below the element-wise `exp`. An optimization barrier stops the mover and
    is itself removed before code generation, so it costs nothing (CPU only; other backends lay out
    both shapes alike).
    """
    lw = logweights[..., 0]
    if cpu_reformulations():
        lw = jax.lax.optimization_barrier(lw)
    return jnp.exp(lw)


def sq_distance(x: Array, means: Array, keepdims: bool = False) -> Array:
    """Squared distances |x - mu_k|^2 of points `x [..., C]` to the means `[..., K, C]`.

    Returns `[..., K]`, or `[..., K, 1]` with `keepdims` (the log-weight layout). Under
    `cpu_reformulations()` the channel sum is written over channel slices of the inputs, so XLA
    fuses it into its consumer without a `[..., K, C]` intermediate (materialized otherwise,
    because the consumer reads it C times).
    """
    if not cpu_reformulations() or means.shape[-1] > UNROLL_MAX:
        return jnp.sum((x[..., None, :] - means) ** 2, axis=-1, keepdims=keepdims)
    if keepdims:
        terms = [(x[..., None, c : c + 1] - means[..., c : c + 1]) ** 2 for c in range(x.shape[-1])]
    else:
        terms = [(x[..., None, c] - means[..., c]) ** 2 for c in range(means.shape[-1])]
    return functools.reduce(operator.add, terms)


def _unrolled_lse_value(x: Array, axis: int) -> Array:
    """LSE over `axis` (dropped) from m the max and S = sum_k exp(min(x_k - m, 0)) (unrolled).

    The LSE is m + log(max(S, 1)) where m is finite, and m itself (+-inf, NaN) elsewhere. The two
    clamps are exact in exact arithmetic (the max's own term is exp(0) = 1). Why: XLA fuses the
    computation of `x` into both the max and the exponentials and may round the two copies
    differently (one contracted into an FMA, the other not); for logits of magnitude 1e11 (a point
    far from every component) one ulp is 3e4, and the unclamped exponentials of the off-by-ulps
    copies give S = 0 or S = inf. The terms are slices without the reduced axis: a kept size-1
    axis would be the minor one of the fusion, and XLA:CPU does not vectorize `exp` along it.
    """
    terms = [jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis])]
    m = functools.reduce(jnp.maximum, terms)
    finite = jnp.isfinite(m)
    shift = jnp.where(finite, m, 0.0)
    total = functools.reduce(operator.add, [jnp.exp(jnp.minimum(t - shift, 0.0)) for t in terms])
    total = jnp.maximum(total, 1.0)
    return jnp.where(finite, shift + jnp.log(total), m)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _unrolled_logsumexp(x: Array, axis: int) -> Array:
    """Max-shifted log-sum-exp over `axis` (dropped), the sum of exponentials unrolled."""
    return _unrolled_lse_value(x, axis)


@_unrolled_logsumexp.defjvp
def _unrolled_logsumexp_jvp(axis, primals, tangents):
    """d LSE = sum_k softmax_k dx_k, written as a native reduction.

    Why: differentiating the unrolled sum makes its transpose scatter the cotangent into K padded
    full-size arrays (K = 64: 64 x [B, K] buffers, 90% of the transition loss's backward on the
    checkerboard); the transpose of `jnp.sum` is one broadcast, fused into its consumer. The softmax
    is e / S with max-shifted, clamped exponentials as in the forward (as accurate as the
    derivative of the unrolled sum, unlike exp(x - LSE), which loses the bits of the rounded LSE).
    Its max and sum are native reductions too: the forward's unrolled ones, broadcast back over K
    into e / S, would be fused into every element and recomputed K times (K = 64: the loss's
    forward + backward 3.6 ms -> 12 ms).
    """
    (x,), (dx,) = primals, tangents
    lse = _unrolled_lse_value(x, axis)
    m = jnp.max(x, axis=axis, keepdims=True)
    e = jnp.exp(jnp.minimum(x - jnp.where(jnp.isfinite(m), m, 0.0), 0.0))
    softmax = e / jnp.maximum(jnp.sum(e, axis=axis, keepdims=True), 1.0)
    return lse, jnp.sum(softmax * dx, axis=axis)


def axis_logsumexp(x: Array, axis: int, keepdims: bool = False) -> Array:
    """Log-sum-exp over one short static axis, max-shifted, unrolled under `cpu_reformulations()`.

    The sum of exponentials stays unrolled at every size: XLA does not duplicate a fusion that
    computes `exp` into its consumers, so the blowup described in `axis_sum` cannot happen here. The
    derivative is the softmax (a custom JVP, see `_unrolled_logsumexp_jvp`).
    """
    if x.shape[axis] > UNROLL_MAX or not cpu_reformulations():
        return jax.nn.logsumexp(x, axis=axis, keepdims=keepdims)
    axis %= x.ndim
    if axis < x.ndim - 1 and math.prod(x.shape[axis + 1 :]) == 1:
        # [..., K, 1] (log-weights): reduce the squeezed [..., K]; the trailing size-1 axis would
        # be the minor axis of the fusion (see `_unrolled_lse_value`)
        out = _unrolled_logsumexp(x.reshape(x.shape[: axis + 1]), axis)
        out = out.reshape(x.shape[:axis] + x.shape[axis + 1 :])
    else:
        out = _unrolled_logsumexp(x, axis)
    return jnp.expand_dims(out, axis) if keepdims else out


def axis_log_softmax(x: Array, axis: int) -> Array:
    """Log-softmax over one short static axis, built on `axis_logsumexp`."""
    return x - axis_logsumexp(x, axis, keepdims=True)


def axis_softmax(x: Array, axis: int = -1) -> Array:
    """Softmax over one short static axis (the weights of a mixture from its logits).

    Under `cpu_reformulations()`: the max is unrolled, the exponentials are clamped as in
    `_unrolled_lse_value`, and their sum is the dot of `axis_sum`. Why the dot here: it makes XLA
    write the exponentials once, where an unrolled sum would have every consumer recompute the
    logits (re-targeted mean at the latent shape: 1.6 ms against 2.4 ms).
    """
    if x.shape[axis] > UNROLL_MAX or not cpu_reformulations():
        return jax.nn.softmax(x, axis=axis)
    m = functools.reduce(jnp.maximum, _slices(x, axis))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(jnp.minimum(x - m, 0.0))
    return e / jnp.maximum(axis_sum(e, axis, keepdims=True), 1.0)


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


def _mean_xla(means: Array, logweights: Array) -> Array:
    """sum_k exp(l_k) mu_k (normalized log-weights) in the XLA forms."""
    return weighted_sum(component_weights(logweights), means)


def _moments_xla(means: Array, logweights: Array) -> tuple[Array, Array]:
    """(m, sum_k w_k |mu_k - m|^2 / C) in the XLA forms: two passes, the second reading the means
    again rather than a `[..., K, C]` centred copy."""
    w = component_weights(logweights)
    m = weighted_sum(w, means)  # bit for bit _mean_xla (the 2nd-order correction compares them)
    spread = axis_sum(w * sq_distance(m, means), -1, broadcast_back=False) / means.shape[-1]
    return m, spread


def _iso_xla(means: Array, logweights: Array, var0: Array) -> tuple[Array, Array]:
    """`cpu_kernels.gm_moments` in the XLA forms (its derivatives): (m, spread + var0 `[..., 1]`)."""
    m, spread = _moments_xla(means, logweights)
    return m, (spread + var0)[..., None]


def gm_mean(gm: GM, power: float = 1.0) -> Array:
    """Mean of the GM, sum_k softmax(p l)_k mu_k, shape `[..., C]` (§2.1)."""
    check_gm(gm)
    gm = gm.astype_compute()
    if power != 1.0:
        w = jnp.exp(axis_log_softmax(power * gm.logweights[..., 0], -1))
        return weighted_sum(w, gm.means)
    # log-weights are normalized: the same weights as gm_to_iso_gaussian, and its mean bit for bit
    if native_kernels_apply(gm.means):
        mean = cpu_kernels.with_reference_gradient(cpu_kernels.gm_mean, _mean_xla)
        return mean(gm.means, gm.logweights)
    return _mean_xla(gm.means, gm.logweights)


def gm_to_iso_gaussian(gm: GM) -> tuple[Array, Array]:
    """Moment-matched isotropic Gaussian `(m [..., C], v [..., 1])`, v per pixel (§2.2).

    Two passes (the mean, then the weighted squared distances to it), as accurate as the centred
    form of §2.2 (one pass of the native kernel over each pixel, `native_kernels_apply`).
    """
    check_gm(gm)
    gm = gm.astype_compute()
    if native_kernels_apply(gm.means):
        var0 = jnp.exp(2.0 * gm.logstds[..., 0, 0])  # [B, 1, ..., 1]: the GM's own variance
        moments = cpu_kernels.with_reference_gradient(cpu_kernels.gm_moments, _iso_xla)
        return moments(gm.means, gm.logweights, var0)
    # (the variance added outside `_moments_xla`: the XLA:CPU fusion of the samplers, and so their
    # results, bit for bit as before the kernels existed)
    m, spread = _moments_xla(gm.means, gm.logweights)
    return m, spread[..., None] + jnp.exp(2.0 * gm.logstds[..., 0, :])


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
    if native_kernels_apply(gm.means):
        # LSE_k(l_k - |x - mu_k|^2 / (2 s^2)) - C log s - C/2 log(2 pi), s per sample
        logstd = gm.logstds[..., 0, 0]
        denom, offset = 2.0 * jnp.exp(2.0 * logstd), -c * logstd - 0.5 * c * LOG_2PI
        lse = cpu_kernels.with_reference_gradient(cpu_kernels.tilted_lse, _tilted_lse_xla)
        return lse(gm.means, gm.logweights, x, denom, offset)
    logstd = gm.logstds[..., 0]  # [..., 1]: broadcasts over the K axis of the logits
    logits = gm.logweights[..., 0] - 0.5 * sq_distance(x, gm.means) * jnp.exp(-2.0 * logstd)
    return axis_logsumexp(logits - c * logstd, -1) - 0.5 * c * LOG_2PI


def _tilted_lse_xla(means, logweights, point, denom, offset) -> Array:
    """`cpu_kernels.tilted_lse` in the XLA forms (its derivatives)."""
    logits = logweights[..., 0] - sq_distance(point, means) / denom[..., None]
    return axis_logsumexp(logits, -1) + offset


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
    s2 = jnp.exp(2.0 * gm.logstds)
    norm = jnp.maximum(v + rho * s2, PRODUCT_EPS)
    logstds = gm.logstds + 0.5 * jnp.log(v) - 0.5 * jnp.log(norm)
    if native_kernels_apply(gm.means):
        # means a mu_k + b m, logits l_k - |m - mu_k|^2 / d, per sample (a, b, d: [..., 1, 1])
        a, b, d = v / norm, rho * s2 / norm, 2.0 * norm / rho
        product = cpu_kernels.with_reference_gradient(cpu_kernels.gm_product, _product_xla)
        means, logweights = product(
            gm.means, gm.logweights, mean, d[..., 0, 0], a[..., 0, 0], b[..., 0, 0]
        )
        return GM(means, logweights, logstds)
    m = mean[..., None, :]  # [..., 1, C]
    means = (v * gm.means + rho * s2 * m) / norm
    sq = sq_distance(mean, gm.means, keepdims=True)
    logweights = axis_log_softmax(gm.logweights - rho * sq / (2.0 * norm), -2)
    return GM(means, logweights, logstds)


def _product_xla(means, logweights, point, denom, a, b) -> tuple[Array, Array]:
    """`cpu_kernels.gm_product` in the XLA forms (its derivatives): d, a, b broadcasting to the
    pixels `[...]`."""
    logits = logweights - sq_distance(point, means, keepdims=True) / denom[..., None, None]
    new_means = a[..., None, None] * means + b[..., None, None] * point[..., None, :]
    return new_means, axis_log_softmax(logits, -2)


def _tilted_mean_xla(means, logweights, point, denom, a, b, c) -> Array:
    """`tilted_mean` in the XLA forms: d, a, b, c broadcasting to `[..., 1]`."""
    w = axis_softmax(logweights[..., 0] - sq_distance(point, means) / denom, -1)
    return (a * weighted_sum(w, means) + b * point) / c


def _tilted_mean_kernel(means, logweights, point, denom, a, b, c) -> Array:
    d, a, b, c = (x if x.ndim == 0 else x[..., 0] for x in (denom, a, b, c))  # per pixel
    return cpu_kernels.tilted_mean(means, logweights, point, d, a / c, b / c)


def tilted_mean(gm: GM, point: Array, denom: Array, a: Array, b: Array, c: Array) -> Array:
    """(a sum_k w_k mu_k + b y) / c, w = softmax_k(l_k - |y - mu_k|^2 / d): the mean of the GM
    tilted by an isotropic Gaussian at y, mapped affinely (§2.5, §3.4), `[..., C]`.

    `point` y is `[..., C]`; `denom` d and `a`, `b`, `c` are per-pixel or per-sample scalars in the
    layout of an isotropic variance (§0.1): scalars, or arrays broadcasting to `[..., 1]`. The
    log-weights need not be normalized (the softmax normalizes them).
    """
    check_gm(gm)
    gm = gm.astype_compute()
    point, denom, a, b, c = map(to_compute_dtype, (point, denom, a, b, c))
    check_point(point, gm, "point")
    for name, x in (("denom", denom), ("a", a), ("b", b), ("c", c)):
        if x.ndim and x.shape[-1] != 1:
            raise ValueError(f"{name} must broadcast to [..., 1] (trailing axis 1), got {x.shape}")
    args = (gm.means, gm.logweights, point, denom, a, b, c)
    if native_kernels_apply(gm.means):
        return cpu_kernels.with_reference_gradient(_tilted_mean_kernel, _tilted_mean_xla)(*args)
    return _tilted_mean_xla(*args)


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

    One component index per pixel is shared by all of its channels. The random draws
    (`gm_sample_draws`) and the rest (`gm_sample_from_draws`) are separate functions so that each
    can be timed and tested alone; together they are this function.
    """
    idx, noise = gm_sample_draws(key, gm, sample_shape)
    return gm_sample_from_draws(gm, idx, noise)


def gm_sample_draws(key: Array, gm: GM, sample_shape: tuple[int, ...] = ()) -> tuple[Array, Array]:
    """The randomness of `gm_sample`: component indices k ~ Cat(w) `sample_shape + [...]` (int32)
    and standard normal noise `sample_shape + [..., C]`."""
    check_gm(gm)
    gm = gm.astype_compute()
    key_k, key_n = jax.random.split(key)
    out_shape = tuple(sample_shape) + gm.means.shape[:-2]
    idx = jax.random.categorical(key_k, gm.logweights[..., 0], axis=-1, shape=out_shape)
    noise = jax.random.normal(key_n, out_shape + gm.means.shape[-1:], gm.means.dtype)
    return idx, noise


def gm_sample_from_draws(gm: GM, idx: Array, noise: Array) -> Array:
    """x = mu_k + s n for given component indices `idx [*S, ...]` and noise `[*S, ..., C]` (§2.8)."""
    check_gm(gm)
    gm = gm.astype_compute()
    pixels = gm.means.shape[:-2]
    sample_shape = idx.shape[: idx.ndim - len(pixels)]
    if idx.shape[len(sample_shape) :] != pixels or noise.shape != idx.shape + gm.means.shape[-1:]:
        raise ValueError(
            f"idx {idx.shape} must be [*S, ...] over the GM's pixels {pixels} and noise "
            f"{noise.shape} must be idx's shape + (C,) = {idx.shape + gm.means.shape[-1:]}"
        )
    means = jnp.broadcast_to(gm.means, tuple(sample_shape) + gm.means.shape)
    chosen = jnp.take_along_axis(means, idx[..., None, None], axis=-2)[..., 0, :]
    std = jnp.exp(gm.logstds[..., 0, :])
    return chosen + std * noise
