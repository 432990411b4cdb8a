"""Tests of the Flax AutoencoderKL (gmflow_jax.models.vae) and its diffusers converter
(gmflow_jax.interop.key_table, tools/convert_vae.py), `docs/math.md` §4.8.

The oracle is a float64 NumPy forward pass (NCHW, torch weight layouts) that reads the diffusers state
dict directly; the state dict's keys and shapes come from `_diffusers_layout`, a plain description of
the diffusers AutoencoderKL module tree written independently of the converter.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.official_layout import TINY_VAE_CONFIG as TINY_CONFIG
from helpers.official_layout import (
    VAE_ATTENTION_NAMES,
    load_convert_vae_cli,
    random_state_dict,
    vae_layout,
)
from safetensors.numpy import save_file

from gmflow_jax.interop.key_table import convert_vae_state_dict
from gmflow_jax.models.vae import (
    AutoencoderKL,
    VAEConfig,
    count_vae_params,
    images_to_latents,
    latents_to_images,
    load_vae,
    pixels_from_uint8,
    pixels_to_uint8,
    sd_vae_ft_ema_config,
    vae_from_params,
)

# config.json of stabilityai/sd-vae-ft-ema (diffusers 0.4.2 era: no scaling_factor key).
SD_VAE_FT_EMA_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD_VAE_FT_EMA_PARAMS = 83_653_863


def _vae_state_dict(shapes: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights: fan-in scaled kernels, norm scales near 1, small biases."""
    return random_state_dict(shapes, seed, bias_std=0.1, norm_std=0.2)


# ----------------------------------------------------------------------------------------------
# NumPy float64 oracle (NCHW, torch layouts)
# ----------------------------------------------------------------------------------------------


def _np_conv(x, w, b, stride=1, pad=(1, 1, 1, 1)):
    """Cross-correlation of x [B,C,H,W] with w [O,C,kh,kw]; pad = (top, bottom, left, right)."""
    top, bottom, left, right = pad
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    win = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=(2, 3))
    win = win[:, :, ::stride, ::stride]
    return np.einsum("bchwij,ocij->bohw", win, w) + b[None, :, None, None]


def _np_group_norm(x, w, b, groups, eps=1e-6):
    """torch.nn.GroupNorm on [B,C,H,W]."""
    bsz, c, h, wd = x.shape
    xg = x.reshape(bsz, groups, -1)
    xg = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + eps)
    return xg.reshape(bsz, c, h, wd) * w[None, :, None, None] + b[None, :, None, None]


def _silu(x):
    return x / (1.0 + np.exp(-x))


