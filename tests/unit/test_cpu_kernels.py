"""The native CPU kernels (`gmflow_jax.cpu_kernels`) against float64 oracles and the XLA forms.

The suite runs on 8 fake CPU devices, where `gm.native_kernels_apply` keeps the XLA forms (a custom
call cannot be partitioned); every test here turns the kernels on with `cpu_kernels.forced(True)`.
Oracles: numpy float64 recomputations of §2.1, §2.2 and §2.5 on the same float32 inputs, and for
the re-targeted mean (§3.4) the XLA form in float64 (itself checked against closed forms in
test_flow.py). Shapes cover a partial last tile (105 pixels) and several chunks on several threads
(3200 pixels).
"""

from __future__ import annotations

import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from gmflow_jax import cpu_kernels, flow
from gmflow_jax import gm as G

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"
)

SHAPES = [(3, 5, 7), (2, 40, 40)]  # 105 pixels (a partial tile), 3200 (four chunks)


def _gm32(rng, batch, *, offset=0.0, scale=1.0):
    means = offset + scale * rng.normal(size=batch + (8, 4))
    logits = 1.5 * rng.normal(size=batch + (8, 1))
    lw = logits - logsumexp(logits, axis=-2, keepdims=True)
    ls = rng.uniform(-1.0, 0.5, size=(batch[0],) + (1,) * (len(batch) + 1))
    return [np.asarray(a, np.float32) for a in (means, lw, ls)]


def _kernel(fn, *args):
    """`fn(*args)` jitted with the kernels on, float32 in, numpy out."""
    with cpu_kernels.forced(True):
        out = jax.jit(fn)(*[jnp.asarray(a) for a in args])
    return jax.tree.map(np.asarray, out)


def _mean_oracle(means, lw):
    m64, w64 = means.astype(np.float64), np.exp(lw.astype(np.float64))
    return np.sum(w64 * m64, axis=-2)


def test_kernels_build_and_apply_only_where_they_should():
    assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
    gm = G.GM(*[jnp.asarray(a) for a in _gm32(np.random.default_rng(0), (2, 3, 3))])

    def hlo():  # a fresh function: jit caches traces by function, not by the switches
        return jax.jit(lambda g: G.gm_to_iso_gaussian(g)).lower(gm).as_text()

    # 8 fake devices: the XLA forms unless forced; forced(False) turns them off anywhere
    assert jax.device_count() > 1 and not G.native_kernels_apply(gm.means)
    assert "gmflow_gm_moments" not in hlo()
    with cpu_kernels.forced(True):
        assert G.native_kernels_apply(gm.means)
        assert "gmflow_gm_moments" in hlo()
        assert G.native_kernels_apply(gm.means.astype(jnp.bfloat16).astype(jnp.float32))
        assert not G.native_kernels_apply(gm.means[..., :3, :])  # K = 3: the XLA forms
        assert not G.native_kernels_apply(gm.means[..., :3])  # C = 3
        with G.forced_forms(False):  # the GPU / TPU forms never call the CPU kernels
            assert not G.native_kernels_apply(gm.means)
        with cpu_kernels.forced(False):
            assert not G.native_kernels_apply(gm.means)


