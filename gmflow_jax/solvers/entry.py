"""`sample`: the jitted entry point of every sampler (docs/math.md §5.2): noise -> x0 in one scan.

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
(GMFlow) or a u mean `[B,H,W,C]` (the flow-matching baseline). Guidance: probabilistic (`0 < w < 1`,
GM solvers, §5.3) or classic CFG (`w > 1`, §5.9).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from gmflow_jax.solvers.baseline_loop import baseline_loop
from gmflow_jax.solvers.config import GM_SOLVERS, SolverConfig
from gmflow_jax.solvers.gm_loop import gm_sample_loop

Array = jax.Array


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
        return gm_sample_loop(denoiser, params, key, noise, labels, cfg, scale, spectrum)
    return baseline_loop(denoiser, params, key, noise, labels, cfg, scale)
