"""Tests of `gmflow_jax.transport` against independent oracles (`docs/math.md` §2.9-2.11, §5.7, §9.21-25)."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf as np_erf

from gmflow_jax import transport as T
from gmflow_jax.gm import GM

inverse_cdf = jax.jit(T.gm1d_inverse_cdf, static_argnames="n_steps")
pdf_cdf = jax.jit(T.gm1d_pdf_cdf)
to_gm = jax.jit(T.gaussian_to_gm_samples)
to_gaussian = jax.jit(T.gm_samples_to_gaussian)
kr_rotation = jax.jit(T.kr_rotation)
hartley = jax.jit(T.hartley, static_argnames="axes")

MEANS_3 = np.array([-1.0, 0.5, 2.0])
LOGW_3 = np.log(np.full(3, 1.0 / 3.0))


def np_random_gm(seed: int, b: int, h: int, w: int, k: int, c: int):
    """A random GM (numpy float64) with moderate overlap, anisotropic and not axis-aligned."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(c, c)))
    scales = np.array([1.5, 1.0, 0.7, 0.5, 0.4][:c])
    means = (rng.normal(size=(b, h, w, k, c)) * scales) @ q.T
    logits = rng.normal(size=(b, h, w, k, 1))
    logweights = logits - np.log(np.sum(np.exp(logits), axis=-2, keepdims=True))
    logstds = np.log(rng.uniform(0.3, 0.8, size=(b, 1, 1, 1, 1)))
    return means, logweights, logstds


def to_jax_gm(np_gm, dtype) -> GM:
    """Convert numpy GM fields to a jnp GM of `dtype` (call inside `enable_x64` for float64)."""
    return GM(*(jnp.asarray(a, dtype) for a in np_gm))


def np_ancestral_samples(seed: int, np_gm, n: int):
    """Independent §2.8 sampler in numpy: n samples per pixel, [B, n, *P, C]."""
    means, logweights, logstds = np_gm
    rng = np.random.default_rng(seed)
    w = np.exp(logweights[..., 0])  # [B, *P, K]
    cum = np.cumsum(w / w.sum(-1, keepdims=True), axis=-1)
    r = rng.uniform(size=(means.shape[0], n) + means.shape[1:-2] + (1,))
    idx = np.minimum(np.sum(r > cum[:, None], axis=-1), means.shape[-2] - 1)  # [B, n, *P]
    m = np.broadcast_to(means[:, None], (means.shape[0], n) + means.shape[1:])
    chosen = np.take_along_axis(m, idx[..., None, None], axis=-2)[..., 0, :]
    return chosen + np.exp(logstds[:, None, ..., 0, :]) * rng.normal(size=chosen.shape)


def np_moment_match(means, logweights, logstds):
    """Independent float64 §2.3: per-pixel mean [..., C] and covariance [..., C, C]."""
    w = np.exp(logweights)
    m = np.sum(w * means, axis=-2)
    d = means - m[..., None, :]
    cov = np.einsum("...kc,...kd->...cd", w * d, d)
    s2 = np.exp(2.0 * logstds[..., 0, :])[..., None]
    return m, cov + s2 * np.eye(means.shape[-1])


def np_newton(means, logweights, s, u, z, n_steps):
    """Independent float64 numpy re-implementation of the clamped Newton iteration of §2.9."""
    w = np.exp(logweights)
    m = np.sum(w * means)
    v = np.sum(w * (means - m) ** 2) + s * s
    y = m + np.sqrt(v) * z
    for _ in range(n_steps):
        d = (y[:, None] - means) / s
        pdf = np.sum(w * np.exp(-0.5 * d * d) / s, axis=-1) / np.sqrt(2.0 * np.pi)
        cdf = np.sum(w * np_erf(d / np.sqrt(2.0)), axis=-1)
        y = y - np.clip((cdf - u) / (2.0 * np.maximum(pdf, 1e-6)), -1.5 * s, 1.5 * s)
    return y


# ------------------------------------------------------------------------------------------------
# §2.9 1-D pdf / CDF / inverse CDF (oracle 21)
# ------------------------------------------------------------------------------------------------


