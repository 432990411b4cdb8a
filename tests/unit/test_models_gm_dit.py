"""Tests of the image networks (`docs/math.md` §6.1, §6.3; oracles §9.26, §9.31, §9.32).

Oracles are independent numpy float64 re-derivations of the docs/math.md formulas (sinusoids, 2-D positions,
a full GM-DiT forward pass with explicit patch/unpatchify index loops, the SpectrumMLP with explicit
FFT-crop index selection), closed-form parameter counts, and gradient checks.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from gmflow_jax.gm import GM
from gmflow_jax.models import (
    DiTBlock,
    GMDiT,
    GMDiTConfig,
    SpectrumMLP,
    gm_dit_config,
    sincos_position_embedding_2d,
    timestep_embedding,
)
from gmflow_jax.models.gm_dit import LOGICAL_AXIS_NAMES
from gmflow_jax.models.logical_axes import logical_param

TINY = GMDiTConfig(
    num_layers=2,
    hidden_size=32,
    num_heads=2,
    patch_size=2,
    in_channels=3,
    sample_size=8,
    num_gaussians=3,
    num_classes=5,
    logstd_inner_dim=16,
)


# Tiny test graphs compile without backend optimization (halves the compile time; same results to
# float32 rounding). Random init uses the "rbg" PRNG, which compiles faster than threefry.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
def _call_split(graphdef, state, *args):
    return nnx.merge(graphdef, state)(*args)


def _forward(model, *args):
    """Jitted `model(*args)`."""
    graphdef, state = nnx.split(model)
    return _call_split(graphdef, state, *args)


def _inputs(cfg: GMDiTConfig, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.sample_size, cfg.sample_size, cfg.in_channels))
    t = rng.uniform(0.0, 1000.0, size=batch)
    y = rng.integers(0, cfg.num_classes + 1, size=batch)
    return jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y, jnp.int32)


def _pure_params(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _model_with_params(cfg: GMDiTConfig, pure: dict) -> GMDiT:
    """A GM-DiT for `cfg` holding copies of `pure` params (built abstractly: no init compile)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GMDiT(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.array, pure))
    return nnx.merge(graphdef, state)


def _stacked(pure: dict, num_layers: int) -> dict:
    """List-layout params -> scan layout (block params stacked along a leading axis)."""
    out = dict(pure)
    blocks = out.pop("blocks")
    out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in range(num_layers)])
    return out


