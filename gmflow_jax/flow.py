"""The flow-matching noise process: schedule, time samplers, grids, transitions, GM conversions.

Reference `docs/math.md`:

======================================  ===============================================================
function                                docs/math.md
======================================  ===============================================================
`sigma_alpha`                           §1.1 sigma = t / T, alpha = 1 - sigma
`shift_warp`                            §1.2 timestep shift
`sample_t_uniform`, `sample_t_logit_normal`  §1.3 training timestep samplers
`inference_grid`                        §1.4 inference grid with trailing sigma = 0
`forward_diffusion`                     §1.1 x_t = alpha x_0 + sigma eps
`forward_transition`, `transition_variance`  §3.2 forward transition
`reverse_transition_coefs`              §3.3 c1, c2, c3, b
`reverse_transition_gm`                 §3.3 reverse-transition GM (u- and x0-prediction)
`reverse_transition_sample`             §3.3 sample mode
`u_to_x0`, `u_to_x0_gaussian`, `u_to_x0_tensor`  §3.1 u -> x0 conversion
`retarget_gm`, `retarget_mean`          §3.4 re-targeting an x0-GM to another (x_t, t)
======================================  ===============================================================

Times are in t units, t in [0, T] with T = 1000, given as a scalar or a per-sample `[B]` array; they are
broadcast against `[B, ...]` tensors internally. Everything computes in float32 (float64 stays float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gmflow_jax.constants import (
    NUM_TIMESTEPS,
    RETARGET_EPS,
    SIGMA_LOG_EPS,
    TRANSITION_EPS,
)
from gmflow_jax.gm import (
    GM,
    axis_log_softmax,
    axis_sum,
    check_gm,
    check_point,
    tilted_mean,
    to_compute_dtype,
)

Array = jax.Array


def _per_sample(t, ndim: int) -> Array:
    """Reshape a scalar or `[B]` time to broadcast against a rank-`ndim` `[B, ...]` tensor."""
    t = to_compute_dtype(t)
    if t.ndim == 0:
        return t
    if t.ndim != 1:
        raise ValueError(f"t must be a scalar or a per-sample [B] array, got shape {t.shape}")
    return t.reshape(t.shape + (1,) * (ndim - 1))


def sigma_alpha(t) -> tuple[Array, Array]:
    """(sigma, alpha) = (t / T, 1 - t / T) (§1.1)."""
    sigma = to_compute_dtype(t) / NUM_TIMESTEPS
    return sigma, 1.0 - sigma


def shift_warp(tau, shift: float) -> Array:
    """Warp a linear time tau in [0, 1]: a tau / (1 + (a - 1) tau) (§1.2); a = 1 is the identity."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    tau = to_compute_dtype(tau)
    return shift * tau / (1.0 + (shift - 1.0) * tau)


def sample_t_uniform(key: Array, shape: tuple[int, ...], shift: float = 1.0) -> Array:
    """Training t = T warp(1 - U), U ~ U[0, 1), so t in (0, T] (§1.3, uniform mode)."""
    tau = 1.0 - jax.random.uniform(key, shape, jnp.float32)
    return NUM_TIMESTEPS * shift_warp(tau, shift)


def sample_t_logit_normal(
    key: Array, shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0, shift: float = 1.0
) -> Array:
    """Training t = T warp(sigmoid(mean + std n)), n ~ N(0, 1) (§1.3, logit-normal mode)."""
    tau = jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))
    return NUM_TIMESTEPS * shift_warp(tau, shift)


