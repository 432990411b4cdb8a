"""Tests of the one model builder (gmflow_jax.models.builder) and the one network wrapper
(gmflow_jax.models.denoiser), `docs/math.md` §6.

Oracles: a float64 NumPy forward of the SpectrumMLP (§6.3) read from the module's parameters, the
networks' own `__call__` (the wrapper must equal calling the module), and the config values themselves
(the builder must pass every field).
"""

from __future__ import annotations

import functools
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.official_layout import write_tiny_official_folder

from gmflow_jax.checkpoint import Checkpointer
from gmflow_jax.gm import GM
from gmflow_jax.models.builder import (
    abstract_model,
    build_model,
    gm_dit_config_from,
    model_config_from_pipeline_config,
    pipeline_config,
)
from gmflow_jax.models.denoiser import lift, network_functions
from gmflow_jax.models.flat_params import flat_params
from gmflow_jax.models.image_denoiser import ImageDenoiser
from gmflow_jax.models.spectrum_mlp import SpectrumMLP
from gmflow_jax.models.toy_mlp import ToyMLP
from gmflow_jax.pipeline import GMFlowPipeline

TINY_GM_DIT = {
    "name": "gm_dit",
    "num_layers": 2,
    "hidden_size": 32,
    "num_heads": 2,
    "patch_size": 2,
    "in_channels": 4,
    "sample_size": 8,
    "num_gaussians": 3,
    "num_classes": 10,
    "logstd_inner_dim": 16,
    "dtype": "float32",
    "spectrum_net": {"enabled": True, "base_size": (4, 8, 8), "layers": (16, 8)},
}

TINY_TOY_MLP = {
    "name": "toy_mlp",
    "num_gaussians": 5,
    "embed_dim": 16,
    "hidden_dim": 24,
    "num_layers": 3,
    "pos_min_period": 0.01,
    "pos_max_period": 20.0,
    "mean_only": False,
}


