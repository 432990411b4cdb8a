"""GM-SDE / GM-ODE, 1st or 2nd order, guided, with substeps: one `lax.scan` (docs/math.md §5.2).

The 2nd-order cache (§5.5) and the GM-ODE substeps (§5.6) live inside the scan carry; the network is
called exactly `num_steps` times. Per outer step i the key is `fold_in(key, i)`, split into
(GM draw, step noise, spare) keys; the baseline loop uses the same step-noise stream so K = 1
reductions compare exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gmflow_jax import flow, guidance, transport
from gmflow_jax import gm as gmlib
from gmflow_jax.constants import NUM_TIMESTEPS
from gmflow_jax.gm import GM
from gmflow_jax.solvers import steps
from gmflow_jax.solvers.config import SolverConfig
from gmflow_jax.solvers.network_call import evaluate_denoiser
from gmflow_jax.solvers.second_order import empty_second_order_state, gm_second_order


def outer_schedule(cfg: SolverConfig):
    """Per-outer-step scan inputs: t_i, h_i, the S+1 sigmas of its substeps, and the index i."""
    n, s = cfg.num_steps, cfg.num_substeps
    timesteps, sigmas = flow.inference_grid(n * s, cfg.shift)
    t_outer = timesteps[::s]
    t_next = jnp.concatenate([t_outer[1:], jnp.zeros((1,), jnp.float32)])
    h = jnp.where(jnp.arange(n) < n - 1, t_outer - t_next, t_outer)
    idx = jnp.arange(n)[:, None] * s + jnp.arange(s + 1)[None, :]
    return t_outer, h, sigmas[idx], jnp.arange(n)


def gm_sample_loop(denoiser, params, key, noise, labels, cfg: SolverConfig, scale, spectrum):
    """GM-SDE / GM-ODE, 1st or 2nd order, with guidance and substeps (§5.2)."""
    x0_shape_dtype = noise.dtype
    x = noise.astype(jnp.float32)
    ode = cfg.solver == "gm_ode"
    probabilistic = cfg.guided and cfg.guidance == "probabilistic"

    def guided_gm(x, t):
        cond, uncond = evaluate_denoiser(denoiser, params, x, t, labels, cfg)
        if not isinstance(cond, GM):
            raise ValueError(
                f"solver={cfg.solver!r} needs a GM denoiser; the denoiser returned an array "
                "(a mean-only baseline); use one of the baseline solvers instead"
            )
        gm = flow.u_to_x0(cond, x, t)
        if not cfg.guided:
            return gm, gmlib.gm_to_iso_gaussian(gm), None
        gm_uncond = flow.u_to_x0(uncond, x, t)
        if probabilistic:
            res = guidance.probabilistic_guidance(gm, gm_uncond, scale, cfg.orthogonal_guidance)
            return res.gm, (res.mean, res.var), res
        gm = guidance.cfg_gm(gm, gm_uncond, scale, cfg.orthogonal_guidance > 0)
        return gm, gmlib.gm_to_iso_gaussian(gm), None

    def body(carry, xs):
        x, so_state = carry
        t, h, sub_sigmas, i = xs
        key_i = jax.random.fold_in(key, i)
        k_sample, k_noise, k_spec = jax.random.split(key_i, 3)
        gm, gaussian, gres = guided_gm(x, t)
        if cfg.order == 2:
            gm, gaussian, so_state = gm_second_order(
                so_state,
                gm,
                gaussian,
                x,
                t,
                h,
                gres,
                scale if probabilistic else 0.0,
                cfg.gm2_coefs,
                cfg.gm2_correction_steps,
            )
        sigma, sigma_to = sub_sigmas[0], sub_sigmas[1]
        if ode:
            x0_hat = gmlib.gm_mean(gm)
            x_new = steps.euler_step(x, x0_hat, sigma, sigma_to)
        else:
            if cfg.spectral:
                psi = spectrum(params, gaussian[0], gaussian[1]).astype(jnp.float32)
                x0_hat = transport.spectral_gm_sample(k_sample, gm, psi)
            else:
                x0_hat = gmlib.gm_sample(k_sample, gm)
            n = jax.random.normal(k_noise, x.shape, jnp.float32)
            x_new = steps.gm_sde_step(x, x0_hat, sigma, sigma_to, n, "sample")
        if cfg.num_substeps > 1:
            t_base, x_base = t, x

            def substep(x_sub, sig):
                sig_from, sig_to = sig
                x0_sub = flow.retarget_mean(gm, x_base, t_base, x_sub, sig_from * NUM_TIMESTEPS)
                return steps.euler_step(x_sub, x0_sub, sig_from, sig_to), None

            x_new, _ = jax.lax.scan(substep, x_new, (sub_sigmas[1:-1], sub_sigmas[2:]))
        return (x_new, so_state), None

    init_gm = jax.eval_shape(lambda: guided_gm(x, jnp.float32(NUM_TIMESTEPS))[0])
    init_gm = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), init_gm)
    carry = (x, empty_second_order_state(init_gm, x))
    (x, _), _ = jax.lax.scan(body, carry, outer_schedule(cfg))
    return x.astype(x0_shape_dtype)
