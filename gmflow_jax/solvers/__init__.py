"""Sampling: the whole loop over the inference grid as one `lax.scan` (spec `gmflow-math.md` §5).

`sample(denoiser, params, key, noise, labels, cfg)` runs one of:

=================  ===========================================================================
`cfg.solver`       what it is
=================  ===========================================================================
`gm_sde`           GM-SDE (§5.1 GM-SDE scheduler, sample mode, §5.2); `order=2` is GM-SDE 2 (§5.5);
                   `spectral=True` draws x0 with spectral KR sampling (§5.7)
`gm_ode`           GM-ODE (§5.1 Euler, mean mode) with `num_substeps` analytic substeps (§5.6);
                   `order=2` is GM-ODE 2
`euler`            flow-matching Euler on the mean (§5.1, §5.9; DDIM eta=0)
`ddpm_small`       GM-SDE scheduler on the mean, small variance (DDIM eta=1)
`ddpm_large`       GM-SDE scheduler on the mean, large variance
`dpmpp_2m`         DPM-Solver++(2M) through the flow adapter (§5.1)
`dpmpp_2m_sde`     SDE-DPM-Solver++(2M) through the flow adapter (§5.1)
=================  ===========================================================================

The denoiser seam: `denoiser(params, x_t [B,H,W,C], t [B], labels [B] | None)` returns a u-space `GM`
(GMFlow) or a u mean `[B,H,W,C]` (the flow-matching baseline). The baseline solvers accept either (a GM is
reduced to its mean). Guidance: probabilistic (`0 < w < 1`, GM solvers, §5.3) or classic CFG (`w > 1`,
§5.9; on a GM it shifts every component mean, Table 4 A3). The 2nd-order cache and the GM-ODE substeps
live inside the scan carry; the network is called exactly `num_steps` times.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gmflow_jax import flow, guidance
from gmflow_jax import gm as gmlib
from gmflow_jax.constants import NUM_TIMESTEPS
from gmflow_jax.gm import GM
from gmflow_jax.solvers import steps
from gmflow_jax.solvers.second_order import empty_second_order_state, gm_second_order

Array = jax.Array

GM_SOLVERS = ("gm_sde", "gm_ode")
BASELINE_SOLVERS = ("euler", "ddpm_small", "ddpm_large", "dpmpp_2m", "dpmpp_2m_sde")
SOLVERS = GM_SOLVERS + BASELINE_SOLVERS


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Static sampler settings (hashable, so it can be a `jit` static argument)."""

    solver: str = "gm_sde"  # one of SOLVERS
    num_steps: int = 8  # N outer steps = network evaluations (NFE)
    num_substeps: int = 1  # S analytic GM-ODE substeps per outer step (§5.6)
    order: int = 1  # 1, or 2 for GM-SDE 2 / GM-ODE 2 (§5.5)
    guidance_scale: float = 0.0  # probabilistic w in [0, 1) or CFG w (active when > 1)
    guidance: str = "probabilistic"  # "probabilistic" (§5.3) or "cfg" (§5.9)
    orthogonal_guidance: float = 1.0  # projection strength o (§5.3 step 2)
    null_label: int = -1  # the unconditional label, required when guidance is active
    shift: float = 1.0  # timestep shift of the grid (§1.2)
    gm2_coefs: tuple[float, float] = (0.005, 1.0)  # (c_a, c_b) of §5.5
    gm2_correction_steps: int = 0  # correction iterations of §5.5 step 6
    spectral: bool = False  # GM-SDE: spectral KR sampling of x0 (§5.7), needs a spectrum net

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver={self.solver!r} is unknown; allowed: {', '.join(SOLVERS)}")
        if int(self.num_steps) != self.num_steps or self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps} must be an integer >= 1")
        if int(self.num_substeps) != self.num_substeps or self.num_substeps < 1:
            raise ValueError(f"num_substeps={self.num_substeps} must be an integer >= 1")
        if self.num_substeps > 1 and self.solver != "gm_ode":
            raise ValueError(
                f"num_substeps={self.num_substeps} > 1 needs solver='gm_ode' (mean output), "
                f"got solver={self.solver!r}"
            )
        if self.order not in (1, 2):
            raise ValueError(f"order={self.order} must be 1 or 2")
        if self.order == 2 and self.solver not in GM_SOLVERS:
            raise ValueError(
                f"order=2 applies to the GM solvers {GM_SOLVERS}; {self.solver!r} has its own order"
            )
        if self.guidance == "probabilistic":
            guidance.check_guidance_scale(self.guidance_scale, "probabilistic")
            if self.guidance_scale > 0 and self.solver not in GM_SOLVERS:
                raise ValueError(
                    f"probabilistic guidance needs a GM solver {GM_SOLVERS}, got "
                    f"solver={self.solver!r}; use guidance='cfg' for the baselines"
                )
        else:
            guidance.check_guidance_scale(self.guidance_scale, self.guidance)
        if self.guided and self.null_label < 0:
            raise ValueError(
                f"guidance_scale={self.guidance_scale} is active but null_label={self.null_label}; "
                "set null_label to the model's unconditional label"
            )
        if self.spectral and self.solver != "gm_sde":
            raise ValueError(f"spectral=True needs solver='gm_sde', got {self.solver!r}")

    @property
    def guided(self) -> bool:
        """Whether the sampler runs the [uncond; cond] batch (§5.2 step 2.1, §5.9)."""
        if self.guidance == "probabilistic":
            return self.guidance_scale > 0
        return self.guidance_scale > 1

    @property
    def nfe(self) -> int:
        """Network evaluations (each on a 2B batch when guided)."""
        return self.num_steps


