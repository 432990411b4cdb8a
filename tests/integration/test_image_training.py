"""Class-conditional image training: train steps, label dropout, spectral loss routing, sampling, bf16.

`docs/math.md` §4.1-4.6 (training), §5.2-5.7 (guided GM-SDE 2 / GM-ODE 2 sampling). The
ImageNet-256 tiny run and the latent loaders are in `test_imagenet_task.py`.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gmflow_jax import solvers
from gmflow_jax.gm import GM
from gmflow_jax.models.builder import build_image_denoiser
from gmflow_jax.models.denoiser import network_functions
from gmflow_jax.models.gm_dit import GMDiTConfig
from gmflow_jax.models.image_denoiser import ImageDenoiser, SpectrumConfig
from gmflow_jax.tasks.image import row_solver_config
from gmflow_jax.train.state import (
    LossConfig,
    drop_labels,
    loss_terms,
)


def _tiny_model(dtype="float32", spectrum=True, seed=0) -> ImageDenoiser:
    cfg = GMDiTConfig(
        num_layers=1,
        hidden_size=32,
        num_heads=2,
        patch_size=2,
        in_channels=1,
        sample_size=8,
        num_gaussians=4,
        num_classes=10,
        logstd_inner_dim=16,
        dtype=dtype,
    )
    spec = SpectrumConfig((1, 8, 8), (16, 4)) if spectrum else None
    return build_image_denoiser(cfg, spec, jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------------------------
# §4.4 label dropout


def test_label_dropout_rate_is_one_minus_prob_class_and_independent_per_sample():
    n, p_keep, null = 200_000, 0.9, 10
    labels = jnp.asarray(np.arange(n) % 10, jnp.int32)
    out = np.asarray(drop_labels(jax.random.PRNGKey(3), labels, p_keep, null))
    dropped = out == null
    kept = ~dropped
    np.testing.assert_array_equal(out[kept], np.asarray(labels)[kept])  # kept labels unchanged
    sd = math.sqrt(p_keep * (1 - p_keep) / n)
    assert abs(dropped.mean() - (1 - p_keep)) < 5 * sd
    # same rate for every class (the draw ignores the label), within 5 sd of a class's share
    for c in range(10):
        assert abs(dropped[np.asarray(labels) == c].mean() - 0.1) < 5 * sd * math.sqrt(10)
    # neighbours are uncorrelated (independent draws), |corr| < 5 / sqrt(n)
    d = dropped.astype(np.float64)
    corr = np.corrcoef(d[:-1], d[1:])[0, 1]
    assert abs(corr) < 5 / math.sqrt(n)


def test_label_dropout_uses_its_own_stream_and_leaves_t_and_noise_unchanged():
    seen = []

    def recorder(params, x_t, t, labels):
        seen.append((np.asarray(x_t), np.asarray(t), np.asarray(labels)))
        return jnp.zeros_like(x_t) + params

    x0 = jax.random.normal(jax.random.PRNGKey(0), (4096, 1, 1, 2))
    labels = jnp.asarray(np.arange(4096) % 7, jnp.int32)
    key = jax.random.PRNGKey(5)
    for prob in (1.0, 0.9):
        cfg = LossConfig(objective="flow_matching_l2", prob_class=prob, null_label=7)
        loss_terms(recorder, jnp.float32(0.0), key, x0, labels, cfg)
    (x1, t1, y1), (x2, t2, y2) = seen
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(y1, np.asarray(labels))
    dropped = y2 != np.asarray(labels)
    assert np.all(y2[dropped] == 7) and 0.05 < dropped.mean() < 0.15


def test_loss_config_rejects_dropout_without_a_null_label():
    with pytest.raises(ValueError, match="null_label"):
        LossConfig(prob_class=0.9)
    with pytest.raises(ValueError, match="prob_class"):
        LossConfig(prob_class=1.5, null_label=3)


# ----------------------------------------------------------------------------------------------
# §4.3 spectral loss gradient routing, and bf16 vs fp32 (one compile per dtype, shared)

_X0 = jax.random.uniform(jax.random.PRNGKey(1), (16, 8, 8, 1), minval=-1, maxval=1)
_LABELS = jnp.arange(16, dtype=jnp.int32) % 10
_LOSS_CFG = LossConfig(trans_ratio=0.5, t_sampler="logit_normal", prob_class=0.9, null_label=10)


def _spiked_params():
    """fp32 params of the tiny model with a non-zero spectrum (psi != 0): every layer learns."""
    model = _tiny_model()
    out = model.spectrum_net.linear_out
    out.kernel[...] = 0.3 * jax.random.normal(jax.random.PRNGKey(9), out.kernel[...].shape)
    return nnx.state(model)


@functools.cache
def _term_grads(dtype: str):
    """Jitted params -> (terms, grad of "trans", grad of "spec") for the tiny model in `dtype`."""
    denoiser, spectrum = network_functions(_tiny_model(dtype))

    def fn(params):
        terms = lambda p: loss_terms(  # noqa: E731
            denoiser, p, jax.random.PRNGKey(2), _X0, _LABELS, _LOSS_CFG, spectrum
        )
        g_trans = jax.grad(lambda p: terms(p)["trans"])(params)
        g_spec = jax.grad(lambda p: terms(p)["spec"])(params)
        return terms(params), g_trans, g_spec

    return jax.jit(fn)


def _max_abs(tree) -> list[float]:
    return [float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(tree)]


def test_spectral_loss_trains_only_the_spectrum_net_and_transition_loss_never_does():
    _, g_trans, g_spec = _term_grads("float32")(_spiked_params())
    assert max(_max_abs(g_trans["spectrum_net"])) == 0.0
    assert max(_max_abs(g_spec["denoiser"])) == 0.0
    assert min(_max_abs(g_spec["spectrum_net"])) > 0  # every SpectrumMLP leaf learns
    assert max(_max_abs(g_trans["denoiser"])) > 0


def test_bf16_loss_and_gradients_agree_with_fp32_within_two_percent():
    """Same fp32 params, batch and key: each loss term within 2% (bf16 has an 8-bit mantissa), the
    total gradient finite, fp32, with cosine similarity > 0.99 to the fp32 one. (A full bf16 train
    step runs in the imagenet256 tiny main test of test_imagenet_task.py.)"""
    params = _spiked_params()
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(_tiny_model("bfloat16"))))
    flat = {}
    for dtype in ("float32", "bfloat16"):
        terms, g_trans, g_spec = _term_grads(dtype)(params)
        total = jax.tree.map(jnp.add, g_trans, g_spec)
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(total))
        flat[dtype] = (terms, jnp.concatenate([g.ravel() for g in jax.tree.leaves(total)]))
    (t32, g32), (t16, g16) = flat["float32"], flat["bfloat16"]
    for name in ("trans", "spec"):
        np.testing.assert_allclose(float(t16[name]), float(t32[name]), rtol=2e-2, atol=1e-4)
    assert bool(jnp.all(jnp.isfinite(g16)))
    cos = float(g32 @ g16 / (jnp.linalg.norm(g32) * jnp.linalg.norm(g16)))
    assert cos > 0.99


# ----------------------------------------------------------------------------------------------
# Sampling: guided GM-SDE 2 + spectral and GM-ODE 2 + substeps, one compile for any w


def test_guided_sampling_is_one_jitted_function_that_does_not_retrace():
    model = _tiny_model()
    denoiser, spectrum = network_functions(model)
    params = nnx.state(model)
    labels = jnp.arange(6, dtype=jnp.int32) % 10
    noise = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 1))
    sde = row_solver_config("gm_sde_2", 3, 0.3, null_label=10, has_spectrum=True)
    ode = row_solver_config("gm_ode_2", 3, 0.3, null_label=10, substeps_total=6)
    assert sde.spectral and sde.order == 2 and sde.guided
    assert ode.num_substeps == 2 and ode.order == 2 and ode.guided

    @jax.jit
    @chex.assert_max_traces(n=1)
    def draw(params, key, noise, labels, w):
        a = solvers.sample(denoiser, params, key, noise, labels, sde, w, spectrum)
        b = solvers.sample(denoiser, params, key, noise, labels, ode, w)
        return a, b

    outs = [
        draw(params, jax.random.PRNGKey(i), noise, labels, jnp.float32(w))
        for i, w in enumerate((0.1, 0.3, 0.6))
    ]
    assert draw._cache_size() == 1
    for a, b in outs:
        assert a.shape == b.shape == noise.shape
        assert np.all(np.isfinite(np.asarray(a))) and np.all(np.isfinite(np.asarray(b)))
    assert np.max(np.abs(np.asarray(outs[0][1]) - np.asarray(outs[2][1]))) > 1e-4  # w is used


def test_denoiser_function_on_the_full_state_equals_the_image_model_call():
    model = _tiny_model()
    graphdef, params = nnx.split(model)
    denoiser, _ = network_functions(model)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 1))
    t = jnp.array([10.0, 500.0, 990.0])
    y = jnp.array([0, 4, 10], jnp.int32)
    a, b = jax.jit(lambda p: (nnx.merge(graphdef, p)(x, t, y), denoiser(p, x, t, y)))(params)
    assert isinstance(a, GM)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6)


def test_row_names_map_to_the_paper_solvers():
    kw = dict(null_label=10, substeps_total=128, has_spectrum=True)
    c = row_solver_config("gm_sde_2_nospec", 8, 0.0, **kw)
    assert (c.solver, c.order, c.spectral, c.guided) == ("gm_sde", 2, False, False)
    c = row_solver_config("gm_ode_2_nosub", 8, 0.3, **kw)
    assert (c.solver, c.order, c.num_substeps, c.guided) == ("gm_ode", 2, 1, True)
    assert row_solver_config("gm_ode", 32, 0.1, **kw).num_substeps == 4
    c = row_solver_config("dpmpp_2m", 4, 1.0, **kw)
    assert (c.solver, c.guidance, c.guided) == ("dpmpp_2m", "cfg", False)
    assert row_solver_config("euler", 4, 3.0, **kw).guided
    with pytest.raises(ValueError, match="unknown"):
        row_solver_config("gm_sde_3", 4, 0.1, **kw)
    with pytest.raises(ValueError, match="probabilistic"):
        row_solver_config("gm_sde", 4, 1.5, **kw)
