"""Scheduler updates from sigma to sigma' given an x0 prediction: pure, stateless step functions.

Reference `docs/math.md`:

=========================  =========================================================================
function                   docs/math.md
=========================  =========================================================================
`euler_step`               §5.1 Euler ODE (x0 form; exact on the linear path, oracle 29)
`gm_sde_step`              §5.1 GM-SDE scheduler: sample mode, mean mode with small / large variance
`dpmpp_2m_step`            §5.1 flow adapter + DPM-Solver++(2M), data prediction, multistep
`dpmpp_2m_sde_step`        §5.1 flow adapter + SDE-DPM-Solver++(2M), midpoint form
=========================  =========================================================================

Sigmas are scalars (the grid is shared by the batch). The DPM-Solver++ updates are written directly in
the flow parameterization x = alpha x0 + sigma eps with lambda = log(max(alpha, 1e-6) / sigma); this equals
the adapter's VP rescaling (DPM-Solver++ is invariant to a per-time rescaling of x), with the adapter's
alpha floor. Their last step, to sigma' = 0, is first order (diffusers' `final_sigmas_type="zero"`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gmflow_jax import flow
from gmflow_jax.constants import SDE_LARGE_VAR_EPS, TRANSITION_EPS

Array = jax.Array


def euler_step(x: Array, x0_hat: Array, sigma, sigma_to) -> Array:
    """x' = x + (sigma' - sigma)(x - x0_hat) / sigma (§5.1; sigma > 0 always, no clamp)."""
    return x + (sigma_to - sigma) * (x - x0_hat) / sigma


def euler_step_u(x: Array, u_hat: Array, sigma, sigma_to) -> Array:
    """u-prediction Euler: x' = x + (sigma' - sigma) u (§5.1, §5.9)."""
    return x + (sigma_to - sigma) * u_hat


def gm_sde_step(
    x: Array,
    x0_hat: Array,
    sigma,
    sigma_to,
    noise: Array,
    output_mode: str = "sample",
    variance_mode: str = "large",
) -> Array:
    """GM-SDE: x' = c1 x + c2 x0_hat + std n, std by output/variance mode (§5.1).

    `sample` or `small`: std = sqrt(b) sigma'. `mean` with `large`: std = sqrt(b) sigma
    sqrt((alpha'^2 + sigma'^2) / max(alpha^2 + sigma^2, 1e-6)) (adds noise even at the last step, §11.2).
    """
    if output_mode not in ("sample", "mean"):
        raise ValueError(f"output_mode must be 'sample' or 'mean', got {output_mode!r}")
    if variance_mode not in ("small", "large"):
        raise ValueError(f"variance_mode must be 'small' or 'large', got {variance_mode!r}")
    c1, c2, _, b = flow.reverse_transition_coefs(sigma, sigma_to)
    sqrt_b = jnp.sqrt(jnp.maximum(b, 0.0))
    if output_mode == "sample" or variance_mode == "small":
        std = sqrt_b * sigma_to
    else:
        alpha, alpha_to = 1.0 - sigma, 1.0 - sigma_to
        ratio = (alpha_to**2 + sigma_to**2) / jnp.maximum(alpha**2 + sigma**2, SDE_LARGE_VAR_EPS)
        std = sqrt_b * sigma * jnp.sqrt(ratio)
    return c1 * x + c2 * x0_hat + std * noise


def dpm_lambda(sigma) -> Array:
    """Half log-SNR lambda = log(max(alpha, 1e-6)) - log(sigma) (flow adapter's alpha floor, §5.1)."""
    alpha = 1.0 - sigma
    return jnp.log(jnp.maximum(alpha, TRANSITION_EPS)) - jnp.log(sigma)


def _dpm_data_estimate(x0_hat, prev_x0_hat, sigma_prev, sigma, sigma_to, second_order):
    """D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i (DPM-Solver++(2M), midpoint)."""
    h = dpm_lambda(sigma_to) - dpm_lambda(sigma)
    h_prev = dpm_lambda(sigma) - dpm_lambda(sigma_prev)
    r = h_prev / h
    d1 = (x0_hat - prev_x0_hat) / r
    return jnp.where(second_order, x0_hat + 0.5 * d1, x0_hat)


def dpmpp_2m_step(
    x: Array, x0_hat: Array, prev_x0_hat: Array, sigma_prev, sigma, sigma_to, second_order
) -> Array:
    """DPM-Solver++(2M): x' = (sigma'/sigma) x + alpha' (1 - e^{-h}) D (§5.1 flow adapter).

    `second_order` is a traced bool: False on the first and the last step.
    """
    alpha_to = 1.0 - sigma_to
    exp_neg_h = jnp.exp(-(dpm_lambda(sigma_to) - dpm_lambda(sigma)))
    d = _dpm_data_estimate(x0_hat, prev_x0_hat, sigma_prev, sigma, sigma_to, second_order)
    return (sigma_to / sigma) * x + alpha_to * (1.0 - exp_neg_h) * d


def dpmpp_2m_sde_step(
    x: Array,
    x0_hat: Array,
    prev_x0_hat: Array,
    sigma_prev,
    sigma,
    sigma_to,
    second_order,
    noise: Array,
) -> Array:
    """SDE-DPM-Solver++(2M), midpoint (§5.1 flow adapter).

    x' = (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) D + sigma' sqrt(1 - e^{-2h}) n.
    """
    alpha_to = 1.0 - sigma_to
    exp_neg_h = jnp.exp(-(dpm_lambda(sigma_to) - dpm_lambda(sigma)))
    d = _dpm_data_estimate(x0_hat, prev_x0_hat, sigma_prev, sigma, sigma_to, second_order)
    one_minus = 1.0 - exp_neg_h**2
    return (
        (sigma_to / sigma) * exp_neg_h * x
        + alpha_to * one_minus * d
        + sigma_to * jnp.sqrt(jnp.maximum(one_minus, 0.0)) * noise
    )
