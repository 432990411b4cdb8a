"""Spectral loss (`docs/math.md` §4.3): stop-gradient targets, closed-form value and minimizer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from helpers.oracles import exact_posterior_u_gm

from gmflow_jax import flow, losses

MEANS, LOGW, VAR = np.array([[-1.0, 0.5], [1.0, -0.3], [0.2, 1.2]]), np.log([0.3, 0.3, 0.4]), 0.1


def _setup(b=512, h=4, w=4, t=500.0):
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    comp = jax.random.categorical(k1, jnp.asarray(LOGW), shape=(b, h, w))
    x0 = jnp.asarray(MEANS)[comp] + math.sqrt(VAR) * jax.random.normal(k2, (b, h, w, 2))
    tt = jnp.full((b,), t)
    x_t = flow.forward_diffusion(x0, jax.random.normal(k3, x0.shape), tt)
    return x0, x_t, tt, exact_posterior_u_gm(x_t, tt, MEANS, LOGW, VAR)


def test_spectral_targets_are_white_under_the_exact_posterior():
    x0, x_t, t, gm_u = _setup()
    m, v, big_z = losses.spectral_targets(gm_u, x0, x_t, t)
    z = np.asarray(big_z)
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1.0) < 5 * math.sqrt(2.0 / n)
    # The summary is the x0-space moment match: mean x_t - sigma m_u, variance sigma^2 v_u.
    assert m.shape == x0.shape and v.shape == x0.shape[:-1] + (1,)
    assert bool(jnp.all(v > 0))


def test_spectral_loss_value_and_zero_at_flat_spectrum():
    big_z = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 2)) * 1.3
    psi = 0.3 * jax.random.normal(jax.random.PRNGKey(2), (3, 4, 4, 2))
    zz, pp = np.asarray(big_z, np.float64), np.asarray(psi, np.float64)
    expected = 0.5 * 2 * 0.7 * np.mean(zz**2 * (np.exp(-pp) - 1) + pp)
    np.testing.assert_allclose(losses.spectral_loss(big_z, psi, 0.7), expected, rtol=1e-5)
    assert float(losses.spectral_loss(big_z, jnp.zeros_like(psi))) == 0.0


def test_spectral_loss_is_minimized_at_the_log_power_and_only_trains_psi():
    scale = jnp.linspace(0.5, 2.0, 16).reshape(1, 4, 4, 1)
    big_z = jax.random.normal(jax.random.PRNGKey(3), (4000, 4, 4, 1)) * scale
    psi_opt = jnp.log(jnp.mean(big_z**2, axis=0, keepdims=True))
    grad = jax.grad(lambda p: losses.spectral_loss(big_z, jnp.broadcast_to(p, big_z.shape)))(
        psi_opt
    )
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)
    assert (
        float(
            jnp.max(
                jnp.abs(
                    jax.grad(lambda z: losses.spectral_loss(z, jnp.full(big_z.shape, 0.1)))(big_z)
                )
            )
        )
        == 0.0
    )
    x0, x_t, t, gm_u = _setup(b=8)
    g = jax.grad(
        lambda means: jnp.sum(losses.spectral_targets(gm_u.replace(means=means), x0, x_t, t)[2])
    )(gm_u.means)
    assert float(jnp.max(jnp.abs(g))) == 0.0
