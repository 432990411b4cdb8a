"""Tests of the toy 2-D MLP denoiser (`docs/math.md` §6.4; oracles 31, 32)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gmflow_jax.gm import GM
from gmflow_jax.models.toy_mlp import ToyMLP, point_position_embedding


@nnx.jit
def _apply(model, x, t, labels=None):
    """One compiled forward pass (eager op-by-op dispatch is slow on a loaded CPU)."""
    return model(x, t, labels)


def _build(seed: int, *args, **kwargs) -> ToyMLP:
    """Build a ToyMLP under jit (one compile instead of many eager initializer ops)."""
    return nnx.jit(lambda: ToyMLP(*args, rngs=nnx.Rngs(seed), **kwargs))()


@pytest.fixture(scope="module")
def model64() -> ToyMLP:
    return _build(3, 64)


@pytest.fixture(scope="module")
def small_model() -> ToyMLP:
    return _build(0, 4, embed_dim=16, hidden_dim=16, num_layers=2)


def _num_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_param_count_k64_matches_reference():
    model = nnx.eval_shape(lambda: ToyMLP(64, rngs=nnx.Rngs(0)))
    assert _num_params(model) == 1_412_289


def test_mean_only_param_count_is_trunk_plus_linear_512_to_2():
    model = nnx.eval_shape(lambda: ToyMLP(64, mean_only=True, rngs=nnx.Rngs(0)))
    trunk = 5 * (512 * 512 + 512)
    assert _num_params(model) == trunk + 512 * 2 + 2


def test_init_gives_uniform_weights_and_unit_std_for_any_input(model64):
    k, model = 64, model64
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 1, 1, 2)) * 3.0
    t = jax.random.uniform(jax.random.PRNGKey(1), (16,)) * 1000.0
    gm = _apply(model, x, t)
    assert isinstance(gm, GM)
    assert gm.means.shape == (16, 1, 1, k, 2) and gm.means.dtype == jnp.float32
    assert gm.logweights.shape == (16, 1, 1, k, 1) and gm.logstds.shape == (16, 1, 1, 1, 1)
    np.testing.assert_allclose(gm.logweights, -math.log(k), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(gm.logstds, 0.0)
    assert float(jnp.std(gm.means)) > 0.1  # the means head is not zero-initialized


def test_kaiming_normal_init_statistics_and_zero_biases(model64):
    model = model64
    w = np.asarray(model.layers[1].kernel[...])  # fan_in 512, 262144 entries
    std = math.sqrt(2.0 / 512)
    # relative standard error of a sample std is 1/sqrt(2N) ~ 0.14%; allow 5 standard errors
    assert abs(w.std() / std - 1.0) < 5 / math.sqrt(2 * w.size)
    assert abs(w.mean()) < 5 * std / math.sqrt(w.size)
    # untruncated normal: P(|z| > 3.5) * N ~ 120 expected entries beyond 3.5 std
    assert np.sum(np.abs(w) > 3.5 * std) > 50
    first = np.asarray(model.layers[0].kernel[...])  # fan_in = 2 * embed_dim = 512
    assert abs(first.std() / math.sqrt(2.0 / first.shape[0]) - 1.0) < 0.01
    for layer in [*model.layers, model.out_means, model.out_logweights, model.out_logstds]:
        np.testing.assert_array_equal(layer.bias[...], 0.0)
    np.testing.assert_array_equal(model.out_logweights.kernel[...], 0.0)
    np.testing.assert_array_equal(model.out_logstds.kernel[...], 0.0)


def _numpy_time_embedding(t, dim=256):
    half = dim // 2
    freqs = np.exp(-np.log(1e4) * np.arange(half) / (half - 1))  # q / 127 for dim 256
    args = np.asarray(t, np.float64)[:, None] * freqs[None]
    return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def _numpy_position_embedding(x, dim=256, pmin=5e-3, pmax=50.0):
    n = dim // 4
    periods = np.array(
        [np.exp(np.log(pmin) + q / (n - 1) * (np.log(pmax) - np.log(pmin))) for q in range(n)]
    )
    out = []
    for b in range(x.shape[0]):
        row = []
        for d in range(2):
            theta = 2 * np.pi * x[b, d] / periods
            row += [np.sin(theta), np.cos(theta)]
        out.append(np.concatenate(row))
    return np.stack(out)


def test_point_position_embedding_matches_numpy_formula():
    x = np.array([[0.3, -1.7], [3.9, 0.0], [-4.0, 2.5]], np.float32)
    got = np.asarray(point_position_embedding(jnp.asarray(x)))
    want = _numpy_position_embedding(x.astype(np.float64))
    # float32 phase error: |theta| <= 2 pi 4 / 5e-3 ~ 5e3, times eps ~ 6e-8 -> ~3e-4
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert np.max(np.abs(got - want)[:, :64]) < 2e-3  # coordinate 1, sin first


def _numpy_forward(model: ToyMLP, x, t):
    """Independent float64 forward pass of the §6.4 network from the model's weights."""
    h = np.concatenate([_numpy_time_embedding(t), _numpy_position_embedding(x.reshape(-1, 2))], -1)
    for layer in model.layers:
        h = h @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)
        h = h / (1 + np.exp(-h))
    k = model.num_gaussians
    lin = lambda m: h @ np.asarray(m.kernel[...], np.float64) + np.asarray(m.bias[...], np.float64)
    means = lin(model.out_means).reshape(-1, k, 2)  # component-major: index k * 2 + c
    logits = lin(model.out_logweights)
    logweights = (
        logits
        - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    return means, logweights, lin(model.out_logstds)


def test_forward_matches_independent_numpy_network_with_random_heads():
    model = _build(1, 8)
    rng = np.random.default_rng(0)
    # give the zero-initialized heads random weights so that their layout is tested too
    for m in (model.out_logweights, model.out_logstds):
        m.kernel[...] = jnp.asarray(rng.normal(0, 0.05, m.kernel[...].shape), jnp.float32)
    x = rng.uniform(-4, 4, (5, 1, 1, 2)).astype(np.float32)
    t = np.array([0.0, 1.0, 250.5, 999.0, 1000.0], np.float32)
    gm = _apply(model, jnp.asarray(x), jnp.asarray(t))
    means, logweights, logstds = _numpy_forward(model, x, t)
    np.testing.assert_allclose(gm.means[:, 0, 0], means, atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(gm.logweights[:, 0, 0, :, 0], logweights, atol=2e-3)
    np.testing.assert_allclose(gm.logstds.reshape(-1), logstds.reshape(-1), atol=2e-3)


def test_scalar_time_broadcasts_like_a_per_sample_time(small_model):
    model = small_model
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 1, 1, 2))
    a = _apply(model, x, jnp.float32(300.0))
    b = _apply(model, x, jnp.full((3,), 300.0))
    np.testing.assert_array_equal(a.means, b.means)


def test_mean_only_returns_u_mean_and_ignores_labels():
    model = _build(0, 4, embed_dim=16, hidden_dim=16, num_layers=2, mean_only=True)
    x = jnp.ones((4, 1, 1, 2))
    u = _apply(model, x, jnp.full((4,), 500.0), jnp.arange(4))
    assert u.shape == (4, 1, 1, 2) and u.dtype == jnp.float32
    np.testing.assert_array_equal(u, _apply(model, x, jnp.full((4,), 500.0), None))


@pytest.mark.parametrize("shape", [(4, 2), (4, 2, 2, 2), (4, 1, 1, 3)])
def test_bad_input_shape_raises_value_error_naming_x_t(small_model, shape):
    with pytest.raises(ValueError, match="x_t"):
        small_model(jnp.zeros(shape), jnp.zeros((4,)))
