"""The FID InceptionV3 of the ADM evaluator in Flax NNX, channel-last (`docs/math.md` §7).

The network is TensorFlow's `inception-2015-12-05` graph (`classify_image_graph_def.pb`, which the ADM
evaluator of openai/guided-diffusion runs), in the layer layout of its PyTorch port
`pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's `fid_inception_v3`: torchvision's Inception3
with `FIDInceptionA/C/E_1/E_2` blocks, no aux head, 1008 classes). Its quirks, all kept here:

* input: NHWC images with values in [0, 255] (uint8 or float), any size, resized bilinearly to 299x299
  and normalized as x -> (x - 128) / 128 (the graph's `Sub`/`Mul` after `ResizeBilinear`);
* the resize of the TF graph is TF1's `ResizeBilinear` with align_corners=False and no half-pixel
  centers (source = dest * in / out); `resize_mode="pytorch"` gives pytorch-fid's
  `F.interpolate(..., align_corners=False)` (half-pixel centers) instead;
* every conv is conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU;
* the 3x3 average pools of the A, C and E_1 blocks leave the zero padding out of the mean
  (count_include_pad=False); the last block (Mixed_7c, E_2) max-pools instead;
* outputs: `pool` (2048, global average of Mixed_7c, the graph's `pool_3`), `logits` (1008, fc with
  bias, the graph's `softmax/logits`) and `spatial` (2023 = 17x17x7, the first 7 channels of
  Mixed_6d's 1x1 branch, the graph's `mixed_6/conv` that ADM's sFID uses). ADM's Inception Score
  multiplies `pool` by the fc weight without the bias: `logits_from_pool(pool, include_bias=False)`.

Weights come from a local file: `convert_torch_state_dict` maps the PyTorch state_dict (key names such
as `Mixed_5b.branch1x1.conv.weight`) to this module's parameters with the rules of `PARAM_RULES` (one
row per parameter kind: rename and axis permutation, OIHW -> HWIO for convs); `weight_mappings()`
lists every key of the state_dict with its shapes, generated from the module itself.
`tools/convert_inception_weights.py` runs the conversion from a .pth (needs torch) or .npz.

==============================  ================================================================
name                            what it is
==============================  ================================================================
`FIDInceptionV3`                the network: `preprocess`, `features`, `__call__`, `logits_from_pool`
`InceptionOutputs`              (pool [B, 2048], logits [B, 1008], spatial [B, 2023])
`resize_bilinear`               NHWC bilinear resize, TF1 legacy or PyTorch half-pixel sampling
`weight_mappings`               every state_dict key -> parameter path, shapes and axis permutation
`convert_torch_state_dict`      PyTorch state_dict arrays -> {parameter path: array}
`inception_from_params`         build the network from converted parameters
`load_fid_inception`            build the network from a converted .npz file
`save_inception_params`         write converted parameters to .npz
`extract_features`              batched, jitted features of many images (numpy out)
==============================  ================================================================
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmflow_jax.atomic_file import write_npz_atomic

Array = jax.Array

INCEPTION_SIZE = 299
"""Side of the square network input; every image is resized to it."""

POOL_DIM = 2048
"""Dimension of the pool features (`pool_3`)."""

NUM_CLASSES = 1008
"""Classes of the graph's softmax (1000 ImageNet classes + 8 unused)."""

BN_EPS = 1e-3
"""BatchNorm epsilon of every conv block."""

INPUT_SHIFT = 128.0
"""Normalization x -> (x - INPUT_SHIFT) / INPUT_SCALE of [0, 255] inputs (the graph's Sub/Mul)."""

INPUT_SCALE = 128.0
"""See INPUT_SHIFT."""

SPATIAL_CHANNELS = 7
"""ADM's sFID keeps the first 7 channels of `mixed_6/conv` (Mixed_6d.branch1x1, 17x17x192)."""

SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
"""Dimension of the flattened spatial features (2023)."""

RESIZE_MODES = ("tf1", "pytorch")
"""`tf1`: the TF graph's ResizeBilinear (ADM); `pytorch`: pytorch-fid's half-pixel interpolate."""

DEFAULT_PRECISION = jax.lax.Precision.HIGHEST
"""Matmul/conv precision: full float32 (no TF32/bf16 passes on GPUs), as the reference computes."""


class InceptionOutputs(NamedTuple):
    """Features of a batch: pool [B, 2048], logits [B, 1008] (with fc bias), spatial [B, 2023]."""

    pool: Array
    logits: Array
    spatial: Array