def _spectrum_oracle(params: dict, base_size, m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """psi `[B,H,W,C]` in float64 NumPy at the base size (§6.3), from flat SpectrumMLP params."""
    p = {k: np.asarray(val, np.float64) for k, val in params.items()}
    m, v = np.asarray(m, np.float64), np.asarray(v, np.float64)
    stats = np.stack([v.mean(axis=(1, 2, 3)), m.var(axis=(1, 2), ddof=1).mean(-1)], -1)

    def silu(x):
        return x / (1.0 + np.exp(-x))

    h = silu(stats @ p["linear_1.kernel"] + p["linear_1.bias"])
    h = silu(h @ p["linear_2.kernel"] + p["linear_2.bias"])
    c, h0, w0 = base_size
    logits = (h @ p["linear_out.kernel"] + p["linear_out.bias"]).reshape(-1, c, h0 * w0)
    top = logits.max(-1, keepdims=True)
    lse = top + np.log(np.exp(logits - top).sum(-1, keepdims=True))
    psi = logits - lse + math.log(h0 * w0)
    return psi.reshape(-1, c, h0, w0).transpose(0, 2, 3, 1)


def _gaussian(seed: int, shape=(3, 8, 8, 4)):
    """An x0 Gaussian (mean `[B,H,W,C]`, variance `[B,1,1,1]`) with spread-out statistics."""
    rng = np.random.default_rng(seed)
    m = (rng.standard_normal(shape) * rng.uniform(0.5, 2.0, (shape[0], 1, 1, 1))).astype(np.float32)
    v = np.exp(rng.standard_normal((shape[0], 1, 1, 1))).astype(np.float32)
    return m, v


def _assert_float32_spectrum(model: ImageDenoiser, params) -> None:
    """The SpectrumMLP computes in float32: params f32, psi f32 and within 1e-4 of the f64 oracle."""
    net = model.spectrum_net
    assert net.dtype == jnp.float32
    flat = flat_params(nnx.state(net))
    assert all(np.asarray(a).dtype == np.float32 for a in flat.values())
    _, spectrum = network_functions(model)
    m, v = _gaussian(1)
    psi = jax.jit(spectrum)(params, jnp.asarray(m), jnp.asarray(v))
    ref = _spectrum_oracle(flat, net.base_size, m, v)
    assert psi.dtype == jnp.float32 and np.std(ref) > 0.05
    np.testing.assert_allclose(np.asarray(psi), ref, atol=1e-4, rtol=1e-4)


def _nonzero_spectrum(model: ImageDenoiser, seed: int) -> None:
    """Give the (zero-initialized) last SpectrumMLP layer random weights, so psi is not constant."""
    out = model.spectrum_net.linear_out
    out.kernel[...] = jax.random.normal(jax.random.PRNGKey(seed), out.kernel[...].shape)


# ----------------------------------------------------------------------------------------------
# The one dtype rule
# ----------------------------------------------------------------------------------------------


def test_oracle_detects_a_bfloat16_spectrum_net():
    """The float32 check can fail: a bf16-compute SpectrumMLP misses the f64 oracle by > 1e-3."""
    net = SpectrumMLP((4, 8, 8), (16, 8), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = net.linear_out
    out.kernel[...] = jax.random.normal(jax.random.PRNGKey(3), out.kernel[...].shape)
    m, v = _gaussian(1)
    ref = _spectrum_oracle(flat_params(nnx.state(net)), (4, 8, 8), m, v)
    assert np.abs(np.asarray(net(jnp.asarray(m), jnp.asarray(v))) - ref).max() > 1e-3
    with pytest.raises(ValueError, match="must compute in float32"):
        ImageDenoiser(build_model(TINY_GM_DIT, jax.random.PRNGKey(0)).denoiser, net)


def test_spectrum_net_is_float32_on_the_training_path():
    """build_model with a bfloat16 GM-DiT still builds a float32 SpectrumMLP."""
    model = build_model({**TINY_GM_DIT, "dtype": "bfloat16"}, jax.random.PRNGKey(0))
    assert model.config.compute_dtype == jnp.bfloat16
    _nonzero_spectrum(model, 4)
    _assert_float32_spectrum(model, nnx.state(model))


def test_spectrum_net_is_float32_on_the_checkpoint_path(tmp_path):
    """GMFlowPipeline.from_checkpoint(dtype=bfloat16) restores the EMA into a float32 SpectrumMLP."""
    model = build_model(TINY_GM_DIT, jax.random.PRNGKey(0))
    _nonzero_spectrum(model, 5)
    state = nnx.state(model)
    ema = jax.tree.map(lambda a: 0.5 * a, state)
    with Checkpointer(tmp_path / "checkpoints", async_save=False) as ckpt:
        ckpt.save(2, {"ema_params": ema}, force=True)
    (tmp_path / "config.json").write_text(json.dumps(pipeline_config(TINY_GM_DIT)))
    pipe = GMFlowPipeline.from_checkpoint(str(tmp_path), dtype="bfloat16")
    assert pipe.config.compute_dtype == jnp.bfloat16 and pipe.config.remat is False
    _assert_float32_spectrum(pipe.model, pipe.params)
    for a, b in zip(jax.tree.leaves(pipe.params), jax.tree.leaves(ema), strict=True):
        np.testing.assert_array_equal(a, b)  # the EMA weights, not the raw ones


def test_spectrum_net_is_float32_on_the_official_path(tmp_path):
    """GMFlowPipeline.from_official(dtype=bfloat16) loads the official SpectrumMLP in float32."""
    root = write_tiny_official_folder(tmp_path / "official")
    pipe = GMFlowPipeline.from_official(str(root), dtype="bfloat16", with_vae=False)
    assert pipe.config.compute_dtype == jnp.bfloat16
    _assert_float32_spectrum(pipe.model, pipe.params)


# ----------------------------------------------------------------------------------------------
# The builder
# ----------------------------------------------------------------------------------------------


def test_toy_mlp_gets_every_config_field():
    """ "toy_mlp": a ToyMLP with the config's K, widths and depth (parameter shapes say so)."""
    model = build_model(TINY_TOY_MLP, jax.random.PRNGKey(0))
    assert isinstance(model, ToyMLP)
    assert (model.num_gaussians, model.embed_dim) == (5, 16)
    assert (model.pos_min_period, model.pos_max_period, model.mean_only) == (0.01, 20.0, False)
    shapes = [tuple(layer.kernel[...].shape) for layer in model.layers]
    assert shapes == [(32, 24), (24, 24), (24, 24)]
    assert model.out_means.kernel[...].shape == (24, 2 * 5)
    baseline = build_model({**TINY_TOY_MLP, "mean_only": True}, jax.random.PRNGKey(0))
    assert baseline.mean_only and baseline.out_u.kernel[...].shape == (24, 2)


def test_gm_dit_model_state_and_the_same_key_gives_the_same_parameters():
    """ "gm_dit": an ImageDenoiser whose state is {denoiser, spectrum_net}; spectrum off drops it."""
    a = build_model(TINY_GM_DIT, jax.random.PRNGKey(7))
    b = build_model(TINY_GM_DIT, jax.random.PRNGKey(7))
    assert isinstance(a, ImageDenoiser) and set(nnx.state(a)) == {"denoiser", "spectrum_net"}
    assert a.config == gm_dit_config_from(TINY_GM_DIT)
    assert a.spectrum_net.base_size == (4, 8, 8)
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(x, y)
    off = {**TINY_GM_DIT, "spectrum_net": {"enabled": False}}
    plain = build_model(off, jax.random.PRNGKey(7))
    assert plain.spectrum_net is None and set(nnx.state(plain)) == {"denoiser"}


def test_abstract_model_matches_build_model_without_allocating():
    """abstract_model has the shapes and dtypes of build_model, with ShapeDtypeStruct leaves."""
    for cfg in (TINY_GM_DIT, TINY_TOY_MLP):
        abstract = jax.tree.leaves(nnx.state(abstract_model(cfg)))
        concrete = jax.tree.leaves(nnx.state(build_model(cfg, jax.random.PRNGKey(0))))
        assert all(isinstance(a, jax.ShapeDtypeStruct) for a in abstract)
        assert [(a.shape, a.dtype) for a in abstract] == [(c.shape, c.dtype) for c in concrete]


def test_pipeline_config_round_trips_to_the_same_network():
    """config.model -> config.json -> config.model builds the same network (same key, same params)."""
    run_config = json.loads(json.dumps(pipeline_config(TINY_GM_DIT)))  # through JSON, as on disk
    back = model_config_from_pipeline_config(run_config)
    assert gm_dit_config_from(back) == gm_dit_config_from(TINY_GM_DIT)
    a = build_model(TINY_GM_DIT, jax.random.PRNGKey(3))
    b = build_model(back, jax.random.PRNGKey(3))
    assert nnx.graphdef(a) == nnx.graphdef(b)
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(x, y)
    no_spec = model_config_from_pipeline_config({"model": run_config["model"]})
    assert build_model(no_spec, jax.random.PRNGKey(3)).spectrum_net is None


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({**TINY_GM_DIT, "name": "dit"}, r"config.model.name must be one of .*got 'dit'"),
        (
            {
                **TINY_GM_DIT,
                "spectrum_net": {"enabled": True, "base_size": (4, 4, 4), "layers": (4, 4)},
            },
            r"spectrum base_size \(4, 4, 4\) does not fit images \[8, 8, 4\]",
        ),
        (
            {**TINY_GM_DIT, "mean_only": True, "num_gaussians": 1},
            "spectrum must be None for a mean_only GM-DiT",
        ),
    ],
)
def test_bad_model_configs_fail_before_building(cfg, match):
    """A bad name or a SpectrumMLP that does not fit raises a ValueError naming it."""
    with pytest.raises(ValueError, match=match):
        abstract_model(cfg)


