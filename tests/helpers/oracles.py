"""Independent oracles shared by the tests: the exact GM posterior of a GM prior (`docs/math.md` §9)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gmflow_jax.gm import GM


def exact_posterior_u_gm(x_t, t, prior_means, prior_logweights, prior_var) -> GM:
    """The exact u-space posterior GM p(u | x_t) for data ~ sum_k pi_k N(m_k, v I) (`docs/math.md` §9).

    x_t `[B, H, W, C]`, t `[B]` in [0, 1000]; prior means `[K, C]`, log-weights `[K]`, scalar var.
    Posterior over x0: v' = (1/v + a^2/s^2)^-1, m'_k = v'(m_k/v + a x_t/s^2), log-weights
    log pi_k - ||x_t - a m_k||^2 / (2 (a^2 v + s^2)); u-GM: mu_k = (x_t - m'_k)/s, s_u = sqrt(v')/s.
    """
    dtype = x_t.dtype
    sigma = (t / 1000.0).astype(dtype).reshape(-1, 1, 1, 1, 1)
    alpha = 1.0 - sigma
    m = jnp.asarray(prior_means, dtype)
    lw = jnp.asarray(prior_logweights, dtype)
    x = x_t[..., None, :]
    v_post = 1.0 / (1.0 / prior_var + alpha**2 / sigma**2)
    m_post = v_post * (m / prior_var + alpha * x / sigma**2)
    sq = jnp.sum((x - alpha * m) ** 2, axis=-1, keepdims=True)
    logits = lw[:, None] - sq / (2.0 * (alpha**2 * prior_var + sigma**2))
    logweights = jax.nn.log_softmax(logits, axis=-2)
    means_u = (x - m_post) / sigma
    logstds = 0.5 * jnp.log(v_post) - jnp.log(sigma)
    return GM(means_u, logweights, logstds)


def gm_prior_denoiser(prior_means, prior_logweights, prior_var):
    """A perfect denoiser `(params, x_t, t, labels) -> u-GM` for the given GM prior."""

    def denoiser(params, x_t, t, labels):
        del params, labels
        return exact_posterior_u_gm(x_t, t, prior_means, prior_logweights, prior_var)

    return denoiser


def sample_gm_prior(rng: np.random.Generator, n, prior_means, prior_weights, prior_var):
    """Exact numpy samples `[n, C]` of the GM prior."""
    k = rng.choice(len(prior_weights), size=n, p=prior_weights)
    return prior_means[k] + np.sqrt(prior_var) * rng.standard_normal((n, prior_means.shape[1]))
