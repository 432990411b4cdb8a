"""Transport between standard normal noise and a GM: 1-D inverse CDF, Knothe-Rosenblatt, Hartley.

Reference `docs/math.md`, channel-last layout (§0.1):

==============================  ================================================================
function                        docs/math.md
==============================  ================================================================
`gm1d_pdf_cdf`                  §2.9 1-D GM pdf and scaled CDF
`gm1d_inverse_cdf`              §2.9 clamped Newton inverse of the scaled CDF
`gm1d_inverse_cdf_bracketed`    §2.9 bracketed Halley inverse of the scaled CDF (used by KR)
`kr_rotation`                   §2.10 rotation V (eigenvectors of the mean covariance of §2.3)
`gaussian_to_gm_samples`        §2.10 Knothe-Rosenblatt transport N(0, I) -> GM (axis-aligned)
`gm_samples_to_gaussian`        §2.10 Knothe-Rosenblatt transport GM -> N(0, I) (rotated frame)
`hartley`                       §2.11 orthonormal 2-D discrete Hartley transform
`spectral_gm_sample`            §5.7 spectral (Hartley-correlated) sampling from a GM
==============================  ================================================================

Shapes. A GM is `GM(means [B, *P, K, C], logweights [B, *P, K, 1], logstds [B, 1, ..., 1])` with
pixel axes `P` (usually `(H, W)`). Points handled by the KR maps are either `[B, *P, C]` (one per
pixel) or `[B, n, *P, C]` (n per pixel: the sample axis sits right after the batch axis, as in
§0.1). The rotation `V` is `[B, C, C]`, one per sample, columns ordered by descending eigenvalue.

Precision. Everything is computed in at least float32 (bf16/fp16 inputs are promoted; float64
inputs stay float64, which the oracle tests use). `gaussian_to_gm_samples` casts its result back to
the dtype of `z` (the reference's `force_fp32`); every other function returns the compute dtype.
Products with `V` use `Precision.HIGHEST` so that accelerators do not silently drop to bf16 passes.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp

from gmflow_jax.constants import ERFINV_EPS, NEWTON_MAX_STEP, NEWTON_PDF_EPS, NEWTON_STEPS
from gmflow_jax.gm import GM, check_gm, component_weights, to_compute_dtype, weighted_sum

Array = jax.Array

_SQRT2 = math.sqrt(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_HIGHEST = jax.lax.Precision.HIGHEST

KR_SOLVER_STEPS = 8
"""Iterations of the bracketed Halley solver of the Gaussian -> GM KR map (docs/math.md §2.9-2.10).

The reference runs 16 clamped Newton steps (`gm1d_inverse_cdf`). The bracketed Halley iteration of
`gm1d_inverse_cdf_bracketed` converges from the bracket [min mu + s z, max mu + s z] at least as
fast as bisection and cubically near the root, so 8 steps reach the float32 root wherever the 16
Newton steps do (and also for well-separated modes, where those do not); see
tests/unit/test_transport.py for the float64 brute-force check.
"""

KR_UNROLL_MAX_CHANNELS = 8
"""Rotations by V are unrolled into element-wise products up to this many channels (see
`_rotate`); more channels use a batched matmul."""

KR_BLOCK_BYTES = 1 << 23
"""`gaussian_to_gm_samples` and `kr_rotation` visit the batch in blocks of samples of at most about
this many bytes of working set (a `lax.map` over blocks; see `_sample_blocks`).

Why: XLA:CPU allocates the temporaries of a jitted call in one buffer per call, and the allocator
maps a buffer above 32 MB afresh on every call; the page faults of that memory cost ~15-20% of a
call of `gaussian_to_gm_samples` at the latent shape (B = 128, 32 x 32 pixels, K = 8, C = 4: 48 MB
of temporaries in one block). Four blocks of 8 MiB measured fastest there on the 2-core CPU
(`benchmarks/transport.py`, idle machine: 49.5-54.4 ms per call, against 56-66 ms in eight blocks
of 4 MiB and 62-65 ms in fewer, larger ones; after the solver changes since, timed alternately in one
process: two blocks of 16 MiB 1.03x and eight of 4 MiB 1.17x the time of four of 8 MiB)."""

KR_MAX_BLOCKS = 16
"""At most this many blocks (more would multiply the per-operation overhead); a batch with no
divisor that fits the budget is one block."""

KR_UNROLL_MAX_COMPONENTS = 16
"""Largest K for which `gaussian_to_gm_samples` runs the bracketed solver on K separate arrays.