def test_pdf_integrates_to_one_and_scaled_cdf_matches_quadrature():
    rng = np.random.default_rng(0)
    means = rng.normal(size=5) * 2.0
    logits = rng.normal(size=5)
    logweights = logits - np.log(np.sum(np.exp(logits)))
    grid = np.linspace(-20.0, 20.0, 400_001)
    with jax.enable_x64(True):
        pdf, cdf = pdf_cdf(jnp.asarray(means), jnp.asarray(logweights), math.log(0.4), grid)
        pdf, cdf = np.asarray(pdf), np.asarray(cdf)
    dx = grid[1] - grid[0]
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * dx)])
    assert abs(cum[-1] - 1.0) < 1e-9
    np.testing.assert_allclose(cdf, 2.0 * cum - 1.0, atol=1e-9)
    # The pdf itself against the textbook mixture density.
    ref = np.sum(
        np.exp(logweights) * np.exp(-0.5 * ((grid[::997, None] - means) / 0.4) ** 2),
        axis=-1,
    ) / (0.4 * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(pdf[::997], ref, rtol=1e-12, atol=1e-300)


def test_pdf_cdf_broadcasts_logstd_and_stays_finite_for_tiny_std():
    y = jnp.array([[-1.0, 0.5, 3.0]])
    pdf, cdf = pdf_cdf(jnp.asarray(MEANS_3), jnp.asarray(LOGW_3), jnp.array([[-30.0]]), y)
    assert pdf.shape == cdf.shape == (1, 3)
    assert bool(jnp.all(jnp.isfinite(pdf))) and bool(jnp.all(jnp.isfinite(cdf)))
    np.testing.assert_allclose(np.asarray(cdf), [[-2.0 / 3.0, 0.0, 1.0]], atol=1e-6)
    # At a mean the density is w / (s sqrt(2 pi)) with s = exp(-30).
    assert float(pdf[0, 0]) == pytest.approx(
        math.exp(30.0) / 3.0 / math.sqrt(2 * math.pi), rel=1e-5
    )


@pytest.mark.parametrize("use_z_init", [False, True])
def test_inverse_cdf_converges_for_moderate_overlap(use_z_init):
    """Oracle 21: |F(y) - u| < 1e-6 for s in {1, 0.5, 0.3}, z in [-4, 4], equal weights."""
    stds = np.array([1.0, 0.5, 0.3])
    z = np.linspace(-4.0, 4.0, 161)
    u = np_erf(z / np.sqrt(2.0))
    y = inverse_cdf(
        jnp.asarray(np.broadcast_to(MEANS_3, (3, 1, 3)), jnp.float32),
        jnp.asarray(LOGW_3, jnp.float32),
        jnp.asarray(np.log(stds)[:, None], jnp.float32),
        jnp.asarray(u[None], jnp.float32),
        z_init=jnp.asarray(z, jnp.float32) if use_z_init else None,
    )
    assert y.shape == (3, 161) and y.dtype == jnp.float32
    d = (np.asarray(y, np.float64)[..., None] - MEANS_3) / stds[:, None, None]
    residual = np.sum(np.exp(LOGW_3) * np_erf(d / np.sqrt(2.0)), axis=-1) - u
    assert np.max(np.abs(residual)) < 1e-6


def _newton_scalar(means, s, u, y):
    """One clamped Newton step for an equal-weight 1-D GM, with scalar math-module arithmetic."""
    w = 1.0 / len(means)
    pdf = sum(w * math.exp(-0.5 * ((y - m) / s) ** 2) for m in means) / (s * math.sqrt(2 * math.pi))
    cdf = sum(w * math.erf((y - m) / s / math.sqrt(2.0)) for m in means)
    delta = (cdf - u) / (2.0 * max(pdf, 1e-6))
    return y - min(max(delta, -1.5 * s), 1.5 * s)


def test_inverse_cdf_one_and_two_steps_match_hand_computed_iterates():
    """The clamped iteration itself: init, step cap, pdf floor, unclamped Newton step.

    All cases run as one batch, padded to K = 3 with zero-weight (log-weight -inf) components.
    """
    u_plain = math.erf(1.0 / math.sqrt(2.0))
    cases = [
        # (means, s, u, z_init, exact [y0, y1, y2] where known by hand)
        ((-5.0, 5.0), 0.3, 0.2, 0.0, [0.0, 0.45, 0.9]),  # pdf ~ 1e-61: floor, then 1.5 s cap
        ((-5.0, 5.0), 0.3, 5e-7, 0.0, [0.0, 0.25, 0.5]),  # floor active, cap not: delta = -0.25
        # K = 1, s = 1: y1 = erf(1 / sqrt 2) / (2 phi(0)) = 0.8556, below the cap 1.5.
        ((0.0,), 1.0, u_plain, 0.0, [0.0, u_plain * math.sqrt(2.0 * math.pi) / 2.0, None]),
        ((-1.0, 0.5, 2.0), 0.5, -0.3, 0.7, [None, None, None]),  # generic
    ]
    means = np.zeros((len(cases), 3))
    logweights = np.full((len(cases), 3), -np.inf)
    for i, (mu, *_) in enumerate(cases):
        means[i, : len(mu)] = mu
        logweights[i, : len(mu)] = -math.log(len(mu))
    logstd = np.log([case[1] for case in cases])
    u = np.array([case[2] for case in cases])
    z0 = np.array([case[3] for case in cases])
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a) for a in (means, logweights, logstd, u))
        got = np.stack(
            [np.asarray(inverse_cdf(*args, z_init=jnp.asarray(z0), n_steps=n)) for n in (0, 1, 2)],
            axis=-1,
        )
    for i, (mu, s, u_i, z_i, exact) in enumerate(cases):
        k = len(mu)
        m = sum(mu) / k
        init = m + math.sqrt(sum((x - m) ** 2 for x in mu) / k + s * s) * z_i
        step1 = _newton_scalar(mu, s, u_i, init)
        step2 = _newton_scalar(mu, s, u_i, step1)
        np.testing.assert_allclose(got[i], [init, step1, step2], rtol=1e-12, atol=1e-14)
        for expected, value in zip(exact, got[i], strict=True):
            if expected is not None:
                assert value == pytest.approx(expected, abs=1e-14)


def test_inverse_cdf_without_z_init_uses_clipped_erfinv():
    """z from sqrt(2) erfinv(clip(u, +-(1 - 1e-6))): for u = +-1 the init equals z = +-4.8916."""
    z_clip = math.sqrt(2.0) * 3.458910737275499  # erfinv(1 - 1e-6)
    with jax.enable_x64(True):
        y0 = inverse_cdf(
            jnp.zeros(1), jnp.zeros(1), math.log(2.0), jnp.array([-1.0, 1.0, 0.5]), n_steps=0
        )
    np.testing.assert_allclose(
        np.asarray(y0),
        [-2.0 * z_clip, 2.0 * z_clip, 2.0 * math.sqrt(2.0) * 0.4769362762044699],
        rtol=1e-9,
    )


