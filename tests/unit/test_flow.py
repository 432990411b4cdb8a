"""Tests of `gmflow_jax.flow` (`docs/math.md` §1, §3; oracles 1-7, 12, 13, 35) against independent oracles.

The oracles are numpy float64 formulas written from docs/math.md (Gaussian conditioning of the joint
(x_t', x_t) | x_0, the exact GM posterior of a GM prior, ...), Monte Carlo estimates with tolerances
from the standard error, and scipy KS tests. Property tests cover jit / vmap / grad, bf16 inputs,
float64 recomputation, finite-difference gradients at extreme values and trace-time shape errors.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.gm_inputs import gm_with_negligible_component, random_gm, uniform_gm
from helpers.numerics import (
    bcast,
    check_jit_vmap_grad_bf16_float64,
    fd_check,
    rbg_key,
    run32,
    run64,
)
from scipy import stats
from scipy.special import logsumexp

from gmflow_jax import flow as F
from gmflow_jax import gm as G
from gmflow_jax import losses as L

T = 1000.0
EPS = 1e-6  # the §3.1 / §3.3 / §3.4 floors


# ------------------------------------------------------------------------------------------------
# helpers and numpy float64 oracles
# ------------------------------------------------------------------------------------------------


def np_conditioning_coefs(sigma, sigma_to):
    """c1, c2, c3 by Gaussian conditioning of (x_t', x_t) | x_0 (oracle 6), sigma_to < sigma."""
    a, a_to = 1 - sigma, 1 - sigma_to
    # x_t = (a / a_to) x_t' + noise independent of x_t'  =>  Cov(x_t', x_t | x0) = (a / a_to) s'^2
    cov = a / a_to * sigma_to**2
    c1 = cov / sigma**2
    c2 = a_to - c1 * a
    c3 = sigma_to**2 - cov**2 / sigma**2
    return c1, c2, c3


def np_posterior(log_pi, m, v, x, sigma):
    """Exact p(x0 | x_t = x) for the GM prior {pi, m, v} (`docs/math.md` §9): means, log-weights, variance.

    log_pi [..., K, 1], m [..., K, C], v broadcastable to [..., 1, 1], x [..., C], sigma bcast.
    """
    a = 1 - sigma
    vp = 1.0 / (1.0 / v + a**2 / sigma**2)
    mp = vp * (m / v + a * x[..., None, :] / sigma**2)
    sq = np.sum((x[..., None, :] - a * m) ** 2, axis=-1, keepdims=True)
    logits = log_pi - sq / (2 * (a**2 * v + sigma**2))
    return mp, logits - logsumexp(logits, axis=-2, keepdims=True), vp


def np_mixture_mean(means, lw):
    return np.sum(np.exp(lw) * means, axis=-2)


# ------------------------------------------------------------------------------------------------
# §1: schedule, shift, samplers, grid (oracles 1-4)
# ------------------------------------------------------------------------------------------------


def test_flow_identities_recover_x0_and_noise():
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=(2, 4, 3, 3, 4))
    t = np.array([1.0, 250.0, 731.5, 1000.0])
    sigma = bcast(t / T, 4)
    alpha = 1 - sigma

    def fn(x0, eps, t):
        x_t = F.forward_diffusion(x0, eps, t)
        u = eps - x0
        return x_t, F.u_to_x0_tensor(u, x_t, t)

    for run, tol in ((run64, 1e-13), (run32, 2e-6)):
        x_t, x0_back = run(fn, x0, eps, t)
        np.testing.assert_allclose(x_t, alpha * x0 + sigma * eps, atol=tol)
        np.testing.assert_allclose(x0_back, x0, atol=tol)  # x_t - sigma u = x0
        np.testing.assert_allclose(x_t + alpha * (eps - x0), eps, atol=tol)  # x_t + alpha u = eps
    s, a = run64(F.sigma_alpha, t)
    # (under jit XLA may evaluate t / T as an fma with 1 / T: equal to ~1 ulp, not bitwise)
    np.testing.assert_allclose(s, t / T, rtol=1e-15)
    np.testing.assert_allclose(a, 1 - t / T, rtol=1e-15, atol=1e-16)


