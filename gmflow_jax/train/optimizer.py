"""AdamW with a warm-up-then-constant learning rate, bias-free weight decay, clipping and step skipping.

Reference `docs/math.md`:

==============================  ==================================================================
function                        docs/math.md
==============================  ==================================================================
`warmup_constant_lr`            §4.6 lr_i = lr (1 - (1 - i/W)(1 - ratio)) for i < W, else lr
`weight_decay_mask`             §4.6 / §10 "Parameter groups": no decay on any parameter named *bias*
`OptimizerConfig`               §4.6 AdamW hyperparameters (ImageNet and checkerboard settings)
`make_adamw`                    §4.6 AdamW (Adam moments + decoupled weight decay), lr applied outside
`apply_gradients`               §4.6 global-norm clip from iteration `clip_begin`; skip the whole step
                                (Adam moments, weight decay, update) when the grad norm is non-finite
                                (§11.11)
==============================  ==================================================================

The learning rate is a pure function of the 0-based training iteration (the train state's step), as the
reference's iteration-based lr hook: a skipped step still advances the iteration (and the lr), while the
Adam moments and their bias-correction count stay as they were (the reference's PyTorch AdamW does not
step a parameter without a gradient). Without skips, `make_adamw` + `apply_gradients` equals
`optax.adamw(schedule, b1, b2, eps, weight_decay, mask)`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and schedule hyperparameters (§4.6); defaults are the checkerboard setting."""

    lr: float = 2e-4
    """Peak (constant) learning rate."""
    b1: float = 0.9
    """Adam beta_1."""
    b2: float = 0.999
    """Adam beta_2 (ImageNet: 0.95)."""
    eps: float = 1e-8
    """Adam epsilon, added to sqrt(v_hat)."""
    weight_decay: float = 0.0
    """Decoupled weight decay on every non-bias parameter (ImageNet: 0.05)."""
    warmup_iters: int = 1000
    """Linear warm-up length W in iterations (0: no warm-up)."""
    warmup_ratio: float = 0.001
    """lr_0 = warmup_ratio * lr."""
    grad_clip_norm: float = 0.0
    """Global L2-norm clip threshold; 0 disables clipping (ImageNet: 10.0)."""
    clip_begin: int = 0
    """First 0-based iteration at which clipping and the non-finite skip apply (ImageNet: 1000)."""
    skip_nonfinite: bool = False
    """Skip the whole update when the grad norm is non-finite (iterations >= clip_begin)."""

    def __post_init__(self):
        """Validate the fields, naming the bad one."""
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"betas must be in [0, 1), got ({self.b1}, {self.b2})")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if not 0 < self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in (0, 1], got {self.warmup_ratio}")
        if self.grad_clip_norm < 0:
            raise ValueError(f"grad_clip_norm must be >= 0 (0 = off), got {self.grad_clip_norm}")
        if self.clip_begin < 0:
            raise ValueError(f"clip_begin must be >= 0, got {self.clip_begin}")


def warmup_constant_lr(lr: float, warmup_iters: int, warmup_ratio: float = 0.001) -> optax.Schedule:
    """lr_i = lr (1 - (1 - i/W)(1 - ratio)) for 0-based i < W, else lr (§4.6)."""

    def schedule(step) -> Array:
        i = jnp.asarray(step, jnp.float32)
        if warmup_iters == 0:
            return jnp.full_like(i, lr)
        # 1 - (1 - i/W)(1 - r) = r + (1 - r) i/W, the second form without float32 cancellation
        factor = warmup_ratio + (1.0 - warmup_ratio) * (i / warmup_iters)
        return jnp.where(i < warmup_iters, lr * factor, lr)

    return schedule


def _is_bias(path) -> bool:
    """True when any key of a pytree path names a bias ("bias" in its name)."""
    return "bias" in jax.tree_util.keystr(path).lower()


def weight_decay_mask(params: PyTree) -> PyTree:
    """Bool pytree like `params`: False for every parameter whose path contains "bias" (§4.6)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: not _is_bias(path), params)


@functools.lru_cache(maxsize=32)
def make_adamw(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Adam moments followed by decoupled weight decay on non-bias parameters; the lr is applied later."""
    return optax.chain(
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask),
    )


def global_norm(grads: PyTree) -> Array:
    """Global L2 norm over all leaves, float32."""
    return optax.global_norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))


def apply_gradients(
    cfg: OptimizerConfig,
    tx: optax.GradientTransformation,
    params: PyTree,
    grads: PyTree,
    opt_state: optax.OptState,
    step: Array,
    lr_schedule: Callable[[Array], Array] | None = None,
) -> tuple[PyTree, optax.OptState, dict[str, Array]]:
    """One AdamW update at 0-based iteration `step`; returns (params, opt_state, metrics).

    From iteration `clip_begin` on: the gradient is clipped to global norm `grad_clip_norm` (if > 0)
    and, if `skip_nonfinite`, a non-finite grad norm skips the step (params and opt_state unchanged).
    Before `clip_begin` non-finite gradients propagate. Metrics: `grad_norm` (before clipping), `lr`,
    `skipped` (1.0 when the update was dropped).
    """
    schedule = lr_schedule or warmup_constant_lr(cfg.lr, cfg.warmup_iters, cfg.warmup_ratio)
    lr = schedule(step)
    norm = global_norm(grads)
    active = step >= cfg.clip_begin
    if cfg.grad_clip_norm > 0:
        scale = jnp.where(active & (norm > cfg.grad_clip_norm), cfg.grad_clip_norm / norm, 1.0)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = jax.tree.map(lambda p, u: p - (lr * u).astype(p.dtype), params, updates)
    skip = (active & ~jnp.isfinite(norm)) if cfg.skip_nonfinite else jnp.array(False)
    if cfg.skip_nonfinite:
        new_params = jax.tree.map(lambda new, old: jnp.where(skip, old, new), new_params, params)
        new_opt_state = jax.tree.map(
            lambda new, old: jnp.where(skip, old, new), new_opt_state, opt_state
        )
    metrics = {"grad_norm": norm, "lr": lr, "skipped": skip.astype(jnp.float32)}
    return new_params, new_opt_state, metrics
