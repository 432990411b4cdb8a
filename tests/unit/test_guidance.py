"""Probabilistic guidance and CFG (`docs/math.md` §5.3-§5.5, §5.9; oracles 18-20)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmflow_jax import gm as gmlib
from gmflow_jax import guidance
from gmflow_jax.gm import GM
from gmflow_jax.solvers import SolverConfig, sample


def _random_gm(key, b=3, h=4, w=4, k=4, c=3, logstd=-0.5):
    k1, k2, k3 = jax.random.split(key, 3)
    means = jax.random.normal(k1, (b, h, w, k, c))
    logweights = jax.nn.log_softmax(jax.random.normal(k2, (b, h, w, k, 1)), axis=-2)
    logstds = logstd + 0.1 * jax.random.normal(k3, (b, 1, 1, 1, 1))
    return GM(means, logweights, logstds)


def _spatial(a):
    return np.mean(np.asarray(a), axis=tuple(range(1, np.ndim(a))))


@pytest.mark.parametrize("orthogonal", [0.0, 1.0])
def test_guidance_bias_has_rms_w_sqrt_vbar_and_is_orthogonal(orthogonal):
    cond, uncond = _random_gm(jax.random.PRNGKey(0)), _random_gm(jax.random.PRNGKey(1))
    w = 0.4
    res = guidance.probabilistic_guidance(cond, uncond, w, orthogonal)
    m_c, v_c = gmlib.gm_to_iso_gaussian(cond)
    vbar = _spatial(v_c)
    np.testing.assert_allclose(_spatial(res.bias**2), w**2 * vbar, rtol=1e-5)
    np.testing.assert_allclose(res.var[:, 0, 0, 0], (1 - w**2) * vbar, rtol=1e-5)
    np.testing.assert_allclose(res.mean, m_c + res.bias, atol=1e-6)
    inner = _spatial(res.bias * m_c)
    if orthogonal == 1.0:
        np.testing.assert_allclose(inner, 0.0, atol=1e-5)
    else:
        # Without projection the bias is the raw difference, rescaled: parallel to m_c - m_u.
        raw = m_c - gmlib.gm_mean(uncond)
        ratio = np.asarray(res.bias) / np.asarray(raw)
        np.testing.assert_allclose(ratio, ratio[:, :1, :1, :1] * np.ones_like(ratio), rtol=1e-4)


def test_equal_cond_and_uncond_means_give_zero_bias():
    cond = _random_gm(jax.random.PRNGKey(2))
    res = guidance.probabilistic_guidance(cond, cond, 0.5, 1.0)
    np.testing.assert_allclose(res.bias, 0.0, atol=1e-7)


def test_fold_with_k1_and_constant_variance_is_the_target_gaussian():
    # Oracle 19: K = 1, spatially constant variance, w^2 v_c >> 1e-6.
    key = jax.random.PRNGKey(3)
    cond = _random_gm(key, k=1, logstd=-0.3)
    uncond = _random_gm(jax.random.PRNGKey(4), k=1, logstd=-0.3)
    w = 0.6
    res = guidance.probabilistic_guidance(cond, uncond, w, 1.0)
    m_c, v_c = gmlib.gm_to_iso_gaussian(cond)
    np.testing.assert_allclose(res.gm.means[..., 0, :], m_c + res.bias, atol=2e-5)
    np.testing.assert_allclose(
        np.exp(2 * res.gm.logstds[:, 0, 0, 0, 0]), (1 - w**2) * v_c[:, 0, 0, 0], rtol=1e-4
    )


def test_small_guidance_converges_to_the_conditional_gm():
    # Oracle 20 (second part) with w^2 v_c >> 1e-6; and the w = 0 fold is the identity up to the clamp.
    cond, uncond = _random_gm(jax.random.PRNGKey(5)), _random_gm(jax.random.PRNGKey(6))
    errs = []
    for w in (0.2, 0.05, 0.0125):
        out = guidance.probabilistic_guidance(cond, uncond, w, 1.0).gm
        errs.append(float(jnp.max(jnp.abs(gmlib.gm_mean(out) - gmlib.gm_mean(cond)))))
    # The mean shift is the bias itself, of RMS w sqrt(V-bar): it vanishes linearly in w.
    assert errs[0] > errs[1] > errs[2] and errs[2] < errs[0] / 10, errs
    zero = guidance.probabilistic_guidance(cond, uncond, 0.0, 1.0).gm
    np.testing.assert_allclose(zero.means, cond.means, atol=1e-5)
    np.testing.assert_allclose(zero.logweights, cond.logweights, atol=1e-5)
    np.testing.assert_allclose(zero.logstds, cond.logstds, atol=1e-6)


def test_guidance_scale_outside_unit_interval_is_rejected():
    cond = _random_gm(jax.random.PRNGKey(7))
    for bad in (-0.1, 1.0, 2.5):
        with pytest.raises(ValueError, match=f"guidance_scale={bad} is outside"):
            guidance.probabilistic_guidance(cond, cond, bad)


def _counting_denoiser(calls):
    def den(params, x, t, labels):
        calls.append(x.shape[0])
        lab = labels.astype(jnp.float32).reshape(-1, 1, 1, 1, 1)
        means = jnp.tanh(x)[..., None, :] + jnp.stack([lab[..., 0], -lab[..., 0]], axis=-2) * 0.3
        return GM(means, jnp.full(means.shape[:-1] + (1,), -jnp.log(2.0)), jnp.zeros_like(lab))

    return den


def test_zero_guidance_runs_the_unguided_single_batch_path_bit_identically():
    labels = jnp.array([1, 2, 3, 4])
    noise = jax.random.normal(jax.random.PRNGKey(8), (4, 2, 2, 3))
    calls = []
    den = _counting_denoiser(calls)
    a = sample(den, None, jax.random.PRNGKey(0), noise, labels, SolverConfig("gm_sde", 3, order=2))
    cfg0 = SolverConfig("gm_sde", 3, order=2, guidance_scale=0.0, null_label=0)
    b = sample(den, None, jax.random.PRNGKey(0), noise, labels, cfg0)
    np.testing.assert_array_equal(a, b)
    assert set(calls) == {4}
    calls.clear()
    cfg = SolverConfig("gm_sde", 3, order=2, guidance_scale=0.3, null_label=0)
    c = sample(den, None, jax.random.PRNGKey(0), noise, labels, cfg)
    assert set(calls) == {8} and np.all(np.isfinite(c)) and not np.allclose(a, c)


def test_traced_guidance_scale_sweep_does_not_recompile():
    labels = jnp.array([1, 2, 3, 4])
    noise = jax.random.normal(jax.random.PRNGKey(9), (4, 2, 2, 3))
    calls = []
    den = _counting_denoiser(calls)
    cfg = SolverConfig("gm_ode", 2, 3, order=2, guidance_scale=0.5, null_label=0)
    outs = []
    for i, w in enumerate((0.1, 0.3, 0.5)):
        scale = jnp.float32(w)
        outs.append(
            sample(den, None, jax.random.PRNGKey(0), noise, labels, cfg, guidance_scale=scale)
        )
        if i == 0:
            traced = len(calls)
    assert len(calls) == traced  # later scales reuse the compiled sampler
    assert not np.allclose(outs[0], outs[2])
    ref = sample(den, None, jax.random.PRNGKey(0), noise, labels, cfg)
    np.testing.assert_allclose(outs[2], ref, atol=1e-4)


def test_cfg_velocity_extrapolates_and_projects():
    u_c = jax.random.normal(jax.random.PRNGKey(10), (2, 3, 3, 2))
    u_u = jax.random.normal(jax.random.PRNGKey(11), (2, 3, 3, 2))
    out = guidance.cfg_velocity(u_c, u_u, 3.0)
    np.testing.assert_allclose(out, 3.0 * u_c - 2.0 * u_u, atol=1e-6)
    ortho = guidance.cfg_velocity(u_c, u_u, 3.0, orthogonal=True)
    np.testing.assert_allclose(_spatial((ortho - u_c) * u_c), 0.0, atol=1e-5)
    np.testing.assert_allclose(guidance.cfg_velocity(u_c, u_u, 1.0), u_c)


def test_vanilla_cfg_on_a_gm_shifts_every_component_mean():
    cond, uncond = _random_gm(jax.random.PRNGKey(12)), _random_gm(jax.random.PRNGKey(13))
    out = guidance.cfg_gm(cond, uncond, 2.5)
    shift = out.means - cond.means
    np.testing.assert_allclose(shift, jnp.broadcast_to(shift[..., :1, :], shift.shape), atol=1e-6)
    expected = 1.5 * (gmlib.gm_mean(cond) - gmlib.gm_mean(uncond))
    np.testing.assert_allclose(shift[..., 0, :], expected, atol=1e-5)
    np.testing.assert_array_equal(out.logweights, cond.logweights)