# ------------------------------------------------------------------------------------------------
# Resize


def _interpolation_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """[out_size, in_size] float32 matrix of 1-D linear interpolation weights (rows sum to 1)."""
    # Source coordinates computed in float32, as both reference kernels do.
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    if mode == "tf1":
        src = dst * scale
    else:
        src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
    low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = (src - low.astype(np.float32)).astype(np.float64)
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix.astype(np.float32)


def resize_bilinear(
    images: Array,
    size: tuple[int, int],
    mode: str = "tf1",
    precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
) -> Array:
    """Bilinear resize of NHWC `images` to `size` = (H', W'), float32, no antialiasing.

    `mode="tf1"`: TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False): source
    coordinate = dest * in / out. `mode="pytorch"`: F.interpolate(mode="bilinear",
    align_corners=False): source = (dest + 0.5) * in / out - 0.5, clamped at 0. Neighbours past the
    last row/column are clamped to it in both. Applied as two interpolation matrices.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape [B, H, W, C], got {images.shape}")
    out_h, out_w = size
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size}")
    x = jnp.asarray(images, jnp.float32)
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) != (out_h, out_w):
        mh = jnp.asarray(_interpolation_matrix(in_h, out_h, mode))
        mw = jnp.asarray(_interpolation_matrix(in_w, out_w, mode))
        x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=precision)
        x = jnp.einsum("pw,bowc->bopc", mw, x, precision=precision)
    return x


# ------------------------------------------------------------------------------------------------
# Layers


def _max_pool_3x3(x: Array, stride: int, padding: int) -> Array:
    """3x3 max pool of NHWC `x` (padding counts as -inf)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    init = jnp.asarray(-jnp.inf, x.dtype)
    return jax.lax.reduce_window(x, init, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def _avg_pool_3x3_excluding_padding(x: Array) -> Array:
    """3x3 stride-1 average pool with padding 1 that divides by the in-image count (TF's `SAME`)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    zero = jnp.asarray(0.0, x.dtype)
    sums = jax.lax.reduce_window(x, zero, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    ones = np.ones((1, x.shape[1], x.shape[2], 1), np.float32)
    counts = np.zeros_like(ones)
    padded = np.pad(ones, pad)
    for i in range(3):
        for j in range(3):
            counts += padded[:, i : i + x.shape[1], j : j + x.shape[2], :]
    return sums / jnp.asarray(counts, x.dtype)


def _filled(shape: tuple[int, ...], value: float) -> Array:
    """A float32 device array of `value` (via device_put: no per-shape compilation when eager)."""
    return jax.device_put(np.full(shape, value, np.float32))


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """(value, value) for an int, the tuple itself otherwise."""
    return (value, value) if isinstance(value, int) else tuple(value)


class Conv2d(nnx.Module):
    """Bias-free 2-D convolution of NHWC inputs with an HWIO `kernel` (zero-initialized)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: int,
        padding: tuple[int, int],
        precision: jax.lax.PrecisionLike,
    ):
        self.kernel = nnx.Param(_filled((*kernel_size, in_channels, out_channels), 0.0))
        self.stride = stride
        self.padding = padding
        self.precision = precision

    def __call__(self, x: Array) -> Array:
        """Cross-correlation with symmetric zero padding, as torch.nn.Conv2d."""
        ph, pw = self.padding
        return jax.lax.conv_general_dilated(
            x,
            self.kernel[...],
            window_strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )


class FrozenBatchNorm(nnx.Module):
    """Inference BatchNorm over the last axis: (x - mean) / sqrt(var + 1e-3) * scale + bias."""

    def __init__(self, channels: int):
        self.scale = nnx.Param(_filled((channels,), 1.0))
        self.bias = nnx.Param(_filled((channels,), 0.0))
        self.mean = nnx.BatchStat(_filled((channels,), 0.0))
        self.var = nnx.BatchStat(_filled((channels,), 1.0))

    def __call__(self, x: Array) -> Array:
        """Normalize with the running statistics."""
        mul = jax.lax.rsqrt(self.var[...] + BN_EPS) * self.scale[...]
        return (x - self.mean[...]) * mul + self.bias[...]


class Dense(nnx.Module):
    """Affine layer: `kernel` [in, out] and `bias` [out] (zero-initialized)."""

    def __init__(self, in_features: int, out_features: int):
        self.kernel = nnx.Param(_filled((in_features, out_features), 0.0))
        self.bias = nnx.Param(_filled((out_features,), 0.0))


