"""NLL evaluation (`docs/math.md` §5.10, paper Eq. 19/21) against closed-form entropies."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from helpers.oracles import gm_prior_denoiser

from gmflow_jax.eval.nll import evaluate_nll, nll_bits_per_dim

M, V = np.array([[0.3, -0.5]]), 0.2  # a single Gaussian N(m, v I) per pixel, C = 2


def _data(key, b=4000, h=2, w=2):
    return jnp.asarray(M[0]) + math.sqrt(V) * jax.random.normal(key, (b, h, w, 2))


def test_nll_at_t_max_is_the_data_entropy_in_bits_per_dim():
    # At sigma = 1, x_t carries no information: q(x0 | x_t) is the prior, whose entropy is closed form.
    den = gm_prior_denoiser(M, np.zeros(1), V)
    x0 = _data(jax.random.PRNGKey(0))
    nll = np.asarray(
        nll_bits_per_dim(den, None, jax.random.PRNGKey(1), x0, None, t=jnp.full((4000,), 1000.0))
    )
    expected = 0.5 * math.log(2 * math.pi * math.e * V) / math.log(2.0)
    assert abs(nll.mean() - expected) < 5 * nll.std() / math.sqrt(nll.size), (nll.mean(), expected)


def test_nll_over_uniform_t_matches_the_conditional_entropy():
    # For Gaussian data, H(x0 | x_t) per dim = 0.5 log(2 pi e v') with v' = (1/v + a^2/s^2)^-1.
    den = gm_prior_denoiser(M, np.zeros(1), V)
    x0 = _data(jax.random.PRNGKey(2), b=20000, h=1, w=1)
    key = jax.random.PRNGKey(3)
    out = evaluate_nll(den, None, key, [(x0[:10000], None), (x0[10000:], None)])
    u = np.concatenate(
        [
            np.asarray(
                jax.random.uniform(jax.random.split(jax.random.fold_in(key, i))[0], (10000,))
            )
            for i in range(2)
        ]
    )
    s = np.maximum(u, 1e-4)
    v_post = 1.0 / (1.0 / V + (1 - s) ** 2 / s**2)
    expected = np.mean(0.5 * np.log(2 * np.pi * np.e * v_post)) / np.log(2.0)
    assert abs(out["nll_bits_per_dim"] - expected) < 5 * out["stderr"] + 1e-3, (out, expected)


def test_flat_spectrum_adds_nothing_and_a_wrong_spectrum_costs_its_kl():
    den = gm_prior_denoiser(M, np.zeros(1), V)
    b, h, w = 3000, 4, 4
    x0 = _data(jax.random.PRNGKey(4), b=b, h=h, w=w)
    t = jnp.full((b,), 400.0)
    key = jax.random.PRNGKey(5)
    base = nll_bits_per_dim(den, None, key, x0, None, t=t)
    flat = nll_bits_per_dim(
        den, None, key, x0, None, t=t, spectrum=lambda p, m, v: jnp.zeros_like(m)
    )
    np.testing.assert_allclose(flat, base, atol=1e-6)
    logits = jax.random.normal(jax.random.PRNGKey(6), (h, w, 2))
    psi = jax.nn.log_softmax(logits.reshape(-1, 2), axis=0).reshape(h, w, 2) + math.log(h * w)
    spec = nll_bits_per_dim(
        den, None, key, x0, None, t=t, spectrum=lambda p, m, v: jnp.broadcast_to(psi, m.shape)
    )
    # Under the exact posterior, Z ~ iid N(0, 1): E[-log N(Z; 0, e^psi) + log N(Z; 0, 1)] is a KL.
    kl = np.sum(0.5 * (np.exp(-np.asarray(psi)) - 1.0) + 0.5 * np.asarray(psi)) / (
        h * w * 2 * math.log(2)
    )
    diff = np.asarray(spec - base)
    assert abs(diff.mean() - kl) < 5 * diff.std() / math.sqrt(b), (diff.mean(), kl)