def test_shift_warp_is_identity_at_one_monotone_and_inverted_by_the_spec_formula():
    tau = np.linspace(0.0, 1.0, 1001)
    np.testing.assert_array_equal(run64(lambda x: F.shift_warp(x, 1.0), tau), tau)
    for a in (0.3, 3.0, 10.0):
        warped = run64(lambda x, a=a: F.shift_warp(x, a), tau)
        assert warped[0] == 0.0 and abs(warped[-1] - 1.0) < 1e-15
        assert np.all(np.diff(warped) > 0)
        np.testing.assert_allclose(warped / (a - (a - 1) * warped), tau, atol=1e-14)
        np.testing.assert_allclose(warped, a * tau / (1 + (a - 1) * tau), atol=1e-15)
    with pytest.raises(ValueError, match="shift must be > 0"):
        F.shift_warp(tau, 0.0)


def test_logit_normal_sampler_gives_normal_logits_and_median_500():
    n = 20_000
    t = np.asarray(jax.jit(lambda k: F.sample_t_logit_normal(k, (n,)))(rbg_key(0)), np.float64)
    assert t.dtype == np.float64 and np.all((t > 0) & (t < T))
    logit = np.log(t / (T - t))
    assert stats.kstest(logit, "norm").pvalue > 1e-3
    # median: SE = 1 / (2 f(500) sqrt(n)) with f the density of t at 500 (logit-normal: phi(0)/(T/4))
    se = 1.0 / (2 * (stats.norm.pdf(0) * 4 / T) * math.sqrt(n))
    assert abs(np.median(t) - 500.0) < 5 * se
    # location / scale parameters, and the shift applied after the sigmoid
    t2 = jax.jit(lambda k: F.sample_t_logit_normal(k, (n,), mean=0.5, std=0.8, shift=3.0))(
        rbg_key(1)
    )
    tau_w = np.asarray(t2, np.float64) / T
    tau = tau_w / (3.0 - 2.0 * tau_w)  # undo the warp (oracle 2)
    assert stats.kstest(np.log(tau / (1 - tau)), "norm", args=(0.5, 0.8)).pvalue > 1e-3
    assert stats.kstest(logit, "norm", args=(0.5, 1.0)).pvalue < 1e-6  # the test has power


def test_uniform_sampler_is_uniform_on_0_1000():
    n = 20_000
    t = np.asarray(jax.jit(lambda k: F.sample_t_uniform(k, (n,)))(rbg_key(2)), np.float64)
    assert np.all((t > 0) & (t <= T))
    assert stats.kstest(t, "uniform", args=(0.0, T)).pvalue > 1e-3
    t3 = np.asarray(jax.jit(lambda k: F.sample_t_uniform(k, (n,), shift=3.0))(rbg_key(3)))
    tau_w = t3.astype(np.float64) / T
    assert stats.kstest(tau_w / (3.0 - 2.0 * tau_w), "uniform").pvalue > 1e-3
    assert stats.kstest(tau_w, "uniform").pvalue < 1e-6


def test_inference_grid_with_four_steps():
    ts, sig = F.inference_grid(4)
    assert ts.dtype == jnp.float32 and sig.dtype == jnp.float32
    np.testing.assert_array_equal(ts, [1000.0, 750.0, 500.0, 250.0])
    np.testing.assert_array_equal(sig, [1.0, 0.75, 0.5, 0.25, 0.0])
    ts, sig = jax.jit(F.inference_grid, static_argnums=(0, 1))(5, 3.0)
    tau = 1 - np.arange(5) / 5
    expected = 3 * tau / (1 + 2 * tau)
    np.testing.assert_allclose(sig, np.append(expected, 0.0), rtol=1e-6)
    np.testing.assert_allclose(ts, T * expected, rtol=1e-6)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
            F.inference_grid(bad)


# ------------------------------------------------------------------------------------------------
# §3.2 / §3.3 transitions (oracles 5-7)
# ------------------------------------------------------------------------------------------------