Why a limit: the unrolled program grows with K (every component is its own array in the solver and
the per-axis setup), so its compile time grows with it (K = 64, C = 4 took ~50 s instead of ~1 s
before the axes were rolled into one `lax.scan`). Above the limit the map is the reference's
vectorized 16-step clamped Newton iteration over a K axis (§2.9), one `lax.scan` over the axes,
whose program size does not depend on K."""


# --------------------------------------------------------------------------------------------------
# §2.9  1-D GM pdf, scaled CDF and inverse CDF
# --------------------------------------------------------------------------------------------------


def _check_1d(means: Array, logweights: Array, logstd: Array, y: Array, y_name: str) -> None:
    """Shape checks shared by the 1-D functions (all raise at trace time)."""
    if means.ndim < 1:
        raise ValueError(f"means must have shape [..., K], got a scalar of shape {means.shape}")
    if logweights.ndim < 1 or logweights.shape[-1] not in (1, means.shape[-1]):
        raise ValueError(
            f"logweights must have shape [..., K] with K = {means.shape[-1]} (as means "
            f"{means.shape}), got {logweights.shape}"
        )
    try:
        jnp.broadcast_shapes(
            means.shape,
            logweights.shape,
            logstd.shape + (1,),
            y.shape + (1,),
        )
    except ValueError:
        raise ValueError(
            f"means {means.shape}, logweights {logweights.shape} ([..., K]), logstd {logstd.shape} "
            f"and {y_name} {y.shape} ([...], no K axis) do not broadcast together"
        ) from None


def _pdf_cdf(
    means: Array, logweights: Array, weights: Array, logstd: Array, std: Array, y: Array
) -> tuple[Array, Array]:
    """pdf and scaled CDF with precomputed weights / std; logstd and std carry a trailing K axis."""
    d = (y[..., None] - means) / std
    pdf = jnp.sum(jnp.exp(logweights - 0.5 * d * d - logstd), axis=-1) * math.exp(-_HALF_LOG_2PI)
    cdf = jnp.sum(weights * jax.lax.erf(d / _SQRT2), axis=-1)
    return pdf, cdf


def gm1d_pdf_cdf(means: Array, logweights: Array, logstd: Array, y: Array) -> tuple[Array, Array]:
    """pdf and scaled CDF (2F - 1) of a 1-D GM at `y` (§2.9); K is the last axis of the GM arrays.

    Args:
      means: component means `[..., K]`.
      logweights: normalized log-weights `[..., K]`.
      logstd: log of the shared component std, broadcastable to `[...]` (no K axis).
      y: evaluation points `[...]`.

    Returns:
      `(pdf, scaled_cdf)`, each of the broadcast shape `[...]`.
    """
    means, logweights, logstd, y = map(to_compute_dtype, (means, logweights, logstd, y))
    _check_1d(means, logweights, logstd, y, "y")
    logstd = logstd[..., None]
    return _pdf_cdf(means, logweights, jnp.exp(logweights), logstd, jnp.exp(logstd), y)


def gm1d_inverse_cdf(
    means: Array,
    logweights: Array,
    logstd: Array,
    u: Array,
    z_init: Array | None = None,
    n_steps: int = NEWTON_STEPS,
) -> Array:
    """Solve scaled_cdf(y) = u for a 1-D GM by exactly `n_steps` clamped Newton steps (§2.9).

    Initialization: moment-matched proxy `y0 = m + sqrt(v) z` with `z = z_init` when given (the
    standard normal variable whose scaled CDF is `u`), else
    `z = sqrt(2) erfinv(clip(u, -1 + 1e-6, 1 - 1e-6))`.
    Step: `delta = (F(y) - u) / (2 max(pdf(y), 1e-6))`, clipped to `+-1.5 s`, `y <- y - delta`.

    Args:
      means: component means `[..., K]`.
      logweights: normalized log-weights `[..., K]`.
      logstd: log of the shared component std, broadcastable to `[...]`.
      u: targets in (-1, 1), `[...]`.
      z_init: optional standard-normal driver with `erf(z_init / sqrt 2) = u`, `[...]`.
      n_steps: number of Newton iterations (a static Python int >= 0).

    Returns:
      `y`, the broadcast shape `[...]`.
    """
    if not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be a non-negative Python int, got {n_steps!r}")
    means, logweights, logstd, u = map(to_compute_dtype, (means, logweights, logstd, u))
    _check_1d(means, logweights, logstd, u, "u")
    if z_init is None:
        z = _SQRT2 * jax.scipy.special.erfinv(jnp.clip(u, -1.0 + ERFINV_EPS, 1.0 - ERFINV_EPS))
    else:
        z = to_compute_dtype(z_init)
        try:
            jnp.broadcast_shapes(z.shape, u.shape)
        except ValueError:
            raise ValueError(
                f"z_init {z.shape} must broadcast with u {u.shape} (shape [...])"
            ) from None

    logstd = logstd[..., None]
    std = jnp.exp(logstd)
    weights = jnp.exp(logweights)
    proxy_mean = jnp.sum(weights * means, axis=-1)
    proxy_var = jnp.sum(weights * (means - proxy_mean[..., None]) ** 2, axis=-1) + std[..., 0] ** 2
    y0 = proxy_mean + jnp.sqrt(proxy_var) * z
    shape = jnp.broadcast_shapes(y0.shape, u.shape, means.shape[:-1], logweights.shape[:-1])
    y0 = jnp.broadcast_to(y0, shape)
    max_step = NEWTON_MAX_STEP * std[..., 0]

    def newton_step(_, y):
        pdf, cdf = _pdf_cdf(means, logweights, weights, logstd, std, y)
        delta = (cdf - u) / (2.0 * jnp.maximum(pdf, NEWTON_PDF_EPS))
        delta = jnp.clip(delta, -max_step, max_step)
        return y - delta

    return jax.lax.fori_loop(0, n_steps, newton_step, y0)


def _bracketed_halley(
    means: Array, weights: Array, std: Array, z: Array, u: Array, n_steps: int, axis: int
) -> Array:
    """The solver of `gm1d_inverse_cdf_bracketed`; component k of the GM is index k of `axis`.

    Why the K terms are unrolled (component k is a slice, summed element-wise): on XLA:CPU a sum
    over a short minor K axis runs several times slower than element-wise work (`gm.axis_sum`), and
    the K-fold blowup that keeps `axis_sum` from unrolling cannot happen here because the loop
    carry is materialized every iteration. Every iteration is one vectorized pass over the points.
    The slices are taken inside the loop body, so the stacked arrays enter the loop as they are
    (slices taken outside it would be copied into K separate arrays first).

    Why the loop carries the sums at the current iterate (and not only the iterate): a loop body
    that starts from y and evaluates F, F' and F'' at it feeds the K `erf` terms to several
    consumers (the bracket update, the step), and XLA:CPU then materializes every term (K arrays)
    and recomputes the sum in each consumer. Evaluated at the end of the body, each sum has a single
    consumer, the loop carry, so an iteration is one fused pass for F (the K `erf` terms) and one
    for F' and F'' (the K `exp` terms, accumulated as one complex number F' + i F'' so that each
    `exp` is computed once), plus a few cheap element-wise updates.
    """
    num_components = means.shape[axis]

    def components(x):
        return [jax.lax.index_in_dim(x, k, axis, keepdims=False) for k in range(num_components)]

    inv_std = 1.0 / std
    means_k, weights_k = components(means), components(weights)
    # Every component CDF is monotone, so F(min_k mu_k + s z) <= u = erf(z / sqrt 2) <=
    # F(max_k mu_k + s z): the root lies in this bracket. Components of weight 0 are left out.
    big = jnp.asarray(jnp.inf, z.dtype)
    lo = std * z + functools.reduce(
        jnp.minimum, [jnp.where(w > 0, m, big) for m, w in zip(means_k, weights_k, strict=True)]
    )
    hi = std * z + functools.reduce(
        jnp.maximum, [jnp.where(w > 0, m, -big) for m, w in zip(means_k, weights_k, strict=True)]
    )
    # Start from the §2.9 moment-matched proxy, moved into the bracket.
    proxy_mean = functools.reduce(
        operator.add, [w * m for m, w in zip(means_k, weights_k, strict=True)]
    )
    proxy_var = functools.reduce(
        operator.add, [w * (m - proxy_mean) ** 2 for m, w in zip(means_k, weights_k, strict=True)]
    )
    y0 = jnp.clip(proxy_mean + jnp.sqrt(proxy_var + std * std) * z, lo, hi)
    pdf_scale = 2.0 * inv_std / math.sqrt(2.0 * math.pi)  # f' = 2 pdf = pdf_scale sum_k w_k e_k
    slack = 1e-3 * std

    def scaled_cdf(y):  # F(y) = sum_k w_k erf(d_k / sqrt 2)
        cdf = 0.0
        for m, w in zip(components(means), components(weights), strict=True):
            cdf = cdf + w * jax.lax.erf((y - m) * inv_std * (1.0 / _SQRT2))
        return cdf

    def dens_slope(y):  # sum_k w_k e_k + i sum_k w_k e_k d_k, e_k = exp(-d_k^2 / 2)
        acc = 0.0
        for m, w in zip(components(means), components(weights), strict=True):
            d = (y - m) * inv_std
            e = w * jnp.exp(-0.5 * d * d)
            acc = acc + jax.lax.complex(e, e * d)
        return acc

    def halley_update(carry):
        """The next iterate and bracket from the sums at the current iterate (no new sums)."""
        y, lo, hi, step_prev, step_prev2, cdf, dens_slope_y = carry
        f = cdf - u
        below = f < 0  # the root lies above y
        lo, hi = jnp.where(below, y, lo), jnp.where(below, hi, y)
        f1 = pdf_scale * jnp.real(dens_slope_y)  # dF/dy
        f2 = -pdf_scale * inv_std * jnp.imag(dens_slope_y)  # d2F/dy2
        step = 2.0 * f * f1 / (2.0 * f1 * f1 - f * f2)
        y_halley = y - step
        # Take Halley's step if it lands in the bracket and is at most half the step before the
        # previous one (as in Numerical Recipes' rtsafe), else bisect: a step out of the bracket
        # or NaN (f1 underflows in a gap between modes) or slow progress (creeping along the tail
        # of a mode towards a far root) halves the bracket instead, so the bracket at least halves
        # every two iterations. A converged y sits on a bracket end and its step is rounding noise
        # that may point just outside (XLA may round the recomputed F differently in two fusions):
        # within `slack` such a step is taken, clipped to the bracket.
        halley = (
            (y_halley > lo - slack)
            & (y_halley < hi + slack)
            & (jnp.abs(step) <= 0.5 * step_prev2 + slack)
        )
        y_next = jnp.where(halley, jnp.clip(y_halley, lo, hi), 0.5 * (lo + hi))
        return y_next, lo, hi, jnp.abs(y_next - y), step_prev

    def halley_step(_, carry):
        y_next, lo, hi, step, step_prev = halley_update(carry)
        return y_next, lo, hi, step, step_prev, scaled_cdf(y_next), dens_slope(y_next)

    if n_steps == 0:
        return y0
    # The last iteration needs no sums at its result: it runs after the loop, without them (one
    # of the n_steps + 1 evaluations of F, F', F'' saved).
    width = hi - lo
    carry = (y0, lo, hi, width, width, scaled_cdf(y0), dens_slope(y0))
    return halley_update(jax.lax.fori_loop(0, n_steps - 1, halley_step, carry))[0]


def gm1d_inverse_cdf_bracketed(
    means: Array, logweights: Array, logstd: Array, z: Array, n_steps: int = KR_SOLVER_STEPS
) -> Array:
    """Solve scaled_cdf(y) = erf(z / sqrt 2) for a 1-D GM by a bracketed Halley iteration (§2.9).

    The root lies in [min_k mu_k + s z, max_k mu_k + s z] (each component CDF is monotone). Starting
    from the §2.9 proxy `m + sqrt(v) z` clipped into the bracket, each of exactly `n_steps`
    iterations shrinks the bracket to the side of the root and takes Halley's step
    `y - 2 f f' / (2 f'^2 - f f'')` (f = F - u, f' = 2 pdf) if it stays inside the bracket, else the
    bracket midpoint. It is the solver of the Gaussian -> GM KR map (`gaussian_to_gm_samples`);
    `gm1d_inverse_cdf` is the reference's clamped Newton iteration.

    Args:
      means: component means `[..., K]`.
      logweights: normalized log-weights `[..., K]` (-inf for absent components).
      logstd: log of the shared component std, broadcastable to `[...]`.
      z: standard-normal drivers `[...]`; the target is `u = erf(z / sqrt 2)`.
      n_steps: number of iterations (a static Python int >= 0).

    Returns:
      `y`, the broadcast shape `[...]`, in the compute dtype.
    """
    if not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be a non-negative Python int, got {n_steps!r}")
    means, logweights, logstd, z = map(to_compute_dtype, (means, logweights, logstd, z))
    _check_1d(means, logweights, logstd, z, "z")
    shape = jnp.broadcast_shapes(means.shape[:-1], logweights.shape[:-1], logstd.shape, z.shape)
    z = jnp.broadcast_to(z, shape)
    weights = jnp.broadcast_to(jnp.exp(logweights), logweights.shape[:-1] + means.shape[-1:])
    u = jax.lax.erf(z / _SQRT2)
    return _bracketed_halley(means, weights, jnp.exp(logstd), z, u, n_steps, axis=-1)


# --------------------------------------------------------------------------------------------------
# §2.10  Knothe-Rosenblatt transport
# --------------------------------------------------------------------------------------------------


def _sample_blocks(batch: int, sample_bytes: int) -> int:
    """Number of blocks of samples for `KR_BLOCK_BYTES` (a divisor of `batch`, 1 if none fits)."""
    fits = (
        d
        for d in range(1, KR_MAX_BLOCKS + 1)
        if batch % d == 0 and batch // d * sample_bytes <= KR_BLOCK_BYTES
    )
    return next(fits, 1)


def _map_blocks(fn, blocks: int, *fields: Array) -> Array:
    """`fn(*fields)` for fields with a leading batch axis, one block of samples at a time."""
    if blocks == 1:
        return fn(*fields)
    batch = fields[0].shape[0]
    split = tuple(f.reshape((blocks, batch // blocks) + f.shape[1:]) for f in fields)
    out = jax.lax.map(lambda f: fn(*f), split)
    return out.reshape((batch,) + out.shape[2:])


def kr_rotation(gm: GM) -> Array:
    """Per-sample rotation V `[B, C, C]`: eigenvectors of the pixel-averaged covariance (§2.10).

    The covariance of every pixel is the full-covariance moment match of §2.3; the average runs over
    all pixel axes (everything between the batch axis and the K axis). Columns are ordered by
    descending eigenvalue. Computed under stop-gradient in (at least) float32.
    """
    check_gm(gm)
    if gm.means.ndim < 3:
        raise ValueError(f"gm.means must have shape [B, ..., K, C], got {gm.means.shape}")
    gm = jax.tree_util.tree_map(jax.lax.stop_gradient, gm.astype_compute())
    b, c = gm.means.shape[0], gm.num_channels

    def spread_of(means, root_w, mean):
        """sum over pixels and K of w (mu - m)(mu - m)^T for a block of samples, [rows, C, C]."""
        root_w = root_w[..., None]
        # The pixel mean of the per-pixel §2.3 covariances is one contraction over (pixels, K): a
        # single [C, P K] x [P K, C] matmul per sample instead of P tiny [C, K] x [K, C] ones, with
        # sqrt(w) (mu - m) as both operands (one array instead of two).
        scaled = (root_w * (means - mean[..., None, :])).reshape(means.shape[0], -1, c)
        return jnp.einsum("bnc,bnd->bcd", scaled, scaled, precision=_HIGHEST)

    # In blocks of samples: see KR_BLOCK_BYTES.
    sample_bytes = 4 * math.prod(gm.means.shape[1:])
    blocks = _sample_blocks(b, 2 * sample_bytes)  # the means and sqrt(w) (mu - m)
    # Two-pass, as §2.3: the pixel means first, over the whole batch. Why outside the blocks: an
    # array that enters the loop over blocks is written once, where inside the block XLA would fuse
    # the K-term mean into every component's centring and recompute it K times (kr_rotation at the
    # latent shape: 13.5 ms -> 6.1 ms).
    # The square roots of the weights likewise (computed in the block, XLA would recompute them for
    # every channel); both on [..., K]: XLA:CPU runs transcendentals ~5x slower on arrays whose
    # minor dimension is 1 (`gm.component_weights`).
    weights = component_weights(gm.logweights)
    mean = weighted_sum(weights, gm.means)
    spread = _map_blocks(spread_of, blocks, gm.means, jnp.sqrt(weights), mean)
    pixels = gm.means.shape[1:-2]
    var = jnp.broadcast_to(jnp.exp(2.0 * gm.logstds)[..., 0, 0], (b,) + pixels)
    var = jnp.mean(var.reshape(b, -1), axis=-1)
    cov = spread / math.prod(pixels) + var[:, None, None] * jnp.eye(c, dtype=spread.dtype)
    _, eigvecs = jnp.linalg.eigh(cov)
    return jax.lax.stop_gradient(eigvecs[..., ::-1])


def _validate_kr(gm: GM, points: Array, rotation: Array | None, name: str):
    """Validate and promote the inputs of both KR directions; add a sample axis to `points`.

    Returns `(gm, points [B, n, *P, C], rotation [B, C, C], has_sample_axis)` (the default
    rotation is `kr_rotation(gm)`).
    """
    check_gm(gm)
    means_shape = gm.means.shape
    if gm.means.ndim < 3:
        raise ValueError(f"gm.means must have shape [B, ..., K, C], got {means_shape}")
    points = jnp.asarray(points)
    pixel_shape = means_shape[:-2] + means_shape[-1:]  # [B, *P, C]
    if points.shape == pixel_shape:
        has_sample_axis = False
    elif points.ndim == len(pixel_shape) + 1 and (
        points.shape[:1] + points.shape[2:] == pixel_shape
    ):
        has_sample_axis = True
    else:
        raise ValueError(
            f"{name} must have shape {pixel_shape} ([B, *P, C]) or [B, n, *P, C] = "
            f"{pixel_shape[:1] + ('n',) + pixel_shape[1:]} for gm.means {means_shape}, "
            f"got {points.shape}"
        )
    num_channels = means_shape[-1]
    points = to_compute_dtype(points)
    if not has_sample_axis:
        points = points[:, None]
    if rotation is None:
        rotation = kr_rotation(gm)
    rotation = jax.lax.stop_gradient(to_compute_dtype(rotation))
    if rotation.shape != (means_shape[0], num_channels, num_channels):
        raise ValueError(
            f"rotation must have shape [B, C, C] = {(means_shape[0], num_channels, num_channels)}, "
            f"got {rotation.shape}"
        )
    return gm.astype_compute(), points, rotation, has_sample_axis


def _prepare_kr(gm: GM, points: Array, rotation: Array | None, name: str):
    """Validate, promote, add a sample axis and rotate the GM means (GM -> Gaussian direction)."""
    gm, points, rotation, has_sample_axis = _validate_kr(gm, points, rotation, name)
    # Insert the sample axis into the GM: [B, 1, *P, K, C].
    means, logweights, logstds = (f[:, None] for f in (gm.means, gm.logweights, gm.logstds))
    v = rotation.reshape((rotation.shape[0],) + (1,) * (means.ndim - 3) + rotation.shape[1:])
    means_rot = jnp.matmul(means, v, precision=_HIGHEST)  # rows: (V^T mu_k)^T
    return means_rot, logweights, logstds, points, v, has_sample_axis


def _rotate(vectors: list[Array], v: Array, transpose: bool) -> list[Array]:
    """`V^T x` (transpose) or `V x` for a vector given as its C channel arrays; V `[B, 1.., C, C]`.

    Up to `KR_UNROLL_MAX_CHANNELS` channels the product is unrolled into element-wise multiply-adds
    (exact float32 products, no batched tiny matmul, which XLA:CPU runs slowly); beyond, a matmul.
    """
    c = len(vectors)
    if c > KR_UNROLL_MAX_CHANNELS:
        stacked = jnp.stack(vectors, axis=-1)
        spec = "...c,...ca->...a" if transpose else "...a,...ca->...c"
        out = jnp.einsum(spec, stacked, v, precision=_HIGHEST)
        return [out[..., i] for i in range(c)]
    if transpose:
        return [
            functools.reduce(operator.add, [vectors[i] * v[..., i, j] for i in range(c)])
            for j in range(c)
        ]
    return [
        functools.reduce(operator.add, [v[..., i, j] * vectors[j] for j in range(c)])
        for i in range(c)
    ]


def _gaussian_to_gm_samples_newton(gm: GM, z: Array, rotation: Array | None) -> Array:
    """The KR map of `gaussian_to_gm_samples` with the reference's clamped Newton solver (§2.9),
    vectorized over the K axis: one compiled Newton loop for all C axes (`lax.scan`)."""
    out_dtype = jnp.asarray(z).dtype
    means_rot, logweights, logstds, z, v, has_sample_axis = _prepare_kr(gm, z, rotation, "z")
    logweights = logweights[..., 0]  # [B, 1, *P, K]
    logstd = logstds[..., 0, 0]  # [B, 1, 1.., 1] with the rank of z without C
    std = jnp.exp(logstd)[..., None]
    u = jax.lax.erf(z / _SQRT2)
    num_channels = z.shape[-1]
    # Carry: sum_{j<a} ((y_j - mu_kj) / s)^2, [B, n, *P, K].
    sq_prev0 = jnp.zeros(z.shape[:-1] + logweights.shape[-1:], z.dtype)

    def kr_axis(sq_prev, inputs):
        a, means_a, u_a, z_a = inputs  # means_a [B, 1, *P, K]; u_a, z_a [B, n, *P]
        # Slice log-weights; l^(0) = l exactly (the log-softmax is only needed for a > 0).
        slice_logweights = jnp.where(
            a == 0, logweights, jax.nn.log_softmax(logweights - 0.5 * sq_prev, axis=-1)
        )
        y_a = gm1d_inverse_cdf(
            means_a, slice_logweights, logstd, u_a, z_init=z_a, n_steps=NEWTON_STEPS
        )  # [B, n, *P]
        d = (y_a[..., None] - means_a) / std
        return sq_prev + d * d, y_a

    axes_first = (
        jnp.arange(num_channels),
        jnp.moveaxis(means_rot, -1, 0),
        jnp.moveaxis(u, -1, 0),
        jnp.moveaxis(z, -1, 0),
    )
    _, y_rot = jax.lax.scan(kr_axis, sq_prev0, axes_first)
    y_rot = jnp.moveaxis(y_rot, 0, -1)  # [B, n, *P, C]
    x = jnp.einsum("...d,...cd->...c", y_rot, v, precision=_HIGHEST)  # x = V y
    if not has_sample_axis:
        x = x[:, 0]
    return jax.lax.stop_gradient(x.astype(out_dtype))


def _transposed(x: Array, perm: tuple[int, ...]) -> Array:
    """`x` transposed by `perm` and flattened to 1-D; reshape the result back where it is used.

    Why flattened: XLA:CPU picks the layout of a transposed array freely and, when the consumer
    wants another one, moves the data inside that consumer's fusion, or in a separate copy, with its
    generic loop emitter (~5x slower than its transpose kernel, measured on this 16.8 MB array). A
    1-D reshape of the transposed array only exists in row-major order, so the data movement happens
    once, here, in one transpose-and-copy fusion.
    """
    return jnp.transpose(x, perm).reshape(-1)


def gaussian_to_gm_samples(gm: GM, z: Array, rotation: Array | None = None) -> Array:
    """Knothe-Rosenblatt transport of standard-normal `z` to GM samples (§2.10, axis-aligned).

    Channel `a` of `z` (not rotated) drives rotated axis `a`: sequentially for a = 0..C-1, the
    rotated coordinate solves scaled_cdf_a(y_a) = erf(z_a / sqrt 2) for the slice GM (rotated means
    of axis a, std s, slice log-weights conditioned on y_0..y_{a-1}); then x = V y. The 1-D solver is
    `gm1d_inverse_cdf_bracketed` with `KR_SOLVER_STEPS` iterations (the reference uses 16 clamped
    Newton steps of §2.9; both reach the same root where those converge); above
    `KR_UNROLL_MAX_COMPONENTS` components it is the reference's Newton map (compile time).

    Args:
      gm: GM with means `[B, *P, K, C]` and per-sample logstds `[B, 1, ..., 1]` (per-pixel
        `[B, *P, 1, 1]` also work).
      z: standard-normal drivers `[B, *P, C]`, or `[B, n, *P, C]` for n samples per pixel.
      rotation: optional V `[B, C, C]` (default `kr_rotation(gm)`), e.g. to reuse one V both ways.

    Returns:
      Samples `x` of the shape and dtype of `z`. No gradient flows (stop-gradient on all inputs).
    """
    out_dtype = jnp.asarray(z).dtype
    gm = jax.tree_util.tree_map(jax.lax.stop_gradient, gm)
    z = jax.lax.stop_gradient(z)
    if gm.num_components > KR_UNROLL_MAX_COMPONENTS:  # see KR_UNROLL_MAX_COMPONENTS
        return _gaussian_to_gm_samples_newton(gm, z, rotation)
    gm, z, rotation, has_sample_axis = _validate_kr(gm, z, rotation, "z")
    b, n = z.shape[:2]
    p = math.prod(z.shape[2:-1])
    k_ = gm.num_components
    # In blocks of samples (see KR_BLOCK_BYTES): the transposed means, and per point and component
    # the slice log-weights, weights, terms of the logsumexp and the transposed log-weights.
    blocks = _sample_blocks(b, 4 * (p * k_ * gm.num_channels + 4 * n * p * k_))
    logstds = jnp.broadcast_to(gm.logstds, (b,) + gm.logstds.shape[1:])
    # V of the whole batch, before the blocks: inside a block XLA fuses the pixel means of
    # `kr_rotation` into its centring of every component and recomputes them K times.
    fields = (gm.means, gm.logweights, logstds, z, rotation)
    x = _map_blocks(lambda *f: _kr_map(GM(*f[:3]), *f[3:]), blocks, *fields)
    if not has_sample_axis:
        x = x[:, 0]
    return jax.lax.stop_gradient(x.astype(out_dtype))


def _kr_map(gm: GM, z: Array, rotation: Array) -> Array:
    """`gaussian_to_gm_samples` on validated inputs: z `[B, n, *P, C]` -> x of that shape."""
    k_, c_ = gm.num_components, gm.num_channels
    b, n = z.shape[:2]
    p = math.prod(z.shape[2:-1])
    # Layout: the pixels are flattened and minor, the components stacked before them. A per-point
    # array is [B, n * P] (n = 1) or [B, n, P], a per-point per-component one [B, K, n * P] or
    # [B, K, n, P]; the GM fields have no sample axis ([B, K, P] or [B, K, 1, P]). Why: see
    # `_bracketed_halley` (no short minor axes) and `_transposed`.
    points = (b, p) if n == 1 else (b, n, p)
    gm_points = (b, k_, p) if n == 1 else (b, k_, 1, p)
    batch = (b,) + (1,) * (len(points) - 1)  # per-sample scalars broadcast over the points
    means_t = _transposed(gm.means.reshape(b, p, k_ * c_), (0, 2, 1))  # [B, K * C, P]
    logweights_t = _transposed(gm.logweights.reshape(b, p, k_), (0, 2, 1))  # [B, K, P]
    z_t = _transposed(z.reshape(b, n * p, c_), (0, 2, 1))  # [B, C, n * P]
    logstd = gm.logstds[..., 0, 0]  # [B or 1, *P or 1..]
    if math.prod(logstd.shape[1:]) == 1:  # one std per sample: a scalar per row
        std = jnp.broadcast_to(jnp.exp(logstd.reshape(-1)), (b,)).reshape(batch)
    else:
        std = jnp.exp(jnp.broadcast_to(logstd, (b,) + z.shape[2:-1])).reshape(
            gm_points[:1] + gm_points[2:]
        )
    inv_std = jnp.expand_dims(1.0 / std, 1)  # broadcasts against [B, K, ...]
    rotation_t = jnp.transpose(rotation, (2, 1, 0))  # [a, i, B] = V[B, i, a]

    def kr_axis(slice_logweights, a):
        """Solve rotated axis a; carry: the slice log-weights l^(a), [B, K, *points]."""
        means = means_t.reshape(b, k_, c_, p)
        v_a = jax.lax.dynamic_index_in_dim(rotation_t, a, 0, keepdims=False)  # [C, B]
        means_a = functools.reduce(  # (V^T mu_k)_a, [B, K, P]
            operator.add, [means[:, :, i] * v_a[i][:, None, None] for i in range(c_)]
        ).reshape(gm_points)
        z_a = jax.lax.dynamic_index_in_dim(z_t.reshape(b, c_, n * p), a, 1, keepdims=False)
        z_a = z_a.reshape(points)
        u_a = jax.lax.erf(z_a / _SQRT2)
        weights = jnp.exp(slice_logweights)  # l^(0) = l exactly
        y_a = _bracketed_halley(means_a, weights, std, z_a, u_a, KR_SOLVER_STEPS, axis=1)

        def condition(slice_logweights):
            # l^(a+1) = logsoftmax_k(l^(a) - ((y_a - mu_ka) / s)^2 / 2), max-shifted; the
            # normalizer is a reduction over K, which XLA computes once (an unrolled max and sum
            # over K would be recomputed for every component).
            logits = slice_logweights - 0.5 * ((jnp.expand_dims(y_a, 1) - means_a) * inv_std) ** 2
            shift = jnp.max(logits, axis=1, keepdims=True)
            shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
            total = jnp.sum(jnp.exp(logits - shift), axis=1, keepdims=True)
            return logits - (shift + jnp.log(total))

        # The last axis has no successor to condition: skip the update there.
        return jax.lax.cond(a < c_ - 1, condition, lambda x: x, slice_logweights), y_a

    # One compiled axis for all C axes (compile time); the slice log-weights are the carry.
    logweights0 = jnp.broadcast_to(logweights_t.reshape(gm_points), (b, k_) + points[1:])
    _, y_rot = jax.lax.scan(kr_axis, logweights0, jnp.arange(c_))  # [C, *points]
    v = rotation.reshape(batch + rotation.shape[1:])
    x = jnp.stack(_rotate([y_rot[a] for a in range(c_)], v, transpose=False), axis=-1)
    return x.reshape(z.shape)  # x = V y, [B, n, *P, C]


def gm_samples_to_gaussian(gm: GM, x: Array, rotation: Array | None = None) -> Array:
    """Knothe-Rosenblatt transport of GM samples `x` to N(0, I), in the rotated frame (§2.10).

    `x~ = V^T x`, `d_ka = (x~_a - mu~_ka) / s`, slice weights `w^(a)` conditioned on
    `x~_0..x~_{a-1}`, and
    `z_a = sqrt(2) erfinv(clip(sum_k w^(a)_k erf(d_ka / sqrt 2), +-(1 - 1e-6)))`.
    With the same V this inverts `gaussian_to_gm_samples` (up to Newton error and the clip).

    Args:
      gm: GM with means `[B, *P, K, C]` and per-sample logstds `[B, 1, ..., 1]`.
      x: samples `[B, *P, C]`, or `[B, n, *P, C]`.
      rotation: optional V `[B, C, C]` (default `kr_rotation(gm)`).

    Returns:
      `z` of the shape of `x`, in the compute dtype (at least float32); V carries no gradient.
    """
    means_rot, logweights, logstds, x, v, has_sample_axis = _prepare_kr(gm, x, rotation, "x")
    x_rot = jnp.einsum("...c,...cd->...d", x, v, precision=_HIGHEST)  # V^T x, [B, n, *P, C]
    d = (x_rot[..., None, :] - means_rot) / jnp.exp(logstds)  # [B, n, *P, K, C]
    sq = d * d
    # Exclusive cumulative sum over the rotated axes: sum_{j<a} d_kj^2.
    sq_prev = jnp.concatenate(
        [jnp.zeros_like(sq[..., :1]), jnp.cumsum(sq[..., :-1], axis=-1)], axis=-1
    )
    slice_logweights = jax.nn.log_softmax(logweights - 0.5 * sq_prev, axis=-2)
    cdf = jnp.sum(jnp.exp(slice_logweights) * jax.lax.erf(d / _SQRT2), axis=-2)
    z = _SQRT2 * jax.scipy.special.erfinv(jnp.clip(cdf, -1.0 + ERFINV_EPS, 1.0 - ERFINV_EPS))
    if not has_sample_axis:
        z = z[:, 0]
    return z


# --------------------------------------------------------------------------------------------------
# §2.11  Hartley transform, §5.7 spectral sampling
# --------------------------------------------------------------------------------------------------


def hartley(z: Array, axes: tuple[int, int] = (-3, -2)) -> Array:
    """Orthonormal 2-D discrete Hartley transform Re(FFT2) + Im(FFT2) over `axes` (§2.11).

    It is orthogonal and self-inverse.

    The default axes are the spatial axes (H, W) of a channel-last `[..., H, W, C]` field.
    """
    z = to_compute_dtype(z)
    if len(axes) != 2:
        raise ValueError(f"axes must name exactly two axes, got {axes!r}")
    for ax in axes:
        if not -z.ndim <= ax < z.ndim:
            raise ValueError(f"axes {axes!r} out of range for an input of shape {z.shape}")
    if jnp.issubdtype(z.dtype, jnp.complexfloating):
        raise ValueError(f"z must be real, got dtype {z.dtype}")
    zf = jnp.fft.fft2(z, axes=axes, norm="ortho")
    return (zf.real + zf.imag).astype(z.dtype)


def spectral_gm_sample(
    key: Array, gm: GM, log_spectrum: Array, n_samples: int | None = None
) -> Array:
    """Sample from the GM with pixels correlated through a frequency spectrum (§5.7).

    `S ~ N(0, 1)`, `S <- S exp(psi / 2)`, `z = hartley(S)` over (H, W) per channel, then
    `x0 = gaussian_to_gm_samples(gm, z)`.

    Args:
      key: PRNG key.
      gm: GM with means `[B, H, W, K, C]` and logstds `[B, 1, 1, 1, 1]`.
      log_spectrum: psi, the log-variance per frequency and channel, broadcastable to
        `[B, H, W, C]`.
      n_samples: None for one sample per GM (`[B, H, W, C]`), else n (`[B, n, H, W, C]`).

    Returns:
      Samples in float32 (the compute dtype), `[B, H, W, C]` or `[B, n, H, W, C]`.
    """
    check_gm(gm)
    if gm.means.ndim != 5:
        raise ValueError(f"gm.means must have shape [B, H, W, K, C], got {gm.means.shape}")
    b, h, w, _, c = gm.means.shape
    log_spectrum = to_compute_dtype(log_spectrum)
    bad_shape = log_spectrum.ndim > 4
    try:
        jnp.broadcast_shapes(log_spectrum.shape, (b, h, w, c))
    except ValueError:
        bad_shape = True
    if bad_shape:
        raise ValueError(
            f"log_spectrum must broadcast to [B, H, W, C] = {(b, h, w, c)} (at most 4 dims), "
            f"got {log_spectrum.shape}"
        )
    if n_samples is None:
        shape = (b, h, w, c)
    else:
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be None or a positive int, got {n_samples!r}")
        shape = (b, n_samples, h, w, c)
        log_spectrum = jnp.broadcast_to(log_spectrum, (b, h, w, c))[:, None]
    dtype = jnp.promote_types(log_spectrum.dtype, jnp.float32)
    noise = jax.random.normal(key, shape, dtype) * jnp.exp(0.5 * log_spectrum)
    z = hartley(noise, axes=(-3, -2))
    return gaussian_to_gm_samples(gm, z)
