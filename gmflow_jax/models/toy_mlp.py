"""The toy 2-D MLP denoiser of the checkerboard experiment (`GMFlowMLP2DDenoiser`).

Reference `docs/math.md`:

================================  ===========================================================
function / class                  docs/math.md
================================  ===========================================================
`point_position_embedding`        §6.4 step 2 (geometric periods, [sin, cos] per coordinate)
`ToyMLP`                          §6.4 steps 1-5 (time + position embedding, 5 x (Linear, SiLU),
                                  GM head with K means / log-weights / one log-std, init)
`ToyMLP(mean_only=True)`          the flow-matching baseline (§5.9): the same trunk, u-mean head
`ToyMLP(num_classes=C)`           class-conditional: a learned label table (C + 1 rows, row C the
                                  null label, §4.4) added to the time embedding, as GM-DiT's (§6.1)
================================  ===========================================================

Input `x_t` `[B, 1, 1, 2]` (a 2-D point as a 1x1 "image", §0.1) and raw times `t` `[B]` in [0, 1000];
labels `[B]` in 0..C are required when `num_classes` C > 0 and ignored otherwise (C = 0, the
default: the unconditional model, unchanged). Output: a `GM` over u with means `[B, 1, 1, K, 2]`,
log-weights `[B, 1, 1, K, 1]`, log-std `[B, 1, 1, 1, 1]`, all float32 (or, for the baseline, the u
mean `[B, 1, 1, 2]`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gmflow_jax.gm import GM
from gmflow_jax.models.embeddings import timestep_embedding
from gmflow_jax.models.gm_dit import LABEL_TABLE_STD

Array = jax.Array

TOY_TIME_FREQ_SHIFT = 1.0
"""The toy MLP's timestep sinusoid uses f_q = exp(-ln(1e4) q / (dim/2 - 1)) ("downscale_freq_shift"=1, §6.4)."""

kaiming_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
"""PyTorch's `kaiming_normal_(mode='fan_in', nonlinearity='relu')`: N(0, 2 / fan_in), not truncated."""