def default_substeps(nfe: int) -> int:
    """The paper's GM-ODE substep rule for 2-D data: ceil(128 / NFE) (paper-facts §2)."""
    return max(1, math.ceil(128 / nfe))


def _as_f32(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(jnp.float32), tree)


def _lift(params):
    """Re-bind closed-over params inside the current trace (a no-op for XLA).

    The network runs inside `lax.scan` bodies and `jax.eval_shape`; NNX's own `nnx.scan` over stacked
    blocks refuses variables holding tracers of an outer trace, so the params enter each inner trace
    through one element-wise op.
    """
    return jax.tree_util.tree_map(
        lambda a: a + jnp.zeros((), a.dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else a, params
    )


def _evaluate(denoiser, params, x, t, labels, cfg: SolverConfig):
    """Network call at scalar time t; returns (cond output, uncond output or None), float32."""
    params = _lift(params)
    batch = x.shape[0]
    t_batch = jnp.full((batch,), t, jnp.float32)
    if not cfg.guided:
        return _as_f32(denoiser(params, x, t_batch, labels)), None
    null = jnp.full((batch,), cfg.null_label, labels.dtype)
    out = denoiser(
        params,
        jnp.concatenate([x, x]),
        jnp.concatenate([t_batch, t_batch]),
        jnp.concatenate([null, labels]),
    )
    out = _as_f32(out)
    uncond = jax.tree_util.tree_map(lambda a: a[:batch], out)
    cond = jax.tree_util.tree_map(lambda a: a[batch:], out)
    return cond, uncond


def _outer_schedule(cfg: SolverConfig):
    """Per-outer-step scan inputs: t_i, h_i, the S+1 sigmas of its substeps, and the index i."""
    n, s = cfg.num_steps, cfg.num_substeps
    timesteps, sigmas = flow.inference_grid(n * s, cfg.shift)
    t_outer = timesteps[::s]
    t_next = jnp.concatenate([t_outer[1:], jnp.zeros((1,), jnp.float32)])
    h = jnp.where(jnp.arange(n) < n - 1, t_outer - t_next, t_outer)
    idx = jnp.arange(n)[:, None] * s + jnp.arange(s + 1)[None, :]
    return t_outer, h, sigmas[idx], jnp.arange(n)


def _gm_sample_loop(denoiser, params, key, noise, labels, cfg, scale, spectrum):
    """GM-SDE / GM-ODE, 1st or 2nd order, with guidance and substeps (§5.2)."""
    x0_shape_dtype = noise.dtype
    x = noise.astype(jnp.float32)
    ode = cfg.solver == "gm_ode"
    probabilistic = cfg.guided and cfg.guidance == "probabilistic"

    def guided_gm(x, t):
        cond, uncond = _evaluate(denoiser, params, x, t, labels, cfg)
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
                from gmflow_jax import transport

                psi = spectrum(_lift(params), gaussian[0], gaussian[1]).astype(jnp.float32)
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
    (x, _), _ = jax.lax.scan(body, carry, _outer_schedule(cfg))
    return x.astype(x0_shape_dtype)


def _baseline_loop(denoiser, params, key, noise, labels, cfg, scale):
    """Euler, DDPM small/large and DPM-Solver++(2M)(SDE) on the mean prediction (§5.1, §5.9)."""
    out_dtype = noise.dtype
    x = noise.astype(jnp.float32)
    n = cfg.num_steps
    _, sigmas = flow.inference_grid(n, cfg.shift)
    sigma_prev = jnp.concatenate([jnp.ones((1,), jnp.float32), sigmas[:-2]])
    xs = (sigma_prev, sigmas[:-1], sigmas[1:], jnp.arange(n))

    def x0_prediction(x, sigma):
        cond, uncond = _evaluate(denoiser, params, x, sigma * NUM_TIMESTEPS, labels, cfg)
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


@functools.partial(jax.jit, static_argnames=("denoiser", "cfg", "spectrum"))
def sample(
    denoiser: Callable[..., Any],
    params: Any,
    key: Array,
    noise: Array,
    labels: Array | None,
    cfg: SolverConfig,
    guidance_scale: Array | float | None = None,
    spectrum: Callable[..., Array] | None = None,
) -> Array:
    """Run the sampler `cfg` from `noise` `[B, H, W, C]` at sigma = 1 to x0 (§5.2, one jitted scan).

    `guidance_scale`, when given, replaces `cfg.guidance_scale` as a traced value (sweeps do not
    recompile); whether guidance is active is decided by the static `cfg`. `spectrum(params, mean, var)`
    returns the SpectrumMLP log-spectrum psi `[B,H,W,C]` for `cfg.spectral`.
    """
    scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
    if cfg.guided and labels is None:
        raise ValueError("guidance is active but labels is None; pass class labels [B]")
    if cfg.spectral and spectrum is None:
        raise ValueError("spectral=True needs a spectrum function (the SpectrumMLP)")
    if cfg.solver in GM_SOLVERS:
        return _gm_sample_loop(denoiser, params, key, noise, labels, cfg, scale, spectrum)
    return _baseline_loop(denoiser, params, key, noise, labels, cfg, scale)
