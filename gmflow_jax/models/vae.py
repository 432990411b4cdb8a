"""AutoencoderKL (the Stable Diffusion VAE, `stabilityai/sd-vae-ft-ema`) in Flax NNX (`docs/math.md` §4.8).

`docs/math.md` §4.8: ImageNet 256x256 crops in [-1, 1] are encoded to 32x32x4 latents as a
posterior **sample** times the scaling factor 0.18215; decoding divides by 0.18215 and maps
[-1, 1] to [0, 1] with clamping.

=======================================  ==========================================================
object                                   role
=======================================  ==========================================================
`VAEConfig`, `sd_vae_ft_ema_config`      architecture, parsed from a diffusers `config.json`
`AutoencoderKL.encode`                   image [-1, 1] -> (mean, logvar) of the diagonal Gaussian
`AutoencoderKL.sample_latent`            posterior sample x scaling factor (§4.8 latents)
`AutoencoderKL.decode`                   latents / scaling factor -> image in about [-1, 1]
`images_to_latents`, `latents_to_images` uint8 images <-> latents (§4.8 pre/post-processing)
`pixels_from_uint8`, `pixels_to_uint8`   [0, 255] uint8 <-> [-1, 1] float
`abstract_vae_params`                    parameter shapes by dotted path (what converters fill)
`vae_from_params`, `load_vae`            build a model holding converted parameters
=======================================  ==========================================================

Architecture (diffusers `AutoencoderKL` with `DownEncoderBlock2D` / `UpDecoderBlock2D` blocks), all
tensors channel-last `[B, H, W, C]`; with `c_i = block_out_channels[i]`, `n = len(c)`, `L =
layers_per_block`, every GroupNorm has `norm_num_groups` groups and eps 1e-6, every activation is SiLU:

* `ResnetBlock`: `h = conv2(silu(norm2(conv1(silu(norm1(x))))))`, out `= shortcut(x) + h`, where the
  shortcut is a 1x1 conv when the channel count changes and the identity otherwise; convs 3x3, pad 1.
* `Attention` (mid-block, one head of width C): `h = group_norm(x)` flattened to `[B, HW, C]`,
  `out = x + to_out(softmax(q k^T / sqrt(C)) v)` with linear `to_q`, `to_k`, `to_v`, `to_out`.
* `MidBlock`: resnet -> attention -> resnet (no attention when `mid_block_add_attention` is false).
* Encoder: conv_in 3x3 (in -> c_0); block i: L resnets (c_{i-1} -> c_i, c_{-1} := c_0) then, except
  the last block, a downsampler: zero padding (0, 1) on the bottom and right, then a 3x3 stride-2
  conv with no padding; mid-block (c_{n-1}); GroupNorm, SiLU, conv_out 3x3 (c_{n-1} -> 2 latent).
  `quant_conv` 1x1 (2 latent -> 2 latent); the output splits into mean (first half of the channels)
  and log-variance (second half), the latter clamped to [-30, 20].
* Decoder: `post_quant_conv` 1x1 (latent -> latent); conv_in 3x3 (latent -> c_{n-1}); mid-block;
  block i = 0..n-1 works at width `r_i = c_{n-1-i}`: L + 1 resnets (r_{i-1} -> r_i, r_{-1} := r_0)
  then, except the last block, an upsampler: nearest-neighbour x2, conv 3x3 pad 1; GroupNorm, SiLU,
  conv_out 3x3 (c_0 -> out).

Precision: parameters are always float32. With `dtype=bfloat16` (or float16) every conv, linear,
SiLU and residual add runs in that dtype; every GroupNorm computes its statistics, normalization and
affine transform in float32 and casts the result back; attention logits and softmax are float32.
`encode` returns float32 mean/logvar, posterior sampling is float32, `decode` returns float32.

uint8 conversion (`pixels_to_uint8`): `floor(255 * clip((x + 1) / 2, 0, 1) + 0.5)`, i.e. round half
up on the [0, 1] image, as torchvision's `save_image` / `ToPILImage` do; `pixels_from_uint8` is
`u / 127.5 - 1`, and the uint8 -> float -> uint8 round trip is the identity.

Parameter names mirror the diffusers module tree (`encoder.down_blocks.0.resnets.0.conv1.kernel`);
the diffusers key table that converts a diffusers state dict to them is
`gmflow_jax.interop.key_table.convert_vae_state_dict`, with the other conversion tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmflow_jax.models.flat_params import abstract_flat_params, module_from_flat_params

Array = jax.Array

NORM_EPS = 1e-6
"""Epsilon of every GroupNorm of the VAE (diffusers `resnet_eps`, `conv_norm_out`)."""

LOGVAR_MIN = -30.0
"""Lower clamp of the posterior log-variance (diffusers `DiagonalGaussianDistribution`)."""

LOGVAR_MAX = 20.0
"""Upper clamp of the posterior log-variance (diffusers `DiagonalGaussianDistribution`)."""

SD_VAE_SCALING_FACTOR = 0.18215
"""Latent scaling factor of the Stable Diffusion VAE (`docs/math.md` §4.8)."""

_SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an AutoencoderKL; defaults are `stabilityai/sd-vae-ft-ema`."""

    in_channels: int = 3  # image channels
    out_channels: int = 3  # decoded image channels
    latent_channels: int = 4  # latent channels
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # widths per resolution level
    layers_per_block: int = 2  # resnets per encoder block (decoder blocks have one more)
    norm_num_groups: int = 32  # GroupNorm groups
    sample_size: int = 256  # nominal image size (informational; any divisible size works)
    scaling_factor: float = SD_VAE_SCALING_FACTOR  # latents = (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0  # 0 for the SD VAE (diffusers `shift_factor: null`)
    use_quant_conv: bool = True  # 1x1 conv after the encoder
    use_post_quant_conv: bool = True  # 1x1 conv before the decoder
    mid_block_add_attention: bool = True  # self-attention in the mid-blocks
    dtype: Any = "float32"  # compute dtype (params are always float32)

    def __post_init__(self) -> None:
        """Validate sizes, channel/group divisibility and the dtype."""
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        for name in ("in_channels", "out_channels", "latent_channels", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
            raise ValueError(
                f"VAEConfig.layers_per_block must be a positive int, got {self.layers_per_block!r}"
            )
        if not isinstance(self.sample_size, int) or self.sample_size < 1:
            raise ValueError(
                f"VAEConfig.sample_size must be a positive int, got {self.sample_size!r}"
            )
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels must be non-empty, got ()")
        for c in self.block_out_channels:
            if not isinstance(c, int) or c < 1 or c % self.norm_num_groups:
                raise ValueError(
                    "VAEConfig.block_out_channels must be positive ints divisible by "
                    f"norm_num_groups={self.norm_num_groups}, got {self.block_out_channels}"
                )
        if not (isinstance(self.scaling_factor, int | float) and self.scaling_factor > 0):
            raise ValueError(
                f"VAEConfig.scaling_factor must be a positive number, got {self.scaling_factor!r}"
            )
        if not isinstance(self.shift_factor, int | float):
            raise ValueError(f"VAEConfig.shift_factor must be a number, got {self.shift_factor!r}")
        if jnp.dtype(self.dtype).name not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"VAEConfig.dtype must be one of {_SUPPORTED_DTYPES}, got {self.dtype!r}"
            )

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The compute dtype as a numpy dtype."""
        return jnp.dtype(self.dtype)

    @property
    def downsample_factor(self) -> int:
        """Spatial factor between an image and its latent: 2 ** (len(block_out_channels) - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], *, dtype: Any = "float32") -> VAEConfig:
        """Parse a diffusers AutoencoderKL `config.json` dict; unknown keys are ignored."""
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a mapping (a parsed config.json), got {type(config)}")
        cls_name = config.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ValueError(f"config _class_name must be 'AutoencoderKL', got {cls_name!r}")
        act_fn = config.get("act_fn", "silu")
        if act_fn != "silu":
            raise ValueError(f"config act_fn must be 'silu', got {act_fn!r}")
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                raise ValueError(
                    f"config {key} must be null (per-channel latent stats are unsupported)"
                )
        block_out = tuple(config.get("block_out_channels", (64,)))
        n = len(block_out)
        down = tuple(config.get("down_block_types", (_DOWN_BLOCK,) * n))
        up = tuple(config.get("up_block_types", (_UP_BLOCK,) * n))
        if down != (_DOWN_BLOCK,) * n:
            raise ValueError(
                f"config down_block_types must be {n} x {_DOWN_BLOCK!r} (one per block_out_channels "
                f"entry), got {list(down)}"
            )
        if up != (_UP_BLOCK,) * n:
            raise ValueError(
                f"config up_block_types must be {n} x {_UP_BLOCK!r} (one per block_out_channels "
                f"entry), got {list(up)}"
            )
        scaling = config.get("scaling_factor")
        shift = config.get("shift_factor")
        return cls(
            in_channels=config.get("in_channels", 3),
            out_channels=config.get("out_channels", 3),
            latent_channels=config.get("latent_channels", 4),
            block_out_channels=block_out,
            layers_per_block=config.get("layers_per_block", 1),
            norm_num_groups=config.get("norm_num_groups", 32),
            sample_size=config.get("sample_size", 32),
            scaling_factor=SD_VAE_SCALING_FACTOR if scaling is None else float(scaling),
            shift_factor=0.0 if shift is None else float(shift),
            use_quant_conv=bool(config.get("use_quant_conv", True)),
            use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
            dtype=dtype,
        )

    def to_diffusers(self) -> dict[str, Any]:
        """This config as a diffusers-style dict (the inverse of `from_diffusers`; no dtype)."""
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": [_DOWN_BLOCK] * n,
            "in_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_add_attention": self.mid_block_add_attention,
            "norm_num_groups": self.norm_num_groups,
            "out_channels": self.out_channels,
            "sample_size": self.sample_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor or None,
            "up_block_types": [_UP_BLOCK] * n,
            "use_post_quant_conv": self.use_post_quant_conv,
            "use_quant_conv": self.use_quant_conv,
        }