class BasicConv2d(nnx.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU, NHWC."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
    ):
        self.conv = Conv2d(
            in_channels, out_channels, _pair(kernel_size), stride, _pair(padding), precision
        )
        self.bn = FrozenBatchNorm(out_channels)

    def __call__(self, x: Array) -> Array:
        """relu(bn(conv(x)))."""
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    """FIDInceptionA: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(excl. padding)-1x1 -> 224 + pool_features."""

    def __init__(self, in_channels: int, pool_features: int, *, precision):
        conv = functools.partial(BasicConv2d, precision=precision)
        self.branch1x1 = conv(in_channels, 64, 1)
        self.branch5x5_1 = conv(in_channels, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(in_channels, pool_features, 1)

    def __call__(self, x: Array) -> Array:
        """Concatenation of the four branches along channels."""
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_excluding_padding(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Grid reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 384 + 96 + in_channels."""

    def __init__(self, in_channels: int, *, precision):
        conv = functools.partial(BasicConv2d, precision=precision)
        self.branch3x3 = conv(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x: Array) -> Array:
        """Concatenation of the three branches along channels."""
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = _max_pool_3x3(x, stride=2, padding=0)
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nnx.Module):
    """FIDInceptionC: factorized 7x7 branches, avgpool excluding padding -> 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int, *, precision):
        conv = functools.partial(BasicConv2d, precision=precision)
        c7 = channels_7x7
        self.branch1x1 = conv(in_channels, 192, 1)
        self.branch7x7_1 = conv(in_channels, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(in_channels, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x: Array) -> Array:
        """Concatenation of the four branches along channels."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        bp = self.branch_pool(_avg_pool_3x3_excluding_padding(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """Grid reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 320 + 192 + in."""

    def __init__(self, in_channels: int, *, precision):
        conv = functools.partial(BasicConv2d, precision=precision)
        self.branch3x3_1 = conv(in_channels, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(in_channels, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x: Array) -> Array:
        """Concatenation of the three branches along channels."""
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))
        bp = _max_pool_3x3(x, stride=2, padding=0)
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nnx.Module):
    """FIDInceptionE_1 (`pool="avg"`, excluding padding) or FIDInceptionE_2 (`pool="max"`) -> 2048."""

    def __init__(self, in_channels: int, pool: str, *, precision):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        conv = functools.partial(BasicConv2d, precision=precision)
        self.pool = pool
        self.branch1x1 = conv(in_channels, 320, 1)
        self.branch3x3_1 = conv(in_channels, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(in_channels, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x: Array) -> Array:
        """Concatenation of 320 + (384 + 384) + (384 + 384) + 192 channels."""
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3_excluding_padding(x)
        else:
            pooled = _max_pool_3x3(x, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nnx.Module):
    """The FID InceptionV3 (TF `inception-2015-12-05` / `pt_inception-2015-12-05`), NHWC, float32.

    Attribute names follow the PyTorch state_dict (`Conv2d_1a_3x3`, `Mixed_5b`, ..., `fc`), so a
    parameter path is the state_dict key with `/` for `.` and the renames of `PARAM_RULES`. Weights
    start at zero (BatchNorm at identity), so no `rngs`: the network only runs with loaded weights
    (`load_fid_inception`, `inception_from_params`).
    """

    def __init__(
        self,
        *,
        resize_mode: str = "tf1",
        precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
    ):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.resize_mode = resize_mode
        self.precision = precision
        conv = functools.partial(BasicConv2d, precision=precision)
        block = {"precision": precision}
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, **block)
        self.Mixed_5c = InceptionA(256, 64, **block)
        self.Mixed_5d = InceptionA(288, 64, **block)
        self.Mixed_6a = InceptionB(288, **block)
        self.Mixed_6b = InceptionC(768, 128, **block)
        self.Mixed_6c = InceptionC(768, 160, **block)
        self.Mixed_6d = InceptionC(768, 160, **block)
        self.Mixed_6e = InceptionC(768, 192, **block)
        self.Mixed_7a = InceptionD(768, **block)
        self.Mixed_7b = InceptionE(1280, "avg", **block)
        self.Mixed_7c = InceptionE(2048, "max", **block)
        self.fc = Dense(POOL_DIM, NUM_CLASSES)

    def preprocess(self, images: Array) -> Array:
        """[B, H, W, 3] images in [0, 255] -> [B, 299, 299, 3] float32 network input in [-1, 1)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must have shape [B, H, W, 3] (RGB, NHWC), got {images.shape}")
        x = resize_bilinear(
            images, (INCEPTION_SIZE, INCEPTION_SIZE), self.resize_mode, self.precision
        )
        return (x - INPUT_SHIFT) / INPUT_SCALE

    def features(self, x: Array) -> InceptionOutputs:
        """Outputs for a preprocessed input `x` [B, 299, 299, 3] (see `preprocess`)."""
        if x.ndim != 4 or x.shape[1:] != (INCEPTION_SIZE, INCEPTION_SIZE, 3):
            raise ValueError(f"x must have shape [B, 299, 299, 3], got {x.shape}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_3x3(x, stride=2, padding=0)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool_3x3(x, stride=2, padding=0)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        spatial = self.Mixed_6d.branch1x1(x)[..., :SPATIAL_CHANNELS]
        x = self.Mixed_6e(self.Mixed_6d(x))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = jnp.mean(x, axis=(1, 2))
        return InceptionOutputs(
            pool=pool,
            logits=self.logits_from_pool(pool),
            spatial=spatial.reshape(spatial.shape[0], -1),
        )

    def __call__(self, images: Array) -> InceptionOutputs:
        """Outputs for [B, H, W, 3] images in [0, 255] (resized to 299 and normalized first)."""
        return self.features(self.preprocess(images))

    def logits_from_pool(self, pool: Array, *, include_bias: bool = True) -> Array:
        """[B, 1008] logits of pool features; `include_bias=False` is what ADM's IS uses."""
        if pool.ndim != 2 or pool.shape[-1] != POOL_DIM:
            raise ValueError(f"pool must have shape [B, {POOL_DIM}], got {pool.shape}")
        logits = jnp.matmul(pool, self.fc.kernel[...], precision=self.precision)
        return logits + self.fc.bias[...] if include_bias else logits


# ------------------------------------------------------------------------------------------------
# Weights


PARAM_RULES: tuple[tuple[str, str, tuple[int, ...] | None], ...] = (
    # (parameter path suffix here, state_dict key suffix, axes of the torch array in our order)
    ("conv/kernel", "conv.weight", (2, 3, 1, 0)),  # OIHW -> HWIO
    ("bn/scale", "bn.weight", None),
    ("bn/bias", "bn.bias", None),
    ("bn/mean", "bn.running_mean", None),
    ("bn/var", "bn.running_var", None),
    ("fc/kernel", "fc.weight", (1, 0)),  # [out, in] -> [in, out]
    ("fc/bias", "fc.bias", None),
)
"""Every parameter kind: rename of the key's tail and axis permutation (`np.transpose` axes)."""

IGNORED_KEY_SUFFIXES = ("num_batches_tracked",)
"""state_dict entries without a counterpart (BatchNorm step counters of newer PyTorch versions)."""


@dataclass(frozen=True)
class WeightMapping:
    """One state_dict entry: its key, our parameter path, both shapes and the axis permutation."""

    torch_key: str
    param_path: str
    torch_shape: tuple[int, ...]
    param_shape: tuple[int, ...]
    permutation: tuple[int, ...] | None


@functools.cache
def _abstract_split(resize_mode: str, precision: jax.lax.PrecisionLike) -> tuple:
    """(graphdef, flat abstract state) of the network: shapes only, built once per configuration."""
    abstract = nnx.eval_shape(lambda: FIDInceptionV3(resize_mode=resize_mode, precision=precision))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_flat_state(state)


@functools.cache
def weight_mappings() -> tuple[WeightMapping, ...]:
    """Every state_dict key of the PyTorch FID Inception and where it goes, from the module itself."""
    mappings = []
    for path, variable in _abstract_split("tf1", DEFAULT_PRECISION)[1]:
        param_path = "/".join(str(p) for p in path)
        shape = tuple(variable.get_value().shape)
        for ours, theirs, perm in PARAM_RULES:
            if param_path == ours or param_path.endswith("/" + ours):
                prefix = param_path[: -len(ours)].rstrip("/").replace("/", ".")
                torch_key = f"{prefix}.{theirs}" if prefix else theirs
                torch_shape = shape if perm is None else tuple(shape[i] for i in np.argsort(perm))
                mappings.append(WeightMapping(torch_key, param_path, torch_shape, shape, perm))
                break
        else:
            raise ValueError(f"parameter {param_path!r} matches no row of PARAM_RULES")
    return tuple(mappings)


def convert_torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch FID Inception state_dict (numpy arrays) -> {parameter path: float32 array}.

    Raises ValueError on a missing key, an unexpected key (other than `IGNORED_KEY_SUFFIXES`) or a
    shape that differs from the architecture's.
    """
    mappings = weight_mappings()
    expected = {m.torch_key for m in mappings}
    unexpected = sorted(
        k for k in state_dict if k not in expected and not k.endswith(IGNORED_KEY_SUFFIXES)
    )
    missing = sorted(expected - set(state_dict))
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match the FID Inception layout: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    params = {}
    for m in mappings:
        value = np.asarray(state_dict[m.torch_key])
        if value.shape != m.torch_shape:
            raise ValueError(
                f"state_dict[{m.torch_key!r}] has shape {value.shape}, expected {m.torch_shape}"
            )
        if m.permutation is not None:
            value = np.transpose(value, m.permutation)
        params[m.param_path] = np.ascontiguousarray(value, dtype=np.float32)
    return params


def inception_from_params(
    params: Mapping[str, np.ndarray],
    *,
    resize_mode: str = "tf1",
    precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
) -> FIDInceptionV3:
    """Build the network with converted parameters (keys = parameter paths of `weight_mappings`)."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    graphdef, flat = _abstract_split(resize_mode, precision)
    wanted = {"/".join(str(p) for p in path) for path, _ in flat}
    missing, extra = sorted(wanted - set(params)), sorted(set(params) - wanted)
    if missing or extra:
        raise ValueError(
            f"params do not match the network: {len(missing)} missing {missing[:5]}, "
            f"{len(extra)} unexpected {extra[:5]}"
        )
    leaves = []
    for path, variable in flat:
        key = "/".join(str(p) for p in path)
        value = np.asarray(params[key], np.float32)
        if value.shape != tuple(variable.get_value().shape):
            raise ValueError(
                f"params[{key!r}] has shape {value.shape}, expected {variable.get_value().shape}"
            )
        leaves.append((path, variable.replace(jax.device_put(value))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def save_inception_params(params: Mapping[str, np.ndarray], path: str) -> None:
    """Write converted parameters to an uncompressed .npz (keys = parameter paths), atomically."""
    write_npz_atomic(path, **{k: np.asarray(v, np.float32) for k, v in params.items()})


def load_fid_inception(
    path: str,
    *,
    resize_mode: str = "tf1",
    precision: jax.lax.PrecisionLike = DEFAULT_PRECISION,
) -> FIDInceptionV3:
    """The network with parameters from a .npz written by `tools/convert_inception_weights.py`."""
    with np.load(path) as data:
        params = {k: data[k] for k in data.files}
    return inception_from_params(params, resize_mode=resize_mode, precision=precision)


# ------------------------------------------------------------------------------------------------
# Batched extraction


@functools.partial(jax.jit, static_argnums=0)
def _preprocess_jit(graphdef: nnx.GraphDef, state: nnx.State, images: Array) -> Array:
    """Jitted `preprocess` of the split network (compiled once per input shape)."""
    return nnx.merge(graphdef, state).preprocess(images)


@functools.partial(jax.jit, static_argnums=0)
def _features_jit(graphdef: nnx.GraphDef, state: nnx.State, x: Array) -> InceptionOutputs:
    """Jitted `features` of the split network (compiled once per batch size)."""
    return nnx.merge(graphdef, state).features(x)


def extract_features(
    model: FIDInceptionV3,
    images: np.ndarray | Iterable[np.ndarray],
    batch_size: int = 100,
) -> InceptionOutputs:
    """Features (numpy, float32) of images [N, H, W, 3] in [0, 255], or of an iterable of batches.

    Batches are padded to `batch_size` so the network compiles once; outputs are in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, np.ndarray | jax.Array):
        if images.ndim != 4:
            raise ValueError(f"images must have shape [N, H, W, 3], got {images.shape}")
        batches: Iterable = (
            images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)
        )
    else:
        batches = images
    graphdef, state = nnx.split(model)
    outputs: list[InceptionOutputs] = []
    for batch in batches:
        for start in range(0, batch.shape[0], batch_size):
            part = np.asarray(batch[start : start + batch_size])
            n = part.shape[0]
            if n < batch_size:
                part = np.concatenate(
                    [part, np.zeros((batch_size - n, *part.shape[1:]), part.dtype)]
                )
            x = _preprocess_jit(graphdef, state, jax.device_put(part))
            out = _features_jit(graphdef, state, x)
            outputs.append(InceptionOutputs(*(np.asarray(o)[:n] for o in out)))
    if not outputs:
        raise ValueError("images holds no image")
    return InceptionOutputs(*(np.concatenate(parts) for parts in zip(*outputs, strict=True)))