def inference_grid(num_steps: int, shift: float = 1.0) -> tuple[Array, Array]:
    """The §1.4 grid: timesteps `[M]` (T sigma_i) and sigmas `[M + 1]` with a trailing 0.

    tau_i = 1 - i / M for i = 0..M-1, sigma_i = warp(tau_i), sigma_M = 0.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
    tau = 1.0 - jnp.arange(num_steps, dtype=jnp.float32) / num_steps
    sigmas = shift_warp(tau, shift).astype(jnp.float32)
    timesteps = NUM_TIMESTEPS * sigmas
    return timesteps, jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)])


def forward_diffusion(x0: Array, noise: Array, t) -> Array:
    """x_t = alpha_t x_0 + sigma_t eps (§1.1)."""
    x0, noise = to_compute_dtype(x0), to_compute_dtype(noise)
    sigma, alpha = sigma_alpha(_per_sample(t, x0.ndim))
    return alpha * x0 + sigma * noise


def transition_variance(t_low, t_high) -> Array:
    """beta = sigma_h^2 - (alpha_h sigma_l / alpha_l)^2, the forward transition variance (§3.2)."""
    s_l, a_l = sigma_alpha(t_low)
    s_h, a_h = sigma_alpha(t_high)
    return s_h**2 - (a_h / a_l * s_l) ** 2


def forward_transition(x_low: Array, t_low, t_high, noise: Array) -> Array:
    """x_{t_h} = (alpha_h / alpha_l) x_{t_l} + sqrt(beta) n, keeping x_{t_h}|x_0 marginals (§3.2)."""
    x_low, noise = to_compute_dtype(x_low), to_compute_dtype(noise)
    t_low, t_high = _per_sample(t_low, x_low.ndim), _per_sample(t_high, x_low.ndim)
    _, a_l = sigma_alpha(t_low)
    _, a_h = sigma_alpha(t_high)
    beta = transition_variance(t_low, t_high)
    return a_h / a_l * x_low + jnp.sqrt(jnp.maximum(beta, 0.0)) * noise


def reverse_transition_coefs(sigma, sigma_to) -> tuple[Array, Array, Array, Array]:
    """(c1, c2, c3, b) of q(x_{t'} | x_t, x_0) = N(c1 x_t + c2 x_0, c3 I), in sigma units (§3.3)."""
    sigma, sigma_to = to_compute_dtype(sigma), to_compute_dtype(sigma_to)
    alpha, alpha_to = 1.0 - sigma, 1.0 - sigma_to
    r_sigma = sigma_to / jnp.maximum(sigma, TRANSITION_EPS)
    r_alpha = alpha / jnp.maximum(alpha_to, TRANSITION_EPS)
    b = 1.0 - (r_sigma * r_alpha) ** 2
    c1 = r_sigma**2 * r_alpha
    c2 = b * alpha_to
    c3 = b * sigma_to**2
    return c1, c2, c3, b


def u_to_x0(gm_u: GM, x_t: Array, t) -> GM:
    """u-GM -> x0-GM: mu = x_t - sigma mu_u, lambda = lambda_u + log max(sigma, 1e-6) (§3.1)."""
    check_gm(gm_u, "gm_u")
    gm_u = gm_u.astype_compute()
    x_t = to_compute_dtype(x_t)
    check_point(x_t, gm_u, "x_t")
    sigma, _ = sigma_alpha(_per_sample(t, gm_u.means.ndim))
    means = x_t[..., None, :] - sigma * gm_u.means
    logstds = gm_u.logstds + jnp.log(jnp.maximum(sigma, SIGMA_LOG_EPS))
    return GM(means, gm_u.logweights, logstds)


def u_to_x0_gaussian(mean_u: Array, var_u: Array, x_t: Array, t) -> tuple[Array, Array]:
    """Isotropic Gaussian over u -> over x0: mean x_t - sigma m, variance sigma^2 v (§3.1)."""
    mean_u, var_u, x_t = map(to_compute_dtype, (mean_u, var_u, x_t))
    sigma, _ = sigma_alpha(_per_sample(t, x_t.ndim))
    return x_t - sigma * mean_u, sigma**2 * var_u


def u_to_x0_tensor(u: Array, x_t: Array, t) -> Array:
    """x0 = x_t - sigma u (§3.1)."""
    u, x_t = to_compute_dtype(u), to_compute_dtype(x_t)
    sigma, _ = sigma_alpha(_per_sample(t, x_t.ndim))
    return x_t - sigma * u


def reverse_transition_gm(gm: GM, x_t: Array, t, t_to, prediction: str = "u") -> GM:
    """The reverse-transition GM q(x_{t'} | x_t) for a u- or x0-GM denoiser (§3.3).

    Means c1 x_t + c2 mu^{x0}_k; variance (factor s)^2 + c3 computed in log space with the two floors of
    §3.3 (the std factor sigma c2 or c2 floored at 1e-6 inside its log, c3 floored at 1e-6).
    """
    if prediction not in ("u", "x0"):
        raise ValueError(f"prediction must be 'u' or 'x0', got {prediction!r}")
    check_gm(gm)
    gm = gm.astype_compute()
    x_t = to_compute_dtype(x_t)
    check_point(x_t, gm, "x_t")
    ndim = gm.means.ndim
    sigma, _ = sigma_alpha(_per_sample(t, ndim))
    sigma_to, _ = sigma_alpha(_per_sample(t_to, ndim))
    c1, c2, c3, _ = reverse_transition_coefs(sigma, sigma_to)
    x = x_t[..., None, :]
    if prediction == "u":
        means = c1 * x + c2 * (x - sigma * gm.means)
        factor = sigma * c2
    else:
        means = c1 * x + c2 * gm.means
        factor = c2
    logstds = 0.5 * jnp.logaddexp(
        2.0 * (gm.logstds + jnp.log(jnp.maximum(factor, TRANSITION_EPS))),
        jnp.log(jnp.maximum(c3, TRANSITION_EPS)),
    )
    return GM(means, jnp.broadcast_to(gm.logweights, means.shape[:-1] + (1,)), logstds)


def reverse_transition_sample(x_t: Array, x0_hat: Array, t, t_to, noise: Array) -> Array:
    """Sample mode: x_{t'} = c1 x_t + c2 x0_hat + sqrt(b) sigma' n (§3.3)."""
    x_t, x0_hat, noise = map(to_compute_dtype, (x_t, x0_hat, noise))
    sigma, _ = sigma_alpha(_per_sample(t, x_t.ndim))
    sigma_to, _ = sigma_alpha(_per_sample(t_to, x_t.ndim))
    c1, c2, _, b = reverse_transition_coefs(sigma, sigma_to)
    return c1 * x_t + c2 * x0_hat + jnp.sqrt(jnp.maximum(b, 0.0)) * sigma_to * noise


def _retarget_gaussian(x_src, sigma_src, x_tgt, sigma_tgt) -> tuple[Array, Array]:
    """The likelihood-ratio Gaussian N(g_m, g_v) in x0 of §3.4 (g_v per sample, `[B, ..., 1]`)."""
    a_src, a_tgt = 1.0 - sigma_src, 1.0 - sigma_tgt
    denom = jnp.maximum((a_tgt * sigma_src) ** 2 - (a_src * sigma_tgt) ** 2, RETARGET_EPS)
    g_m = (a_tgt * sigma_src * sigma_src * x_tgt - a_src * sigma_tgt * sigma_tgt * x_src) / denom
    g_v = (sigma_tgt * sigma_src) ** 2 / denom
    return g_m, g_v


def _retarget_parts(gm_x0: GM, x_src, t_src, x_tgt, t_tgt):
    """(gm, g_m `[..., C]`, g_v, s2, norm): the likelihood-ratio Gaussian N(g_m, g_v) of §3.4,
    the GM's variance s2 and the product's normalizer norm = g_v + s2 (the last three
    `[B, 1, ..., 1]`, broadcasting against the means `[..., K, C]`)."""
    check_gm(gm_x0, "gm_x0")
    gm = gm_x0.astype_compute()
    x_src, x_tgt = to_compute_dtype(x_src), to_compute_dtype(x_tgt)
    if x_src.shape != x_tgt.shape:
        raise ValueError(f"x_src {x_src.shape} and x_tgt {x_tgt.shape} must have the same shape")
    check_point(x_src, gm, "x_src")
    ndim = gm.means.ndim
    sigma_src, _ = sigma_alpha(_per_sample(t_src, ndim))
    sigma_tgt, _ = sigma_alpha(_per_sample(t_tgt, ndim))
    g_m, g_v = _retarget_gaussian(x_src[..., None, :], sigma_src, x_tgt[..., None, :], sigma_tgt)
    s2 = jnp.exp(2.0 * gm.logstds)
    norm = jnp.maximum(g_v + s2, RETARGET_EPS)
    return gm, g_m[..., 0, :], g_v, s2, norm


def retarget_gm(gm_x0: GM, x_src: Array, t_src, x_tgt: Array, t_tgt) -> GM:
    """The x0-GM predicted at (x_src, t_src) re-targeted to (x_tgt, t_tgt < t_src) (§3.4, fused §2.5)."""
    gm, g_m, g_v, s2, norm = _retarget_parts(gm_x0, x_src, t_src, x_tgt, t_tgt)
    means = (g_v * gm.means + s2 * g_m[..., None, :]) / norm
    sq = axis_sum((gm.means - g_m[..., None, :]) ** 2, -1, keepdims=True)
    logits = gm.logweights - sq / (2.0 * norm)
    logstds = gm.logstds + 0.5 * jnp.log(g_v) - 0.5 * jnp.log(norm)
    return GM(means, axis_log_softmax(logits, -2), logstds)


def retarget_mean(gm_x0: GM, x_src: Array, t_src, x_tgt: Array, t_tgt) -> Array:
    """E[x0 | x_tgt] under the x0-GM predicted at (x_src, t_src), shape `[..., C]` (§3.4).

    The mean of `retarget_gm` without forming it: every product component mean is the same affine
    map of mu_k, (g_v mu_k + s2 g_m) / norm, and the weights sum to one, so the mean is that map of
    sum_k w_k mu_k (`gm.tilted_mean`, one pass of the native kernel on the CPU).
    """
    gm, g_m, g_v, s2, norm = _retarget_parts(gm_x0, x_src, t_src, x_tgt, t_tgt)
    # [B, 1, ..., 1, 1] -> [B, 1, ..., 1] against [..., 1] (g_v is a scalar for scalar times)
    g_v, s2, norm = (x[..., 0] if x.ndim else x for x in (g_v, s2, norm))
    return tilted_mean(gm, g_m, 2.0 * norm, g_v, s2, norm)