def test_forward_transition_moments_by_monte_carlo():
    pairs = np.array([[0.0, 300.0], [200.0, 700.0], [900.0, 1000.0], [499.0, 500.0]])
    t_l, t_h = pairs[:, 0], pairs[:, 1]
    n = 1_000_000
    rng = np.random.default_rng(1)
    x0 = np.full((4, n, 1), 0.7)
    n0, n1 = rng.standard_normal((2, 4, n, 1), dtype=np.float32)

    def fn(x0, n0, n1, t_l, t_h):
        x_l = F.forward_diffusion(x0, n0, t_l)
        return x_l, F.forward_transition(x_l, t_l, t_h, n1)

    x_l, x_h = (a[..., 0].astype(np.float64) for a in run32(fn, x0, n0, n1, t_l, t_h))
    s_l, s_h = t_l / T, t_h / T
    a_l, a_h = 1 - s_l, 1 - s_h
    mean_h, var_h = x_h.mean(1), x_h.var(1)
    cov = np.mean((x_h - mean_h[:, None]) * (x_l - x_l.mean(1)[:, None]), axis=1)
    # standard errors of mean / variance / covariance estimates (Gaussian formulas)
    assert np.all(np.abs(mean_h - a_h * 0.7) < 5 * s_h / math.sqrt(n))
    assert np.all(np.abs(var_h - s_h**2) < 5 * s_h**2 * math.sqrt(2.0 / n))
    cov_true = a_h / a_l * s_l**2
    se_cov = np.sqrt((s_l**2 * s_h**2 + cov_true**2) / n)
    assert np.all(np.abs(cov - cov_true) < 5 * se_cov + 1e-9)
    beta = run64(F.transition_variance, t_l, t_h)
    np.testing.assert_allclose(beta, s_h**2 - (a_h * s_l / a_l) ** 2, rtol=1e-13)


SIGMA_PAIRS = [(0.6, 0.3), (0.9, 0.05), (1.0, 0.5), (0.3, 0.299), (0.01, 0.002), (0.999, 0.998)]