class _Oracle:
    """A float64 NumPy AutoencoderKL reading a diffusers state dict."""

    def __init__(self, sd: dict, cfg: dict):
        self.sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
        self.cfg = cfg
        self.g = cfg["norm_num_groups"]

    def conv(self, name, x, k=3, **kw):
        pad = (k - 1) // 2
        kw.setdefault("pad", (pad,) * 4)
        return _np_conv(x, self.sd[f"{name}.weight"], self.sd[f"{name}.bias"], **kw)

    def norm(self, name, x):
        return _np_group_norm(x, self.sd[f"{name}.weight"], self.sd[f"{name}.bias"], self.g)

    def resnet(self, name, x):
        h = self.conv(f"{name}.conv1", _silu(self.norm(f"{name}.norm1", x)))
        h = self.conv(f"{name}.conv2", _silu(self.norm(f"{name}.norm2", h)))
        if f"{name}.conv_shortcut.weight" in self.sd:
            x = self.conv(f"{name}.conv_shortcut", x, k=1)
        return x + h

    def linear(self, name, t):
        w = self.sd[f"{name}.weight"]
        w = w.reshape(w.shape[0], w.shape[1])
        return t @ w.T + self.sd[f"{name}.bias"]

    def attention(self, name, x):
        bsz, c, h, w = x.shape
        style = "modern" if f"{name}.to_q.weight" in self.sd else "legacy"
        nq, nk, nv, no = (f"{name}.{p}" for p in VAE_ATTENTION_NAMES[style])
        t = self.norm(f"{name}.group_norm", x).reshape(bsz, c, h * w).transpose(0, 2, 1)
        q, k, v = self.linear(nq, t), self.linear(nk, t), self.linear(nv, t)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(c)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = self.linear(no, p @ v)
        return x + o.transpose(0, 2, 1).reshape(bsz, c, h, w)

    def mid(self, name, x):
        x = self.resnet(f"{name}.resnets.0", x)
        x = self.attention(f"{name}.attentions.0", x)
        return self.resnet(f"{name}.resnets.1", x)

    def encode(self, x_nhwc):
        """Image NHWC -> (mean, logvar) NHWC, as diffusers AutoencoderKL.encode."""
        cfg, n = self.cfg, len(self.cfg["block_out_channels"])
        x = self.conv("encoder.conv_in", np.transpose(np.asarray(x_nhwc, np.float64), (0, 3, 1, 2)))
        for i in range(n):
            for j in range(cfg["layers_per_block"]):
                x = self.resnet(f"encoder.down_blocks.{i}.resnets.{j}", x)
            if i < n - 1:
                x = self.conv(
                    f"encoder.down_blocks.{i}.downsamplers.0.conv", x, stride=2, pad=(0, 1, 0, 1)
                )
        x = self.mid("encoder.mid_block", x)
        x = self.conv("encoder.conv_out", _silu(self.norm("encoder.conv_norm_out", x)))
        x = self.conv("quant_conv", x, k=1)
        mean, logvar = np.split(x, 2, axis=1)
        logvar = np.clip(logvar, -30.0, 20.0)
        return np.transpose(mean, (0, 2, 3, 1)), np.transpose(logvar, (0, 2, 3, 1))

    def decode(self, latents_nhwc):
        """Scaled latents NHWC -> image NHWC: decoder(post_quant_conv(latents / scaling_factor))."""
        cfg, n = self.cfg, len(self.cfg["block_out_channels"])
        z = np.transpose(np.asarray(latents_nhwc, np.float64), (0, 3, 1, 2)) / cfg["scaling_factor"]
        x = self.conv("decoder.conv_in", self.conv("post_quant_conv", z, k=1))
        x = self.mid("decoder.mid_block", x)
        for i in range(n):
            for j in range(cfg["layers_per_block"] + 1):
                x = self.resnet(f"decoder.up_blocks.{i}.resnets.{j}", x)
            if i < n - 1:
                x = np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)
                x = self.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", x)
        x = self.conv("decoder.conv_out", _silu(self.norm("decoder.conv_norm_out", x)))
        return np.transpose(x, (0, 2, 3, 1))


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


