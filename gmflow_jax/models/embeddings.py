"""Fixed sinusoidal embeddings of the networks: timestep sinusoid and 2-D sin-cos positions.

Reference `docs/math.md`:

================================  ===========================================================
function                          docs/math.md
================================  ===========================================================
`timestep_embedding`              §6.1 step 2 (GM-DiT, shift 0) and §6.4 step 1 (toy MLP, shift 1)
`sincos_position_embedding_2d`    §6.1 step 1 (fixed 2-D position embedding of the patch tokens)
================================  ===========================================================

Both are parameter-free. The timestep sinusoid is always evaluated in float32 (§10 "Precision":
bf16 cannot resolve t in [0, 1000]); callers cast its result to the network dtype. The position
embedding is a numpy constant built at trace time (it is not part of the parameter state).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def timestep_embedding(
    t: Array,
    dim: int = 256,
    *,
    max_period: float = 10000.0,
    downscale_freq_shift: float = 0.0,
) -> Array:
    """Float32 sinusoid `[cos(t f), sin(t f)]` `[B, dim]` of raw times `t` `[B]`.

    Frequencies `f_q = exp(-ln(max_period) q / (dim/2 - downscale_freq_shift))`, q = 0..dim/2-1.
    `downscale_freq_shift=0` is the GM-DiT variant (§6.1, q/128 for dim 256), `1` the toy MLP's
    (§6.4, q/127). `t` is cast to float32 first, whatever its dtype.
    """
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"t must have shape [B], got shape {t.shape}")
    if dim <= 0 or dim % 2 != 0:
        raise ValueError(f"dim must be a positive even integer, got {dim}")
    half = dim // 2
    if half - downscale_freq_shift <= 0:
        raise ValueError(
            f"downscale_freq_shift must be < dim/2 = {half}, got {downscale_freq_shift}"
        )
    exponent = (
        -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    )
    freqs = jnp.exp(exponent)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


@functools.lru_cache(maxsize=16)
def _sincos_position_embedding_2d_cached(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(
        np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij"
    )
    col_args = cols.reshape(-1, 1) * omega[None, :]
    row_args = rows.reshape(-1, 1) * omega[None, :]
    emb = np.concatenate(
        [np.sin(col_args), np.cos(col_args), np.sin(row_args), np.cos(row_args)], axis=-1
    )
    emb = emb.astype(np.float32)
    emb.setflags(write=False)
    return emb


def sincos_position_embedding_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Fixed 2-D embedding `[grid_h*grid_w, dim]` float32; token (i, j) at row i*grid_w + j.

    Token (i, j) gets `[sin(j w), cos(j w), sin(i w), cos(i w)]` with `w_q = 10000^(-q/(dim/4))`,
    q = 0..dim/4-1: the first half encodes the column j, the second half the row i (§6.1 step 1).
    The returned array is read-only (cached).
    """
    if grid_h <= 0 or grid_w <= 0:
        raise ValueError(f"grid_h, grid_w must be positive, got ({grid_h}, {grid_w})")
    if dim <= 0 or dim % 4 != 0:
        raise ValueError(f"dim must be a positive multiple of 4, got {dim}")
    return _sincos_position_embedding_2d_cached(int(grid_h), int(grid_w), int(dim))
