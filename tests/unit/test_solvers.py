"""Solvers (`docs/math.md` §5) against independent oracles: exact GM posteriors, closed-form Gaussian flows."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.oracles import exact_posterior_u_gm, gm_prior_denoiser, sample_gm_prior
from scipy import stats

from gmflow_jax import flow
from gmflow_jax import gm as gmlib
from gmflow_jax.gm import GM
from gmflow_jax.solvers import SolverConfig, default_substeps, sample, steps
from gmflow_jax.solvers.second_order import empty_second_order_state, gm_second_order

PRIOR_MEANS = np.array([[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]])
PRIOR_W = np.array([0.2, 0.5, 0.3])
PRIOR_VAR = 0.05


def _mixture_cdf(x, means, weights, var):
    return sum(w * stats.norm.cdf(x, m, np.sqrt(var)) for m, w in zip(means, weights, strict=True))


def _run(cfg, denoiser, n=20000, seed=0, params=None, labels=None, c=2):
    noise = jax.random.normal(jax.random.PRNGKey(seed + 1), (n, 1, 1, c))
    out = sample(denoiser, params, jax.random.PRNGKey(seed), noise, labels, cfg)
    return np.asarray(out).reshape(n, c)


@pytest.mark.parametrize("num_steps,order", [(1, 1), (2, 1), (8, 1), (4, 2)])
def test_gm_sde_with_exact_posterior_reproduces_the_data_distribution(num_steps, order):
    den = gm_prior_denoiser(PRIOR_MEANS, np.log(PRIOR_W), PRIOR_VAR)
    x = _run(SolverConfig("gm_sde", num_steps, order=order), den)
    # KS test of each marginal against the exact mixture CDF; p > 1e-3 at n = 20000.
    for d in range(2):
        p = stats.kstest(
            x[:, d], lambda v, d=d: _mixture_cdf(v, PRIOR_MEANS[:, d], PRIOR_W, PRIOR_VAR)
        )
        assert p.pvalue > 1e-3, (num_steps, order, d, p)
    # Sanity: a wrong variance is rejected by the same test (the test has power).
    wrong = stats.kstest(x[:, 0], lambda v: _mixture_cdf(v, PRIOR_MEANS[:, 0], PRIOR_W, 0.08))
    assert wrong.pvalue < 1e-3


def _gaussian_pf_ode_solution(noise, m, v):
    """Closed-form probability-flow ODE for data N(m, v I): x_sigma = alpha m + sqrt(alpha^2 v + sigma^2) z."""
    return m + np.sqrt(v) * noise


def _gaussian_mean_denoiser(m, v):
    """Exact posterior-mean velocity for data N(m, v I): E[u | x_t]."""

    def den(params, x, t, labels):
        sigma = (t / 1000.0).reshape(-1, 1, 1, 1)
        alpha = 1.0 - sigma
        x0_mean = m + alpha * v / (alpha**2 * v + sigma**2) * (x - alpha * m)
        return (x - x0_mean) / sigma

    return den


def test_ode_solver_convergence_order_on_a_gaussian_flow():
    # Euler is first order; DPM-Solver++(2M) approaches second order (its first steps from sigma = 1
    # have O(1) steps in lambda on the uniform sigma grid, so the rate reaches 2 only asymptotically).
    m, v = 0.7, 0.3
    den = _gaussian_mean_denoiser(m, v)
    noise = jax.random.normal(jax.random.PRNGKey(3), (64, 1, 1, 1))
    exact = _gaussian_pf_ode_solution(np.asarray(noise), m, v)
    errs = {}
    with jax.enable_x64(True):
        for solver in ("euler", "dpmpp_2m"):
            errs[solver] = []
            for steps_n in (64, 128, 256):
                cfg = SolverConfig(solver, steps_n)
                out = sample(den, None, jax.random.PRNGKey(0), noise.astype(jnp.float64), None, cfg)
                errs[solver].append(np.max(np.abs(np.asarray(out) - exact)))
    rate = {k: np.log2(np.array(e[:-1]) / np.array(e[1:])) for k, e in errs.items()}
    assert np.all(np.abs(rate["euler"] - 1.0) < 0.1), rate
    assert np.all(rate["dpmpp_2m"] > 1.6), rate
    assert errs["dpmpp_2m"][0] < errs["euler"][0] / 5, errs


@pytest.mark.parametrize("solver", ["ddpm_small", "ddpm_large", "dpmpp_2m_sde"])
def test_sde_baselines_converge_to_the_gaussian_data_distribution(solver):
    m, v = 0.7, 0.3
    x = _run(SolverConfig(solver, 64), _gaussian_mean_denoiser(m, v), n=40000, c=1)[:, 0]
    se_mean, se_var = np.sqrt(v / x.size), v * np.sqrt(2.0 / x.size)
    assert abs(x.mean() - m) < 5 * se_mean + 0.01
    assert abs(x.var() - v) < 5 * se_var + 0.02


def test_gm_ode_error_decreases_with_substeps():
    den = gm_prior_denoiser(PRIOR_MEANS, np.log(PRIOR_W), PRIOR_VAR)
    noise = jax.random.normal(jax.random.PRNGKey(5), (256, 1, 1, 2))
    ref = sample(den, None, jax.random.PRNGKey(0), noise, None, SolverConfig("gm_ode", 8, 64))
    errs = []
    for s in (1, 4, 16):
        out = sample(den, None, jax.random.PRNGKey(0), noise, None, SolverConfig("gm_ode", 2, s))
        errs.append(float(jnp.mean(jnp.abs(out - ref))))
    assert errs[0] > 2 * errs[1] > 4 * errs[2] * 0.5, errs


def test_gm_ode_one_step_many_substeps_matches_prior_moments():
    den = gm_prior_denoiser(PRIOR_MEANS, np.log(PRIOR_W), PRIOR_VAR)
    x = _run(SolverConfig("gm_ode", 1, 256), den, n=20000)
    ref = sample_gm_prior(np.random.default_rng(0), 200000, PRIOR_MEANS, PRIOR_W, PRIOR_VAR)
    np.testing.assert_allclose(x.mean(0), ref.mean(0), atol=0.04)
    np.testing.assert_allclose(np.cov(x.T), np.cov(ref.T), atol=0.08)


def _k1_denoisers(logstd):
    """A K=1 GM denoiser and the matching mean-only denoiser (u mean of a fixed nonlinear field)."""

    def u_mean(x, t):
        return jnp.tanh(1.3 * x) + 0.1 * (t / 1000.0).reshape(-1, 1, 1, 1) - 0.2

    def gm_den(params, x, t, labels):
        mu = u_mean(x, t)[..., None, :]
        return GM(mu, jnp.zeros(mu.shape[:-1] + (1,)), jnp.full((x.shape[0], 1, 1, 1, 1), logstd))

    def mean_den(params, x, t, labels):
        return u_mean(x, t)

    return gm_den, mean_den


def test_k1_gm_sde_with_zero_std_equals_ddpm_small_variance():
    gm_den, mean_den = _k1_denoisers(-40.0)
    for n in (1, 4, 8):
        a = _run(SolverConfig("gm_sde", n), gm_den, n=512)
        b = _run(SolverConfig("ddpm_small", n), mean_den, n=512)
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_k1_gm_ode_with_one_substep_equals_euler():
    gm_den, mean_den = _k1_denoisers(0.0)
    for n in (1, 3, 8):
        a = _run(SolverConfig("gm_ode", n, 1), gm_den, n=512)
        b = _run(SolverConfig("euler", n), mean_den, n=512)
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_point_mass_gm_ode_is_independent_of_substeps():
    gm_den, _ = _k1_denoisers(-40.0)
    a = _run(SolverConfig("gm_ode", 4, 1), gm_den, n=256)
    b = _run(SolverConfig("gm_ode", 4, 7), gm_den, n=256)
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_gm_sde_step_law_is_the_reverse_transition_gm():
    # Oracle 35: x0 ~ N(mu, (sigma s_u)^2), then the GM-SDE step: law N(c1 x + c2 mu, c2^2 sigma^2 s_u^2 + c3).
    key = jax.random.PRNGKey(0)
    n, t, t_to, mu, x, s_u = 400000, 700.0, 300.0, 0.4, -0.3, 0.8
    sigma, sigma_to = t / 1000.0, t_to / 1000.0
    k1, k2 = jax.random.split(key)
    x0 = mu + sigma * s_u * jax.random.normal(k1, (n,))
    out = np.asarray(steps.gm_sde_step(x, x0, sigma, sigma_to, jax.random.normal(k2, (n,))))
    c1, c2, c3, _ = (float(c) for c in flow.reverse_transition_coefs(sigma, sigma_to))
    var = c2**2 * sigma**2 * s_u**2 + c3
    assert abs(out.mean() - (c1 * x + c2 * mu)) < 5 * np.sqrt(var / n)
    assert abs(out.var() - var) < 5 * var * np.sqrt(2.0 / n)


def test_euler_x0_step_is_exact_on_the_linear_path():
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal(5), rng.standard_normal(5)
    s, s_to = 0.8, 0.35
    x = (1 - s) * x0 + s * eps
    out = steps.euler_step(x, x0, s, s_to)
    np.testing.assert_allclose(out, (1 - s_to) * x0 + s_to * eps, atol=1e-6)


def test_second_order_correction_is_identity_for_the_exact_posterior():
    # Oracle 16: Delta = 0, so the corrected GM equals the input up to the 1e-6 quotient clamp.
    with jax.enable_x64(True):
        key = jax.random.PRNGKey(0)
        b = 16
        x_prev = jax.random.normal(key, (b, 1, 1, 2), jnp.float64) * 1.5
        t_prev, t = 600.0, 350.0
        gm_prev = flow.u_to_x0(
            exact_posterior_u_gm(
                x_prev, jnp.full((b,), t_prev), PRIOR_MEANS, np.log(PRIOR_W), PRIOR_VAR
            ),
            x_prev,
            t_prev,
        )
        x = x_prev * 0.8 + 0.1
        gm = flow.u_to_x0(
            exact_posterior_u_gm(x, jnp.full((b,), t), PRIOR_MEANS, np.log(PRIOR_W), PRIOR_VAR),
            x,
            t,
        )
        state = empty_second_order_state(gm, x)._replace(
            gm=gm_prev, x=x_prev, t=jnp.float64(t_prev), h=jnp.float64(250.0), valid=jnp.bool_(True)
        )
        out, _, new_state = gm_second_order(state, gm, gmlib.gm_to_iso_gaussian(gm), x, t, 200.0)
        # The clamped quotient is N(0, v0^2 / 1e-6): means shrink by s^2 1e-6 / v0^2 (relative).
        _, v0 = gmlib.gm_to_iso_gaussian(gm)
        s2 = jnp.exp(2.0 * gm.logstds[..., 0, :])
        bound = 2.0 * s2 * 1e-6 / v0**2 * jnp.max(jnp.abs(gm.means), axis=-2) + 1e-12
        assert bool(jnp.all(jnp.abs(out.means - gm.means) <= bound[..., None, :])), bound.max()
        np.testing.assert_allclose(out.logweights, gm.logweights, atol=1e-3)
        assert bool(new_state.valid) and float(new_state.t) == t
        # A non-exact previous GM (shifted means) makes the correction move the GM.
        shifted = state._replace(gm=GM(gm_prev.means + 0.3, gm_prev.logweights, gm_prev.logstds))
        moved, _, _ = gm_second_order(shifted, gm, gmlib.gm_to_iso_gaussian(gm), x, t, 200.0)
        assert float(jnp.max(jnp.abs(moved.means - gm.means))) > 1e-3


def test_first_step_of_second_order_passes_the_gm_through():
    den = gm_prior_denoiser(PRIOR_MEANS, np.log(PRIOR_W), PRIOR_VAR)
    a = _run(SolverConfig("gm_ode", 1, 8, order=2), den, n=256)
    b = _run(SolverConfig("gm_ode", 1, 8, order=1), den, n=256)
    np.testing.assert_array_equal(a, b)


def test_sampler_does_not_recompile_across_calls():
    den = gm_prior_denoiser(PRIOR_MEANS, np.log(PRIOR_W), PRIOR_VAR)
    cfg = SolverConfig("gm_ode", 4, 4, order=2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(key, noise):
        return sample(den, None, key, noise, None, cfg)

    for i in range(3):
        noise = jax.random.normal(jax.random.PRNGKey(10 + i), (64, 1, 1, 2))
        jax.block_until_ready(run(jax.random.PRNGKey(i), noise))
    before = sample._cache_size()
    for i in range(3):
        noise = jax.random.normal(jax.random.PRNGKey(20 + i), (64, 1, 1, 2))
        jax.block_until_ready(sample(den, None, jax.random.PRNGKey(i), noise, None, cfg))
    assert sample._cache_size() <= before + 1


def test_solver_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="solver='heun' is unknown"):
        SolverConfig("heun", 4)
    with pytest.raises(ValueError, match="num_steps=0"):
        SolverConfig("gm_sde", 0)
    with pytest.raises(ValueError, match=r"outside the probabilistic guidance range \[0, 1\)"):
        SolverConfig("gm_sde", 4, guidance_scale=1.0, null_label=0)
    with pytest.raises(ValueError, match="null_label"):
        SolverConfig("gm_sde", 4, guidance_scale=0.3)
    with pytest.raises(ValueError, match="num_substeps=4 > 1 needs solver='gm_ode'"):
        SolverConfig("gm_sde", 4, num_substeps=4)
    assert default_substeps(8) == 16 and default_substeps(1) == 128 and default_substeps(3) == 43


def test_gm_solver_rejects_a_mean_only_denoiser():
    _, mean_den = _k1_denoisers(0.0)
    with pytest.raises(ValueError, match="needs a GM denoiser"):
        _run(SolverConfig("gm_sde", 2), mean_den, n=8)