def test_reverse_coefficients_equal_gaussian_conditioning_of_the_joint():
    s, s_to = np.array(SIGMA_PAIRS).T
    c1, c2, c3, b = run64(F.reverse_transition_coefs, s, s_to)
    e1, e2, e3 = np_conditioning_coefs(s, s_to)
    np.testing.assert_allclose(c1, e1, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(c2, e2, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(c3, e3, rtol=1e-10, atol=1e-15)
    a, a_to = 1 - s, 1 - s_to
    np.testing.assert_allclose(c1 * a + c2, a_to, rtol=1e-13)  # identities of oracle 6
    np.testing.assert_allclose(c1**2 * s**2 + c3, s_to**2, rtol=1e-13)
    np.testing.assert_allclose(b * s**2, s**2 - (a * s_to / a_to) ** 2, rtol=1e-10, atol=1e-16)


def test_reverse_coefficients_limits():
    s = np.array([0.2, 0.7, 0.999])
    c1, c2, c3, b = run64(F.reverse_transition_coefs, s, np.zeros(3))
    np.testing.assert_array_equal(c1, 0.0)
    np.testing.assert_array_equal(c2, 1.0)
    np.testing.assert_array_equal(c3, 0.0)
    c1, c2, c3, _ = run64(F.reverse_transition_coefs, s, s - 1e-12)
    np.testing.assert_allclose(c1, 1.0, atol=1e-7)
    np.testing.assert_allclose(c2, 0.0, atol=1e-7)
    np.testing.assert_allclose(c3, 0.0, atol=1e-7)


def np_reverse_gm(means, lw, ls, x_t, t, t_to, prediction):
    """Reverse-transition GM from the `docs/math.md` §3.3 formulas with both floors (numpy float64)."""
    nd = means.ndim
    s, s_to = bcast(t, nd) / T, bcast(t_to, nd) / T
    a, a_to = 1 - s, 1 - s_to
    r_s, r_a = s_to / np.maximum(s, EPS), a / np.maximum(a_to, EPS)
    b = 1 - (r_s * r_a) ** 2
    c1, c2, c3 = r_s**2 * r_a, b * a_to, b * s_to**2
    x = x_t[..., None, :]
    if prediction == "u":
        mu_x0, factor = x - s * means, s * c2
    else:
        mu_x0, factor = means, c2
    out_ls = 0.5 * np.logaddexp(
        2 * (ls + np.log(np.maximum(factor, EPS))), np.log(np.maximum(c3, EPS))
    )
    return c1 * x + c2 * mu_x0, np.broadcast_to(lw, mu_x0.shape[:-1] + (1,)), out_ls


@pytest.mark.parametrize("prediction", ["u", "x0"])
def test_reverse_transition_gm_equals_spec_formulas_including_floors(prediction):
    rng = np.random.default_rng(2)
    means, lw, ls = random_gm(rng, batch=(6, 2, 2), k=3, c=2)
    x_t = rng.normal(size=(6, 2, 2, 2))
    # interior, sigma' = 0 (c3 floor), sigma' -> sigma (factor and c3 floors), t = T (alpha = 0)
    t = np.array([600.0, 600.0, 500.0, 1000.0, 1e-3, 999.9])
    t_to = np.array([300.0, 0.0, 500.0 * (1 - 1e-9), 400.0, 0.0, 999.8])
    out = run64(
        lambda a, b, c, x, t, tt: F.reverse_transition_gm(G.GM(a, b, c), x, t, tt, prediction),
        means,
        lw,
        ls,
        x_t,
        t,
        t_to,
    )
    exp = np_reverse_gm(means, lw, ls, x_t, t, t_to, prediction)
    for got, want in zip(jax.tree.leaves(out), exp, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # sigma' = 0: the x0-GM with its variance increased by exactly 1e-6
    s2_x0 = np.exp(2 * ls[1]) * (0.6**2 if prediction == "u" else 1.0)
    np.testing.assert_allclose(np.exp(2 * out.logstds[1]), s2_x0 + 1e-6, rtol=1e-12)
    x0_means = x_t[1][..., None, :] - 0.6 * means[1] if prediction == "u" else means[1]
    np.testing.assert_allclose(out.means[1], x0_means, atol=1e-13)
    # sigma' -> sigma: both floors active, variance s^2 1e-12 + 1e-6 (a sum, not a max)
    np.testing.assert_allclose(
        np.exp(2 * out.logstds[2]), np.exp(2 * ls[2]) * 1e-12 + 1e-6, rtol=1e-9
    )


def test_k1_reverse_transition_is_the_ddpm_posterior_and_matches_sample_mode_by_monte_carlo():
    # K = 1 u-GM: the law of x' = c1 x + c2 x0_hat + sqrt(b) s' n with x0_hat ~ x0-GM is
    # N(c1 x + c2 mu_x0, c2^2 sigma^2 s_u^2 + c3) (oracles 7 and 35)
    rng = np.random.default_rng(3)
    t, t_to = 600.0, 250.0
    s, s_to = t / T, t_to / T
    mu_u = rng.normal(size=(1, 1, 1, 1, 2))
    ls_u = np.full((1, 1, 1, 1, 1), -0.4)
    x_t = rng.normal(size=(1, 1, 1, 2))
    c1, c2, c3 = np_conditioning_coefs(s, s_to)
    mu_x0 = x_t - s * mu_u[..., 0, :]
    mean_exp = c1 * x_t + c2 * mu_x0
    var_exp = c2**2 * s**2 * np.exp(2 * ls_u[..., 0, :]) + c3
    out = run64(
        lambda a, b, c, x: F.reverse_transition_gm(G.GM(a, b, c), x, t, t_to),
        mu_u,
        np.zeros((1, 1, 1, 1, 1)),
        ls_u,
        x_t,
    )
    np.testing.assert_allclose(out.means[..., 0, :], mean_exp, rtol=1e-13)
    np.testing.assert_allclose(np.exp(2 * out.logstds[..., 0, :]), var_exp, rtol=1e-13)
    # sample mode, MC over x0_hat and n
    n = 200_000
    x0_hat = mu_x0 + s * np.exp(ls_u[..., 0, :]) * rng.normal(size=(n, 1, 1, 2))
    noise = rng.normal(size=(n, 1, 1, 2))
    xs = run64(
        lambda x, x0, nz: F.reverse_transition_sample(x, x0, t, t_to, nz),
        np.broadcast_to(x_t, (n, 1, 1, 2)),
        x0_hat,
        noise,
    )
    np.testing.assert_allclose(
        xs, c1 * x_t + c2 * x0_hat + math.sqrt(c3) * noise, rtol=1e-12, atol=1e-12
    )
    assert np.all(np.abs(xs.mean(0) - mean_exp[0]) < 5 * np.sqrt(var_exp / n))
    assert np.all(np.abs(xs.var(0) - var_exp) < 5 * var_exp * math.sqrt(2.0 / n))
    # sigma' = 0: sample mode returns x0_hat exactly
    x_last = run64(
        lambda x, x0, nz: F.reverse_transition_sample(x, x0, t, 0.0, nz), x_t, mu_x0, x_t
    )
    np.testing.assert_array_equal(x_last, mu_x0)


def test_reverse_transition_gm_of_a_mixture_is_the_mixture_of_transitions():
    # brute force: the density of x' = c1 x + c2 x0 + sqrt(c3) n, x0 ~ x0-GM, on a 1-D grid
    rng = np.random.default_rng(4)
    means = rng.normal(size=(1, 3, 1))
    lw = np.log(np.array([0.2, 0.5, 0.3]))[None, :, None]
    ls = np.full((1, 1, 1), -0.7)
    x_t = np.array([[0.4]])
    t, t_to = 700.0, 300.0
    c1, c2, c3 = np_conditioning_coefs(t / T, t_to / T)
    out = run64(
        lambda a, b, c, x: F.reverse_transition_gm(G.GM(a, b, c), x, t, t_to), means, lw, ls, x_t
    )
    grid = np.linspace(-6, 6, 2001)
    x0_means = x_t[0, 0] - t / T * means[0, :, 0]
    var = c2**2 * (t / T) ** 2 * np.exp(2 * ls[0, 0, 0]) + c3
    dens = np.exp(lw[0, :, 0]) @ stats.norm.pdf(
        grid[None], (c1 * x_t[0, 0] + c2 * x0_means)[:, None], math.sqrt(var)
    )
    got = np.exp(out.logweights[0, :, 0]) @ stats.norm.pdf(
        grid[None], out.means[0, :, 0][:, None], np.exp(out.logstds[0, 0, 0])
    )
    np.testing.assert_allclose(got, dens, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# §3.1 u -> x0 (oracle 12)
# ------------------------------------------------------------------------------------------------


def test_u_to_x0_gm_gaussian_and_tensor_equal_spec_formulas():
    rng = np.random.default_rng(5)
    means, lw, ls = random_gm(rng, batch=(3, 2, 2), k=4, c=3)
    x_t = rng.normal(size=(3, 2, 2, 3))
    t = np.array([0.0, 1e-3, 640.0])  # t = 0 and 1e-3 (sigma = 1e-6) hit the log floor
    out = run64(lambda a, b, c, x, t: F.u_to_x0(G.GM(a, b, c), x, t), means, lw, ls, x_t, t)
    s = bcast(t / T, 5)
    np.testing.assert_allclose(out.means, x_t[..., None, :] - s * means, atol=1e-14)
    np.testing.assert_array_equal(out.logweights, lw)
    np.testing.assert_allclose(out.logstds, ls + np.log(np.maximum(s, 1e-6)), rtol=1e-14)
    m_u, v_u = rng.normal(size=(3, 2, 2, 3)), rng.uniform(0.5, 2, size=(3, 2, 2, 1))
    m, v = run64(F.u_to_x0_gaussian, m_u, v_u, x_t, t)
    np.testing.assert_allclose(m, x_t - bcast(t / T, 4) * m_u, atol=1e-14)
    np.testing.assert_allclose(v, bcast(t / T, 4) ** 2 * v_u, rtol=1e-14)


def test_u_to_x0_nll_identity():
    # NLL_x0(x_t - sigma u) = NLL_u(u) + C log sigma (no floor active); same for the log-density
    rng = np.random.default_rng(6)
    means, lw, ls = random_gm(rng, batch=(3, 2, 2), k=4, c=3)
    x_t = rng.normal(size=(3, 2, 2, 3))
    u = rng.normal(size=(3, 2, 2, 3))
    t = np.array([100.0, 500.0, 900.0])
    s = bcast(t / T, 4)

    def fn(a, b, c, x, u, t):
        gm_u = G.GM(a, b, c)
        gm_x0 = F.u_to_x0(gm_u, x, t)
        x0 = F.u_to_x0_tensor(u, x, t)
        return (
            L.gm_nll(gm_x0, x0) - L.gm_nll(gm_u, u),
            G.gm_logprob(gm_x0, x0) - G.gm_logprob(gm_u, u),
        )

    d_nll, d_lp = run64(fn, means, lw, ls, x_t, u, t)
    np.testing.assert_allclose(
        d_nll, np.broadcast_to(3 * np.log(s[..., 0]), d_nll.shape), atol=1e-12
    )
    np.testing.assert_allclose(
        d_lp, np.broadcast_to(-3 * np.log(s[..., 0]), d_lp.shape), atol=1e-12
    )


# ------------------------------------------------------------------------------------------------
# §3.4 re-targeting with the perfect denoiser (oracle 13)
# ------------------------------------------------------------------------------------------------


def _prior(rng, batch=(2, 3, 2), k=4, c=3):
    m = 1.5 * rng.normal(size=batch + (k, c))
    logits = rng.normal(size=batch + (k, 1))
    log_pi = logits - logsumexp(logits, axis=-2, keepdims=True)
    v = rng.uniform(0.05, 0.3, size=(batch[0],) + (1,) * (len(batch) + 1))
    return log_pi, m, v


def _exact_u_gm(log_pi, m, v, x, t):
    """The perfect denoiser: the exact posterior at (x, t) as a u-GM (`docs/math.md` §9)."""
    s = bcast(np.asarray(t) / T, m.ndim)
    mp, lwp, vp = np_posterior(log_pi, m, v, x, s)
    return (x[..., None, :] - mp) / s, lwp, 0.5 * np.log(vp) - np.log(s)


@pytest.mark.parametrize(
    "t_src,t_tgt",
    [(np.array([800.0, 500.0]), np.array([300.0, 100.0])), (900.0, 600.0), (700.0, 1.0)],
)
def test_retarget_with_the_exact_posterior_reproduces_the_exact_posterior(t_src, t_tgt):
    rng = np.random.default_rng(7)
    log_pi, m, v = _prior(rng)
    x_src = rng.normal(size=(2, 3, 2, 3))
    x_tgt = rng.normal(size=(2, 3, 2, 3))  # any point: both sides are exact posteriors
    gm_u = _exact_u_gm(log_pi, m, v, x_src, t_src)

    def fn(a, b, c, xs, ts, xt, tt):
        gm_x0 = F.u_to_x0(G.GM(a, b, c), xs, ts)
        return gm_x0, F.retarget_mean(gm_x0, xs, ts, xt, tt), F.retarget_gm(gm_x0, xs, ts, xt, tt)

    args = (*gm_u, x_src, t_src, x_tgt, t_tgt)
    gm_x0, mean, gm_t = run64(fn, *args)
    # u_to_x0 of the exact u-GM is the exact x0 posterior at the source
    mp_s, lw_s, vp_s = np_posterior(log_pi, m, v, x_src, bcast(np.asarray(t_src) / T, 5))
    np.testing.assert_allclose(gm_x0.means, mp_s, atol=1e-12)
    np.testing.assert_allclose(gm_x0.logstds, np.broadcast_to(0.5 * np.log(vp_s), (2, 1, 1, 1, 1)))
    # re-targeted mean and GM equal the exact posterior at the target
    mp, lwp, vp = np_posterior(log_pi, m, v, x_tgt, bcast(np.asarray(t_tgt) / T, 5))
    np.testing.assert_allclose(mean, np_mixture_mean(mp, lwp), atol=1e-10)
    np.testing.assert_allclose(gm_t.means, mp, atol=1e-10)
    np.testing.assert_allclose(gm_t.logweights, lwp, atol=1e-10)
    np.testing.assert_allclose(np.exp(2 * gm_t.logstds), np.broadcast_to(vp, gm_t.logstds.shape))
    # float32: the same to float32 accuracy (observed <= 7e-7 for O(1) values)
    gm_x0_32, mean32, gm_t32 = run32(fn, *args)
    np.testing.assert_allclose(mean32, np_mixture_mean(mp, lwp), atol=2e-6)
    np.testing.assert_allclose(gm_t32.means, mp, atol=2e-6)


def np_retarget(means, lw, ls, x_src, t_src, x_tgt, t_tgt):
    """§3.4 from the docs/math.md formulas with both floors (numpy float64): (mean, GM)."""
    s_s, s_t = bcast(t_src, 5) / T, bcast(t_tgt, 5) / T
    a_s, a_t = 1 - s_s, 1 - s_t
    d = np.maximum((a_t * s_s) ** 2 - (a_s * s_t) ** 2, EPS)
    g_m = (a_t * s_s**2 * x_tgt[..., None, :] - a_s * s_t**2 * x_src[..., None, :]) / d
    g_v = (s_t * s_s) ** 2 / d
    s2 = np.exp(2 * ls)
    n = np.maximum(g_v + s2, EPS)
    mu = (g_v * means + s2 * g_m) / n
    logits = lw - np.sum((means - g_m) ** 2, -1, keepdims=True) / (2 * n)
    lwp = logits - logsumexp(logits, axis=-2, keepdims=True)
    return np_mixture_mean(mu, lwp), (mu, lwp, ls + 0.5 * np.log(g_v) - 0.5 * np.log(n))


def test_retarget_floors_equal_spec_formulas():
    # D floored (t_tgt = t_src), product normalizer floored (tiny std, t_tgt -> 0), interior
    rng = np.random.default_rng(8)
    means, lw, _ = random_gm(rng, batch=(3, 2, 2), k=3, c=2)
    ls = np.array([0.0, -12.0, -0.5]).reshape(3, 1, 1, 1, 1)
    x_src, x_tgt = rng.normal(size=(2, 3, 2, 2, 2))
    t_src = np.array([500.0, 999.9, 700.0])
    t_tgt = np.array([500.0, 1e-3, 200.0])
    mean, gm = run64(
        lambda a, b, c, xs, ts, xt, tt: (
            F.retarget_mean(G.GM(a, b, c), xs, ts, xt, tt),
            F.retarget_gm(G.GM(a, b, c), xs, ts, xt, tt),
        ),
        means,
        lw,
        ls,
        x_src,
        t_src,
        x_tgt,
        t_tgt,
    )
    exp_mean, exp_gm = np_retarget(means, lw, ls, x_src, t_src, x_tgt, t_tgt)
    np.testing.assert_allclose(mean, exp_mean, rtol=1e-9, atol=1e-11)
    for got, want in zip(jax.tree.leaves(gm), exp_gm, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# properties: jit / vmap / grad, dtypes, float64 recomputation, FD gradients, shape errors
# ------------------------------------------------------------------------------------------------


def f_fwd(x0, noise, t):
    return F.forward_diffusion(x0, noise, t)


def f_fwd_trans(x, t_l, t_h, noise):
    return F.forward_transition(x, t_l, t_h, noise)


def f_coefs(s, s_to):
    return F.reverse_transition_coefs(s, s_to)


def f_u2x0(a, b, c, x, t):
    return F.u_to_x0(G.GM(a, b, c), x, t)


def f_u2x0_gauss(m, v, x, t):
    return F.u_to_x0_gaussian(m, v, x, t)


def f_u2x0_tensor(u, x, t):
    return F.u_to_x0_tensor(u, x, t)


def f_rev_u(a, b, c, x, t, t_to):
    return F.reverse_transition_gm(G.GM(a, b, c), x, t, t_to, "u")


def f_rev_x0(a, b, c, x, t, t_to):
    return F.reverse_transition_gm(G.GM(a, b, c), x, t, t_to, "x0")


def f_rev_sample(x, x0, t, t_to, noise):
    return F.reverse_transition_sample(x, x0, t, t_to, noise)


def f_ret_mean(a, b, c, xs, ts, xt, tt):
    return F.retarget_mean(G.GM(a, b, c), xs, ts, xt, tt)


def f_ret_gm(a, b, c, xs, ts, xt, tt):
    return F.retarget_gm(G.GM(a, b, c), xs, ts, xt, tt)


def f_warp(tau):
    return F.shift_warp(tau, 3.0)


def _case_args(name, rng, gm=None, t_hi=None, t_lo=None):
    """(fn, args) for `name`; `gm` / times override the defaults (used at extreme values)."""
    means, lw, ls = gm if gm is not None else random_gm(rng, batch=(2, 2, 3), k=3, c=4)
    x, y, z = rng.normal(size=(3, 2, 2, 3, 4))
    v = rng.uniform(0.5, 1.5, size=(2, 2, 3, 1))
    t_hi = np.array([700.0, 420.0]) if t_hi is None else t_hi
    t_lo = np.array([300.0, 0.0]) if t_lo is None else t_lo
    return {
        "forward_diffusion": (f_fwd, (x, y, t_hi)),
        "forward_transition": (f_fwd_trans, (x, t_lo, t_hi, y)),
        "reverse_transition_coefs": (f_coefs, (t_hi / T, t_lo / T)),
        "u_to_x0": (f_u2x0, (means, lw, ls, x, t_hi)),
        "u_to_x0_gaussian": (f_u2x0_gauss, (x, v, y, t_hi)),
        "u_to_x0_tensor": (f_u2x0_tensor, (x, y, t_hi)),
        "reverse_transition_gm_u": (f_rev_u, (means, lw, ls, x, t_hi, t_lo)),
        "reverse_transition_gm_x0": (f_rev_x0, (means, lw, ls, x, t_hi, t_lo)),
        "reverse_transition_sample": (f_rev_sample, (x, y, t_hi, t_lo, z)),
        # re-targeting to t = 0 is a point mass (log-std -inf): use t_tgt > 0
        "retarget_mean": (f_ret_mean, (means, lw, ls, x, t_hi, y, np.maximum(t_lo, 50.0))),
        "retarget_gm": (f_ret_gm, (means, lw, ls, x, t_hi, y, np.maximum(t_lo, 50.0))),
        "shift_warp": (f_warp, (np.linspace(0.01, 0.99, 7),)),
    }[name]


CASE_NAMES = [
    "forward_diffusion",
    "forward_transition",
    "reverse_transition_coefs",
    "u_to_x0",
    "u_to_x0_gaussian",
    "u_to_x0_tensor",
    "reverse_transition_gm_u",
    "reverse_transition_gm_x0",
    "reverse_transition_sample",
    "retarget_mean",
    "retarget_gm",
    "shift_warp",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_jit_vmap_grad_bf16_and_float64_recomputation(name):
    rng = np.random.default_rng(0)
    fn, args = _case_args(name, rng)
    check_jit_vmap_grad_bf16_float64(fn, args, rng, vmap_scale=0.9)


def test_gradients_match_finite_differences_at_extreme_values():
    # sigma near 0 (t = 1e-3) and near 1 (t = 999.9), log-stds -12 and 4, a weight of 1e-30;
    # times are frozen (scale 0) where they sit on a floor's kink (sigma = 1e-6 exactly at t=1e-3)
    rng = np.random.default_rng(9)
    t_hi = np.array([1e-3, 999.9])
    t_lo = np.array([0.0, 500.0])
    for logstd in (-12.0, 4.0):
        gm = gm_with_negligible_component(rng, logstd)
        for name in ("u_to_x0", "reverse_transition_gm_u", "reverse_transition_gm_x0"):
            fn, args = _case_args(name, rng, gm, t_hi, t_lo)
            fd_check(fn, args, rng, [1.0] * 4 + [0.0] * (len(args) - 4))
        # re-target from near sigma = 1 to near sigma = 0, and an interior pair
        for ts, tt in ((np.array([999.9, 999.9]), np.array([1e-3, 0.5])), (t_hi * 0 + 800, t_lo)):
            fn, args = _case_args("retarget_mean", rng, gm, ts, tt)
            fd_check(fn, args, rng, [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
            fn, args = _case_args("retarget_gm", rng, gm, ts, tt)
            fd_check(fn, args, rng, [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    # times themselves, away from kinks; a time moves on the scale of its distance to 0 or T
    t_hi, t_lo = np.array([999.9, 2e-3]), np.array([999.8, 1e-3])

    def t_scale(t):
        return 0.1 * np.minimum(t, T - t)

    fn, args = _case_args("forward_transition", rng, None, t_hi, t_lo)
    fd_check(fn, args, rng, [1.0, t_scale(t_lo), t_scale(t_hi), 1.0])
    fn, args = _case_args("reverse_transition_sample", rng, None, t_hi, t_lo)
    fd_check(fn, args, rng, [1.0, 1.0, t_scale(t_hi), t_scale(t_lo), 1.0])
    fn, args = _case_args("reverse_transition_coefs", rng, None, t_hi, t_lo)
    fd_check(fn, args, rng, [t_scale(t_hi) / T, t_scale(t_lo) / T])


def test_shape_mistakes_raise_value_errors_naming_the_argument():
    gm, x = uniform_gm(k=3, c=4)
    bad_gm = G.GM(gm.means, gm.logweights[..., :2, :], gm.logstds)
    jit = jax.jit
    with pytest.raises(ValueError, match=r"t must be a scalar or a per-sample \[B\] array"):
        jit(F.forward_diffusion)(x, x, jnp.ones((2, 1)))
    with pytest.raises(ValueError, match=r"t must be a scalar or a per-sample \[B\] array"):
        jit(F.u_to_x0)(gm, x, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="gm_u.logweights must have shape"):
        jit(F.u_to_x0)(bad_gm, x, 500.0)
    with pytest.raises(ValueError, match=r"x_t must have shape \[..., C\] = \[..., 4\]"):
        jit(F.u_to_x0)(gm, x[..., :1], 500.0)  # would silently broadcast over channels
    with pytest.raises(ValueError, match=r"x_t must have shape \[..., C\] = \[..., 4\]"):
        jit(F.reverse_transition_gm)(gm, x[..., :1], 500.0, 100.0)
    with pytest.raises(ValueError, match="gm.logweights must have shape"):
        jit(F.reverse_transition_gm)(bad_gm, x, 500.0, 100.0)
    with pytest.raises(ValueError, match="prediction must be 'u' or 'x0'"):
        F.reverse_transition_gm(gm, x, 500.0, 100.0, prediction="eps")
    with pytest.raises(ValueError, match="x_src .* and x_tgt .* must have the same shape"):
        jit(F.retarget_mean)(gm, x, 500.0, x[:1], 100.0)
    with pytest.raises(ValueError, match=r"x_src must have shape \[..., C\]"):
        jit(F.retarget_gm)(gm, x[..., :1], 500.0, x[..., :1], 100.0)
    with pytest.raises(ValueError, match="gm_x0.logstds must have 5 dims"):
        jit(F.retarget_mean)(G.GM(gm.means, gm.logweights, jnp.zeros((2, 1))), x, 500.0, x, 100.0)
