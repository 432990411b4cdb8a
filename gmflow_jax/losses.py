"""Training objectives: the transition pair, the transition GM-NLL, and the flow-matching baseline loss.

Reference `docs/math.md`:

=============================  ======================================================================
function                       docs/math.md
=============================  ======================================================================
`transition_pair`              §4.1 steps 1-4 (t_high, t_low, x_{t_low}, x_{t_high}), float32
`gm_nll`                       §4.2 per-pixel GM NLL with the 1e4 inverse-std cap
`transition_nll_loss`          §4.1 steps 5-6 + §4.2 (reverse-transition GM, flatmean, weight_scale)
`flow_matching_l2_loss`        §4.2 "Relation to plain flow matching" / §5.9 (u-space MSE, 1/2 ||.||^2)
`spectral_targets`             §4.3 steps 1-4 (stop-gradient Gaussian summary and Hartley residual Z)
`spectral_loss`                §4.3 NLL of Z under N(0, e^psi) minus under N(0, 1)
=============================  ======================================================================
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from gmflow_jax import flow, transport
from gmflow_jax.constants import NLL_INV_STD_EPS, NUM_TIMESTEPS, SPECTRAL_T_EPS, TRAIN_T_EPS
from gmflow_jax.gm import (
    GM,
    axis_logsumexp,
    axis_sum,
    check_gm,
    gm_to_iso_gaussian,
    to_compute_dtype,
)

Array = jax.Array


def transition_pair(
    key: Array,
    x0: Array,
    trans_ratio: float,
    t_sampler: Callable[[Array, tuple[int, ...]], Array],
) -> tuple[Array, Array, Array, Array]:
    """Draw (t_high, t_low, x_{t_low}, x_{t_high}) for one batch `x0 [B, ...]` (§4.1 steps 1-4).

    t_high ~ t_sampler clipped to [1e-4, T]; t_low = clip(t_high (1 - r), 0, t_high - 1e-4);
    x_{t_low} by forward diffusion with n0, x_{t_high} by the forward transition with n1.
    """
    if not 0.0 < trans_ratio <= 1.0:
        raise ValueError(f"trans_ratio must be in (0, 1], got {trans_ratio}")
    x0 = to_compute_dtype(x0)
    key_t, key_n0, key_n1 = jax.random.split(key, 3)
    batch = x0.shape[0]
    t_high = jnp.clip(t_sampler(key_t, (batch,)), TRAIN_T_EPS, NUM_TIMESTEPS)
    t_low = jnp.maximum(jnp.minimum(t_high * (1.0 - trans_ratio), t_high - TRAIN_T_EPS), 0.0)
    n0 = jax.random.normal(key_n0, x0.shape, x0.dtype)
    n1 = jax.random.normal(key_n1, x0.shape, x0.dtype)
    x_low = flow.forward_diffusion(x0, n0, t_low)
    x_high = flow.forward_transition(x_low, t_low, t_high, n1)
    return t_high, t_low, x_low, x_high


def gm_nll(gm: GM, x: Array) -> Array:
    """Per-pixel GM NLL without the (C/2) log 2 pi constant, inverse std capped at 1e4 (§4.2).

    NLL = -LSE_k(l_k + sum_c [-(1/2)((mu_kc - x_c) kappa)^2 - lambda]), kappa = min(e^-lambda, 1e4).
    Returns `[...]` (the GM's batch and pixel axes).
    """
    check_gm(gm)
    gm = gm.astype_compute()
    x = to_compute_dtype(x)
    if x.shape[-1] != gm.num_channels or x.ndim != gm.means.ndim - 1:
        raise ValueError(
            f"target x must have shape [..., {gm.num_channels}] matching the GM means "
            f"{gm.means.shape} without the K axis, got {x.shape}"
        )
    kappa = jnp.minimum(jnp.exp(-gm.logstds), 1.0 / NLL_INV_STD_EPS)
    c = gm.num_channels
    sq = axis_sum(((gm.means - x[..., None, :]) * kappa) ** 2, -1, keepdims=True)
    logits = gm.logweights - 0.5 * sq - c * gm.logstds
    return -axis_logsumexp(logits[..., 0], -1)


def transition_nll_loss(
    gm_u: GM,
    x_high: Array,
    t_high: Array,
    x_low: Array,
    t_low: Array,
    weight_scale: float = 1.0,
) -> tuple[Array, Array]:
    """The transition GM-NLL loss (§4.1 step 6, §4.2) and its per-sample values `[B]`.

    The network's u-GM at (x_high, t_high) is turned into the reverse-transition GM to t_low (§3.3) and
    scored at x_low; the per-pixel NLL is averaged over pixels ("flatmean"), scaled by `weight_scale`
    and averaged over the batch.
    """
    trans = flow.reverse_transition_gm(gm_u, x_high, t_high, t_low, prediction="u")
    nll = gm_nll(trans, x_low)
    per_sample = weight_scale * jnp.mean(nll.reshape(nll.shape[0], -1), axis=-1)
    return jnp.mean(per_sample), per_sample


def flow_matching_l2_loss(
    u_pred: Array, x0: Array, x_t: Array, t: Array, weight_scale: float = 1.0
) -> tuple[Array, Array]:
    """Flow-matching baseline loss 1/2 ||u_pred - u||^2_C per pixel, u = (x_t - x0) / sigma (§4.2).

    Equals the K = 1, lambda = 0 GM NLL in u-space. Reduction as `transition_nll_loss`.
    """
    u_pred, x0, x_t = map(to_compute_dtype, (u_pred, x0, x_t))
    if u_pred.shape != x0.shape:
        raise ValueError(f"u_pred {u_pred.shape} must have the shape of x0 {x0.shape}")
    t = jnp.asarray(t)
    sigma, _ = flow.sigma_alpha(t.reshape(t.shape + (1,) * (x0.ndim - 1)))
    u = (x_t - x0) / sigma
    per_pixel = 0.5 * jnp.sum((u_pred - u) ** 2, axis=-1)
    per_sample = weight_scale * jnp.mean(per_pixel.reshape(per_pixel.shape[0], -1), axis=-1)
    return jnp.mean(per_sample), per_sample


def spectral_targets(gm_u: GM, x0: Array, x_t: Array, t: Array) -> tuple[Array, Array, Array]:
    """Stop-gradient inputs of the spectral loss: x0 Gaussian summary (m, v) and Z (§4.3 steps 1-4).

    m `[B,H,W,C]`, v `[B,H,W,1]` summarize the u-GM in x0 space; the true velocity
    u = (x_t - x0) T / max(t, 1e-6) is KR-whitened under the u-GM and Hartley-transformed to Z.
    """
    gm_u = jax.tree_util.tree_map(jax.lax.stop_gradient, gm_u.astype_compute())
    x0, x_t = to_compute_dtype(x0), to_compute_dtype(x_t)
    t = to_compute_dtype(t).reshape((-1,) + (1,) * (x0.ndim - 1))
    m_u, v_u = gm_to_iso_gaussian(gm_u)
    sigma = t / NUM_TIMESTEPS
    m, v = x_t - sigma * m_u, sigma**2 * v_u
    u = (x_t - x0) * NUM_TIMESTEPS / jnp.maximum(t, SPECTRAL_T_EPS)
    z = transport.gm_samples_to_gaussian(gm_u, u)
    big_z = transport.hartley(z)
    return jax.lax.stop_gradient(m), jax.lax.stop_gradient(v), jax.lax.stop_gradient(big_z)


def spectral_loss(big_z: Array, log_spectrum: Array, weight: float = 1.0) -> Array:
    """L_spec = (1/2) C w mean_{B,H,W,C}[Z^2 (e^-psi - 1) + psi] (§4.3); gradients reach psi only."""
    big_z = jax.lax.stop_gradient(to_compute_dtype(big_z))
    psi = to_compute_dtype(log_spectrum)
    if psi.shape != big_z.shape:
        raise ValueError(f"log_spectrum {psi.shape} must have the shape of Z {big_z.shape}")
    c = big_z.shape[-1]
    return 0.5 * c * weight * jnp.mean(big_z**2 * (jnp.exp(-psi) - 1.0) + psi)