def test_pipeline_config_with_unknown_gm_dit_fields_is_refused():
    """An unknown field in config.json's model raises, naming it."""
    with pytest.raises(ValueError, match=r"unknown fields \['hidden'\]"):
        model_config_from_pipeline_config({"model": {"hidden": 3}})
    with pytest.raises(ValueError, match="'model' entry"):
        model_config_from_pipeline_config({"spectrum_net": {}})


# ----------------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------------


def _inputs(batch=3):
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, 8, 8, 4))
    t = jnp.linspace(10.0, 990.0, batch)
    y = jnp.arange(batch, dtype=jnp.int32) % 10
    return x, t, y


@pytest.mark.parametrize("scan_blocks", [False, True], ids=["list", "scan"])
def test_denoiser_on_the_full_state_equals_the_module_call(scan_blocks):
    """denoiser(params, x, t, y) = model(x, t, y); spectrum(params, m, v) = model.spectrum(m, v)."""
    model = build_model({**TINY_GM_DIT, "scan_blocks": scan_blocks}, jax.random.PRNGKey(1))
    _nonzero_spectrum(model, 2)
    denoiser, spectrum = network_functions(model)
    params = nnx.state(model)
    x, t, y = _inputs()
    got, want = jax.jit(denoiser)(params, x, t, y), model(x, t, y)
    assert isinstance(got, GM)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    m, v = _gaussian(2)
    np.testing.assert_allclose(
        jax.jit(spectrum)(params, m, v), model.spectrum(jnp.asarray(m), jnp.asarray(v)), atol=1e-6
    )
    toy = build_model(TINY_TOY_MLP, jax.random.PRNGKey(1))
    toy_denoiser, none = network_functions(toy)
    pts = jax.random.normal(jax.random.PRNGKey(2), (4, 1, 1, 2))
    got, want = toy_denoiser(nnx.state(toy), pts, t[:1].repeat(4), None), toy(pts, t[:1].repeat(4))
    assert none is None
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_functions_are_hashable_static_arguments_equal_for_equal_models():
    """Abstract and concrete builds give equal functions; a jitted call with them traces once."""
    denoiser, spectrum = network_functions(abstract_model(TINY_GM_DIT))
    model = build_model(TINY_GM_DIT, jax.random.PRNGKey(0))
    again, spectrum_again = network_functions(model)
    assert denoiser == again and hash(denoiser) == hash(again) and spectrum == spectrum_again

    @functools.partial(jax.jit, static_argnums=0)
    @chex.assert_max_traces(n=1)
    def mean_of(fn, params, x, t, y):
        return fn(params, x, t, y).means.mean()

    params = nnx.state(model)
    x, t, y = _inputs()
    a = mean_of(denoiser, params, x, t, y)
    b = mean_of(again, params, x + 1.0, t, y)
    assert np.isfinite(a) and a != b