def point_position_embedding(
    x: Array, dim: int = 256, min_period: float = 5e-3, max_period: float = 50.0
) -> Array:
    """Sin-cos embedding `[B, dim]` of 2-D points `x` `[B, 2]` with geometric periods (§6.4 step 2).

    Periods P_q = exp(ln P_min + q/(n-1) (ln P_max - ln P_min)), q = 0..n-1, n = dim/4; per coordinate
    theta = 2 pi x / P and the vector [sin theta, cos theta]; coordinate 1 first. Float32.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or x.shape[-1] != 2:
        raise ValueError(f"x must have shape [B, 2], got {x.shape}")
    if dim % 4 != 0 or dim < 8:
        raise ValueError(f"dim must be a multiple of 4 and >= 8, got {dim}")
    if not 0 < min_period < max_period:
        raise ValueError(f"need 0 < min_period < max_period, got {min_period}, {max_period}")
    n = dim // 4
    q = jnp.arange(n, dtype=jnp.float32) / (n - 1)
    log_min, log_max = math.log(min_period), math.log(max_period)
    periods = jnp.exp(log_min + q * (log_max - log_min))
    theta = 2.0 * math.pi * x[:, :, None] / periods  # [B, 2, n]
    per_coord = jnp.concatenate([jnp.sin(theta), jnp.cos(theta)], axis=-1)  # [B, 2, 2n]
    return per_coord.reshape(x.shape[0], dim)


def _linear(din: int, dout: int, rngs: nnx.Rngs, zero: bool = False) -> nnx.Linear:
    """A Linear with Kaiming-normal weight (or zeros) and zero bias (§6.4 step 5)."""
    init = nnx.initializers.zeros_init() if zero else kaiming_normal
    return nnx.Linear(
        din, dout, kernel_init=init, bias_init=nnx.initializers.zeros_init(), rngs=rngs
    )


class ToyMLP(nnx.Module):
    """The toy 2-D MLP denoiser: x_t, t -> GM over u (or the u mean when `mean_only`) (§6.4).

    1,412,289 parameters for K = 64 with the defaults (embed 256, hidden 512, 5 layers).
    """

    def __init__(
        self,
        num_gaussians: int = 64,
        *,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        num_layers: int = 5,
        pos_min_period: float = 5e-3,
        pos_max_period: float = 50.0,
        mean_only: bool = False,
        num_classes: int = 0,
        rngs: nnx.Rngs,
    ):
        """Build the trunk and heads with the §6.4 init (log-weight and log-std head weights zeroed)."""
        if num_gaussians < 1 and not mean_only:
            raise ValueError(f"num_gaussians must be >= 1, got {num_gaussians}")
        if embed_dim % 4 != 0 or embed_dim < 8:
            raise ValueError(f"embed_dim must be a multiple of 4 and >= 8, got {embed_dim}")
        if num_layers < 1 or hidden_dim < 1:
            raise ValueError(
                f"need num_layers >= 1 and hidden_dim >= 1, got {num_layers}, {hidden_dim}"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(
                f"num_classes must be an int >= 0 (0 = unconditional), got {num_classes!r}"
            )
        self.num_gaussians = num_gaussians
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.pos_min_period = pos_min_period
        self.pos_max_period = pos_max_period
        self.mean_only = mean_only
        dims = [2 * embed_dim] + [hidden_dim] * num_layers
        self.layers = nnx.List(
            [_linear(a, b, rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )
        if mean_only:
            self.out_u = _linear(hidden_dim, 2, rngs)
        else:
            self.out_means = _linear(hidden_dim, 2 * num_gaussians, rngs)
            self.out_logweights = _linear(hidden_dim, num_gaussians, rngs, zero=True)
            self.out_logstds = _linear(hidden_dim, 1, rngs, zero=True)
        if num_classes > 0:
            # Built last, so the trunk and heads draw the same initial weights as the
            # unconditional model of the same seed. As GM-DiT's label table (§6.1 init): N(0, 0.02)
            # rows, one per class plus the null label's (§4.4), added to the time embedding.
            self.label_embed = nnx.Embed(
                num_classes + 1,
                embed_dim,
                embedding_init=nnx.initializers.normal(LABEL_TABLE_STD),
                rngs=rngs,
            )

    def features(self, x_t: Array, t: Array, labels: Array | None = None) -> Array:
        """Trunk features `[B, hidden]` of points `x_t` `[B, 1, 1, 2]` at times `t` `[B]` or scalar.

        With `num_classes` > 0, `labels` `[B]` (ints in 0..num_classes) are required.
        """
        if x_t.ndim != 4 or x_t.shape[1:] != (1, 1, 2):
            raise ValueError(f"x_t must have shape [B, 1, 1, 2], got {x_t.shape}")
        batch = x_t.shape[0]
        t = jnp.asarray(t, jnp.float32)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"t must be a scalar or have shape [{batch}], got {t.shape}")
        t = jnp.broadcast_to(t, (batch,))
        emb_t = timestep_embedding(t, self.embed_dim, downscale_freq_shift=TOY_TIME_FREQ_SHIFT)
        if self.num_classes > 0:
            if labels is None:
                raise ValueError(
                    f"labels are required by a class-conditional ToyMLP (num_classes="
                    f"{self.num_classes}); pass ints in 0..{self.num_classes} (the last is null)"
                )
            labels = jnp.asarray(labels)
            if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
                raise ValueError(
                    f"labels must be integers of shape [{batch}], got {labels.dtype} {labels.shape}"
                )
            emb_t = emb_t + self.label_embed(labels).astype(jnp.float32)
        emb_x = point_position_embedding(
            x_t.reshape(batch, 2), self.embed_dim, self.pos_min_period, self.pos_max_period
        )
        h = jnp.concatenate([emb_t, emb_x], axis=-1)
        for layer in self.layers:
            h = jax.nn.silu(layer(h))
        return h

    def __call__(self, x_t: Array, t: Array, labels: Array | None = None) -> GM | Array:
        """GM over u (means `[B,1,1,K,2]`, log-weights `[B,1,1,K,1]`, log-std `[B,1,1,1,1]`).

        With `mean_only` the u mean `[B, 1, 1, 2]` instead. `labels` as in `features`.
        """
        return self.head(self.features(x_t, t, labels))

    def head(self, h: Array) -> GM | Array:
        """The output head on trunk features `h` `[B, hidden]`: the GM over u (or the u mean)."""
        batch = h.shape[0]
        if self.mean_only:
            return self.out_u(h).astype(jnp.float32).reshape(batch, 1, 1, 2)
        k = self.num_gaussians
        # One projection for the three heads (the parameters stay three Linears): one [B, 3K + 1]
        # matmul and one input gradient instead of three, the log-std head's a GEMV of width 1
        # (the K=64 train step's head forward + backward: 35 -> 31 ms of CPU at batch 4096).
        heads = (self.out_means, self.out_logweights, self.out_logstds)
        kernel = jnp.concatenate([head.kernel[...] for head in heads], axis=1)
        bias = jnp.concatenate([head.bias[...] for head in heads])
        out = h @ kernel + bias
        means = out[:, : 2 * k].reshape(batch, 1, 1, k, 2)
        logweights = jax.nn.log_softmax(out[:, 2 * k : 3 * k], axis=-1).reshape(batch, 1, 1, k, 1)
        logstds = out[:, 3 * k :].reshape(batch, 1, 1, 1, 1)
        return GM(
            means.astype(jnp.float32), logweights.astype(jnp.float32), logstds.astype(jnp.float32)
        )
