"""Tests of `gmflow_jax.gm` (`docs/math.md` §2.1-2.8, oracles 8-11) against independent numpy float64 oracles.

Every oracle below is written from the docs/math.md formulas in numpy float64 (or is a Monte Carlo or
quadrature estimate); none calls the code under test. Property tests cover jit / vmap / grad, dtype
promotion (bf16 -> float32), float64 recomputation, finite-difference gradients at extreme values
and trace-time shape errors.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import gm_inputs
from helpers.gm_inputs import gm_with_negligible_component, uniform_gm
from helpers.numerics import (
    check_jit_vmap_grad_bf16_float64,
    fd_check,
    rbg_key,
    run32,
    run64,
    to_jax,
)
from scipy.special import logsumexp

from gmflow_jax import gm as G
from gmflow_jax.constants import PRODUCT_EPS, QUOTIENT_EPS

# ------------------------------------------------------------------------------------------------
# numpy float64 oracles (written from docs/math.md, independent of gmflow_jax)
# ------------------------------------------------------------------------------------------------


# this file's random GMs: batch (2, 3, 2) and means of std 2 (components well apart)
random_gm = functools.partial(gm_inputs.random_gm, batch=(2, 3, 2), mean_scale=2.0)


def np_moments(means, logweights, logstds):
    """Mean [..., C], per-pixel iso variance [..., 1], full covariance [..., C, C] (§2.1-2.3)."""
    w = np.exp(logweights)  # [..., K, 1]
    m = np.sum(w * means, axis=-2)
    d = means - m[..., None, :]
    s2 = np.exp(2 * logstds)[..., 0, :]  # [..., 1]
    c = means.shape[-1]
    cov = np.einsum("...k,...kc,...kd->...cd", w[..., 0], d, d) + s2[..., None] * np.eye(c)
    iso = np.trace(cov, axis1=-2, axis2=-1)[..., None] / c
    return m, iso, cov


def np_gm_density(means, logweights, logstds, x):
    """Per-pixel GM density by direct summation of Gaussian densities (no log-sum-exp)."""
    c = means.shape[-1]
    s2 = np.exp(2 * logstds)[..., 0]  # [..., 1]
    sq = np.sum((x[..., None, :] - means) ** 2, axis=-1)  # [..., K]
    comp = np.exp(-0.5 * sq / s2) / (2 * np.pi * s2) ** (c / 2)
    return np.sum(np.exp(logweights[..., 0]) * comp, axis=-1)


def np_gauss_logpdf(x, mean, var):
    """Isotropic Gaussian log-density, per pixel."""
    c = x.shape[-1]
    return -0.5 * np.sum((x - mean) ** 2, -1) / var[..., 0] - 0.5 * c * np.log(
        2 * np.pi * var[..., 0]
    )


draw = jax.jit(G.gm_sample, static_argnums=2)  # (key, gm, sample_shape)


def f_moments(a, b, s):
    gm = G.GM(a, b, s)
    return G.gm_mean(gm), G.gm_to_iso_gaussian(gm)[1], G.gm_to_gaussian(gm)[1]


def mkgm(means, logweights, logstds):
    return G.GM(means, logweights, logstds)


# ------------------------------------------------------------------------------------------------
# §2.1-2.3 moments
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,c", [(1, 1), (3, 2), (8, 4)])
def test_moments_equal_float64_numpy(k, c):
    rng = np.random.default_rng(10 * k + c)
    p = random_gm(rng, k=k, c=c)
    m, iso, cov = np_moments(*p)
    out = run64(
        lambda a, b, s: (
            G.gm_mean(mkgm(a, b, s)),
            *G.gm_to_iso_gaussian(mkgm(a, b, s)),
            G.gm_to_gaussian(mkgm(a, b, s))[1],
            G.gm_to_gaussian(mkgm(a, b, s), cov_scale=2.5)[1],
        ),
        *p,
    )
    np.testing.assert_allclose(out[0], m, rtol=0, atol=1e-13)
    np.testing.assert_allclose(out[1], m, rtol=0, atol=1e-13)
    np.testing.assert_allclose(out[2], iso, rtol=1e-13)
    np.testing.assert_allclose(out[3], cov, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(out[4], 2.5 * cov, rtol=1e-13, atol=1e-13)
    # float32 run agrees with the float64 oracle to float32 accuracy
    out32 = run32(lambda a, b, s: G.gm_to_iso_gaussian(mkgm(a, b, s)), *p)
    np.testing.assert_allclose(out32[0], m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out32[1], iso, rtol=1e-5)


def test_gm_mean_power_uses_softmax_of_scaled_logweights():
    rng = np.random.default_rng(0)
    means, lw, ls = random_gm(rng, k=4, c=3)
    w = np.exp(2.0 * lw - logsumexp(2.0 * lw, axis=-2, keepdims=True))
    expected = np.sum(w * means, axis=-2)
    out = run64(lambda a, b, s: G.gm_mean(mkgm(a, b, s), power=2.0), means, lw, ls)
    np.testing.assert_allclose(out, expected, atol=1e-13)


@pytest.mark.parametrize("k,c", [(1, 1), (3, 2), (8, 4)])
def test_moments_match_monte_carlo_samples(k, c):
    # gm_mean / gm_to_iso_gaussian / gm_to_gaussian against the moments of gm_sample draws
    rng = np.random.default_rng(k)
    p = random_gm(rng, batch=(2, 1, 1), k=k, c=c)
    n = 200_000
    gm = mkgm(*to_jax(p, jnp.float32))
    x = np.asarray(draw(rbg_key(k), gm, (n,)), np.float64)
    m, iso, cov = (np.asarray(a, np.float64) for a in jax.jit(f_moments)(*to_jax(p, jnp.float32)))
    assert x.shape == (n, 2, 1, 1, c)
    # mean: 5 standard errors (per-entry SE from the sample variance)
    se_m = x.std(0) / np.sqrt(n)
    assert np.all(np.abs(x.mean(0) - m) < 5 * se_m + 1e-6)
    # per-pixel isotropic variance, with the SE of the estimator from the samples themselves
    d = x - x.mean(0)
    iso_terms = np.mean(d**2, axis=-1)
    se_v = iso_terms.std(0) / np.sqrt(n)
    assert np.all(np.abs(iso_terms.mean(0) - iso[..., 0]) < 5 * se_v + 1e-6)
    # full covariance, entry-wise
    prod = d[..., :, None] * d[..., None, :]
    se_c = prod.std(0) / np.sqrt(n)
    assert np.all(np.abs(prod.mean(0) - cov) < 5 * se_c + 1e-6)
    # and the sampler's moments are those of docs/math.md (numpy oracle)
    np.testing.assert_allclose(cov, np_moments(*p)[2], rtol=1e-5, atol=1e-5)


def test_gm_sample_uses_one_component_for_all_channels_of_a_pixel():
    # components (a, -a) with a in {10, -10, 20} and a tiny std: with one index per pixel every
    # sample has x0 ~ -x1; channels choosing components independently would break this 2/3 of
    # the time. (Same shapes as the K=3, C=2 Monte Carlo case, so the compilation is shared.)
    a = np.array([10.0, -10.0, 20.0])
    means = np.broadcast_to(np.stack([a, -a], -1), (2, 1, 1, 3, 2))
    lw = np.log(np.full((2, 1, 1, 3, 1), 1 / 3))
    ls = np.full((2, 1, 1, 1, 1), -5.0)
    n = 200_000
    x = np.asarray(draw(rbg_key(3), mkgm(*to_jax((means, lw, ls), jnp.float32)), (n,)))
    assert np.all(np.abs(x[..., 0] + x[..., 1]) < 0.5)
    frac = np.mean(x[..., 0] > 15.0)
    assert abs(frac - 1 / 3) < 5 * math.sqrt(2 / 9 / (2 * n))


def test_gm_sample_without_sample_shape_has_the_pixel_shape():
    p = random_gm(np.random.default_rng(1), batch=(2, 3, 2), k=3, c=4)
    x = jax.eval_shape(G.gm_sample, jax.random.key(0), mkgm(*to_jax(p, jnp.bfloat16)))
    assert x.shape == (2, 3, 2, 4) and x.dtype == jnp.float32
    x = jax.eval_shape(lambda k, g: G.gm_sample(k, g, (5, 7)), jax.random.key(0), mkgm(*p))
    assert x.shape == (5, 7, 2, 3, 2, 4)


def test_gm_sample_is_its_draws_then_the_indexed_mean_plus_scaled_noise():
    p = random_gm(np.random.default_rng(2), batch=(2, 3, 2), k=3, c=4)
    gm, key = mkgm(*to_jax(p, jnp.float32)), jax.random.key(5)
    idx, noise = G.gm_sample_draws(key, gm, (4,))
    assert idx.shape == (4, 2, 3, 2) and noise.shape == (4, 2, 3, 2, 4)
    x = np.asarray(G.gm_sample_from_draws(gm, idx, noise))
    means, _, ls = p  # numpy oracle: x = mu[idx] + exp(log-std) n, per sample and pixel
    chosen = np.take_along_axis(means[None], np.asarray(idx)[..., None, None], axis=-2)[..., 0, :]
    ref = chosen + np.exp(ls[..., 0, :]) * np.asarray(noise, np.float64)
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(G.gm_sample(key, gm, (4,))), x)
    with pytest.raises(ValueError, match="noise"):
        G.gm_sample_from_draws(gm, idx, noise[..., :3])
    with pytest.raises(ValueError, match="idx"):
        G.gm_sample_from_draws(gm, idx[..., :1], noise[..., :1, :])


# ------------------------------------------------------------------------------------------------
# invariances (oracle 8)
# ------------------------------------------------------------------------------------------------


def _summaries(means, lw, ls, x):
    gm = mkgm(means, lw, ls)
    m, v = G.gm_to_iso_gaussian(gm)
    return G.gm_mean(gm), m, v, G.gm_to_gaussian(gm)[1], G.gm_logprob(gm, x)


def _assert_same_summaries(args, ref_args):
    """The float64 summaries of GM `args` equal those of `ref_args` to 1e-12."""
    out, ref = run64(_summaries, *args), run64(_summaries, *ref_args)
    for a, b in zip(out, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_constant_shift_of_logweights_then_renormalizing_leaves_summaries_unchanged():
    rng = np.random.default_rng(5)
    means, lw, ls = random_gm(rng, k=5, c=3)
    x = rng.normal(size=means.shape[:-2] + (3,))
    for const in (-60.0, 37.0):
        lw2 = (lw + const) - logsumexp(lw + const, axis=-2, keepdims=True)
        _assert_same_summaries((means, lw2, ls, x), (means, lw, ls, x))


def test_permuting_components_leaves_summaries_unchanged():
    rng = np.random.default_rng(6)
    means, lw, ls = random_gm(rng, k=6, c=2)
    x = rng.normal(size=means.shape[:-2] + (2,))
    perm = rng.permutation(6)
    _assert_same_summaries((means[..., perm, :], lw[..., perm, :], ls, x), (means, lw, ls, x))


def test_splitting_a_component_into_two_identical_halves_leaves_summaries_unchanged():
    rng = np.random.default_rng(7)
    means, lw, ls = random_gm(rng, k=3, c=4)
    x = rng.normal(size=means.shape[:-2] + (4,))
    means2 = np.concatenate([means, means[..., 1:2, :]], axis=-2)
    lw2 = np.concatenate([lw, lw[..., 1:2, :] - np.log(2)], axis=-2)
    lw2[..., 1:2, :] -= np.log(2)
    _assert_same_summaries((means2, lw2, ls, x), (means, lw, ls, x))


# ------------------------------------------------------------------------------------------------
# §2.4 log-density (oracle 9)
# ------------------------------------------------------------------------------------------------


def test_gm_logprob_equals_direct_sum_of_gaussian_densities():
    rng = np.random.default_rng(8)
    means, lw, ls = random_gm(rng, k=8, c=4, mean_scale=1.0)
    x = rng.normal(size=means.shape[:-2] + (4,))
    expected = np.log(np_gm_density(means, lw, ls, x))
    out = run64(lambda a, b, s, y: G.gm_logprob(mkgm(a, b, s), y), means, lw, ls, x)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    out32 = run32(lambda a, b, s, y: G.gm_logprob(mkgm(a, b, s), y), means, lw, ls, x)
    np.testing.assert_allclose(out32, expected, rtol=1e-5, atol=1e-5)


def test_gm_logprob_with_one_component_is_the_gaussian_log_density():
    rng = np.random.default_rng(9)
    means, lw, ls = random_gm(rng, k=1, c=3)
    x = rng.normal(size=means.shape[:-2] + (3,))
    var = np.broadcast_to(np.exp(2 * ls)[..., 0, :], x.shape[:-1] + (1,))
    expected = np_gauss_logpdf(x, means[..., 0, :], var)
    out = run64(lambda a, b, s, y: G.gm_logprob(mkgm(a, b, s), y), means, lw, ls, x)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    out_iso = run64(G.iso_gaussian_logprob, means[..., 0, :], var, x)
    np.testing.assert_allclose(out_iso, expected, rtol=1e-12)


def test_iso_gaussian_logprob_with_per_pixel_variance():
    rng = np.random.default_rng(10)
    mean = rng.normal(size=(2, 3, 3, 4))
    var = rng.uniform(0.1, 3.0, size=(2, 3, 3, 1))
    x = rng.normal(size=(2, 3, 3, 4))
    out = run64(G.iso_gaussian_logprob, mean, var, x)
    np.testing.assert_allclose(out, np_gauss_logpdf(x, mean, var), rtol=1e-12)


def test_gm_logprob_integrates_to_one_on_1d_and_2d_grids():
    # 1-D: 3 components, trapezoid on [-14, 14] (spectrally accurate for Gaussians)
    means = np.array([[[-1.5], [0.3], [2.0]]])  # [1, K=3, C=1]
    lw = np.log(np.array([0.2, 0.5, 0.3]))[None, :, None]
    ls = np.full((1, 1, 1), np.log(0.6))
    grid = np.linspace(-14, 14, 20001)
    logp = run64(lambda a, b, s, y: G.gm_logprob(mkgm(a, b, s), y), means, lw, ls, grid[:, None])
    assert logp.shape == (grid.size,)
    assert abs(np.trapezoid(np.exp(logp), grid) - 1.0) < 1e-10
    # 2-D: 4 components
    rng = np.random.default_rng(11)
    means2 = rng.normal(size=(1, 4, 2))
    lw2 = np.log(rng.dirichlet(np.ones(4)))[None, :, None]
    ls2 = np.full((1, 1, 1), np.log(0.7))
    g = np.linspace(-9, 9, 361)
    xy = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)
    logp2 = run64(lambda a, b, s, y: G.gm_logprob(mkgm(a, b, s), y), means2, lw2, ls2, xy)
    dens = np.exp(logp2).reshape(g.size, g.size)
    assert abs(np.trapezoid(np.trapezoid(dens, g, axis=1), g) - 1.0) < 1e-9


def test_gm_logprob_is_finite_far_from_all_components_in_float32():
    means, lw, ls = random_gm(np.random.default_rng(12), k=3, c=4, logstd=-6.0)
    x = np.full(means.shape[:-2] + (4,), 1e3)
    out = run32(lambda a, b, s, y: G.gm_logprob(mkgm(a, b, s), y), means, lw, ls, x)
    assert np.all(np.isfinite(out)) and np.all(out < -1e6)


# ------------------------------------------------------------------------------------------------
# §2.5 GM x Gaussian (oracle 10)
# ------------------------------------------------------------------------------------------------


def _gm_1d():
    means = np.array([[[-1.2], [0.4], [2.1]]])  # [1, K=3, C=1]
    lw = np.log(np.array([0.25, 0.45, 0.3]))[None, :, None]
    ls = np.full((1, 1, 1), np.log(0.6))
    return means, lw, ls


@pytest.mark.parametrize("p2", [1.0, 0.5, -0.5])
def test_gm_mul_iso_gaussian_equals_normalized_pointwise_product_on_a_grid(p2):
    means, lw, ls = _gm_1d()
    m, v = np.array([[0.7]]), np.array([[2.0]])
    grid = np.linspace(-16, 16, 40001)[:, None]
    prod = np_gm_density(means, lw, ls, grid) * np.exp(np_gauss_logpdf(grid, m, v[None])) ** p2
    prod = prod / np.trapezoid(prod, grid[:, 0])
    out = run64(
        lambda a, b, s, mm, vv: G.gm_mul_iso_gaussian(mkgm(a, b, s), mm, vv, 1.0, p2),
        means,
        lw,
        ls,
        m,
        v,
    )
    dens = np_gm_density(out.means, out.logweights, out.logstds, grid)
    assert np.max(np.abs(dens - prod)) < 1e-11
    # the output weights are normalized and the std is shared: s'^2 = s^2 v / (v + p2 s^2)
    np.testing.assert_allclose(logsumexp(out.logweights, axis=-2), 0.0, atol=1e-14)
    s2 = np.exp(2 * ls)
    np.testing.assert_allclose(np.exp(2 * out.logstds), s2 * v / (v + p2 * s2), rtol=1e-13)


def test_gm_mul_iso_gaussian_equals_pointwise_product_on_a_2d_grid():
    rng = np.random.default_rng(13)
    means = rng.normal(size=(1, 3, 2))
    lw = np.log(rng.dirichlet(np.ones(3)))[None, :, None]
    ls = np.full((1, 1, 1), np.log(0.8))
    m, v = np.array([[0.5, -0.3]]), np.array([[1.5]])
    g = np.linspace(-9, 9, 301)
    xy = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)
    prod = np_gm_density(means, lw, ls, xy) * np.exp(np_gauss_logpdf(xy, m, v[None]))
    prod = prod / np.trapezoid(np.trapezoid(prod.reshape(g.size, g.size), g, axis=1), g)
    out = run64(
        lambda a, b, s, mm, vv: G.gm_mul_iso_gaussian(mkgm(a, b, s), mm, vv), means, lw, ls, m, v
    )
    dens = np_gm_density(out.means, out.logweights, out.logstds, xy)
    assert np.max(np.abs(dens - prod)) < 1e-10


def test_gm_mul_iso_gaussian_depends_on_the_power_ratio_only():
    rng = np.random.default_rng(14)
    means, lw, ls = random_gm(rng, k=3, c=2)
    m = rng.normal(size=means.shape[:-2] + (2,))
    v = np.full((2, 1, 1, 1), 1.7)
    f = lambda p1, p2: run64(  # noqa: E731
        lambda a, b, s, mm, vv: G.gm_mul_iso_gaussian(mkgm(a, b, s), mm, vv, p1, p2),
        means,
        lw,
        ls,
        m,
        v,
    )
    for a, b in zip(jax.tree.leaves(f(2.0, 1.0)), jax.tree.leaves(f(1.0, 0.5)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


def test_gm_mul_iso_gaussian_with_power_zero_is_the_identity():
    rng = np.random.default_rng(15)
    p = random_gm(rng, k=4, c=3)
    m = rng.normal(size=p[0].shape[:-2] + (3,))
    v = np.full((2, 1, 1, 1), 0.3)
    out = run64(
        lambda a, b, s, mm, vv: G.gm_mul_iso_gaussian(mkgm(a, b, s), mm, vv, 1.0, 0.0), *p, m, v
    )
    for a, b in zip(jax.tree.leaves(out), p, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


def test_gm_mul_then_divide_by_the_same_gaussian_round_trips():
    rng = np.random.default_rng(16)
    p = random_gm(rng, k=4, c=3)
    m = rng.normal(size=p[0].shape[:-2] + (3,))
    v = np.full((2, 1, 1, 1), 0.8)

    def round_trip(a, b, s, mm, vv):
        g1 = G.gm_mul_iso_gaussian(mkgm(a, b, s), mm, vv, 1.0, 1.0)
        return G.gm_mul_iso_gaussian(g1, mm, vv, 1.0, -1.0)

    out = run64(round_trip, *p, m, v)
    for a, b in zip(jax.tree.leaves(out), p, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    out32 = run32(round_trip, *p, m, v)
    for a, b in zip(jax.tree.leaves(out32), p, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def _np_mul_clamped(means, lw, ls, m, v, rho):
    s2 = np.exp(2 * ls)
    vv = v[..., None, :]
    n = np.maximum(vv + rho * s2, PRODUCT_EPS)
    mu = (vv * means + rho * s2 * m[..., None, :]) / n
    logits = lw - rho * np.sum((means - m[..., None, :]) ** 2, -1, keepdims=True) / (2 * n)
    return (
        mu,
        logits - logsumexp(logits, axis=-2, keepdims=True),
        ls + 0.5 * np.log(vv) - 0.5 * np.log(n),
    )


@pytest.mark.parametrize("v", [0.5, 0.5 + 0.5e-6, 0.5 + 4e-6])
def test_gm_mul_iso_gaussian_normalizer_floor_is_absolute_1e6(v):
    # s^2 = 1, rho = -0.5: v + rho s^2 = v - 0.5 in {0, 5e-7 (both floored), 4e-6 (not floored)}
    rng = np.random.default_rng(17)
    means, lw, _ = random_gm(rng, batch=(1, 2, 2), k=3, c=2)
    ls = np.zeros((1, 1, 1, 1, 1))
    m = rng.normal(size=(1, 2, 2, 2))
    var = np.full((1, 1, 1, 1), v)
    out = run64(
        lambda a, b, s, mm, vv: G.gm_mul_iso_gaussian(mkgm(a, b, s), mm, vv, 1.0, -0.5),
        means,
        lw,
        ls,
        m,
        var,
    )
    exp = _np_mul_clamped(means, lw, ls, m, var, -0.5)
    for a, b in zip(jax.tree.leaves(out), exp, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
    expected_n = max(v - 0.5, 1e-6)
    np.testing.assert_allclose(np.exp(2 * out.logstds), v / expected_n, rtol=1e-9)


# ------------------------------------------------------------------------------------------------
# §2.6 Gaussian x Gaussian (oracle 11)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p1,p2", [(1.0, 1.0), (1.0, -1.0), (0.5, 2.0)])
def test_iso_gaussian_product_adds_precisions_and_precision_weights_means(p1, p2):
    rng = np.random.default_rng(18)
    m1, m2 = rng.normal(size=(2, 2, 3, 3, 4))
    v1 = rng.uniform(0.2, 0.5, size=(2, 3, 3, 1))
    v2 = rng.uniform(1.0, 2.0, size=(2, 3, 3, 1))
    m, v = run64(
        lambda a, b, c, d: G.iso_gaussian_mul_iso_gaussian(a, b, c, d, p1, p2), m1, v1, m2, v2
    )
    np.testing.assert_allclose(1.0 / v, p1 / v1 + p2 / v2, rtol=1e-12)
    np.testing.assert_allclose(m / v, p1 * m1 / v1 + p2 * m2 / v2, rtol=1e-11, atol=1e-12)


def test_iso_gaussian_quotient_then_product_round_trips():
    rng = np.random.default_rng(19)
    m1, m2 = rng.normal(size=(2, 2, 3, 3, 4))
    v1 = rng.uniform(0.2, 0.5, size=(2, 1, 1, 1))
    v2 = rng.uniform(1.0, 2.0, size=(2, 1, 1, 1))

    def rt(a, b, c, d):
        q = G.iso_gaussian_mul_iso_gaussian(a, b, c, d, 1.0, -1.0)
        return G.iso_gaussian_mul_iso_gaussian(*q, c, d, 1.0, 1.0)

    m, v = run64(rt, m1, v1, m2, v2)
    np.testing.assert_allclose(m, m1, atol=1e-12)
    np.testing.assert_allclose(v, v1, rtol=1e-12)


@pytest.mark.parametrize("v1,v2", [(1e-3, 1e-3), (0.7, 0.2), (1e-3, 1e-3 + 2e-6)])
def test_iso_gaussian_quotient_normalizer_floor_is_absolute_1e6(v1, v2):
    # (p1, p2) = (1, -1): n = v2 - v1 in {0, -0.5 (both floored to +1e-6), 2e-6 (not floored)}
    m1, m2 = np.array([[0.3, -1.0]]), np.array([[0.1, 0.4]])
    va, vb = np.array([[v1]]), np.array([[v2]])
    m, v = run64(
        lambda a, b, c, d: G.iso_gaussian_mul_iso_gaussian(a, b, c, d, 1.0, -1.0), m1, va, m2, vb
    )
    n = max(v2 - v1, QUOTIENT_EPS)
    np.testing.assert_allclose(v, v1 * v2 / n, rtol=1e-9)
    np.testing.assert_allclose(m, (v2 * m1 - v1 * m2) / n, rtol=1e-9)


# ------------------------------------------------------------------------------------------------
# properties: jit / vmap / grad, dtypes, float64 recomputation, FD gradients, shape errors
# ------------------------------------------------------------------------------------------------

# module-level wrappers (stable identities, so jit caches are shared between tests)


def f_mean(a, b, s):
    return G.gm_mean(G.GM(a, b, s))


def f_iso(a, b, s):
    return G.gm_to_iso_gaussian(G.GM(a, b, s))


def f_full(a, b, s):
    return G.gm_to_gaussian(G.GM(a, b, s))


def f_logprob(a, b, s, y):
    return G.gm_logprob(G.GM(a, b, s), y)


def f_mul(a, b, s, mm, vv):
    return G.gm_mul_iso_gaussian(G.GM(a, b, s), mm, vv, 1.0, -0.5)


def f_quot(m1, v1, m2, v2):
    return G.iso_gaussian_mul_iso_gaussian(m1, v1, m2, v2, 1.0, -1.0)


def _case_args(name, rng):
    means, lw, ls = random_gm(rng, batch=(2, 2, 3), k=3, c=4)
    x = rng.normal(size=(2, 2, 3, 4))
    m = rng.normal(size=(2, 2, 3, 4))
    v = rng.uniform(0.5, 1.5, size=(2, 1, 1, 1))
    vpix = rng.uniform(0.5, 1.5, size=(2, 2, 3, 1))
    v2 = rng.uniform(2.0, 3.0, size=(2, 1, 1, 1))
    return {
        "gm_mean": (f_mean, (means, lw, ls)),
        "gm_to_iso_gaussian": (f_iso, (means, lw, ls)),
        "gm_to_gaussian": (f_full, (means, lw, ls)),
        "gm_logprob": (f_logprob, (means, lw, ls, x)),
        "iso_gaussian_logprob": (G.iso_gaussian_logprob, (m, vpix, x)),
        "gm_mul_iso_gaussian": (f_mul, (means, lw, ls, m, v)),
        "iso_gaussian_mul_iso_gaussian": (f_quot, (m, v, x, v2)),
    }[name]


CASE_NAMES = [
    "gm_mean",
    "gm_to_iso_gaussian",
    "gm_to_gaussian",
    "gm_logprob",
    "iso_gaussian_logprob",
    "gm_mul_iso_gaussian",
    "iso_gaussian_mul_iso_gaussian",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_jit_vmap_grad_bf16_and_float64_recomputation(name):
    rng = np.random.default_rng(0)
    fn, args = _case_args(name, rng)
    check_jit_vmap_grad_bf16_float64(fn, args, rng, vmap_scale=1.1)


def test_gradients_match_finite_differences_at_extreme_values():
    for logstd in (-12.0, 4.0):
        rng = np.random.default_rng(int(logstd) + 20)
        # the shapes of `_case_args`, so the float32 compilations are shared
        means, lw, ls = gm_with_negligible_component(rng, logstd, mean_scale=2.0)
        s = math.exp(logstd)
        # points within a few stds of the heaviest component, so the density is not flat zero
        heavy = np.take_along_axis(means, np.argmax(lw, axis=-2)[..., None], axis=-2)[..., 0, :]
        x = heavy + s * rng.normal(size=heavy.shape)
        m = rng.normal(size=x.shape)
        v = np.full((2, 1, 1, 1), 0.9)
        fd_check(f_mean, (means, lw, ls), rng)
        fd_check(f_iso, (means, lw, ls), rng)
        fd_check(f_full, (means, lw, ls), rng)
        # the log-density moves on the scale of the component std
        fd_check(f_logprob, (means, lw, ls, x), rng, [s, 1.0, 1.0, s])
        fd_check(f_mul, (means, lw, ls, m, v), rng)


def test_gaussian_product_and_log_density_gradients_match_finite_differences():
    rng = np.random.default_rng(30)
    m1, m2 = rng.normal(size=(2, 2, 2, 3, 4))
    v1 = np.full((2, 1, 1, 1), math.exp(-12.0))
    v2 = np.full((2, 1, 1, 1), math.exp(4.0))
    fd_check(f_quot, (m1, v1, m2, v2), rng)
    vpix = rng.uniform(1e-3, 10.0, size=(2, 2, 3, 1))
    fd_check(G.iso_gaussian_logprob, (m1, vpix, m2), rng, [1.0, 1e-4, 1.0])


def test_shape_mistakes_raise_value_errors_naming_the_argument():
    c = 4
    good, x = uniform_gm(k=3, c=c)
    means, lw, ls = good.means, good.logweights, good.logstds
    jit = lambda f: jax.jit(f)  # noqa: E731  (errors must appear at trace time)
    with pytest.raises(ValueError, match="gm must be a gmflow_jax.gm.GM"):
        jit(G.gm_mean)((means, lw, ls))
    with pytest.raises(ValueError, match=r"gm.logweights must have shape \(2, 3, 3, 3, 1\)"):
        jit(G.gm_mean)(G.GM(means, lw[..., :2, :], ls))
    with pytest.raises(ValueError, match="gm.logstds must have 5 dims with trailing"):
        jit(G.gm_to_iso_gaussian)(G.GM(means, lw, jnp.zeros((2, 1, 1, 1))))
    with pytest.raises(ValueError, match="gm.logstds must have 5 dims with trailing"):
        jit(G.gm_to_gaussian)(G.GM(means, lw, jnp.zeros((2, 1, 1, 1, c))))
    with pytest.raises(ValueError, match="does not broadcast"):
        jit(G.gm_sample)(jax.random.key(0), G.GM(means, lw, jnp.zeros((3, 1, 1, 1, 1))))
    with pytest.raises(ValueError, match=r"gm.means must have shape \[..., K, C\]"):
        jit(G.gm_mean)(G.GM(jnp.zeros((4,)), jnp.zeros((1,)), jnp.zeros((1,))))
    with pytest.raises(ValueError, match=r"x must have shape \[..., C\] = \[..., 4\]"):
        jit(G.gm_logprob)(good, x[..., :2])
    with pytest.raises(ValueError, match=r"x must have shape \[..., C\]"):
        jit(G.gm_logprob)(good, x[0])
    with pytest.raises(ValueError, match="gaussian variance must have shape"):
        jit(G.gm_mul_iso_gaussian)(good, x, jnp.ones((2, 1, 1, c)))
    with pytest.raises(ValueError, match=r"mean must have shape \[..., C\]"):
        jit(G.gm_mul_iso_gaussian)(good, x[..., :1], jnp.ones((2, 1, 1, 1)))
    with pytest.raises(ValueError, match="gaussian 2 variance must have shape"):
        jit(G.iso_gaussian_mul_iso_gaussian)(x, jnp.ones((2, 1, 1, 1)), x, jnp.ones((2, 1, 1)))
    with pytest.raises(ValueError, match="gaussian 1 variance .* does not broadcast"):
        jit(G.iso_gaussian_mul_iso_gaussian)(x, jnp.ones((3, 1, 1, 1)), x, jnp.ones((2, 1, 1, 1)))
    with pytest.raises(ValueError, match="gaussian variance must have shape"):
        jit(G.iso_gaussian_logprob)(x, jnp.ones((2, 3, 3)), x)


@pytest.mark.parametrize("k", [8, 64])
def test_axis_logsumexp_derivatives_are_the_float64_softmax(k):
    """Reverse and forward mode of the short-axis log-sum-exp against a float64 softmax oracle.

    Its derivative is a custom rule (the unrolled sum's own transpose is K padded buffers); with
    absent components (-inf) the softmax puts zero weight on them.
    """
    rng = np.random.default_rng(k)
    x = rng.normal(size=(5, 3, k)) * 4.0
    x[0, 0, : k // 2] = -np.inf
    softmax = np.exp(x - logsumexp(x, axis=-1, keepdims=True))
    cot = rng.normal(size=(5, 3))
    tangent = rng.normal(size=x.shape)
    tangent[np.isinf(x)] = 0.0
    x32 = jnp.asarray(x, jnp.float32)
    value, vjp = jax.vjp(lambda a: G.axis_logsumexp(a, -1), x32)
    np.testing.assert_allclose(np.asarray(value), logsumexp(x, axis=-1), rtol=1e-6)
    (grad,) = vjp(jnp.asarray(cot, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), cot[..., None] * softmax, atol=1e-6)
    _, jvp_out = jax.jvp(lambda a: G.axis_logsumexp(a, -1), (x32,), (jnp.asarray(tangent),))
    expected = np.sum(softmax * tangent, axis=-1)
    np.testing.assert_allclose(np.asarray(jvp_out), expected, atol=1e-5)
