"""Tests of `gmflow_jax.losses` (`docs/math.md` §4.1-4.2; oracles 17, 27, 28) against independent oracles.

Oracles: the docs/math.md t_low rule and NLL formula written in numpy, Monte Carlo moments of the training
pair, and 1-D quadrature of the expected transition loss under the exact transition distribution of
a GM prior (its minimizer, its value = entropy, and excess = KL). Property tests cover jit / vmap /
grad, bf16 inputs, float64 recomputation, finite-difference gradients at extreme values and
trace-time shape errors.
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
    to_jax,
)
from scipy.special import logsumexp, xlogy

from gmflow_jax import flow as F
from gmflow_jax import gm as G
from gmflow_jax import losses as L

T = 1000.0


# ------------------------------------------------------------------------------------------------
# helpers and numpy float64 oracles
# ------------------------------------------------------------------------------------------------


def np_nll(means, lw, ls, x):
    """§4.2 per-pixel NLL with the 1e4 inverse-std cap, without (C/2) log 2 pi."""
    c = means.shape[-1]
    kappa = np.minimum(np.exp(-ls), 1e4)
    quad = -0.5 * np.sum(((means - x[..., None, :]) * kappa) ** 2, axis=-1, keepdims=True)
    return -logsumexp(lw + quad - c * ls, axis=-2)[..., 0]


def np_density(means, lw, ls, x):
    """GM density by direct summation (no caps, no log-sum-exp)."""
    c = means.shape[-1]
    s2 = np.exp(2 * ls)[..., 0]
    sq = np.sum((x[..., None, :] - means) ** 2, axis=-1)
    return np.sum(np.exp(lw[..., 0]) * np.exp(-0.5 * sq / s2) / (2 * np.pi * s2) ** (c / 2), -1)


def np_coefs(sigma, sigma_to):
    """c1, c2, c3 by Gaussian conditioning of (x_t', x_t) | x0 (oracle 6)."""
    a, a_to = 1 - sigma, 1 - sigma_to
    cov = a / a_to * sigma_to**2
    c1 = cov / sigma**2
    return c1, a_to - c1 * a, sigma_to**2 - cov**2 / sigma**2


def np_transition_gm(mu_u, lw, ls_u, x_t, t, t_to):
    """Reverse-transition GM of a u-GM from the conditioning coefficients (floors inactive)."""
    nd = mu_u.ndim
    s, s_to = bcast(t, nd) / T, bcast(t_to, nd) / T
    c1, c2, c3 = np_coefs(s, s_to)
    x = x_t[..., None, :]
    var = (c2 * s) ** 2 * np.exp(2 * ls_u) + c3
    return c1 * x + c2 * (x - s * mu_u), lw, 0.5 * np.log(var)


# ------------------------------------------------------------------------------------------------
# §4.1 training pair (oracle 27)
# ------------------------------------------------------------------------------------------------

T_DRAWS = np.array([0.0, 5e-5, 1e-4, 2e-4, 0.3, 500.0, 999.99, 1000.0, 1500.0], np.float32)


def _fixed_sampler(key, shape):
    return jnp.broadcast_to(jnp.asarray(T_DRAWS), shape)


@pytest.mark.parametrize("ratio", [0.5, 1.0, 0.9, 1e-7])
def test_t_low_rule(ratio):
    x0 = np.zeros((T_DRAWS.size, 2, 2, 3), np.float32)
    t_h, t_l, _, _ = jax.jit(lambda k, x: L.transition_pair(k, x, ratio, _fixed_sampler))(
        rbg_key(0), x0
    )
    t_h, t_l = np.asarray(t_h), np.asarray(t_l)
    f32 = np.float32
    exp_h = np.clip(T_DRAWS, f32(1e-4), f32(1000.0))
    np.testing.assert_array_equal(t_h, exp_h)
    exp_l = np.maximum(np.minimum(exp_h * f32(1.0 - ratio), exp_h - f32(1e-4)), f32(0.0))
    np.testing.assert_allclose(t_l, exp_l, rtol=2e-7, atol=0)
    assert np.all(t_l >= 0.0) and np.all(t_l <= t_h - f32(1e-4))
    assert t_l[0] == 0.0 and t_l[2] == 0.0  # t_h clipped to 1e-4 -> t_l = 0
    if ratio == 0.5:
        big = exp_h >= 2e-4
        np.testing.assert_allclose(t_l[big], t_h[big] / 2, rtol=1e-7)
    if ratio == 1.0:
        np.testing.assert_array_equal(t_l, 0.0)
    if ratio == 1e-7:  # t_l = t_h (1 - r) would exceed t_h - 1e-4: clamped
        np.testing.assert_allclose(t_l[3:], t_h[3:] - f32(1e-4), rtol=1e-7)


def test_transition_pair_moments_by_monte_carlo():
    # fixed t_h = 700, t_l = 350 (r = 0.5): x_l ~ N(a_l x0, s_l^2), x_h ~ N(a_h x0, s_h^2),
    # Cov(x_l, x_h) = (a_h / a_l) s_l^2; n0 and n1 must be independent for the covariance to hold
    n = 200_000
    x0 = np.full((n, 1, 1, 2), [0.8, -1.3], np.float32)
    t_h, t_l, x_l, x_h = jax.jit(
        lambda k, x: L.transition_pair(k, x, 0.5, lambda key, s: jnp.full(s, 700.0))
    )(rbg_key(1), x0)
    assert np.all(np.asarray(t_l) == 350.0)
    x_l, x_h = np.asarray(x_l, np.float64), np.asarray(x_h, np.float64)
    s_l, s_h = 0.35, 0.7
    a_l, a_h = 1 - s_l, 1 - s_h
    for x, a, s in ((x_l, a_l, s_l), (x_h, a_h, s_h)):
        assert np.all(np.abs(x.mean(0) - a * x0[0]) < 5 * s / math.sqrt(n))
        assert np.all(np.abs(x.var(0) - s**2) < 5 * s**2 * math.sqrt(2 / n))
    cov = np.mean((x_l - x_l.mean(0)) * (x_h - x_h.mean(0)), axis=0)
    cov_true = a_h / a_l * s_l**2
    assert np.all(np.abs(cov - cov_true) < 5 * math.sqrt((s_l**2 * s_h**2 + cov_true**2) / n))


# ------------------------------------------------------------------------------------------------
# §4.2 NLL
# ------------------------------------------------------------------------------------------------


def test_gm_nll_equals_the_spec_formula_with_and_without_the_inverse_std_cap():
    rng = np.random.default_rng(0)
    means, lw, _ = random_gm(rng, batch=(4, 2, 3), k=4, c=3)
    # log-stds -10 and -12: e^-lambda > 1e4, the cap is active; 0 and 2: inactive
    ls = np.array([-10.0, -12.0, 0.0, 2.0]).reshape(4, 1, 1, 1, 1)
    x = means[..., 1, :] + 1e-4 * rng.normal(size=(4, 2, 3, 3))
    out = run64(lambda a, b, c, y: L.gm_nll(G.GM(a, b, c), y), means, lw, ls, x)
    np.testing.assert_allclose(out, np_nll(means, lw, ls, x), rtol=1e-12)
    # capped rows differ from the exact NLL; uncapped rows equal -log density - (C/2) log 2 pi
    exact = -np.log(np_density(means[2:], lw[2:], ls[2:], x[2:])) - 1.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(out[2:], exact, rtol=1e-12)
    kappa = 1e4
    quad = 0.5 * np.sum(((means[:2] - x[:2, ..., None, :]) * kappa) ** 2, -1)
    capped = -logsumexp(lw[:2, ..., 0] - quad - 3 * ls[:2, ..., 0], axis=-1)
    np.testing.assert_allclose(out[:2], capped, rtol=1e-12)
    # float32: x - mu ~ 1e-4 scaled by 1e4 loses ~3 digits in the capped rows (inherent)
    out32 = run32(lambda a, b, c, y: L.gm_nll(G.GM(a, b, c), y), means, lw, ls, x)
    np.testing.assert_allclose(out32[2:], out[2:], rtol=1e-5)
    np.testing.assert_allclose(out32[:2], out[:2], rtol=1e-4)


def test_gm_nll_invariances():
    rng = np.random.default_rng(1)
    means, lw, ls = random_gm(rng, k=3, c=4)
    x = rng.normal(size=means.shape[:-2] + (4,))
    nll = lambda a, b, c, y: L.gm_nll(G.GM(a, b, c), y)  # noqa: E731
    ref = run64(nll, means, lw, ls, x)
    lw_shift = (lw + 40.0) - logsumexp(lw + 40.0, axis=-2, keepdims=True)
    np.testing.assert_allclose(run64(nll, means, lw_shift, ls, x), ref, rtol=1e-12)
    perm = np.array([2, 0, 1])
    np.testing.assert_allclose(run64(nll, means[..., perm, :], lw[..., perm, :], ls, x), ref)
    means2 = np.concatenate([means, means[..., :1, :]], axis=-2)
    lw2 = np.concatenate([lw, lw[..., :1, :] - np.log(2)], axis=-2)
    lw2[..., :1, :] -= np.log(2)
    np.testing.assert_allclose(run64(nll, means2, lw2, ls, x), ref, rtol=1e-12)


def test_transition_nll_loss_equals_numpy_pipeline():
    rng = np.random.default_rng(2)
    means, lw, ls = random_gm(rng, batch=(3, 2, 4), k=4, c=3)
    x_h, x_l = rng.normal(size=(2, 3, 2, 4, 3))
    t_h = np.array([900.0, 500.0, 120.0])
    t_l = np.array([450.0, 0.0, 60.0])
    loss, per = run64(
        lambda a, b, c, xh, th, xl, tl: L.transition_nll_loss(G.GM(a, b, c), xh, th, xl, tl, 2.0),
        means,
        lw,
        ls,
        x_h,
        t_h,
        x_l,
        t_l,
    )
    mu, lw_t, ls_t = np_transition_gm(means, lw, ls, x_h, t_h, t_l)
    # t_l = 0: c3 = 0 is floored at 1e-6 inside the logaddexp (a sum)
    ls_t[1] = 0.5 * np.log(np.exp(2 * ls[1]) * 0.5**2 + 1e-6)
    per_exp = 2.0 * np.mean(np_nll(mu, lw_t, ls_t, x_l).reshape(3, -1), axis=-1)
    np.testing.assert_allclose(per, per_exp, rtol=1e-11)
    np.testing.assert_allclose(loss, per_exp.mean(), rtol=1e-11)


def test_trans_ratio_one_scores_x0_under_the_x0_gm_with_variance_floor():
    # oracle 28: with r = 1 the transition GM is the x0-GM with variance sigma^2 s_u^2 + 1e-6
    rng = np.random.default_rng(3)
    mu_u, lw, ls_u = random_gm(rng, batch=(3, 2, 2), k=3, c=2, logstd_range=(-9.0, 0.0))
    x_h, x0 = rng.normal(size=(2, 3, 2, 2, 2))
    t_h = np.array([1e-3, 300.0, 1000.0])
    loss, per = run64(
        lambda a, b, c, xh, th, xl, tl: L.transition_nll_loss(G.GM(a, b, c), xh, th, xl, tl),
        mu_u,
        lw,
        ls_u,
        x_h,
        t_h,
        x0,
        np.zeros(3),
    )
    s = bcast(t_h / T, 5)
    x0_gm = (x_h[..., None, :] - s * mu_u, lw, 0.5 * np.log(s**2 * np.exp(2 * ls_u) + 1e-6))
    per_exp = np.mean(np_nll(*x0_gm, x0).reshape(3, -1), axis=-1)
    np.testing.assert_allclose(per, per_exp, rtol=1e-11)


# ------------------------------------------------------------------------------------------------
# oracle 17: the expected transition loss is minimized by the exact transition GM (1-D quadrature)
# ------------------------------------------------------------------------------------------------

PRIOR_LOG_PI = np.log(np.array([0.3, 0.7]))
PRIOR_M = np.array([-1.5, 1.0])
PRIOR_V = 0.2**2
X_T = 0.4


def _posterior(sigma):
    """Exact p(x0 | x_t = X_T) of the 1-D GM prior: means, log-weights, variance."""
    a = 1 - sigma
    vp = 1 / (1 / PRIOR_V + a**2 / sigma**2)
    mp = vp * (PRIOR_M / PRIOR_V + a * X_T / sigma**2)
    logits = PRIOR_LOG_PI - (X_T - a * PRIOR_M) ** 2 / (2 * (a**2 * PRIOR_V + sigma**2))
    return mp, logits - logsumexp(logits), vp


def _expected_nll_fn(t_h, t_l, grid, weights):
    """theta = (mu_u [K], logits [K], logstd_u) -> sum_i weights_i NLL_theta(grid_i), in jax."""

    def expected(mu_u, logits, ls_u):
        k = mu_u.shape[0]
        gm_u = G.GM(
            mu_u.reshape(1, k, 1),
            jax.nn.log_softmax(logits).reshape(1, k, 1),
            ls_u.reshape(1, 1, 1),
        )
        x_t = jnp.full((grid.shape[0], 1), X_T, grid.dtype)
        # the per-pixel term of `transition_nll_loss` (before its flatmean)
        trans = F.reverse_transition_gm(gm_u, x_t, t_h, t_l, prediction="u")
        return jnp.sum(weights * L.gm_nll(trans, grid[:, None]))

    return expected


def _quadrature(mean, std, n=20001, width=12.0):
    grid = np.linspace(mean - width * std, mean + width * std, n)
    w = np.full(n, grid[1] - grid[0])
    w[0] = w[-1] = w[1] / 2
    return grid, w


def test_expected_transition_loss_is_minimized_by_the_exact_transition_gm():
    t_h, t_l = 600.0, 300.0
    s, s_l = t_h / T, t_l / T
    c1, c2, c3 = np_coefs(s, s_l)
    mp, lwp, vp = _posterior(s)
    # true q(x_l | x_t): mixture of N(c1 x_t + c2 m'_k, c2^2 v' + c3)
    q_means, q_var = c1 * X_T + c2 * mp, c2**2 * vp + c3
    grid, w = _quadrature(q_means.mean(), math.sqrt(q_var) + np.ptp(q_means))
    q = np.exp(lwp) @ np.exp(-0.5 * (grid[None] - q_means[:, None]) ** 2 / q_var)
    q /= math.sqrt(2 * np.pi * q_var)
    assert abs(np.sum(w * q) - 1) < 1e-12
    theta_star = ((X_T - mp) / s, lwp.copy(), np.array(0.5 * np.log(vp) - np.log(s)))

    with jax.enable_x64(True):
        expected = jax.jit(_expected_nll_fn(t_h, t_l, jnp.asarray(grid), jnp.asarray(w * q)))
        value_and_grad = jax.jit(jax.value_and_grad(expected, argnums=(0, 1, 2)))
        e_star, grads = value_and_grad(*to_jax(theta_star, jnp.float64))
        # stationary at the exact GM
        for g in grads:
            assert np.all(np.abs(np.asarray(g)) < 1e-9)
        # its value is the entropy of q minus the omitted (1/2) log 2 pi
        entropy = -np.sum(w * xlogy(q, q))
        np.testing.assert_allclose(float(e_star), entropy - 0.5 * np.log(2 * np.pi), atol=1e-10)
        # any perturbation costs exactly KL(q || p_theta) > 0 (p_theta from the docs/math.md formulas)
        perturbations = [
            (np.array([0.05, 0.0]), np.zeros(2), 0.0),
            (np.array([0.0, -0.03]), np.zeros(2), 0.0),
            (np.zeros(2), np.array([0.1, 0.0]), 0.0),
            (np.zeros(2), np.zeros(2), 0.05),
            (np.zeros(2), np.zeros(2), -0.05),
        ]
        for dmu, dl, dls in perturbations:
            theta = (theta_star[0] + dmu, theta_star[1] + dl, theta_star[2] + dls)
            e = float(expected(*to_jax(theta, jnp.float64)))
            lw_th = theta[1] - logsumexp(theta[1])
            mu_t, _, ls_t = np_transition_gm(
                theta[0][None, :, None], lw_th[None, :, None], theta[2], np.array([[X_T]]), t_h, t_l
            )
            log_p = logsumexp(
                lw_th[:, None]
                - 0.5 * (grid[None] - mu_t[0, :, 0][:, None]) ** 2 / np.exp(2 * ls_t),
                axis=0,
            ) - (0.5 * np.log(2 * np.pi) + ls_t)
            kl = np.sum(w * (xlogy(q, q) - q * log_p))
            assert kl > 1e-6
            np.testing.assert_allclose(e - float(e_star), kl, rtol=1e-7, atol=1e-12)


def test_k1_expected_loss_at_t_low_zero_is_minimized_by_the_posterior_mean_velocity():
    # oracle 17, K = 1: the optimal mean is E[u | x_t] and the optimal variance matches Var[x0 | x_t]
    t_h = 600.0
    s = t_h / T
    mp, lwp, vp = _posterior(s)
    wp = np.exp(lwp)
    mean_x0 = wp @ mp
    var_x0 = wp @ (vp + mp**2) - mean_x0**2
    grid, w = _quadrature(mean_x0, math.sqrt(var_x0))
    q = wp @ np.exp(-0.5 * (grid[None] - mp[:, None]) ** 2 / vp) / math.sqrt(2 * np.pi * vp)
    theta = (
        np.array([(X_T - mean_x0) / s]),  # E[u | x_t]
        np.zeros(1),
        np.array(0.5 * np.log((var_x0 - 1e-6) / s**2)),  # sigma^2 s_u^2 + 1e-6 = Var[x0 | x_t]
    )
    with jax.enable_x64(True):
        expected = _expected_nll_fn(t_h, 0.0, jnp.asarray(grid), jnp.asarray(w * q))
        grads = jax.jit(jax.grad(expected, argnums=(0, 2)))(*to_jax(theta, jnp.float64))
    for g in grads:
        assert np.all(np.abs(np.asarray(g)) < 1e-9)


# ------------------------------------------------------------------------------------------------
# flow-matching baseline
# ------------------------------------------------------------------------------------------------


def test_flow_matching_l2_loss_is_the_k1_unit_variance_gm_nll_in_u_space():
    rng = np.random.default_rng(4)
    u_pred, x0, eps = rng.normal(size=(3, 3, 2, 2, 4))
    t = np.array([50.0, 500.0, 990.0])
    x_t = (1 - bcast(t / T, 4)) * x0 + bcast(t / T, 4) * eps
    u = eps - x0

    def fn(up, x0, xt, t, u):
        gm = G.GM(up[..., None, :], jnp.zeros(up.shape[:-1] + (1, 1)), jnp.zeros((3, 1, 1, 1, 1)))
        nll = L.gm_nll(gm, u)
        return L.flow_matching_l2_loss(up, x0, xt, t, 2.0), 2.0 * jnp.mean(nll, axis=(1, 2))

    (loss, per), per_nll = run64(fn, u_pred, x0, x_t, t, u)
    per_exp = 2.0 * np.mean(0.5 * np.sum((u_pred - u) ** 2, -1), axis=(1, 2))
    np.testing.assert_allclose(per, per_exp, rtol=1e-12)
    np.testing.assert_allclose(per_nll, per_exp, rtol=1e-12)
    np.testing.assert_allclose(loss, per_exp.mean(), rtol=1e-12)
    # a scalar time is accepted too
    loss_s, _ = run64(
        lambda up, x0, xt: L.flow_matching_l2_loss(up, x0, xt, 500.0), u_pred, x0, x_t
    )
    assert np.isfinite(loss_s)


# ------------------------------------------------------------------------------------------------
# properties: jit / vmap / grad, dtypes, float64 recomputation, FD gradients, shape errors
# ------------------------------------------------------------------------------------------------


def f_nll(a, b, c, x):
    return L.gm_nll(G.GM(a, b, c), x)


def f_trans(a, b, c, xh, th, xl, tl):
    return L.transition_nll_loss(G.GM(a, b, c), xh, th, xl, tl, 2.0)


def f_fm(up, x0, xt, t):
    return L.flow_matching_l2_loss(up, x0, xt, t, 2.0)


def f_pair(x0):
    # the noise enters linearly; fixed key so that the function is deterministic in x0
    t_h, t_l, x_l, x_h = L.transition_pair(
        jax.random.key(0, impl="rbg"), x0, 0.5, lambda k, s: jnp.full(s, 640.0)
    )
    return x_l, x_h


def _case_args(name, rng, gm=None, t_hi=None, t_lo=None):
    means, lw, ls = gm if gm is not None else random_gm(rng, batch=(2, 2, 3), k=3, c=4)
    x, y, z = rng.normal(size=(3, 2, 2, 3, 4))
    t_hi = np.array([700.0, 420.0]) if t_hi is None else t_hi
    t_lo = np.array([350.0, 0.0]) if t_lo is None else t_lo
    return {
        "gm_nll": (f_nll, (means, lw, ls, x)),
        "transition_nll_loss": (f_trans, (means, lw, ls, x, t_hi, y, t_lo)),
        "flow_matching_l2_loss": (f_fm, (x, y, z, t_hi)),
        "transition_pair": (f_pair, (x,)),
    }[name]


CASE_NAMES = ["gm_nll", "transition_nll_loss", "flow_matching_l2_loss", "transition_pair"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_jit_vmap_grad_bf16_and_float64_recomputation(name):
    rng = np.random.default_rng(0)
    fn, args = _case_args(name, rng)
    check_jit_vmap_grad_bf16_float64(
        fn, args, rng, vmap_scale=0.9, float64=name != "transition_pair"
    )  # its noise is drawn in the input dtype: no float64 recomputation


def test_gradients_match_finite_differences_at_extreme_values():
    # log-stds -12 and 4 (the NLL cap is active at -12 in x0 space), a weight of 1e-30,
    # sigma near 0 (t_h = 1e-3) and near 1 (t_h = 999.9); times frozen (scale 0)
    rng = np.random.default_rng(5)
    t_hi, t_lo = np.array([1e-3, 999.9]), np.array([0.0, 500.0])
    for logstd in (-12.0, 4.0):
        means, lw, ls = gm_with_negligible_component(rng, logstd)
        s = math.exp(logstd)
        fn, args = _case_args("gm_nll", rng, (means, lw, ls))
        x = means[..., 1, :] + s * rng.normal(size=means[..., 1, :].shape)
        fd_check(fn, (means, lw, ls, x), rng, [s, 1.0, 1.0, s])
        fn, args = _case_args("transition_nll_loss", rng, (means, lw, ls), t_hi, t_lo)
        fd_check(fn, args, rng, [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    fn, args = _case_args("flow_matching_l2_loss", rng, None, t_hi)
    fd_check(fn, args, rng, [1.0, 1.0, 1.0, 0.0])


def test_shape_mistakes_raise_value_errors_naming_the_argument():
    gm, x = uniform_gm(k=3, c=4)
    t = jnp.array([500.0, 300.0])
    with pytest.raises(ValueError, match=r"target x must have shape \[..., 4\]"):
        jax.jit(L.gm_nll)(gm, x[..., :1])
    with pytest.raises(ValueError, match="gm.logstds must have 5 dims"):
        jax.jit(L.gm_nll)(G.GM(gm.means, gm.logweights, jnp.zeros((2, 1, 1))), x)
    with pytest.raises(ValueError, match=r"x_t must have shape \[..., C\]"):
        jax.jit(L.transition_nll_loss)(gm, x[..., :1], t, x, t / 2)
    with pytest.raises(ValueError, match=r"target x must have shape"):
        jax.jit(L.transition_nll_loss)(gm, x, t, x[..., :2], t / 2)
    with pytest.raises(ValueError, match=r"u_pred \(2, 3, 3, 2\) must have the shape of x0"):
        jax.jit(L.flow_matching_l2_loss)(x[..., :2], x, x, t)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="trans_ratio must be in"):
            L.transition_pair(jax.random.key(0), x, bad, _fixed_sampler)