def test_inverse_cdf_16_steps_at_s_0p1_matches_float64_reimplementation():
    """Well-separated modes: no convergence is asserted, only the exact clamped iterate."""
    z = np.linspace(-4.0, 4.0, 81)
    u = np_erf(z / np.sqrt(2.0))
    ref = np_newton(MEANS_3, LOGW_3, 0.1, u, z, 16)
    with jax.enable_x64(True):
        y64 = np.asarray(
            inverse_cdf(jnp.asarray(MEANS_3), jnp.asarray(LOGW_3), math.log(0.1), jnp.asarray(u))
        )
    np.testing.assert_allclose(y64, ref, atol=1e-10)
    y32 = inverse_cdf(
        jnp.asarray(MEANS_3, jnp.float32),
        jnp.asarray(LOGW_3, jnp.float32),
        jnp.float32(math.log(0.1)),
        jnp.asarray(u, jnp.float32),
    )
    np.testing.assert_allclose(np.asarray(y32), ref, atol=5e-4)
    # The iterate is genuinely unconverged somewhere (so this test is not a convergence test).
    d = (ref[:, None] - MEANS_3) / 0.1
    assert np.max(np.abs(np.sum(np.exp(LOGW_3) * np_erf(d / np.sqrt(2.0)), -1) - u)) > 1e-4


def np_bisection_inverse_cdf(means, weights, s, u, iters=200):
    """Brute-force float64 inverse of the scaled CDF: bisection on [-100, 100], points on axis 0.

    means, weights: [N, K]; s: scalar or [N]; u: [N]. Independent of any bracket or start choice.
    """
    lo, hi = np.full(u.shape, -100.0), np.full(u.shape, 100.0)
    s = np.broadcast_to(s, u.shape)[:, None]
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        f = np.sum(weights * np_erf((mid[:, None] - means) / s / np.sqrt(2.0)), axis=-1) - u
        lo, hi = np.where(f < 0, mid, lo), np.where(f < 0, hi, mid)
    return 0.5 * (lo + hi)


def _separated_and_moderate_1d_gms():
    """1-D GMs [N, K=3] x z in [-4, 4]: oracle 21's moderate cases and the well-separated s <= 0.15.

    Equal and unequal weights; returns (means, logweights, s, z), each with N = 6 * 3 * 81 rows.
    """
    z = np.linspace(-4.0, 4.0, 81)
    rows = []
    for s in (1.0, 0.5, 0.3, 0.15, 0.1, 0.05):
        for lw in (LOGW_3, np.log([0.7, 0.2, 0.1]), np.log([0.01, 0.01, 0.98])):
            for zi in z:
                rows.append((MEANS_3, lw, s, zi))
    means, logweights, s, z = (np.array(col) for col in zip(*rows, strict=True))
    return means, logweights, s, z


def test_bracketed_inverse_cdf_matches_float64_bisection_and_beats_16_newton_steps():
    """The KR solver (bracketed Halley, `KR_SOLVER_STEPS`) against a brute-force float64 bisection.

    Where the reference's 16 clamped Newton steps converge (oracle 21, s >= 0.3) it reaches the same
    root: to 1e-9 in float64, and in float32 to the float32 resolution of F (|F(y) - u| < 2e-6, y
    within 1e-4 where the density is not tiny). For well-separated modes (s <= 0.15), where neither
    converges in a fixed count, its worst error is below the 16 Newton steps' worst error.
    """
    means, logweights, s, z = _separated_and_moderate_1d_gms()
    u = np_erf(z / np.sqrt(2.0))
    ref = np_bisection_inverse_cdf(means, np.exp(logweights), s, u)
    solve = jax.jit(T.gm1d_inverse_cdf_bracketed)
    with jax.enable_x64(True):
        y64 = np.asarray(solve(*(jnp.asarray(a) for a in (means, logweights, np.log(s), z))))
    moderate = s >= 0.3
    np.testing.assert_allclose(y64[moderate], ref[moderate], atol=1e-9)
    newton = np.array(
        [
            np_newton(means[i], logweights[i], s[i], u[i : i + 1], z[i : i + 1], 16)[0]
            for i in range(len(z))
        ]
    )
    for std in (0.15, 0.1, 0.05):
        rows = s == std
        newton_err = np.max(np.abs(newton - ref)[rows])
        assert newton_err > 1e-5, std  # the case is genuinely hard for the reference iteration
        assert np.max(np.abs(y64 - ref)[rows]) < newton_err, std
    y32 = solve(*(jnp.asarray(a, jnp.float32) for a in (means, logweights, np.log(s), z)))
    assert y32.dtype == jnp.float32
    y32 = np.asarray(y32, np.float64)[moderate]
    m, lw, sd, u_m = means[moderate], logweights[moderate], s[moderate, None], u[moderate]
    d = (y32[:, None] - m) / sd
    residual = np.sum(np.exp(lw) * np_erf(d / np.sqrt(2.0)), axis=-1) - u_m
    assert np.max(np.abs(residual)) < 2e-6
    pdf = np.sum(np.exp(lw) * np.exp(-0.5 * d * d), axis=-1) / sd[:, 0] / np.sqrt(2.0 * np.pi)
    dense = pdf > 1e-2  # z spans [-4, 4] uniformly: a third of the points lie in the tails
    assert dense.mean() > 0.6
    assert np.max(np.abs(y32 - ref[moderate])[dense]) < 1e-4