def test_closed_over_params_work_inside_scan_with_stacked_blocks():
    """The lift: a scanned GM-DiT (nnx.scan) closed over by an outer lax.scan body evaluates."""
    model = build_model({**TINY_GM_DIT, "scan_blocks": True}, jax.random.PRNGKey(1))
    denoiser, _ = network_functions(model)
    params = nnx.state(model)
    x, t, y = _inputs()

    @jax.jit
    def two_steps(params):
        def body(carry, _):
            out = denoiser(params, carry, t, y)
            return carry + 0.01 * out.means.mean(axis=-2), None

        return jax.lax.scan(body, x, None, length=2)[0]

    out = two_steps(params)
    assert out.shape == x.shape and np.all(np.isfinite(np.asarray(out)))


def test_lift_keeps_every_leaf_value_and_dtype():
    """lift re-binds float, integer and bool leaves unchanged; PRNG key leaves pass through."""
    tree = {
        "f": jnp.arange(3, dtype=jnp.bfloat16),
        "i": jnp.arange(3, dtype=jnp.int32),
        "b": jnp.array([True, False]),
        "k": jax.random.key(0),
    }
    out = jax.jit(lift)(tree)
    for name in ("f", "i", "b"):
        assert out[name].dtype == tree[name].dtype
        np.testing.assert_array_equal(out[name], tree[name])
    assert jax.random.key_data(out["k"]).tolist() == jax.random.key_data(tree["k"]).tolist()