def _perturbed(pure: dict, seed: int = 1, scale: float = 0.1) -> dict:
    """Fill every all-zero param (adaLN, final modulation, logstd_out, biases) with N(0, scale^2)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: p if np.any(np.asarray(p)) else jnp.asarray(scale * rng.standard_normal(p.shape)),
        pure,
    )


@functools.partial(jax.jit, static_argnums=0, compiler_options=_FAST_COMPILE)
def _grad_split(graphdef, state, x, t, y, w):
    def loss(st):
        o = nnx.merge(graphdef, st)(x, t, y)
        return (
            w[0] * jnp.mean(o.means**2)
            + w[1] * jnp.mean(o.logweights**2)
            + w[2] * jnp.sum(o.logstds)
        )

    return jax.grad(loss)(state)


def _grad_mix(model, x, t, y, w):
    """Gradient State of w0 <means^2> + w1 <logweights^2> + w2 sum(logstds) wrt all params."""
    graphdef, state = nnx.split(model)
    return _grad_split(graphdef, state, x, t, y, w)


@pytest.fixture(scope="module")
def tiny_init_params() -> dict:
    """Params of the tiny GM-DiT as initialized (the only eager GM-DiT init of this file)."""
    return _pure_params(GMDiT(TINY, rngs=_rngs(0)))


@pytest.fixture(scope="module")
def tiny_perturbed(tiny_init_params) -> GMDiT:
    return _model_with_params(TINY, _perturbed(tiny_init_params))


@pytest.fixture(scope="module")
def tiny_bf16(tiny_perturbed) -> GMDiT:
    return _model_with_params(
        dataclasses.replace(TINY, dtype="bfloat16"), _pure_params(tiny_perturbed)
    )


def _param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


# --------------------------------------------------------------------------------------------------
# numpy oracles


def _np_timestep(t: np.ndarray, dim: int, shift: float) -> np.ndarray:
    half = dim // 2
    out = np.zeros((len(t), dim))
    for q in range(half):
        f = math.exp(-math.log(10000.0) * q / (half - shift))
        out[:, q] = np.cos(t * f)
        out[:, half + q] = np.sin(t * f)
    return out


def _np_pos(gh: int, gw: int, d: int) -> np.ndarray:
    quarter = d // 4
    out = np.zeros((gh * gw, d))
    for i in range(gh):
        for j in range(gw):
            for q in range(quarter):
                w = 10000.0 ** (-q / quarter)
                out[i * gw + j, q] = math.sin(j * w)
                out[i * gw + j, quarter + q] = math.cos(j * w)
                out[i * gw + j, 2 * quarter + q] = math.sin(i * w)
                out[i * gw + j, 3 * quarter + q] = math.cos(i * w)
    return out


def _np_linear(lin: nnx.Linear, x: np.ndarray) -> np.ndarray:
    return x @ np.asarray(lin.kernel[...], np.float64) + np.asarray(lin.bias[...], np.float64)


def _np_silu(x):
    return x / (1.0 + np.exp(-x))


def _np_ln(x, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def _np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _np_block(blk, h: np.ndarray, sc: np.ndarray, nh: int) -> np.ndarray:
    """Float64 adaLN-Zero block of §6.1 step 3 (chunks shift, scale, gate x2; eps 1e-6 / 1e-5)."""
    bsz, d = h.shape[0], h.shape[-1]
    hd = d // nh
    mod = _np_linear(blk.adaln_modulation, sc)
    sh1, s1, g1, sh2, s2, g2 = (mod[:, None, k * d : (k + 1) * d] for k in range(6))
    xa = _np_ln(h, 1e-6) * (1 + s1) + sh1
    q = _np_linear(blk.attn_q, xa).reshape(bsz, -1, nh, hd)
    k_ = _np_linear(blk.attn_k, xa).reshape(bsz, -1, nh, hd)
    v = _np_linear(blk.attn_v, xa).reshape(bsz, -1, nh, hd)
    att = _np_softmax(np.einsum("bqhd,bkhd->bhqk", q, k_) / math.sqrt(hd), axis=-1)
    o = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(bsz, -1, d)
    h = h + g1 * _np_linear(blk.attn_out, o)
    xm = _np_ln(h, 1e-5) * (1 + s2) + sh2
    return h + g2 * _np_linear(blk.mlp_out, _np_gelu_tanh(_np_linear(blk.mlp_in, xm)))


def _np_gm_dit(model: GMDiT, x, t, y):
    """Float64 GM-DiT forward written from §6.1 with explicit index loops for (un)patchify."""
    cfg = model.config
    x, t, y = np.asarray(x, np.float64), np.asarray(t, np.float64), np.asarray(y)
    bsz, p, g, ch, d = x.shape[0], cfg.patch_size, cfg.grid_size, cfg.in_channels, cfg.hidden_size
    nh = cfg.num_heads
    patches = np.zeros((bsz, g * g, p * p * ch))
    for i in range(g):
        for j in range(g):
            for a in range(p):
                for b in range(p):
                    for c in range(ch):
                        patches[:, i * g + j, (a * p + b) * ch + c] = x[:, i * p + a, j * p + b, c]
    h = _np_linear(model.patch_embed, patches) + _np_pos(g, g, d)[None]
    temb = _np_timestep(t, 256, 0.0)
    temb = _np_linear(
        model.time_embed.linear_2, _np_silu(_np_linear(model.time_embed.linear_1, temb))
    )
    cvec = temb + np.asarray(model.label_embed.embedding[...], np.float64)[y]
    sc = _np_silu(cvec)
    for blk in model.blocks:
        h = _np_block(blk, h, sc, nh)
    fmod = _np_linear(model.final_modulation, sc)
    shift, scale = fmod[:, None, :d], fmod[:, None, d:]
    o = _np_linear(model.final_proj, _np_ln(h, 1e-6) * (1 + scale) + shift)
    gch = cfg.head_channels
    img = np.zeros((bsz, g * p, g * p, gch))
    for i in range(g):
        for j in range(g):
            for a in range(p):
                for b in range(p):
                    for gg in range(gch):
                        img[:, i * p + a, j * p + b, gg] = o[:, i * g + j, (a * p + b) * gch + gg]
    if cfg.mean_only:
        return img
    kk = cfg.num_gaussians
    means = np.zeros(img.shape[:3] + (kk, ch))
    logits = np.zeros(img.shape[:3] + (kk, 1))
    for k in range(kk):
        for c in range(ch):
            means[..., k, c] = img[..., k * ch + c]
        logits[..., k, 0] = img[..., kk * ch + k]
    logw = logits - np.log(np.exp(logits).sum(-2, keepdims=True))
    lam = _np_linear(model.logstd_out, _np_silu(_np_linear(model.logstd_hidden, sc)))
    return means, logw, lam.reshape(bsz, 1, 1, 1, 1)


# --------------------------------------------------------------------------------------------------
# embeddings


def test_timestep_embedding_matches_numpy_formula_both_shifts():
    t = np.array([0.0, 0.37, 17.0, 500.25, 999.5, 1000.0])
    for shift in (0.0, 1.0):
        got = timestep_embedding(jnp.asarray(t, jnp.float32), 256, downscale_freq_shift=shift)
        assert got.dtype == jnp.float32 and got.shape == (6, 256)
        # float32 argument t*f has relative error ~6e-8, i.e. ~6e-5 rad at t = 1000
        np.testing.assert_allclose(np.asarray(got), _np_timestep(t, 256, shift), atol=2e-4)
    # the two variants differ (q/128 vs q/127)
    a = timestep_embedding(jnp.asarray([500.0]), 256, downscale_freq_shift=0.0)
    b = timestep_embedding(jnp.asarray([500.0]), 256, downscale_freq_shift=1.0)
    assert float(jnp.max(jnp.abs(a - b))) > 0.1


def test_timestep_embedding_is_float32_for_bf16_network(tiny_bf16):
    # bf16 spacing near 1000 is 4: if t were cast to bf16 first, 999.0 and 999.5 would coincide
    assert jnp.asarray(999.5, jnp.bfloat16) == jnp.asarray(999.0, jnp.bfloat16)
    out = _forward(tiny_bf16.time_embed, jnp.asarray([999.0, 999.5], jnp.float32))
    assert out.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(out[0].astype(jnp.float32) - out[1].astype(jnp.float32)))) > 1e-2
    # and the whole bf16 GM-DiT's log-std (a function of t and y only) resolves half time units
    x, _, _ = _inputs(TINY)
    out = _forward(tiny_bf16, x, jnp.asarray([999.0, 999.5]), jnp.asarray([1, 1]))
    assert out.logstds[0] != out.logstds[1]


def test_position_embedding_matches_numpy_formula_non_square():
    got = sincos_position_embedding_2d(3, 5, 16)
    assert got.dtype == np.float32 and got.shape == (15, 16)
    np.testing.assert_allclose(got, _np_pos(3, 5, 16), atol=1e-6)
    # the XL/2 grid: 16 x 16 tokens, D = 1152
    np.testing.assert_allclose(
        sincos_position_embedding_2d(16, 16, 1152)[[0, 17, 255]],
        _np_pos(16, 16, 1152)[[0, 17, 255]],
        atol=1e-6,
    )


# --------------------------------------------------------------------------------------------------
# GM-DiT structure, counts, init


def test_param_count_xl2_k8_and_dit_sizes():
    abstract = nnx.eval_shape(
        lambda: GMDiT(gm_dit_config("XL/2", scan_blocks=True), rngs=nnx.Rngs(0))
    )
    assert _param_count(abstract) == 676_164_001
    # the DiT size table, then the closed-form count of a 3-layer S/8 in both block layouts
    for name, (layers, d, heads) in {
        "S": (12, 384, 6),
        "B": (12, 768, 12),
        "L": (24, 1024, 16),
        "XL": (28, 1152, 16),
    }.items():
        for p in (2, 4, 8):
            cfg = gm_dit_config(f"{name}/{p}")
            assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (
                layers,
                d,
                heads,
                p,
            )
    cfg = gm_dit_config("S/8", num_layers=3)
    d, pg = cfg.hidden_size, 8 * 8 * 8 * 5
    patch = (64 * 4 + 1) * d
    time_mlp = (256 + 1) * d + (d + 1) * d
    labels = 1001 * d
    block = (d + 1) * 6 * d + 4 * (d + 1) * d + (d + 1) * 4 * d + (4 * d + 1) * d
    final = (d + 1) * 2 * d + (d + 1) * pg
    logstd = (d + 1) * 1024 + 1024 + 1
    expected = patch + time_mlp + labels + 3 * block + final + logstd
    for scan in (False, True):
        m = nnx.eval_shape(
            lambda s=scan: GMDiT(dataclasses.replace(cfg, scan_blocks=s), rngs=nnx.Rngs(0))
        )
        assert _param_count(m) == expected


def test_spectrum_mlp_param_count():
    abstract = nnx.eval_shape(lambda: SpectrumMLP((4, 32, 32), (64, 8), rngs=nnx.Rngs(0)))
    assert _param_count(abstract) == 37_576


def test_init_logstd_zero_and_output_independent_of_t_and_y(tiny_init_params, tiny_perturbed):
    model = _model_with_params(TINY, tiny_init_params)
    x, _, _ = _inputs(TINY)
    out1 = _forward(model, x, jnp.asarray([0.0, 999.0]), jnp.asarray([0, 5]))
    out2 = _forward(model, x, jnp.asarray([700.0, 3.5]), jnp.asarray([5, 2]))
    np.testing.assert_array_equal(np.asarray(out1.logstds), 0.0)
    np.testing.assert_allclose(out1.means, out2.means, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out1.logweights, out2.logweights, rtol=0, atol=1e-6)
    # the final projection is xavier, not zero: outputs are not trivial at init
    assert float(jnp.std(out1.means)) > 0.1
    # zero-initialized exactly: adaLN modulations, final modulation, last log-std linear
    for blk in tiny_init_params["blocks"].values():
        assert not np.any(blk["adaln_modulation"]["kernel"])
    assert not np.any(tiny_init_params["final_modulation"]["kernel"])
    assert not np.any(tiny_init_params["logstd_out"]["kernel"])
    # with non-zero adaLN weights the same comparison does depend on (t, y)
    out3 = _forward(tiny_perturbed, x, jnp.asarray([0.0, 999.0]), jnp.asarray([0, 5]))
    out4 = _forward(tiny_perturbed, x, jnp.asarray([700.0, 3.5]), jnp.asarray([5, 2]))
    assert float(jnp.max(jnp.abs(out3.means - out4.means))) > 1e-2


def test_output_shapes_dtypes_and_logsoftmax_normalization(tiny_perturbed):
    x, t, y = _inputs(TINY, batch=2)
    out = _forward(tiny_perturbed, x, t, y)
    assert isinstance(out, GM)
    assert out.means.shape == (2, 8, 8, 3, 3) and out.means.dtype == jnp.float32
    assert out.logweights.shape == (2, 8, 8, 3, 1) and out.logweights.dtype == jnp.float32
    assert out.logstds.shape == (2, 1, 1, 1, 1) and out.logstds.dtype == jnp.float32
    lse = jax.scipy.special.logsumexp(out.logweights, axis=-2)
    np.testing.assert_allclose(lse, 0.0, atol=1e-6)
    assert float(jnp.std(out.logweights)) > 1e-3  # not uniform: the test can fail


def test_forward_matches_numpy_reference_with_random_weights(tiny_perturbed):
    x, t, y = _inputs(TINY, batch=2, seed=5)
    out = _forward(tiny_perturbed, x, t, y)
    means, logw, lam = _np_gm_dit(tiny_perturbed, x, t, y)
    np.testing.assert_allclose(out.means, means, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.logweights, logw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.logstds, lam, rtol=1e-4, atol=1e-5)


def test_block_layer_norm_eps_on_low_variance_tokens(tiny_perturbed):
    # With token features of variance ~1e-6 the LayerNorm eps matters: 1e-6 before attention,
    # 1e-5 before the MLP (§6.1 step 3). Zeroing the attention gate leaves the MLP norm seeing the
    # same low-variance input, so both norms are checked.
    rng = np.random.default_rng(8)
    h = 1e-3 * rng.standard_normal((2, 16, 32))
    sc = rng.standard_normal((2, 32))
    pure = _pure_params(tiny_perturbed.blocks[0])
    no_gate1 = jax.tree.map(jnp.array, pure)
    no_gate1["adaln_modulation"]["kernel"] = (
        no_gate1["adaln_modulation"]["kernel"].at[:, 64:96].set(0)
    )
    no_gate1["adaln_modulation"]["bias"] = no_gate1["adaln_modulation"]["bias"].at[64:96].set(0)
    for params in (pure, no_gate1):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: DiTBlock(TINY, rngs=nnx.Rngs(0))))
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.array, params))
        blk = nnx.merge(graphdef, state)
        got = _forward(blk, jnp.asarray(h, jnp.float32), jnp.asarray(sc, jnp.float32))
        want = _np_block(blk, h, sc, TINY.num_heads)
        # compare the residual updates (h itself is 1e-3)
        np.testing.assert_allclose(np.asarray(got) - h, want - h, rtol=1e-4, atol=1e-5)


def test_head_layout_from_known_final_projection_pattern(tiny_init_params):
    # At init the blocks are identities and the final modulation is zero; with a zero final kernel
    # the per-token output is the bias, so bias[n] = n exposes the (a p + b) G + g layout (§6.1.5).
    p, kk, ch = TINY.patch_size, TINY.num_gaussians, TINY.in_channels
    gch = TINY.head_channels  # K (C + 1) = 12
    pure = jax.tree.map(lambda a: a, tiny_init_params)
    pure["final_proj"] = {
        "kernel": np.zeros((TINY.hidden_size, p * p * gch), np.float32),
        "bias": np.arange(p * p * gch, dtype=np.float32),
    }
    x, t, y = _inputs(TINY)
    out = _forward(_model_with_params(TINY, pure), x, t, y)
    for row in range(TINY.sample_size):
        for col in range(TINY.sample_size):
            a, b = row % p, col % p
            base = (a * p + b) * gch
            want_means = np.array([[base + k * ch + c for c in range(ch)] for k in range(kk)])
            np.testing.assert_array_equal(out.means[1, row, col], want_means)
            logits = np.array([base + kk * ch + k for k in range(kk)], np.float64)
            want_logw = logits - np.log(np.exp(logits).sum())
            np.testing.assert_allclose(out.logweights[1, row, col, :, 0], want_logw, atol=1e-6)


def test_mean_only_baseline_shape_and_numpy_reference(tiny_perturbed):
    cfg = dataclasses.replace(TINY, mean_only=True, num_gaussians=1)
    assert gm_dit_config("S/2", mean_only=True).num_gaussians == 1
    with pytest.raises(ValueError, match="num_gaussians"):
        dataclasses.replace(TINY, mean_only=True)
    pure = _pure_params(tiny_perturbed)
    del pure["logstd_hidden"], pure["logstd_out"]
    rng = np.random.default_rng(5)
    pure["final_proj"] = {
        "kernel": jnp.asarray(0.2 * rng.standard_normal((32, 4 * 3)), jnp.float32),
        "bias": jnp.asarray(0.1 * rng.standard_normal(4 * 3), jnp.float32),
    }
    model = _model_with_params(cfg, pure)
    assert not hasattr(model, "logstd_hidden")
    x, t, y = _inputs(cfg)
    out = _forward(model, x, t, y)
    assert out.shape == (2, 8, 8, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _np_gm_dit(model, x, t, y), rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise_value_error(tiny_perturbed):
    model = tiny_perturbed
    x, t, y = _inputs(TINY)
    with pytest.raises(ValueError, match="x must have shape"):
        model(x[:, :4], t, y)
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, t[:1], y)
    with pytest.raises(ValueError, match="y must be integer"):
        model(x, t, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="name must be one of"):
        gm_dit_config("XXL/2")
    with pytest.raises(ValueError, match="dtype"):
        dataclasses.replace(TINY, dtype="int8")


# --------------------------------------------------------------------------------------------------
# precision, remat, scan, gradients


def test_bf16_agrees_with_fp32_and_gradients_are_finite(tiny_perturbed, tiny_bf16):
    x, t, y = _inputs(TINY, batch=2, seed=7)
    ref = _forward(tiny_perturbed, x, t, y)
    low = _forward(tiny_bf16, x, t, y)
    assert low.means.dtype == jnp.float32 and low.logstds.dtype == jnp.float32
    # bf16 has an 8-bit mantissa (relative rounding 2^-9 = 2e-3); through two blocks and the head
    # we allow 3% of the output scale and 0.05 in log-weights (measured: 0.45%, 0.009, 0.28%)
    scale = float(jnp.max(jnp.abs(ref.means)))
    assert float(jnp.max(jnp.abs(low.means - ref.means))) < 0.03 * scale
    assert float(jnp.max(jnp.abs(low.logweights - ref.logweights))) < 0.05
    lam_scale = float(jnp.max(jnp.abs(ref.logstds)))
    assert float(jnp.max(jnp.abs(low.logstds - ref.logstds))) < 0.03 * lam_scale
    # and bf16 is really used: the outputs are not bit-identical to float32
    assert float(jnp.max(jnp.abs(low.means - ref.means))) > 0

    grads = _grad_mix(tiny_bf16, x, t, y, jnp.ones(3))
    leaves = jax.tree.leaves(grads)
    assert all(g.dtype == jnp.float32 for g in leaves)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


def test_remat_and_scan_blocks_match_plain_model(tiny_perturbed):
    x, t, y = _inputs(TINY, batch=2, seed=11)
    ref = _forward(tiny_perturbed, x, t, y)
    pure = _pure_params(tiny_perturbed)
    remat = _model_with_params(dataclasses.replace(TINY, remat=True), pure)
    scan = _model_with_params(
        dataclasses.replace(TINY, scan_blocks=True, remat=True), _stacked(pure, 2)
    )
    assert scan.blocks.attn_q.kernel[...].shape == (2, 32, 32)
    for model in (remat, scan):
        out = _forward(model, x, t, y)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # gradients through nnx.scan + nnx.remat equal the plain model's
    w = jnp.asarray([1.0, 1.0, 1.0])
    g_ref = nnx.to_pure_dict(_grad_mix(tiny_perturbed, x, t, y, w))
    g_scan = nnx.to_pure_dict(_grad_mix(scan, x, t, y, w))
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(_stacked(g_ref, 2)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_logstd_head_input_is_stop_gradient(tiny_perturbed):
    x, t, y = _inputs(TINY, batch=2, seed=11)
    g_lam = _grad_mix(tiny_perturbed, x, t, y, jnp.asarray([0.0, 0.0, 1.0]))
    for leaf in jax.tree.leaves(g_lam["label_embed"]) + jax.tree.leaves(g_lam["time_embed"]):
        np.testing.assert_array_equal(leaf, 0.0)
    assert float(jnp.max(jnp.abs(g_lam["logstd_hidden"]["kernel"][...]))) > 0
    # the label table and time MLP do receive gradients through the means
    g_means = _grad_mix(tiny_perturbed, x, t, y, jnp.asarray([1.0, 0.0, 0.0]))
    assert float(jnp.max(jnp.abs(g_means["label_embed"]["embedding"][...]))) > 0
    assert float(jnp.max(jnp.abs(g_means["time_embed"]["linear_1"]["kernel"][...]))) > 0


# --------------------------------------------------------------------------------------------------
# logical axis names


def test_every_parameter_has_logical_axis_names():
    for kw in (dict(), dict(scan_blocks=True)):
        model = nnx.eval_shape(
            lambda kw=kw: GMDiT(dataclasses.replace(TINY, **kw), rngs=nnx.Rngs(0))
        )
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(var.shape), path
            assert set(names) <= set(LOGICAL_AXIS_NAMES), (path, names)
            if kw:
                assert (names[0] == "layers") if path[0] == "blocks" else ("layers" not in names)
    q = nnx.eval_shape(lambda: GMDiT(TINY, rngs=nnx.Rngs(0))).blocks[0].attn_q.kernel
    assert q.get_metadata()["out_sharding"] == ("embed", "heads")


def test_sharded_forward_under_mesh_and_rules_matches_unsharded(tiny_perturbed):
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    rules = tuple((n, None) for n in LOGICAL_AXIS_NAMES if n not in ("batch", "embed"))
    rules += (("batch", "data"), ("embed", "fsdp"))
    x, t, y = _inputs(TINY, batch=2, seed=3)
    ref = _forward(tiny_perturbed, x, t, y)
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(nnx.state(tiny_perturbed, nnx.Param))
    assert specs["blocks"][0]["mlp_in"]["kernel"].get_value() == PartitionSpec("fsdp", None)
    assert specs["label_embed"]["embedding"].get_value() == PartitionSpec(None, "fsdp")
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        # parameters created under a mesh and rules are sharded eagerly
        lin = nnx.Linear(
            32,
            16,
            kernel_init=logical_param(nnx.initializers.lecun_normal(), ("embed", "mlp")),
            rngs=_rngs(0),
        )
        assert lin.kernel[...].sharding.spec == PartitionSpec("fsdp", None)
        # the activation constraints are active inside the jitted forward and change nothing
        out = _forward(tiny_perturbed, x, t, y)
    np.testing.assert_allclose(out.means, ref.means, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.logstds, ref.logstds, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# SpectrumMLP


def _np_spectrum(net: SpectrumMLP, m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Float64 §6.3 with the crop written as a membership test on each frequency index."""
    m, v = np.asarray(m, np.float64), np.asarray(v, np.float64)
    bsz, h, w, c = m.shape
    a1 = v.reshape(bsz, -1).mean(-1)
    a2 = np.stack([m[..., k].reshape(bsz, -1).var(-1, ddof=1) for k in range(c)], -1).mean(-1)
    hid = _np_silu(_np_linear(net.linear_1, np.stack([a1, a2], -1)))
    flat = _np_linear(net.linear_out, _np_silu(_np_linear(net.linear_2, hid)))
    rows = [i for i in range(32) if i < math.ceil(h / 2) or i >= 32 - h // 2]
    cols = [j for j in range(32) if j < math.ceil(w / 2) or j >= 32 - w // 2]
    psi = np.zeros((bsz, h, w, c))
    for ch in range(c):
        sel = np.array([[flat[:, ch * 1024 + i * 32 + j] for j in cols] for i in rows])  # [h, w, B]
        sel = sel.transpose(2, 0, 1).reshape(bsz, -1)
        logp = (
            sel
            - np.log(np.exp(sel - sel.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - sel.max(-1, keepdims=True)
        )
        psi[..., ch] = (logp + math.log(h * w)).reshape(bsz, h, w)
    return psi


def _spectrum(net, m, v):
    return _forward(net, m, v)


def _random_spectrum_net(seed: int) -> SpectrumMLP:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: SpectrumMLP(rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    pure = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), nnx.to_pure_dict(state)
    )
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


_SPECTRUM_CASES = (((32, 32), False), ((16, 16), True), ((7, 10), False), ((2, 3), True))
"""(H, W) and whether v is per pixel: the full base size, even and odd crops, the smallest crop."""


def _spectrum_inputs(h: int, w: int, per_pixel_v: bool, rng: np.random.Generator):
    m = rng.standard_normal((2, h, w, 4)) * np.array([0.5, 1.0, 2.0, 0.1])
    v = rng.uniform(0.1, 2.0, (2, h, w, 1) if per_pixel_v else (2, 1, 1, 1))
    return m, v


def test_spectrum_mlp_zero_at_init():
    net = SpectrumMLP(rngs=_rngs(0))
    assert not np.any(np.asarray(net.linear_out.kernel[...]))
    rng = np.random.default_rng(0)
    for (h, w), per_pixel_v in _SPECTRUM_CASES:
        m, v = _spectrum_inputs(h, w, per_pixel_v, rng)
        psi = _spectrum(net, jnp.asarray(m, jnp.float32), jnp.asarray(v, jnp.float32))
        assert psi.shape == (2, h, w, 4) and psi.dtype == jnp.float32
        np.testing.assert_allclose(psi, 0.0, atol=1e-6)


def test_spectrum_mlp_matches_numpy_crop_layout_and_preserves_power():
    net = _random_spectrum_net(seed=4)
    rng = np.random.default_rng(1)
    for (h, w), per_pixel_v in _SPECTRUM_CASES:
        m, v = _spectrum_inputs(h, w, per_pixel_v, rng)
        psi = _spectrum(net, jnp.asarray(m, jnp.float32), jnp.asarray(v, jnp.float32))
        np.testing.assert_allclose(psi, _np_spectrum(net, m, v), rtol=1e-5, atol=1e-4)
        # total power per channel preserved: mean_ij exp(psi) = 1 (oracle §9.26)
        np.testing.assert_allclose(jnp.mean(jnp.exp(psi), axis=(1, 2)), 1.0, rtol=1e-5)
        assert float(jnp.std(psi)) > 0.1  # not flat: the checks above can fail


def test_spectrum_mlp_uses_unbiased_spatial_variance():
    # psi depends on the inputs only through (a1, a2). The 2x2 image [0, 1; 0, 1] has unbiased
    # variance 1/3 (biased 1/4); a 2x3 image [0, 0, 0; 1, 1, 1] * s has unbiased variance 0.3 s^2,
    # so s^2 = 10/9 reproduces 1/3 and s^2 = 5/6 reproduces 1/4. The 2x3 crop keeps frequency
    # columns (0, 1, 31) and the 2x2 crop (0, 31), so columns [0, 2] of the former are the latter.
    net = _random_spectrum_net(seed=2)
    v = jnp.full((2, 1, 1, 1), 0.5)
    four = np.array([[0.0, 1.0], [0.0, 1.0]])[None, :, :, None] * np.ones((2, 1, 1, 4))

    def six(s2):
        return (
            np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])[None, :, :, None]
            * math.sqrt(s2)
            * np.ones((2, 1, 1, 4))
        )

    def logits(psi):  # log-softmax over the 2x2 frequencies
        return psi - jax.scipy.special.logsumexp(psi, axis=(1, 2), keepdims=True)

    psi_2x2 = _spectrum(net, jnp.asarray(four, jnp.float32), v)
    psi_unb = _spectrum(net, jnp.asarray(six(10 / 9), jnp.float32), v)[:, :, [0, 2]]
    psi_bia = _spectrum(net, jnp.asarray(six(5 / 6), jnp.float32), v)[:, :, [0, 2]]
    np.testing.assert_allclose(logits(psi_2x2), logits(psi_unb), atol=1e-5)
    assert float(jnp.max(jnp.abs(logits(psi_2x2) - logits(psi_bia)))) > 1e-3


def test_spectrum_mlp_bad_sizes_raise():
    net = _random_spectrum_net(seed=0)
    with pytest.raises(ValueError, match="target size"):
        net(jnp.zeros((1, 32, 16, 4)), jnp.ones((1, 1, 1, 1)))
    with pytest.raises(ValueError, match="v must have shape"):
        net(jnp.zeros((1, 16, 16, 4)), jnp.ones((1, 16, 16, 4)))
    with pytest.raises(ValueError, match="m must have shape"):
        net(jnp.zeros((1, 16, 16, 3)), jnp.ones((1, 1, 1, 1)))