@pytest.mark.parametrize("batch", SHAPES)
def test_mean_and_moments_match_float64(batch):
    means, lw, ls = _gm32(np.random.default_rng(1), batch)
    mean = _kernel(lambda *a: G.gm_mean(G.GM(*a)), means, lw, ls)
    m, var = _kernel(lambda *a: G.gm_to_iso_gaussian(G.GM(*a)), means, lw, ls)
    ref_m = _mean_oracle(means, lw)
    d = means.astype(np.float64) - ref_m[..., None, :]
    ref_var = np.sum(np.exp(lw[..., 0].astype(np.float64)) * np.sum(d * d, -1), -1) / 4
    ref_var = ref_var[..., None] + np.exp(2.0 * ls[..., 0, :].astype(np.float64))
    np.testing.assert_allclose(mean, ref_m, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(var, ref_var, rtol=2e-6, atol=2e-6)
    # gm_mean and gm_to_iso_gaussian's mean bit for bit (the 2nd-order correction compares them)
    np.testing.assert_array_equal(mean, m)


def test_variance_is_centred_where_the_one_pass_form_cancels():
    # all components near 1000 with a spread of ~1e-2: E|mu|^2 - |E mu|^2 in float32 loses it all
    rng = np.random.default_rng(2)
    means, lw, ls = _gm32(rng, (2, 4, 4), offset=1000.0, scale=1e-2)
    ls = np.full_like(ls, -20.0)  # the GM's own variance (e^-40) far below the spread
    _, var = _kernel(lambda *a: G.gm_to_iso_gaussian(G.GM(*a)), means, lw, ls)
    w64, m64 = np.exp(lw[..., 0].astype(np.float64)), means.astype(np.float64)
    ref_m = np.sum(w64[..., None] * m64, -2)
    ref = np.sum(w64 * np.sum((m64 - ref_m[..., None, :]) ** 2, -1), -1) / 4
    # float32 rounding of the mean (~3e-5 at 1000) enters squared: ~1e-4 of a 1e-4 spread
    np.testing.assert_allclose(var[..., 0], ref, rtol=5e-4)
    w32 = np.exp(lw[..., 0])
    one_pass = (
        np.sum(w32 * np.sum(means * means, -1), -1) - np.sum(ref_m.astype(np.float32) ** 2, -1)
    ) / 4
    assert np.max(np.abs(one_pass - ref) / ref) > 1e-2  # the case is hard


@pytest.mark.parametrize("batch", SHAPES)
def test_logprob_matches_float64(batch):
    rng = np.random.default_rng(8)
    means, lw, ls = _gm32(rng, batch)
    x = (1.5 * rng.normal(size=batch + (4,))).astype(np.float32)
    out = _kernel(lambda a, b, s, y: G.gm_logprob(G.GM(a, b, s), y), means, lw, ls, x)
    m64, ls64 = means.astype(np.float64), ls.astype(np.float64)[..., 0]
    sq = np.sum((m64 - x.astype(np.float64)[..., None, :]) ** 2, -1)
    logits = lw[..., 0].astype(np.float64) - 0.5 * sq * np.exp(-2.0 * ls64)
    ref = logsumexp(logits, axis=-1) - 4 * ls64[..., 0] - 2.0 * np.log(2.0 * np.pi)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_per_pixel_and_scalar_coefficients():
    # d, a, b, c per pixel (no leading-block form: broadcast to the pixels) and as plain scalars
    rng = np.random.default_rng(9)
    means, lw, ls = _gm32(rng, (2, 5, 6))
    y = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
    per_pixel = [rng.uniform(0.5, 2.0, size=(1, 5, 6, 1)).astype(np.float32) for _ in range(3)]
    per_pixel.append(rng.uniform(0.5, 2.0, size=(2, 5, 6, 1)).astype(np.float32))
    scalars = [np.float32(1.7), np.float32(0.6), np.float32(0.3), np.float32(1.3)]
    for coeffs in (per_pixel, scalars):

        def fn(a, b, s, x, d, ca, cb, cc):
            return G.tilted_mean(G.GM(a, b, s), x, d, ca, cb, cc)

        out = _kernel(fn, means, lw, ls, y, *coeffs)
        with jax.enable_x64(True), cpu_kernels.forced(False):
            args = [jnp.asarray(v, jnp.float64) for v in (means, lw, ls, y, *coeffs)]
            ref = np.asarray(jax.jit(fn)(*args))
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("batch", SHAPES)
def test_gm_product_matches_float64(batch):
    rng = np.random.default_rng(3)
    means, lw, ls = _gm32(rng, batch)
    y = rng.normal(size=batch + (4,)).astype(np.float32)
    var = rng.uniform(0.3, 2.0, size=(batch[0], 1, 1, 1)).astype(np.float32)
    for p1, p2 in [(1.0, 1.0), (2.0, 0.5)]:
        out = _kernel(
            lambda a, b, s, x, v, p1=p1, p2=p2: G.gm_mul_iso_gaussian(G.GM(a, b, s), x, v, p1, p2),
            means,
            lw,
            ls,
            y,
            var,
        )
        rho = p2 / p1
        m64, s2 = means.astype(np.float64), np.exp(2.0 * ls.astype(np.float64))
        v = var.astype(np.float64)[..., None, :]
        norm = v + rho * s2
        ref_means = (v * m64 + rho * s2 * y.astype(np.float64)[..., None, :]) / norm
        sq = np.sum((m64 - y.astype(np.float64)[..., None, :]) ** 2, -1, keepdims=True)
        logits = lw.astype(np.float64) - rho * sq / (2.0 * norm)
        ref_lw = logits - logsumexp(logits, axis=-2, keepdims=True)
        np.testing.assert_allclose(out.means, ref_means, rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(out.logweights, ref_lw, rtol=1e-5, atol=1e-5)
        ref_ls = ls.astype(np.float64) + 0.5 * np.log(v) - 0.5 * np.log(norm)
        np.testing.assert_allclose(out.logstds, ref_ls, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", SHAPES)
def test_retarget_mean_matches_the_float64_xla_form(batch):
    rng = np.random.default_rng(4)
    means, lw, ls = _gm32(rng, batch)
    x_src, x_tgt = rng.normal(size=(2,) + batch + (4,)).astype(np.float32)
    t_src = np.full(batch[0], 800.0, np.float32)
    t_tgt = np.full(batch[0], 450.0, np.float32)
    args = (means, lw, ls, x_src, t_src, x_tgt, t_tgt)

    def fn(a, b, s, xs, ts, xt, tt):
        return flow.retarget_mean(G.GM(a, b, s), xs, ts, xt, tt)

    out = _kernel(fn, *args)
    with jax.enable_x64(True), cpu_kernels.forced(False):
        ref = np.asarray(jax.jit(fn)(*[jnp.asarray(a, jnp.float64) for a in args]))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_non_finite_inputs_behave_as_in_the_xla_forms():
    rng = np.random.default_rng(5)
    means, lw, ls = _gm32(rng, (1, 4, 5))
    lw[0, 0, 0, 3, 0] = -np.inf  # a component of weight exactly zero
    means[0, 1, 2, 5, 1] = np.nan  # one pixel with a NaN mean
    means[0, 2, 3, 0, 0] = np.nan  # and one where the NaN logit comes first
    y = rng.normal(size=(1, 4, 5, 4)).astype(np.float32)
    y[0, 3, 4] = 1e6  # a point far from every component: logits ~ -1e12
    var = np.ones((1, 1, 1, 1), np.float32)

    def ops(a, b, s, x, v):
        g = G.GM(a, b, s)
        prod = G.gm_mul_iso_gaussian(g, x, v).logweights
        return G.gm_mean(g), G.gm_to_iso_gaussian(g), prod, G.gm_logprob(g, x)

    kern = _kernel(ops, means, lw, ls, y, var)
    with cpu_kernels.forced(False):
        xla = jax.tree.map(np.asarray, jax.jit(ops)(means, lw, ls, y, var))
    for k, x in zip(jax.tree.leaves(kern), jax.tree.leaves(xla), strict=True):
        np.testing.assert_array_equal(np.isnan(k), np.isnan(x))
        np.testing.assert_array_equal(np.isinf(k), np.isinf(x))
        fin = np.isfinite(x)
        np.testing.assert_allclose(k[fin], x[fin], rtol=1e-5, atol=1e-5)
    mean, (m, v), lw_out, logp = kern
    # the NaN reaches its channel of the mean and the pixel's variance, nothing else
    assert np.isnan(mean[0, 1, 2]).tolist() == [False, True, False, False]
    assert np.argwhere(np.isnan(v[0, ..., 0])).tolist() == [[1, 2], [2, 3]]
    assert lw_out[0, 0, 0, 3, 0] == -np.inf
    assert np.max(lw_out[0, 3, 4]) == 0.0 and np.isfinite(lw_out[0, 3, 4]).all()
    # a NaN logit makes every log-weight of its pixel NaN (the max-shifted LSE is NaN), and its
    # log-density; the far point's log-density is finite
    assert np.isnan(lw_out[0, 1, 2]).all() and np.isnan(logp[0, 1, 2])
    assert np.isfinite(logp[0, 3, 4]) and logp[0, 3, 4] < -1e11


def test_derivatives_are_those_of_the_xla_forms():
    rng = np.random.default_rng(6)
    means, lw, ls = _gm32(rng, (2, 3, 4))
    y = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    var = np.full((2, 1, 1, 1), 0.7, np.float32)
    r = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)

    def loss(a, b, s, x, v):
        g = G.GM(a, b, s)
        m, vv = G.gm_to_iso_gaussian(g)
        prod = G.gm_mul_iso_gaussian(g, x, v)
        rt = flow.retarget_mean(g, x, jnp.full((2,), 700.0), 0.5 * x, jnp.full((2,), 300.0))
        logp = jnp.sum(G.gm_logprob(g, 0.3 * x))
        return (
            jnp.sum(r * (m + G.gm_mean(prod) + rt))
            + jnp.sum(vv)
            + jnp.sum(prod.logweights**2)
            + logp
        )

    grads = {}
    for on in (True, False):
        with cpu_kernels.forced(on):
            grads[on] = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(means, lw, ls, y, var)
    for a, b in zip(grads[True], grads[False], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # forward mode too: a directional derivative, against central differences in float64
    direction = [rng.normal(size=v.shape).astype(np.float32) for v in (means, lw, ls, y, var)]
    with cpu_kernels.forced(True):
        _, tangent = jax.jit(lambda *p: jax.jvp(loss, p[:5], p[5:]))(
            means, lw, ls, y, var, *direction
        )
    with jax.enable_x64(True), cpu_kernels.forced(False):
        f64 = jax.jit(lambda *p: loss(*p))
        args64 = [jnp.asarray(v, jnp.float64) for v in (means, lw, ls, y, var)]
        h = 1e-5
        plus = f64(*[v + h * d for v, d in zip(args64, direction, strict=True)])
        minus = f64(*[v - h * d for v, d in zip(args64, direction, strict=True)])
        central = float(plus - minus) / (2 * h)
    np.testing.assert_allclose(float(tangent), central, rtol=1e-3)


def test_vmap_and_no_retrace():
    rng = np.random.default_rng(7)
    stacked = [np.stack(x) for x in zip(*[_gm32(rng, (2, 3, 5)) for _ in range(3)], strict=True)]

    def moments(a, b, s):
        return G.gm_to_iso_gaussian(G.GM(a, b, s))

    traced_once = jax.jit(chex.assert_max_traces(moments, n=1))
    with cpu_kernels.forced(True):
        batched = jax.vmap(moments)(*stacked)
        singles = [traced_once(*[x[i] for x in stacked]) for i in range(3)]  # one trace, 3 calls
    for i in range(3):
        np.testing.assert_allclose(np.asarray(batched[0][i]), np.asarray(singles[i][0]), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(batched[1][i]), np.asarray(singles[i][1]), rtol=1e-6)


def test_build_is_atomic_and_reports_a_failing_compiler(tmp_path):
    with pytest.raises(RuntimeError, match="failed"):
        cpu_kernels.build("false", tmp_path / "lib.so")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    compiler = shutil.which("c++") or shutil.which("g++")
    cpu_kernels.build(compiler, tmp_path / "lib.so")
    assert [p.name for p in tmp_path.iterdir()] == ["lib.so"]