def test_bracketed_inverse_cdf_is_exact_for_one_component_and_uses_the_bracket():
    """K = 1: the bracket is the point mu + s z (no iteration needed). 0 steps: the clipped proxy."""
    z = np.array([-3.0, -0.5, 0.0, 2.0])
    with jax.enable_x64(True):
        y = T.gm1d_inverse_cdf_bracketed(
            jnp.full((4, 1), 0.7), jnp.zeros((4, 1)), math.log(0.3), jnp.asarray(z)
        )
        np.testing.assert_allclose(np.asarray(y), 0.7 + 0.3 * z, rtol=0, atol=1e-15)
        # Two modes far apart: the proxy m + sqrt(v) z (v = 25 + s^2) lies outside the bracket
        # [min mu + s z, max mu + s z] = [-5 + z, 5 + z] for z = 3, and is clipped to its end.
        y0 = T.gm1d_inverse_cdf_bracketed(
            jnp.array([-5.0, 5.0]), jnp.log(jnp.array([0.5, 0.5])), 0.0, jnp.array(3.0), n_steps=0
        )
        assert float(y0) == pytest.approx(8.0, abs=1e-12)


def np_kr_bisection(means, logweights, logstds, v, z):
    """Float64 brute-force Gaussian -> GM KR map (§2.10) with bisection per rotated axis.

    means [B, *P, K, C], logweights [B, *P, K, 1], logstds [B, 1.., 1], v [B, C, C], z [B, n, *P, C].
    """
    b, n = z.shape[:2]
    c = means.shape[-1]
    means_rot = np.einsum("b...kc,bca->b...ka", means, v)[:, None]  # [B, 1, *P, K, C]
    means_rot = np.broadcast_to(means_rot, (b, n) + means_rot.shape[2:])
    lw = np.broadcast_to(logweights[:, None, ..., 0], means_rot.shape[:-1])
    s = np.broadcast_to(np.exp(logstds[:, None, ..., 0, 0]), z.shape[:-1])
    flat = lambda a: a.reshape(-1, *a.shape[z.ndim - 1 :])  # noqa: E731
    m_f, lw_f, s_f = flat(means_rot), flat(lw), s.reshape(-1)
    z_f = z.reshape(-1, c)
    y = np.zeros_like(z_f)
    sq = np.zeros_like(lw_f)
    for a in range(c):
        logits = lw_f - 0.5 * sq
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        y[:, a] = np_bisection_inverse_cdf(m_f[..., a], w, s_f, np_erf(z_f[:, a] / np.sqrt(2.0)))
        sq += ((y[:, a : a + 1] - m_f[..., a]) / s_f[:, None]) ** 2
    return np.einsum("bcd,b...d->b...c", v, y.reshape(z.shape))


def test_gaussian_to_gm_matches_float64_brute_force_kr_and_the_16_step_newton_map():
    """The fast KR map against the float64 bisection KR oracle and the reference 16-step iteration.

    A GM like the benchmark's latent GMs (K = 8, C = 4, unit-scale means, s in [0.37, 1]), where the
    reference's 16 clamped Newton steps converge: both maps agree with the oracle (float32 noise,
    amplified by 1 / pdf in the tails), so the faster solver keeps the reference's samples.
    """
    rng = np.random.default_rng(5)
    b, h, w, k, c, n = 2, 3, 3, 8, 4, 40
    means = rng.normal(size=(b, h, w, k, c))
    logits = rng.normal(size=(b, h, w, k, 1))
    logweights = logits - np.log(np.sum(np.exp(logits), axis=-2, keepdims=True))
    logstds = rng.uniform(-1.0, 0.0, size=(b, 1, 1, 1, 1))
    z = rng.normal(size=(b, n, h, w, c))
    gm = to_jax_gm((means, logweights, logstds), jnp.float32)
    v = kr_rotation(gm)
    ref = np_kr_bisection(means, logweights, logstds, np.asarray(v, np.float64), z)
    fast = np.asarray(to_gm(gm, jnp.asarray(z, jnp.float32), v), np.float64)
    newton = np.asarray(jax.jit(_kr_with_newton)(gm, jnp.asarray(z, jnp.float32), v), np.float64)
    for got in (fast, newton):
        err = np.max(np.abs(got - ref), axis=-1)
        assert np.quantile(err, 0.99) < 2e-5 and np.max(err) < 1e-2
    err = np.max(np.abs(fast - newton), axis=-1)
    assert np.quantile(err, 0.99) < 2e-5 and np.max(err) < 1e-2


