"""SpectrumMLP: per-channel log power spectrum psi from two Gaussian statistics (§6.3).

`docs/math.md` §6.3 (init at the end of §6.3; oracle §9.26):

1. statistics per sample: a1 = mean_{H,W}(v), a2 = mean_C(unbiased Var_{H,W}(m)) (over HW - 1);
2. MLP Linear(2, 64) -> SiLU -> Linear(64, 8) -> SiLU -> Linear(8, C*32*32), output index
   c*1024 + i*32 + j;
3. for a smaller target H x W (both in [2, 32)): keep frequency rows [0, ceil(H/2)) then
   [32 - floor(H/2), 32), and likewise columns (FFT index layout);
4. psi_c = logsoftmax_{(i,j)}(spectrum_c) + log(HW), so mean_{ij} exp(psi_{c,ij}) = 1 per channel.

Init: xavier on the three linears, then the last one zeroed, so psi = 0 at init. Parameters are
float32; the MLP computes in `dtype`; the statistics, log-softmax and the output psi are float32.

Parameter names and conversion from the official `spectrum_net/` (torch Linear `(out, in)` ->
`kernel = weight.T`): `linear_1` <- `mlp.0`, `linear_2` <- `mlp.2`, `linear_out` <- `mlp.4`.
All parameters carry the logical axis names `(None, None)` / `(None,)`: the network is tiny and is
replicated on every device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmflow_jax.models.logical_axes import logical_param

Array = jax.Array

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()


def spectrum_crop_indices(base: int, size: int) -> np.ndarray:
    """Frequency indices kept when cropping a `base`-long FFT axis to `size` (§6.3 step 3)."""
    if size == base:
        return np.arange(base)
    if not 2 <= size < base:
        raise ValueError(f"target size must be {base} or in [2, {base}), got {size}")
    return np.concatenate([np.arange(0, (size + 1) // 2), np.arange(base - size // 2, base)])


def _replicated_linear(
    in_features: int, out_features: int, dtype: Any, rngs: nnx.Rngs, *, zero: bool = False
) -> nnx.Linear:
    """A Linear with xavier (or zero) kernel, zero bias, float32 params, replicated logical axes."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=logical_param(_zeros if zero else _xavier, (None, None)),
        bias_init=logical_param(_zeros, (None,)),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


class SpectrumMLP(nnx.Module):
    """Per-channel log power spectrum psi `[B, H, W, C]` of an x0 Gaussian (m, v) (§6.3)."""

    def __init__(
        self,
        base_size: Sequence[int] = (4, 32, 32),
        layers: Sequence[int] = (64, 8),
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        """Build the MLP 2 -> layers -> C*H0*W0 for `base_size` = (C, H0, W0); last layer zero."""
        base_size = tuple(int(s) for s in base_size)
        layers = tuple(int(n) for n in layers)
        if len(base_size) != 3 or min(base_size) <= 0:
            raise ValueError(f"base_size must be (C, H0, W0) of positive ints, got {base_size}")
        if len(layers) != 2 or min(layers) <= 0:
            raise ValueError(f"layers must be two positive widths (e.g. (64, 8)), got {layers}")
        self.base_size = base_size
        self.dtype = jnp.dtype(dtype)
        c, h0, w0 = base_size
        self.linear_1 = _replicated_linear(2, layers[0], self.dtype, rngs)
        self.linear_2 = _replicated_linear(layers[0], layers[1], self.dtype, rngs)
        self.linear_out = _replicated_linear(layers[1], c * h0 * w0, self.dtype, rngs, zero=True)

    def _statistics(self, m: Array, v: Array) -> Array:
        """`[B, 2]` float32: mean_{H,W}(v) and mean_C of the unbiased spatial variance of m."""
        m = m.astype(jnp.float32)
        v = v.astype(jnp.float32)
        a1 = jnp.mean(v, axis=(1, 2, 3))
        a2 = jnp.mean(jnp.var(m, axis=(1, 2), ddof=1), axis=-1)
        return jnp.stack([a1, a2], axis=-1)

    def __call__(self, m: Array, v: Array) -> Array:
        """psi `[B, H, W, C]` float32 for an x0 Gaussian mean `m` `[B,H,W,C]`, variance `v`."""
        m, v = jnp.asarray(m), jnp.asarray(v)
        c, h0, w0 = self.base_size
        if m.ndim != 4 or m.shape[-1] != c:
            raise ValueError(f"m must have shape [B, H, W, {c}], got {m.shape}")
        b, h, w = m.shape[:3]
        if v.shape not in ((b, h, w, 1), (b, 1, 1, 1)):
            raise ValueError(f"v must have shape [{b},{h},{w},1] or [{b},1,1,1], got {v.shape}")
        if h * w < 2:
            raise ValueError(f"m needs H*W >= 2 for the unbiased variance, got H, W = {h}, {w}")
        if not ((h, w) == (h0, w0) or (h < h0 and w < w0)):
            raise ValueError(
                f"target size (H, W) = ({h}, {w}) must equal the base ({h0}, {w0}) or be strictly "
                "smaller in both dimensions"
            )
        rows = spectrum_crop_indices(h0, h)
        cols = spectrum_crop_indices(w0, w)

        stats = self._statistics(m, v).astype(self.dtype)
        hidden = jax.nn.silu(self.linear_1(stats))
        hidden = jax.nn.silu(self.linear_2(hidden))
        spectrum = self.linear_out(hidden).astype(jnp.float32).reshape(b, c, h0, w0)
        spectrum = spectrum[:, :, rows][:, :, :, cols]
        logp = jax.nn.log_softmax(spectrum.reshape(b, c, h * w), axis=-1) + math.log(h * w)
        return logp.reshape(b, c, h, w).transpose(0, 2, 3, 1)