def sd_vae_ft_ema_config(dtype: Any = "float32") -> VAEConfig:
    """The `stabilityai/sd-vae-ft-ema` architecture (83,653,863 parameters)."""
    return VAEConfig(dtype=dtype)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _conv(c_in: int, c_out: int, k: int, dtype: jnp.dtype, rngs: nnx.Rngs, **kw: Any) -> nnx.Conv:
    """k x k conv, stride 1 and `(k - 1) / 2` padding unless overridden; float32 params."""
    pad = (k - 1) // 2
    kw.setdefault("padding", ((pad, pad), (pad, pad)))
    return nnx.Conv(c_in, c_out, (k, k), dtype=dtype, param_dtype=jnp.float32, rngs=rngs, **kw)


def _linear(c_in: int, c_out: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """Linear with bias; float32 params, `dtype` compute."""
    return nnx.Linear(c_in, c_out, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class GroupNorm(nnx.Module):
    """GroupNorm over `[B, H, W, C]` with float32 statistics and affine; output in `dtype`."""

    def __init__(self, channels: int, groups: int, *, dtype: jnp.dtype):
        if channels % groups:
            raise ValueError(f"GroupNorm channels={channels} must be divisible by groups={groups}")
        self.groups = groups
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        """Normalize each (sample, group) over H, W and the group's channels (eps 1e-6)."""
        b, h, w, c = x.shape
        xg = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + NORM_EPS)).reshape(b, h, w, c)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class ResnetBlock(nnx.Module):
    """Pre-activation residual block without time embedding (diffusers `ResnetBlock2D`)."""

    def __init__(self, c_in: int, c_out: int, groups: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(c_in, groups, dtype=dtype)
        self.conv1 = _conv(c_in, c_out, 3, dtype, rngs)
        self.norm2 = GroupNorm(c_out, groups, dtype=dtype)
        self.conv2 = _conv(c_out, c_out, 3, dtype, rngs)
        self.conv_shortcut = _conv(c_in, c_out, 1, dtype, rngs) if c_in != c_out else None

    def __call__(self, x: Array) -> Array:
        """`shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nnx.Module):
    """Single-head spatial self-attention with a GroupNorm and a residual (mid-block)."""

    def __init__(self, channels: int, groups: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.group_norm = GroupNorm(channels, groups, dtype=dtype)
        self.to_q = _linear(channels, channels, dtype, rngs)
        self.to_k = _linear(channels, channels, dtype, rngs)
        self.to_v = _linear(channels, channels, dtype, rngs)
        self.to_out = _linear(channels, channels, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        """`x + to_out(softmax(q k^T / sqrt(C)) v)` over the H*W positions (float32 softmax)."""
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * (1.0 / math.sqrt(c)), axis=-1).astype(self.dtype)
        o = jnp.einsum("bqk,bkc->bqc", probs, v)
        return x + self.to_out(o).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """resnet -> attention -> resnet at constant width (diffusers `UNetMidBlock2D`)."""

    def __init__(
        self, channels: int, groups: int, add_attention: bool, *, dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        self.resnets = nnx.List(
            [ResnetBlock(channels, channels, groups, dtype=dtype, rngs=rngs) for _ in range(2)]
        )
        self.attentions = nnx.List(
            [Attention(channels, groups, dtype=dtype, rngs=rngs)] if add_attention else []
        )

    def __call__(self, x: Array) -> Array:
        """Apply resnet 0, the attention (if any), resnet 1."""
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    """Zero-pad bottom/right by 1, then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = _conv(
            channels, channels, 3, dtype, rngs, strides=(2, 2), padding=((0, 1), (0, 1))
        )

    def __call__(self, x: Array) -> Array:
        """`[B, H, W, C]` -> `[B, floor((H - 2) / 2) + 1, ..., C]` (H / 2 for even H)."""
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3 conv (padding 1)."""

    def __init__(self, channels: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        """`[B, H, W, C]` -> `[B, 2H, 2W, C]`."""
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class EncoderBlock(nnx.Module):
    """`layers` resnets, then an optional downsampler (diffusers `DownEncoderBlock2D`)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        layers: int,
        groups: int,
        add_downsample: bool,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock(c_in if j == 0 else c_out, c_out, groups, dtype=dtype, rngs=rngs)
                for j in range(layers)
            ]
        )
        self.downsamplers = nnx.List(
            [Downsample(c_out, dtype=dtype, rngs=rngs)] if add_downsample else []
        )

    def __call__(self, x: Array) -> Array:
        """Apply the resnets and the downsampler."""
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class DecoderBlock(nnx.Module):
    """`layers` resnets, then an optional upsampler (diffusers `UpDecoderBlock2D`)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        layers: int,
        groups: int,
        add_upsample: bool,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock(c_in if j == 0 else c_out, c_out, groups, dtype=dtype, rngs=rngs)
                for j in range(layers)
            ]
        )
        self.upsamplers = nnx.List(
            [Upsample(c_out, dtype=dtype, rngs=rngs)] if add_upsample else []
        )

    def __call__(self, x: Array) -> Array:
        """Apply the resnets and the upsampler."""
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Encoder(nnx.Module):
    """Image `[B, H, W, in]` -> Gaussian moments `[B, H/f, W/f, 2 latent]` (before quant_conv)."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        dt, g, ch = config.compute_dtype, config.norm_num_groups, config.block_out_channels
        self.conv_in = _conv(config.in_channels, ch[0], 3, dt, rngs)
        self.down_blocks = nnx.List(
            [
                EncoderBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    config.layers_per_block,
                    g,
                    add_downsample=i < len(ch) - 1,
                    dtype=dt,
                    rngs=rngs,
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = MidBlock(ch[-1], g, config.mid_block_add_attention, dtype=dt, rngs=rngs)
        self.conv_norm_out = GroupNorm(ch[-1], g, dtype=dt)
        self.conv_out = _conv(ch[-1], 2 * config.latent_channels, 3, dt, rngs)

    def __call__(self, x: Array) -> Array:
        """conv_in, down blocks, mid-block, GroupNorm, SiLU, conv_out."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent `[B, h, w, latent]` (after post_quant_conv) -> image `[B, f h, f w, out]`."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        dt, g = config.compute_dtype, config.norm_num_groups
        rev = tuple(reversed(config.block_out_channels))
        self.conv_in = _conv(config.latent_channels, rev[0], 3, dt, rngs)
        self.mid_block = MidBlock(rev[0], g, config.mid_block_add_attention, dtype=dt, rngs=rngs)
        self.up_blocks = nnx.List(
            [
                DecoderBlock(
                    rev[max(i - 1, 0)],
                    rev[i],
                    config.layers_per_block + 1,
                    g,
                    add_upsample=i < len(rev) - 1,
                    dtype=dt,
                    rngs=rngs,
                )
                for i in range(len(rev))
            ]
        )
        self.conv_norm_out = GroupNorm(rev[-1], g, dtype=dt)
        self.conv_out = _conv(rev[-1], config.out_channels, 3, dt, rngs)

    def __call__(self, z: Array) -> Array:
        """conv_in, mid-block, up blocks, GroupNorm, SiLU, conv_out."""
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------


class AutoencoderKL(nnx.Module):
    """The KL-regularized image autoencoder of Stable Diffusion (channel-last, `docs/math.md` §4.8)."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        dt, lat = config.compute_dtype, config.latent_channels
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.quant_conv = _conv(2 * lat, 2 * lat, 1, dt, rngs) if config.use_quant_conv else None
        self.post_quant_conv = _conv(lat, lat, 1, dt, rngs) if config.use_post_quant_conv else None

    def _check_image(self, x: Array, name: str, channels: int) -> None:
        """Raise ValueError unless `x` is `[B, H, W, channels]` with H, W divisible as needed."""
        f = self.config.downsample_factor if name == "x" else 1
        if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"{name} must be [B, H, W, {channels}] with H, W divisible by {f}, got shape "
                f"{tuple(x.shape)}"
            )

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Image `[B, H, W, in]` in [-1, 1] -> float32 (mean, logvar), each `[B, H/f, W/f, latent]`."""
        self._check_image(x, "x", self.config.in_channels)
        moments = self.encoder(x.astype(self.config.compute_dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def sample_latent(self, key: Array, x: Array) -> Array:
        """§4.8 latents: `(mean + exp(logvar / 2) * n - shift_factor) * scaling_factor`, float32."""
        mean, logvar = self.encode(x)
        noise = jax.random.normal(key, mean.shape, jnp.float32)
        z = mean + jnp.exp(0.5 * logvar) * noise
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latents: Array) -> Array:
        """Scaled latents `[B, h, w, latent]` -> float32 image `[B, f h, f w, out]`, about [-1, 1]."""
        self._check_image(latents, "latents", self.config.latent_channels)
        z = latents.astype(jnp.float32) / self.config.scaling_factor + self.config.shift_factor
        z = z.astype(self.config.compute_dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Pixel conversions and the §4.8 pipeline helpers
# --------------------------------------------------------------------------------------------


def pixels_from_uint8(images: Array) -> Array:
    """uint8 images in [0, 255] -> float32 in [-1, 1]: `u / 127.5 - 1`."""
    if images.dtype != jnp.uint8:
        raise ValueError(f"images must be uint8, got dtype {images.dtype}")
    return images.astype(jnp.float32) / 127.5 - 1.0


def pixels_to_uint8(x: Array) -> Array:
    """Float image in about [-1, 1] -> uint8: `floor(255 * clip((x + 1) / 2, 0, 1) + 0.5)`."""
    unit = jnp.clip((x.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)
    return jnp.floor(unit * 255.0 + 0.5).astype(jnp.uint8)


def images_to_latents(vae: AutoencoderKL, key: Array, images: Array) -> Array:
    """uint8 images `[B, H, W, 3]` -> §4.8 latents (posterior sample x scaling factor), float32."""
    return vae.sample_latent(key, pixels_from_uint8(images))


def latents_to_images(vae: AutoencoderKL, latents: Array) -> Array:
    """§4.8 latents -> uint8 images `[B, f h, f w, 3]` (decode, clamp [-1, 1] -> [0, 255])."""
    return pixels_to_uint8(vae.decode(latents))


# --------------------------------------------------------------------------------------------
# Parameters: shapes and loading (the diffusers key table is in gmflow_jax.interop.key_table)
# --------------------------------------------------------------------------------------------


def _build(config: VAEConfig):
    """A builder of an `AutoencoderKL` for `config` (for `gmflow_jax.models.flat_params`)."""
    return lambda: AutoencoderKL(config, rngs=nnx.Rngs(0))


def abstract_vae_params(config: VAEConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of this module's parameters, keyed by dotted path (no arrays are materialized)."""
    return abstract_flat_params(_build(config))


def count_vae_params(config: VAEConfig) -> int:
    """Number of scalar parameters of the model described by `config`."""
    return sum(math.prod(v.shape) for v in abstract_vae_params(config).values())


def vae_from_params(config: VAEConfig, params: Mapping[str, Any]) -> AutoencoderKL:
    """Build an `AutoencoderKL` holding `params` (flat dotted keys, as `interop.key_table` converts).

    Raises ValueError naming every missing key, unexpected key and shape mismatch.
    """
    return module_from_flat_params(_build(config), params, "VAE")


def load_vae(
    params_path: str, config_path: str | None = None, *, dtype: Any = "float32"
) -> AutoencoderKL:
    """Load a converted VAE: `params_path` .npz from tools/convert_vae.py, its config json.

    `config_path` defaults to `vae_config.json` next to `params_path`.
    """
    if config_path is None:
        config_path = os.path.join(os.path.dirname(params_path), "vae_config.json")
    with open(config_path) as f:
        config = VAEConfig.from_diffusers(json.load(f), dtype=dtype)
    with np.load(params_path, allow_pickle=False) as data:
        params = {k: data[k] for k in data.files}
    return vae_from_params(config, params)
