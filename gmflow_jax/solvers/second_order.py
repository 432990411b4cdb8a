"""The second-order GM correction of GM-SDE 2 / GM-ODE 2 (`docs/math.md` §5.5).

`SecondOrderState` is the small struct the sampling scan carries (previous pre-correction x0-GM,
previous x, t and h, and whether they exist); `gm_second_order` is a pure function of it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gmflow_jax import flow
from gmflow_jax import gm as gmlib
from gmflow_jax.constants import GUIDANCE_EPS, NUM_TIMESTEPS
from gmflow_jax.gm import GM
from gmflow_jax.guidance import GuidanceResult, fold_gaussian, spatial_mean

Array = jax.Array


class SecondOrderState(NamedTuple):
    """What the 2nd-order solver remembers between outer steps (§5.5)."""

    gm: GM  # previous guided, pre-correction x0-GM
    x: Array  # x at the start of the previous outer step
    t: Array  # its time (scalar)
    h: Array  # its step length in t units (scalar)
    valid: Array  # bool scalar: False before the first step


def empty_second_order_state(gm: GM, x: Array) -> SecondOrderState:
    """An invalid (empty) state with the shapes of `gm` and `x`, for the scan carry."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, gm)
    zero = jnp.zeros((), jnp.float32)
    return SecondOrderState(zeros, jnp.zeros_like(x), zero, jnp.ones((), jnp.float32), False)


def _select(pred: Array, a, b):
    return jax.tree_util.tree_map(lambda u, v: jnp.where(pred, u, v), a, b)


def gm_second_order(
    state: SecondOrderState,
    gm: GM,
    gaussian: tuple[Array, Array],
    x: Array,
    t: Array,
    h: Array,
    guidance: GuidanceResult | None = None,
    guidance_scale: float | Array = 0.0,
    coefs: tuple[float, float] = (0.005, 1.0),
    correction_steps: int = 0,
) -> tuple[GM, tuple[Array, Array], SecondOrderState]:
    """Apply §5.5 to the step's guided x0-GM; returns (GM, Gaussian, new state).

    On the first step (invalid state) the GM and Gaussian pass through unchanged. `gaussian` is the
    step's guided Gaussian (per-pixel or per-sample variance).
    """
    c_a, c_b = coefs
    if guidance is not None:
        mean_bar = gmlib.gm_mean(gm)
        base_gm, base_mean, base_var = guidance.cond_gm, guidance.cond_mean, guidance.cond_var
        mean_var = guidance.mean_var
    else:
        mean_bar = gaussian[0]
        base_gm, base_mean = gm, gaussian[0]
        base_var = jnp.mean(gaussian[1], axis=tuple(range(1, gaussian[1].ndim - 1)), keepdims=True)
        mean_var = spatial_mean(base_var)
    mean_from_prev = flow.retarget_mean(state.gm, state.x, state.t, x, t)
    k = 0.5 * h / state.h
    eta = state.h / NUM_TIMESTEPS
    w_eff = guidance_scale * c_b
    extra = mean_var * (w_eff**2 + c_a)
    delta = (mean_bar - mean_from_prev) * k * jnp.sqrt(jnp.maximum(1.0 - extra / eta**2, 0.0))
    bias = delta + guidance.bias if guidance is not None else delta
    power = spatial_mean(bias**2)
    bias = bias * jnp.sqrt(jnp.minimum(mean_var / jnp.maximum(power, GUIDANCE_EPS), 1.0))
    new_mean = base_mean + bias
    new_var = base_var * jnp.maximum(
        1.0 - power / jnp.maximum(mean_var, GUIDANCE_EPS), GUIDANCE_EPS
    )
    new_gm = fold_gaussian(base_gm, base_mean, base_var, new_mean, new_var)
    if correction_steps > 0:
        target = delta + mean_bar - base_mean
        shift = bias
        for _ in range(correction_steps):
            out_bias = gmlib.gm_mean(new_gm) - base_mean
            err = out_bias - target
            ratio = jnp.linalg.norm(shift, axis=-1, keepdims=True) / jnp.maximum(
                jnp.linalg.norm(out_bias, axis=-1, keepdims=True), GUIDANCE_EPS
            )
            shift = shift - err * jnp.minimum(ratio, 1.0)
            p_a = spatial_mean(shift**2)
            shift = shift * jnp.sqrt(jnp.minimum(mean_var / jnp.maximum(p_a, GUIDANCE_EPS), 1.0))
            var_a = base_var * jnp.maximum(
                1.0 - p_a / jnp.maximum(mean_var, GUIDANCE_EPS), GUIDANCE_EPS
            )
            new_gm = fold_gaussian(base_gm, base_mean, base_var, base_mean + shift, var_a)
    out_gm = _select(state.valid, new_gm, gm)
    out_gaussian = _select(state.valid, (new_mean, new_var), tuple(gaussian))
    new_state = SecondOrderState(
        gm, x, jnp.asarray(t, jnp.float32), jnp.asarray(h, jnp.float32), True
    )
    return out_gm, out_gaussian, new_state
