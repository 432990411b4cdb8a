"""Euler, DDPM small / large and DPM-Solver++(2M)(SDE) on the mean: one `lax.scan` (docs/math.md §5.1).

The denoiser may return a u mean `[B,H,W,C]` (the flow-matching baseline) or a u-space GM (reduced to
its mean). Guidance is classic CFG (§5.9; on a GM it shifts every component mean). The per-step noise
is the GM-SDE loop's step-noise stream, so K = 1 reductions compare exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gmflow_jax import flow, guidance
from gmflow_jax import gm as gmlib
from gmflow_jax.constants import NUM_TIMESTEPS
from gmflow_jax.gm import GM
from gmflow_jax.solvers import steps
from gmflow_jax.solvers.config import SolverConfig
from gmflow_jax.solvers.network_call import evaluate_denoiser


def baseline_loop(denoiser, params, key, noise, labels, cfg: SolverConfig, scale):
    """Euler, DDPM small/large and DPM-Solver++(2M)(SDE) on the mean prediction (§5.1, §5.9)."""
    out_dtype = noise.dtype
    x = noise.astype(jnp.float32)
    n = cfg.num_steps
    _, sigmas = flow.inference_grid(n, cfg.shift)
    sigma_prev = jnp.concatenate([jnp.ones((1,), jnp.float32), sigmas[:-2]])
    xs = (sigma_prev, sigmas[:-1], sigmas[1:], jnp.arange(n))

    def x0_prediction(x, sigma):
        cond, uncond = evaluate_denoiser(denoiser, params, x, sigma * NUM_TIMESTEPS, labels, cfg)
        if isinstance(cond, GM):
            gm = flow.u_to_x0(cond, x, sigma * NUM_TIMESTEPS)
            if cfg.guided:
                gm_u = flow.u_to_x0(uncond, x, sigma * NUM_TIMESTEPS)
                gm = guidance.cfg_gm(gm, gm_u, scale, cfg.orthogonal_guidance > 0)
            return gmlib.gm_mean(gm)
        u = cond
        if cfg.guided:
            u = guidance.cfg_velocity(cond, uncond, scale, cfg.orthogonal_guidance > 0)
        return x - sigma * u

    def body(carry, xs):
        x, prev_x0 = carry
        s_prev, sigma, sigma_to, i = xs
        x0_hat = x0_prediction(x, sigma)
        # The same per-step noise stream as the GM-SDE loop, so K=1 reductions compare exactly.
        k_noise = jax.random.split(jax.random.fold_in(key, i), 3)[1]
        noise_i = jax.random.normal(k_noise, x.shape, jnp.float32)
        second = (i > 0) & (i < n - 1)
        if cfg.solver == "euler":
            x_new = steps.euler_step(x, x0_hat, sigma, sigma_to)
        elif cfg.solver == "ddpm_small":
            x_new = steps.gm_sde_step(x, x0_hat, sigma, sigma_to, noise_i, "mean", "small")
        elif cfg.solver == "ddpm_large":
            x_new = steps.gm_sde_step(x, x0_hat, sigma, sigma_to, noise_i, "mean", "large")
        elif cfg.solver == "dpmpp_2m":
            x_new = steps.dpmpp_2m_step(x, x0_hat, prev_x0, s_prev, sigma, sigma_to, second)
        else:
            x_new = steps.dpmpp_2m_sde_step(
                x, x0_hat, prev_x0, s_prev, sigma, sigma_to, second, noise_i
            )
        return (x_new, x0_hat), None

    (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), xs)
    return x.astype(out_dtype)