def _write_vae_dir(path: pathlib.Path, cfg: dict, sd: dict) -> pathlib.Path:
    """A diffusers-style vae/ folder: config.json + diffusion_pytorch_model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(path / "diffusion_pytorch_model.safetensors"))
    return path


@pytest.fixture(scope="module")
def tiny():
    """Tiny config, its random diffusers state dict, the float64 oracle and converted params."""
    sd = _vae_state_dict(vae_layout(TINY_CONFIG))
    config = VAEConfig.from_diffusers(TINY_CONFIG)
    params = convert_vae_state_dict(sd, config)
    return {"sd": sd, "config": config, "params": params, "oracle": _Oracle(sd, TINY_CONFIG)}


def _image(seed: int, shape=(2, 16, 12, 3)) -> np.ndarray:
    """A smooth-ish random image batch in [-1, 1] (non-square to catch H/W mix-ups)."""
    return np.tanh(np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _latents(seed: int, shape=(2, 8, 6, 4)) -> np.ndarray:
    """Random latents at the scale of scaled SD latents."""
    return (0.18215 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# Jitted entry points: one compile per (config, dtype, input shape), shared by the tests.
_encode = nnx.jit(lambda vae, x: vae.encode(x))
_decode = nnx.jit(lambda vae, z: vae.decode(z))
_images_to_latents = nnx.jit(images_to_latents)
_latents_to_images = nnx.jit(latents_to_images)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attention,attn_as_conv",
    [("modern", False), ("legacy", False), ("legacy", True)],
    ids=["to_q", "query", "query_conv1x1"],
)
def test_converted_encoder_and_decoder_match_numpy_oracle(tmp_path, attention, attn_as_conv):
    """CLI conversion of a safetensors file, then encode/decode equal the float64 NumPy forward."""
    sd = _vae_state_dict(vae_layout(TINY_CONFIG, attention, attn_as_conv), seed=1)
    vae_dir = _write_vae_dir(tmp_path / "vae", TINY_CONFIG, sd)
    assert (
        load_convert_vae_cli().main(["--vae_dir", str(vae_dir), "--out_dir", str(tmp_path / "out")])
        == 0
    )
    vae = load_vae(str(tmp_path / "out" / "vae_params.npz"))
    oracle = _Oracle(sd, TINY_CONFIG)

    x = _image(0)
    mean, logvar = _encode(vae, jnp.asarray(x))
    ref_mean, ref_logvar = oracle.encode(x)
    assert mean.shape == logvar.shape == (2, 8, 6, 4) and mean.dtype == jnp.float32
    assert np.abs(ref_mean).max() > 0.3  # the comparison is not between near-zero tensors
    np.testing.assert_allclose(mean, ref_mean, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logvar, ref_logvar, atol=1e-4, rtol=1e-4)

    z = _latents(1)
    out = _decode(vae, jnp.asarray(z))
    ref = oracle.decode(z)
    assert out.shape == (2, 16, 12, 3) and out.dtype == jnp.float32
    assert np.abs(ref).max() > 0.3
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_logvar_is_clamped_to_minus30_20(tiny):
    """A huge logvar bias in quant_conv saturates at 20 (or -30); the mean is unaffected."""
    x = jnp.asarray(_image(2))
    base_mean, _ = _encode(vae_from_params(tiny["config"], tiny["params"]), x)
    for shift, bound in ((1e3, 20.0), (-1e3, -30.0)):
        params = dict(tiny["params"])
        bias = params["quant_conv.bias"].copy()
        bias[4:] += shift  # channels 4..7 are the log-variance
        params["quant_conv.bias"] = bias
        mean, logvar = _encode(vae_from_params(tiny["config"], params), x)
        np.testing.assert_array_equal(logvar, bound)
        np.testing.assert_array_equal(mean, base_mean)


def test_sample_latent_is_scaled_standardized_gaussian_draw(tiny):
    """images_to_latents = sample_latent of the [-1, 1] image; (z / 0.18215 - mean) / std is N(0, 1)."""
    vae = vae_from_params(tiny["config"], tiny["params"])
    u8 = pixels_to_uint8(jnp.asarray(_image(3)))
    x = pixels_from_uint8(u8)
    mean, logvar = _encode(vae, x)
    eps = []
    for seed in range(4):
        key = jax.random.key(seed)
        z = _images_to_latents(vae, key, u8)
        np.testing.assert_array_equal(z, _images_to_latents(vae, key, u8))  # same key, same draw
        eps.append(np.asarray((z / 0.18215 - mean) / jnp.exp(0.5 * logvar), np.float64).ravel())
    assert not np.allclose(eps[0], eps[1])
    eps = np.concatenate(eps)
    n = eps.size  # 4 keys x 2 x 8 x 6 x 4 = 1536
    assert abs(eps.mean()) < 4.0 / math.sqrt(n)
    assert abs(eps.var() - 1.0) < 4.0 * math.sqrt(2.0 / n)


def test_uint8_pixel_round_trip_and_clamping():
    """uint8 -> [-1, 1] -> uint8 is the identity; out-of-range values clamp; nearest level."""
    u = jnp.arange(256, dtype=jnp.uint8)
    x = pixels_from_uint8(u)
    assert x.dtype == jnp.float32 and float(x[0]) == -1.0 and float(x[-1]) == 1.0
    np.testing.assert_array_equal(pixels_to_uint8(x), u)
    assert np.all(np.diff(np.asarray(x)) > 0)
    extreme = pixels_to_uint8(jnp.array([-5.0, -1.0001, 1.0001, 7.0, jnp.inf, -jnp.inf]))
    np.testing.assert_array_equal(extreme, [0, 0, 255, 255, 255, 0])
    # Nearest level on a dense grid (float64 reference; points within 1e-3 of a tie are skipped).
    grid = np.linspace(-1.2, 1.2, 20001, dtype=np.float32)
    level = (grid.astype(np.float64) + 1.0) / 2.0 * 255.0
    keep = np.abs(level - np.floor(level) - 0.5) > 1e-3
    expected = np.clip(np.round(level), 0, 255)
    np.testing.assert_array_equal(
        np.asarray(pixels_to_uint8(jnp.asarray(grid)))[keep], expected[keep]
    )
    with pytest.raises(ValueError, match="uint8"):
        pixels_from_uint8(jnp.zeros((2,), jnp.float32))


def test_latents_to_images_clamps_the_decoded_image(tiny):
    """latents_to_images = uint8 of clip((decode + 1) / 2), shape [B, 2h, 2w, 3]."""
    vae = vae_from_params(tiny["config"], tiny["params"])
    z = jnp.asarray(_latents(4) * 10.0)  # large latents: decoded values leave [-1, 1]
    decoded = np.asarray(_decode(vae, z))
    assert decoded.min() < -1.0 and decoded.max() > 1.0
    images = np.asarray(_latents_to_images(vae, z))
    assert images.dtype == np.uint8 and images.shape == (2, 16, 12, 3)
    expected = np.floor(np.clip((decoded + 1.0) / 2.0, 0.0, 1.0) * 255.0 + 0.5)
    assert np.abs(images.astype(np.int32) - expected).max() <= 1  # float32 vs float64 at ties
    assert (images == 0).any() and (images == 255).any()


def test_bf16_compute_agrees_with_fp32(tiny):
    """bf16 compute (fp32 params, fp32 GroupNorm stats): max error <= 3% of max |fp32 output| (seen: 1.7%)."""
    fp32 = vae_from_params(tiny["config"], tiny["params"])
    bf16_config = VAEConfig.from_diffusers(TINY_CONFIG, dtype="bfloat16")
    bf16 = vae_from_params(bf16_config, tiny["params"])
    assert bf16.encoder.conv_in.kernel[...].dtype == jnp.float32
    x, z = jnp.asarray(_image(5)), jnp.asarray(_latents(6))
    (mean32, logvar32), (mean16, logvar16) = _encode(fp32, x), _encode(bf16, x)
    for a, b in ((mean32, mean16), (logvar32, logvar16), (_decode(fp32, z), _decode(bf16, z))):
        assert b.dtype == jnp.float32
        err = float(jnp.max(jnp.abs(a - b)))
        scale = float(jnp.max(jnp.abs(a)))
        assert 0.0 < err <= 0.03 * scale, (err, scale)


def test_real_config_shapes_and_parameter_count():
    """sd-vae-ft-ema: 256x256x3 -> 32x32x4 -> 256x256x3 and 83,653,863 params, without materializing."""
    config = VAEConfig.from_diffusers(SD_VAE_FT_EMA_CONFIG)
    assert config == sd_vae_ft_ema_config() and config.scaling_factor == 0.18215
    layout = vae_layout(SD_VAE_FT_EMA_CONFIG, "legacy")
    assert sum(math.prod(s) for s in layout.values()) == SD_VAE_FT_EMA_PARAMS

    graphdef, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0))))
    leaves = jax.tree.leaves(nnx.state(nnx.merge(graphdef, state), nnx.Param))
    assert sum(math.prod(leaf.shape) for leaf in leaves) == SD_VAE_FT_EMA_PARAMS
    image = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    mean, logvar = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state, image)
    assert mean.shape == logvar.shape == (2, 32, 32, 4) and mean.dtype == jnp.float32
    latent = jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32)
    out = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z), state, latent)
    assert out.shape == (2, 256, 256, 3) and out.dtype == jnp.float32


def test_config_parsing_ignores_unknown_keys_and_validates_known_ones():
    """Unknown keys are ignored; to_diffusers round-trips; bad known values raise ValueError."""
    config = VAEConfig.from_diffusers({**TINY_CONFIG, "some_future_key": [1, 2]})
    assert config.block_out_channels == (32, 64) and config.layers_per_block == 1
    layout = vae_layout(TINY_CONFIG)
    assert count_vae_params(config) == sum(math.prod(s) for s in layout.values())
    assert VAEConfig.from_diffusers(config.to_diffusers()) == config
    bad = [
        ({"act_fn": "gelu"}, "act_fn"),
        ({"down_block_types": ["DownBlock2D", "DownEncoderBlock2D"]}, "down_block_types"),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
        ({"norm_num_groups": 5}, "block_out_channels"),
        ({"latents_mean": [0.0] * 4}, "latents_mean"),
        ({"_class_name": "AutoencoderTiny"}, "_class_name"),
    ]
    for override, name in bad:
        with pytest.raises(ValueError, match=name):
            VAEConfig.from_diffusers({**TINY_CONFIG, **override})
    with pytest.raises(ValueError, match="dtype"):
        VAEConfig.from_diffusers(TINY_CONFIG, dtype="int8")


def test_converter_names_unmapped_missing_duplicate_and_misshaped_keys(tiny):
    """Every defect of a state dict is reported by key in one ValueError."""
    config, sd = tiny["config"], dict(tiny["sd"])
    sd["encoder.mid_block.attentions.0.rel_pos.weight"] = np.zeros((3,), np.float32)
    del sd["decoder.conv_out.bias"]
    sd["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    sd["decoder.mid_block.attentions.0.query.weight"] = sd[
        "decoder.mid_block.attentions.0.to_q.weight"
    ]
    sd["decoder.up_blocks.0.resnets.0.conv_shortcut.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    with pytest.raises(ValueError) as info:
        convert_vae_state_dict(sd, config)
    msg = str(info.value)
    for fragment in (
        "unmapped",
        "encoder.mid_block.attentions.0.rel_pos.weight",
        "missing",
        "decoder.conv_out.bias",
        "shape",
        "encoder.conv_in.weight (32, 3, 5, 5)",
        "same parameter",
        "decoder.mid_block.attentions.0.query.weight",
        "does not have",
        "decoder.up_blocks.0.resnets.0.conv_shortcut.weight",
    ):
        assert fragment in msg, (fragment, msg)
    # A clean state dict converts, and a params dict missing a key is refused by vae_from_params.
    params = dict(tiny["params"])
    del params["decoder.conv_in.kernel"]
    with pytest.raises(ValueError, match="decoder.conv_in.kernel"):
        vae_from_params(config, params)


def test_converter_cli_refuses_a_folder_without_weights(tmp_path, capsys):
    """The CLI names the missing file in one line on stderr, exits 1 and writes nothing."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    assert (
        load_convert_vae_cli().main(
            ["--vae_dir", str(tmp_path), "--out_dir", str(tmp_path / "out")]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "diffusion_pytorch_model.safetensors" in err
    assert not (tmp_path / "out").exists()
