"""Likelihood evaluation: NLL in bits/dim of q(x0 | x_t) over uniform t (`docs/math.md` §5.10, paper Table 3).

NLL = E_{t ~ U, x0, x_t}[ -log2 q(x0 | x_t) / D ], D = C H W, with t = T max(U, 1e-4) (§5.10). With a
SpectrumMLP the density is the spectral one, q^S = q * N(Z; 0, e^psi) / N(Z; 0, I) (paper Eq. 19), where Z
is the Hartley transform of the KR-whitened x0. The reference's likelihood code broadcasts the squared
residual over channels before the per-channel factor (§11.6); this module uses the per-channel formula of
Eq. 19, which is what the density means.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gmflow_jax import flow, transport
from gmflow_jax.constants import LIKELIHOOD_T_EPS, NUM_TIMESTEPS
from gmflow_jax.gm import gm_logprob, gm_to_iso_gaussian

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("denoiser", "spectrum"))
def nll_bits_per_dim(
    denoiser: Callable[..., Any],
    params: Any,
    key: Array,
    x0: Array,
    labels: Array | None,
    t: Array | None = None,
    spectrum: Callable[..., Array] | None = None,
) -> Array:
    """Per-sample -log2 q(x0 | x_t) / D `[B]` at one draw of (t, x_t) (§5.10).

    `t` `[B]` may be given (e.g. for a fixed-time check); otherwise t = T max(U, 1e-4).
    `spectrum(params, mean, var)` adds the spectral correction with psi of the x0 Gaussian summary.
    """
    x0 = x0.astype(jnp.float32)
    key_t, key_n = jax.random.split(key)
    if t is None:
        t = NUM_TIMESTEPS * jnp.maximum(
            jax.random.uniform(key_t, (x0.shape[0],), jnp.float32), LIKELIHOOD_T_EPS
        )
    x_t = flow.forward_diffusion(x0, jax.random.normal(key_n, x0.shape, jnp.float32), t)
    gm_u = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), denoiser(params, x_t, t, labels))
    gm_x0 = flow.u_to_x0(gm_u, x_t, t)
    logp = jnp.sum(gm_logprob(gm_x0, x0).reshape(x0.shape[0], -1), axis=-1)
    if spectrum is not None:
        m, v = gm_to_iso_gaussian(gm_x0)
        psi = spectrum(params, m, v).astype(jnp.float32)
        big_z = transport.hartley(transport.gm_samples_to_gaussian(gm_x0, x0))
        corr = -0.5 * big_z**2 * (jnp.exp(-psi) - 1.0) - 0.5 * psi
        logp = logp + jnp.sum(corr.reshape(x0.shape[0], -1), axis=-1)
    dims = math.prod(x0.shape[1:])
    return -logp / (dims * math.log(2.0))


def evaluate_nll(
    denoiser: Callable[..., Any],
    params: Any,
    key: Array,
    batches,
    spectrum: Callable[..., Array] | None = None,
) -> dict[str, float]:
    """Mean bits/dim and its standard error over an iterable of `(x0, labels)` batches (Table 3)."""
    values = []
    for i, (x0, labels) in enumerate(batches):
        values.append(
            nll_bits_per_dim(
                denoiser, params, jax.random.fold_in(key, i), x0, labels, spectrum=spectrum
            )
        )
    if not values:
        raise ValueError("evaluate_nll got no batches")
    allv = jnp.concatenate(values)
    return {
        "nll_bits_per_dim": float(jnp.mean(allv)),
        "stderr": float(jnp.std(allv) / math.sqrt(allv.size)),
        "num_samples": int(allv.size),
    }
