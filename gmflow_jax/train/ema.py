"""Exponential moving average of the parameters (`docs/math.md` §4.7).

==============================  ==================================================================
function                        docs/math.md
==============================  ==================================================================
`EMAConfig`                     §4.7 policies: karras (checkerboard), rampup (ImageNet), fixed
`ema_beta`                      §4.7 beta at 0-based iteration i
`ema_update`                    §4.7 theta_ema <- beta theta_ema + (1 - beta) theta
==============================  ==================================================================

The EMA starts as a copy of the initial parameters and is updated after every iteration (interval 1,
start 0), always with the parameters after that iteration's update.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

EMA_POLICIES = ("karras", "rampup", "fixed")
"""The supported beta policies."""


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    """EMA policy and its hyperparameters (§4.7); defaults are the checkerboard setting."""

    policy: str = "karras"
    """One of `EMA_POLICIES`."""
    gamma: float = 7.0
    """karras: beta_i = (1 - 1/(i+1))^(gamma+1)."""
    ema_kimg: float = 30000.0
    """rampup: half-life cap in thousands of images."""
    ema_rampup: float = 0.05
    """rampup: half-life as a fraction of the images seen so far."""
    batch_size: int = 4096
    """rampup: images per iteration (the global batch)."""
    eps: float = 1e-8
    """rampup: floor of n_ema."""
    beta: float = 0.999
    """fixed: the constant beta."""

    def __post_init__(self):
        """Validate the fields, naming the bad one."""
        if self.policy not in EMA_POLICIES:
            raise ValueError(f"EMA policy must be one of {EMA_POLICIES}, got {self.policy!r}")
        if self.gamma < 0:
            raise ValueError(f"karras gamma must be >= 0, got {self.gamma}")
        if self.batch_size < 1:
            raise ValueError(f"rampup batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.beta <= 1:
            raise ValueError(f"fixed beta must be in [0, 1], got {self.beta}")


def ema_beta(cfg: EMAConfig, step) -> Array:
    """The EMA decay beta at 0-based iteration `step` (float32 scalar; §4.7).

    karras: (1 - 1/(i+1))^(gamma+1); rampup: 0.5^(B / max(min(kimg 1000, rampup (i+1) B), eps));
    fixed: the constant.
    """
    i = jnp.asarray(step, jnp.float32)
    if cfg.policy == "karras":
        return (1.0 - 1.0 / (i + 1.0)) ** (cfg.gamma + 1.0)
    if cfg.policy == "rampup":
        n_cur = (i + 1.0) * cfg.batch_size
        n_ema = jnp.minimum(cfg.ema_kimg * 1000.0, cfg.ema_rampup * n_cur)
        return 0.5 ** (cfg.batch_size / jnp.maximum(n_ema, cfg.eps))
    return jnp.full_like(i, cfg.beta)


def ema_update(ema_params: PyTree, params: PyTree, beta: Array) -> PyTree:
    """theta_ema <- beta theta_ema + (1 - beta) theta, leaf-wise, keeping each leaf's dtype."""

    def lerp(e, p):
        b = beta.astype(jnp.float32)
        return (b * e.astype(jnp.float32) + (1.0 - b) * p.astype(jnp.float32)).astype(e.dtype)

    return jax.tree.map(lerp, ema_params, params)