def _latent_like_np_gm(seed: int, b: int, h: int, w: int, k: int = 8, c: int = 4):
    """A GM like the benchmark's latent GMs: unit-normal means, random weights, s in [0.37, 1]."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(b, h, w, k, c))
    logits = rng.normal(size=(b, h, w, k, 1))
    logweights = logits - np.log(np.sum(np.exp(logits), axis=-2, keepdims=True))
    logstds = rng.uniform(-1.0, 0.0, size=(b, 1, 1, 1, 1))
    return means, logweights, logstds


def test_gaussian_to_gm_with_per_pixel_stds_matches_float64_brute_force_kr():
    """logstds [B, H, W, 1, 1] (one std per pixel, which `check_gm` allows) against the oracle."""
    rng = np.random.default_rng(8)
    means, logweights, _ = _latent_like_np_gm(8, 2, 3, 3)
    logstds = rng.uniform(-1.0, 0.0, size=(2, 3, 3, 1, 1))
    z = rng.normal(size=(2, 10, 3, 3, 4))
    gm = to_jax_gm((means, logweights, logstds), jnp.float32)
    v = kr_rotation(gm)
    ref = np_kr_bisection(means, logweights, logstds, np.asarray(v, np.float64), z)
    got = np.asarray(to_gm(gm, jnp.asarray(z, jnp.float32), v), np.float64)
    err = np.max(np.abs(got - ref), axis=-1)
    assert np.quantile(err, 0.99) < 2e-5 and np.max(err) < 1e-2
    # The oracle has power: one shared std (the pixel mean) gives other samples.
    shared = np.broadcast_to(
        np.log(np.exp(logstds).mean(axis=(1, 2), keepdims=True)), (2, 1, 1, 1, 1)
    )
    ref_shared = np_kr_bisection(means, logweights, shared, np.asarray(v, np.float64), z)
    assert np.max(np.abs(ref_shared - ref)) > 1e-2


def test_gaussian_to_gm_in_sample_blocks_matches_one_block_and_float64_brute_force_kr(monkeypatch):
    """The batch visited in blocks (`KR_BLOCK_BYTES`) gives the samples and V of one block."""
    means, logweights, logstds = _latent_like_np_gm(9, 4, 3, 3)
    z = np.random.default_rng(9).normal(size=(4, 3, 3, 4))
    gm = to_jax_gm((means, logweights, logstds), jnp.float32)
    z32 = jnp.asarray(z, jnp.float32)
    one_block = np.asarray(jax.jit(T.gaussian_to_gm_samples)(gm, z32), np.float64)
    v_one_block = np.asarray(jax.jit(T.kr_rotation)(gm))
    # Room for two of the four samples: 2 blocks in both functions (per-sample bytes as counted
    # there for P = 9 pixels, K = 8, C = 4, n = 1).
    monkeypatch.setattr(T, "KR_BLOCK_BYTES", 2 * 4 * (9 * 32 + 4 * 9 * 8))
    assert T._sample_blocks(4, 4 * (9 * 32 + 4 * 9 * 8)) == 2
    assert T._sample_blocks(4, 2 * 4 * 9 * 32) == 2
    blocks = np.asarray(jax.jit(T.gaussian_to_gm_samples)(gm, z32), np.float64)
    v_blocks = np.asarray(jax.jit(T.kr_rotation)(gm))
    np.testing.assert_allclose(v_blocks, v_one_block, atol=1e-6)
    err = np.max(np.abs(blocks - one_block), axis=-1)
    assert np.quantile(err, 0.99) < 1e-5 and np.max(err) < 1e-3
    ref = np_kr_bisection(means, logweights, logstds, v_blocks.astype(np.float64), z[:, None])
    err = np.max(np.abs(blocks - ref[:, 0]), axis=-1)
    assert np.quantile(err, 0.99) < 2e-5 and np.max(err) < 1e-2


def test_gaussian_to_gm_traces_once_per_shape():
    means, logweights, logstds = _latent_like_np_gm(10, 2, 2, 2)
    gm = to_jax_gm((means, logweights, logstds), jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(gm, z):
        return T.gaussian_to_gm_samples(gm, z)

    for i in range(3):
        z = jax.random.normal(jax.random.PRNGKey(i), (2, 2, 2, 4))
        jax.block_until_ready(run(gm, z))


def _kr_with_newton(gm, z, v):
    """The reference KR map: sequential slice GMs solved by `gm1d_inverse_cdf` (16 Newton steps)."""
    means_rot = jnp.einsum("b...kc,bca->b...ka", gm.means, v)[:, None]  # [B, 1, *P, K, C]
    lw = gm.logweights[:, None, ..., 0]
    logstd = gm.logstds[:, None, ..., 0, 0]
    ys, sq = [], 0.0
    for a in range(z.shape[-1]):
        y = T.gm1d_inverse_cdf(
            means_rot[..., a],
            jax.nn.log_softmax(lw - 0.5 * sq, axis=-1),
            logstd,
            jax.lax.erf(z[..., a] / math.sqrt(2.0)),
            z_init=z[..., a],
        )
        sq = sq + ((y[..., None] - means_rot[..., a]) / jnp.exp(logstd)[..., None]) ** 2
        ys.append(y)
    return jnp.einsum("bcd,b...d->b...c", v, jnp.stack(ys, -1))


# ------------------------------------------------------------------------------------------------
# §2.10 Knothe-Rosenblatt transport (oracles 22-24)
# ------------------------------------------------------------------------------------------------


def test_kr_rotation_diagonalizes_mean_covariance_in_descending_order():
    np_gm = np_random_gm(1, 2, 3, 4, 5, 4)
    v = np.asarray(kr_rotation(to_jax_gm(np_gm, jnp.float32)), np.float64)
    assert v.shape == (2, 4, 4)
    _, cov = np_moment_match(*np_gm)
    cov = cov.mean(axis=(1, 2))
    np.testing.assert_allclose(
        np.swapaxes(v, -1, -2) @ v, np.broadcast_to(np.eye(4), v.shape), atol=1e-5
    )
    rotated = np.swapaxes(v, -1, -2) @ cov @ v
    eig = np.linalg.eigvalsh(cov)[:, ::-1]
    np.testing.assert_allclose(np.diagonal(rotated, axis1=-2, axis2=-1), eig, rtol=1e-5)
    off = rotated - np.eye(4) * np.diagonal(rotated, axis1=-2, axis2=-1)[..., None]
    assert np.max(np.abs(off)) < 1e-5 * np.max(eig)
    assert np.all(np.diff(eig, axis=-1) < 0)


def test_k1_gaussian_to_gm_is_exactly_affine_and_inverted():
    """Oracle 22: with K = 1 the KR map is x = mu + s V z (and GM -> Gaussian undoes it).

    A K = 1 GM is isotropic, so any orthogonal V is valid; a random non-symmetric one is used (the
    kr_rotation of an isotropic covariance is a symmetric permutation, blind to V vs V^T).
    """
    np_gm = np_random_gm(2, 2, 3, 4, 1, 4)
    gm = to_jax_gm(np_gm, jnp.float32)
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(2, 3, 4, 4)), jnp.float32)
    v = jnp.asarray(np.linalg.qr(rng.normal(size=(2, 4, 4)))[0], jnp.float32)
    assert np.max(np.abs(np.asarray(v) - np.swapaxes(np.asarray(v), -1, -2))) > 0.1
    x = to_gm(gm, z, v)
    s = np.exp(np_gm[2][:, :, :, 0])  # [B, 1, 1, 1]
    expected = np_gm[0][..., 0, :] + s * np.einsum(
        "bcd,bhwd->bhwc", np.asarray(v, np.float64), np.asarray(z, np.float64)
    )
    np.testing.assert_allclose(np.asarray(x, np.float64), expected, atol=2e-6)
    np.testing.assert_allclose(np.asarray(to_gaussian(gm, x, v)), np.asarray(z), atol=2e-5)


def np_padded_gm(seed: int, ks: tuple[int, ...], k_max: int, h: int, w: int, c: int):
    """A batch of GMs, item b with ks[b] components, padded to k_max with zero-weight components."""
    means = np.zeros((len(ks), h, w, k_max, c))
    logweights = np.full((len(ks), h, w, k_max, 1), -np.inf)
    logstds = np.zeros((len(ks), 1, 1, 1, 1))
    for b, k in enumerate(ks):
        m, lw, ls = np_random_gm(seed + b, 1, h, w, k, c)
        means[b, :, :, :k], logweights[b, :, :, :k], logstds[b] = m[0], lw[0], ls[0]
    return means, logweights, logstds


@pytest.mark.parametrize("c", [2, 4])
def test_round_trips_recover_samples_and_noise_float64(c):
    """Oracle 23, same V both ways, float64: GM -> N -> GM and N -> GM -> N for K in {1, 8, 64}.

    The three K values are the three batch items (K = 1 and 8 padded to 64 with zero-weight
    components, which leaves the distribution unchanged) so that one compilation serves all.
    """
    ks = (1, 8, 64)
    np_gm = np_padded_gm(10 * c, ks, 64, 4, 4, c)
    with jax.enable_x64(True):
        gm = to_jax_gm(np_gm, jnp.float64)
        v = kr_rotation(gm)
        x = jnp.asarray(np_ancestral_samples(c, np_gm, 3))  # [B, 3, H, W, C]
        z = jnp.asarray(np.clip(np.random.default_rng(3).normal(size=x.shape), -4, 4))
        z_of_x = to_gaussian(gm, x, v)
        x_back = np.asarray(to_gm(gm, z_of_x, v))
        z_back = np.asarray(to_gaussian(gm, to_gm(gm, z, v), v))
        x, z, z_of_x = np.asarray(x), np.asarray(z), np.asarray(z_of_x)
    unclipped = np.all(np.abs(z_of_x) < 4.5, axis=-1)  # the erfinv clip is at |z| = 4.89
    assert unclipped.mean() > 0.95
    for b, k in enumerate(ks):
        assert np.max(np.abs(x_back[b] - x[b])[unclipped[b]]) < 1e-8, f"K={k}"
        assert np.max(np.abs(z_back[b] - z[b])) < 1e-8, f"K={k}"


@pytest.fixture(scope="module")
def kr_float32():
    """One float32 GM (K = 8, C = 4, 2 x 2 pixels) pushed through both KR directions, n per pixel."""
    n = 20_000
    np_gm = np_random_gm(3, 2, 2, 2, 8, 4)
    gm = to_jax_gm(np_gm, jnp.float32)
    v = kr_rotation(gm)
    z = jnp.asarray(np.random.default_rng(11).normal(size=(2, n, 2, 2, 4)), jnp.float32)
    x = jnp.asarray(np_ancestral_samples(12, np_gm, n), jnp.float32)  # [B, n, H, W, C]
    x_of_z = to_gm(gm, z, v)
    z_of_x = to_gaussian(gm, x, v)
    out = dict(np_gm=np_gm, gm=gm, v=v, z=z, x=x, x_of_z=x_of_z, z_of_x=z_of_x)
    out["z_back"] = to_gaussian(gm, x_of_z, v)
    out["x_back"] = to_gm(gm, z_of_x, v)
    return {k: a if k in ("np_gm", "gm") else np.asarray(a, np.float64) for k, a in out.items()}


def test_round_trips_float32(kr_float32):
    """Float32 round trips: z to 1e-4 (|z| < 3), x to 1e-4 except where the map is ill-conditioned.

    float32 erf resolves z only to ~1e-4 near |z| = 4, and x = F^-1(u) amplifies a float32 error
    in F by 1 / (2 pdf), which is large where a slice GM has little mass (tails, gaps between
    modes): there x agrees only to ~1e-3 (float64 agrees to 1e-8, see the test above).
    """
    r = kr_float32
    unclipped = np.all(np.abs(r["z_of_x"]) < 4.5, axis=-1)
    assert unclipped.mean() > 0.999
    x_err = np.max(np.abs(r["x_back"] - r["x"]), axis=-1)[unclipped]
    assert np.quantile(x_err, 0.999) < 1e-4
    assert np.max(x_err) < 1e-2
    inner = np.all(np.abs(r["z"]) < 3.0, axis=-1)
    assert np.max(np.abs(r["z_back"] - r["z"])[inner]) < 1e-4


def test_default_rotation_is_kr_rotation(kr_float32):
    r = kr_float32
    z_default = np.asarray(to_gaussian(r["gm"], jnp.asarray(r["x"][:, :256], jnp.float32)))
    inner = np.abs(r["z_of_x"][:, :256]) < 3.0  # V computed in another kernel: rounding only
    np.testing.assert_allclose(z_default[inner], r["z_of_x"][:, :256][inner], atol=1e-5)


def _assert_moments(samples, mean_ref, cov_ref):
    """Per-pixel MC mean/covariance over axis 1 within 5 standard errors (from the sample itself)."""
    n = samples.shape[1]
    mean = samples.mean(axis=1)
    centered = samples - mean[:, None]
    prods = centered[..., :, None] * centered[..., None, :]
    cov = prods.mean(axis=1)
    mean_se = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1) / n)
    cov_se = prods.std(axis=1) / np.sqrt(n)
    assert np.all(np.abs(mean - mean_ref) < 5.0 * mean_se)
    assert np.all(np.abs(cov - cov_ref) < 5.0 * cov_se)


def test_gaussian_to_gm_matches_gm_moments_monte_carlo(kr_float32):
    """Oracle 24: iid N(0, 1) drivers give per-pixel samples with the §2.3 mean and covariance."""
    r = kr_float32
    mean_ref, cov_ref = np_moment_match(*r["np_gm"])  # [B, H, W, C], [B, H, W, C, C]
    _assert_moments(r["x_of_z"], mean_ref, cov_ref)
    # The oracle has power: the covariance is far from the isotropic part s^2 I.
    s2 = np.exp(2 * r["np_gm"][2][:, 0, 0])[..., None]
    assert np.max(np.abs(cov_ref - np.eye(4) * s2)) > 0.3


def test_gm_to_gaussian_whitens_ancestral_samples_monte_carlo(kr_float32):
    """GM -> Gaussian of ancestral GM samples (§2.8) is N(0, I) per pixel."""
    r = kr_float32
    c = r["z_of_x"].shape[-1]
    _assert_moments(r["z_of_x"], np.zeros(c), np.eye(c))


def test_vmap_over_a_stack_of_gms_matches_the_batched_call(kr_float32):
    r = kr_float32
    stacked = jax.tree_util.tree_map(lambda a: a[:, None], r["gm"])  # [2, 1, H, W, K, C]
    z = jnp.asarray(r["z"][:, None, :256], jnp.float32)  # [2, 1, 256, H, W, C]
    out = jax.jit(jax.vmap(T.gaussian_to_gm_samples))(stacked, z)
    # Equal up to float32 rounding (amplified where the slice density is small, see above).
    err = np.abs(np.asarray(out[:, 0]) - r["x_of_z"][:, :256])
    assert np.quantile(err, 0.99) < 1e-5 and np.max(err) < 1e-3


# ------------------------------------------------------------------------------------------------
# §2.11 Hartley transform and §5.7 spectral sampling (oracle 25)
# ------------------------------------------------------------------------------------------------


def np_hartley_half_spectrum(s):
    """Reference construction (§2.11): half-spectrum X_k = ((S_k + S_-k) + i (S_k - S_-k)) / 2, irfft2."""
    h, w = s.shape[-2:]
    s_neg = np.roll(np.flip(s, axis=(-2, -1)), shift=(1, 1), axis=(-2, -1))  # S_{-k mod (H, W)}
    x = 0.5 * ((s + s_neg) + 1j * (s - s_neg))
    return np.fft.irfft2(x[..., : w // 2 + 1], s=(h, w), norm="ortho")


def test_hartley_is_orthogonal_symmetric_and_self_inverse():
    h, w = 6, 5
    with jax.enable_x64(True):
        basis = jnp.eye(h * w).reshape(h * w, h, w, 1)
        m = np.asarray(hartley(basis)).reshape(h * w, h * w)
    np.testing.assert_allclose(m @ m.T, np.eye(h * w), atol=1e-13)
    np.testing.assert_allclose(m @ m, np.eye(h * w), atol=1e-13)
    np.testing.assert_allclose(m, m.T, atol=1e-13)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 6, 3)), jnp.float32)
    zz = hartley(hartley(z))
    assert zz.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(zz), np.asarray(z), atol=2e-6)


def test_hartley_equals_half_spectrum_irfft2_construction():
    rng = np.random.default_rng(4)
    for shape in [(2, 8, 8, 3), (1, 7, 6, 2)]:
        s = rng.normal(size=shape)
        expected = np.moveaxis(np_hartley_half_spectrum(np.moveaxis(s, -1, 1)), 1, -1)
        with jax.enable_x64(True):
            got = np.asarray(hartley(jnp.asarray(s)))
        np.testing.assert_allclose(got, expected, atol=1e-13)
    # Other axes: a channel-first [B, C, H, W] field.
    with jax.enable_x64(True):
        got = np.asarray(hartley(jnp.asarray(np.moveaxis(s, -1, 1)), axes=(-2, -1)))
    np.testing.assert_allclose(got, np_hartley_half_spectrum(np.moveaxis(s, -1, 1)), atol=1e-13)


def test_hartley_of_white_noise_is_white_noise_monte_carlo():
    n = 20_000
    s = jnp.asarray(np.random.default_rng(1).normal(size=(n, 4, 4, 1)), jnp.float32)
    y = np.asarray(hartley(s), np.float64)
    y = y.reshape(n, 16)
    cov = y.T @ y / n
    # Entries of a Wishart(I)/n matrix: se 1/sqrt(n) off-diagonal, sqrt(2/n) on the diagonal.
    assert np.max(np.abs(np.diagonal(cov) - 1.0)) < 5.0 * np.sqrt(2.0 / n)
    assert np.max(np.abs(cov - np.diag(np.diagonal(cov)))) < 5.0 / np.sqrt(n)
    assert np.max(np.abs(y.mean(axis=0))) < 5.0 / np.sqrt(n)


spectral_sample = jax.jit(T.spectral_gm_sample, static_argnames="n_samples")


def test_spectral_sampler_whitens_to_the_log_spectrum_monte_carlo():
    """With K = 1: x = mu + s V z, so hartley(V^T (x - mu) / s) = S exp(psi / 2) per frequency."""
    b, h, w, c, n = 2, 8, 8, 2, 1000
    rng = np.random.default_rng(1)
    mu = jnp.asarray(rng.normal(size=(b, h, w, 1, c)), jnp.float32)
    gm = GM(mu, jnp.zeros((b, h, w, 1, 1)), jnp.full((b, 1, 1, 1, 1), math.log(0.5)))
    v = np.asarray(kr_rotation(gm), np.float64)
    for psi_scale in (0.0, 0.7):
        psi = jnp.asarray(psi_scale * rng.normal(size=(b, h, w, c)), jnp.float32)
        x = spectral_sample(jax.random.key(3), gm, psi, n_samples=n)
        assert x.shape == (b, n, h, w, c) and x.dtype == jnp.float32
        x = (np.asarray(x, np.float64) - np.asarray(mu, np.float64)[:, None, :, :, 0]) / 0.5
        z = np.einsum("bnhwc,bcd->bnhwd", x, v)
        if psi_scale == 0.0:  # oracle 25: z iid N(0, 1), including across pixels.
            flat = z.transpose(0, 4, 1, 2, 3).reshape(b * c, n, h * w)
            cov = np.einsum("gni,gnj->gij", flat, flat) / n
            assert np.max(np.abs(np.diagonal(cov, axis1=1, axis2=2) - 1)) < 5 * np.sqrt(2 / n)
            off = cov - np.eye(h * w) * np.diagonal(cov, axis1=1, axis2=2)[:, :, None]
            assert np.max(np.abs(off)) < 5.5 / np.sqrt(n)
        spec_c = np.fft.fft2(z, axes=(2, 3), norm="ortho")  # numpy Hartley over (H, W)
        spec = spec_c.real + spec_c.imag
        ratio = (spec**2 / np.exp(np.asarray(psi, np.float64))[:, None]).mean(axis=1)
        assert abs(ratio.mean() - 1.0) < 5.0 * np.sqrt(2.0 / (n * ratio.size))
        assert np.max(np.abs(ratio - 1.0)) < 5.0 * np.sqrt(2.0 / n)
    # One sample per GM: [B, H, W, C].
    single = jax.eval_shape(T.spectral_gm_sample, jax.random.key(4), gm, jnp.zeros((b, h, w, c)))
    assert single.shape == (b, h, w, c)


# ------------------------------------------------------------------------------------------------
# jit / vmap / dtype / errors
# ------------------------------------------------------------------------------------------------


def test_bf16_inputs_compute_in_float32(kr_float32):
    gm32 = kr_float32["gm"]
    gm16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), gm32)
    z = jnp.asarray(kr_float32["z"][:, :8], jnp.float32)
    x = to_gm(gm16, z)
    assert x.dtype == jnp.float32
    # Same values as float32 math on the bf16-rounded GM (a bf16 GM changes only its inputs).
    x_ref = to_gm(gm16.astype_compute(), z)
    np.testing.assert_allclose(np.asarray(x), np.asarray(x_ref), atol=1e-6)
    # Output dtypes (traced only): bf16 drivers are cast back (force_fp32), the rest is float32.
    z16, x16 = z.astype(jnp.bfloat16), x.astype(jnp.bfloat16)
    assert jax.eval_shape(T.gaussian_to_gm_samples, gm32, z16).dtype == jnp.bfloat16
    assert jax.eval_shape(T.gm_samples_to_gaussian, gm16, x16).dtype == jnp.float32
    assert jax.eval_shape(T.hartley, z16).dtype == jnp.float32
    args16 = [jnp.asarray(a, jnp.bfloat16) for a in (MEANS_3, LOGW_3, 0.0, 0.3)]
    assert all(a.dtype == jnp.float32 for a in jax.eval_shape(T.gm1d_pdf_cdf, *args16))
    assert jax.eval_shape(T.gm1d_inverse_cdf, *args16).dtype == jnp.float32


def test_gradients_flow_through_gm_to_gaussian_but_not_gaussian_to_gm(kr_float32):
    gm = kr_float32["gm"]
    x = jnp.asarray(kr_float32["x"][:, :4], jnp.float32)
    g = jax.jit(jax.grad(lambda x: jnp.sum(T.gm_samples_to_gaussian(gm, x) ** 2)))(x)
    assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0))

    def sampled_sum(means):
        return jnp.sum(T.gaussian_to_gm_samples(GM(means, gm.logweights, gm.logstds), x))

    assert bool(jnp.all(jax.jit(jax.grad(sampled_sum))(gm.means) == 0))


def test_bad_shapes_raise_value_errors_naming_the_argument():
    gm = to_jax_gm(np_random_gm(0, 1, 2, 2, 3, 2), jnp.float32)
    with pytest.raises(ValueError, match="z must have shape"):
        T.gaussian_to_gm_samples(gm, jnp.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="x must have shape"):
        T.gm_samples_to_gaussian(gm, jnp.zeros((2, 2, 2, 2)))
    with pytest.raises(ValueError, match="rotation must have shape"):
        T.gm_samples_to_gaussian(gm, jnp.zeros((1, 2, 2, 2)), rotation=jnp.eye(2))
    with pytest.raises(ValueError, match="logweights"):
        T.gm1d_pdf_cdf(jnp.zeros(3), jnp.zeros(4), 0.0, 0.0)
    with pytest.raises(ValueError, match="n_steps"):
        T.gm1d_inverse_cdf(jnp.zeros(3), jnp.zeros(3), 0.0, 0.0, n_steps=-1)
    with pytest.raises(ValueError, match="log_spectrum"):
        T.spectral_gm_sample(jax.random.key(0), gm, jnp.zeros((1, 3, 2, 2)))
    with pytest.raises(ValueError, match="axes"):
        T.hartley(jnp.zeros((2, 4, 4, 1)), axes=(0, 1, 2))
