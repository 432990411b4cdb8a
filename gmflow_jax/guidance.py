"""Guidance: probabilistic guidance folded into the GM, and classifier-free guidance baselines.

Reference `docs/math.md`:

===============================  =================================================================
function                         docs/math.md
===============================  =================================================================
`check_guidance_scale`           §5.3 valid range 0 <= w < 1
`spatial_mean`                   §0.3 <a>: mean over all non-batch axes, kept as `[B, 1, ..., 1]`
`orthogonal_projection`          §5.3 step 2 (also used by CFG, §5.9)
`fold_gaussian`                  §5.4 folding a target Gaussian into a base GM
`probabilistic_guidance`         §5.3 probabilistic guidance (+ orthogonal projection)
`cfg_velocity`                   §5.9 classic CFG on a mean velocity (w > 1)
`cfg_gm`                         §5.9 / Table 4 A3: vanilla CFG shifting every GM component mean
===============================  =================================================================

All functions work in x0 space on float32 values (CFG on u works the same way on u values).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gmflow_jax import gm as gmlib
from gmflow_jax.constants import GUIDANCE_EPS
from gmflow_jax.gm import GM

Array = jax.Array


def check_guidance_scale(scale: float, kind: str = "probabilistic") -> None:
    """Raise a ValueError unless `scale` is a valid guidance scale for `kind` (§5.3, §5.9)."""
    if kind == "probabilistic":
        if not 0.0 <= float(scale) < 1.0:
            raise ValueError(
                f"guidance_scale={scale} is outside the probabilistic guidance range [0, 1) "
                "(w >= 1 would give a non-positive variance; this w is not a CFG scale)"
            )
    elif kind == "cfg":
        if not float(scale) >= 0.0:
            raise ValueError(f"guidance_scale={scale} must be >= 0 for CFG (active when > 1)")
    else:
        raise ValueError(f"guidance kind must be 'probabilistic' or 'cfg', got {kind!r}")


def spatial_mean(a: Array) -> Array:
    """<a>: the mean over all non-batch axes, shape `[B, 1, ..., 1]` (§0.3)."""
    return jnp.mean(a, axis=tuple(range(1, a.ndim)), keepdims=True)


def orthogonal_projection(bias: Array, ref: Array, strength: float) -> Array:
    """b - o <b, ref> / max(<ref, ref>, 1e-6) ref, per sample (§5.3 step 2)."""
    coef = spatial_mean(bias * ref) / jnp.maximum(spatial_mean(ref * ref), GUIDANCE_EPS)
    return bias - strength * coef * ref


def fold_gaussian(
    base_gm: GM, base_mean: Array, base_var: Array, target_mean: Array, target_var: Array
) -> GM:
    """Fold N(target) into a base GM with moment-matched N(base): GM x N(t)/N(b) (§5.4).

    Both variances are per-sample scalars `[B, 1, ..., 1]`; the quotient uses the absolute 1e-6 floor of
    §2.6 (active when the shift is near zero).
    """
    q_mean, q_var = gmlib.iso_gaussian_mul_iso_gaussian(
        target_mean, target_var, base_mean, base_var, 1.0, -1.0
    )
    return gmlib.gm_mul_iso_gaussian(base_gm, q_mean, q_var, 1.0, 1.0)


class GuidanceResult(NamedTuple):
    """Outputs of probabilistic guidance, kept for the 2nd-order correction (§5.3, §5.5)."""

    gm: GM  # the guided (folded) x0-GM
    mean: Array  # guided Gaussian mean m_c + b, [B, H, W, C]
    var: Array  # guided Gaussian variance v_c (1 - w^2), [B, 1, 1, 1]
    bias: Array  # b_cfg, [B, H, W, C]
    mean_var: Array  # V-bar, [B, 1, 1, 1]
    cond_gm: GM  # the conditional x0-GM (base of the fold)
    cond_mean: Array  # m_c
    cond_var: Array  # v_c, spatially averaged, [B, 1, 1, 1]


def probabilistic_guidance(
    gm_cond: GM, gm_uncond: GM, scale: float | Array, orthogonal: float = 1.0
) -> GuidanceResult:
    """Probabilistic guidance of the conditional x0-GM by the unconditional one (§5.3, §5.4).

    The bias m_c - m_u (optionally made orthogonal to m_c) is rescaled to RMS w sqrt(V-bar); the guided
    Gaussian N(m_c + b, v_c (1 - w^2)) is folded into GM_cond. `scale` must lie in [0, 1) (checked by
    the caller when it is a Python float).
    """
    if isinstance(scale, (int, float)):
        check_guidance_scale(scale)
    m_c, v_c = gmlib.gm_to_iso_gaussian(gm_cond)
    v_c = jnp.mean(v_c, axis=tuple(range(1, v_c.ndim - 1)), keepdims=True)
    m_u = gmlib.gm_mean(gm_uncond)
    bias = m_c - m_u
    if orthogonal > 0:
        bias = orthogonal_projection(bias, m_c, orthogonal)
    power = spatial_mean(bias**2)
    mean_var = spatial_mean(v_c)
    bias = bias * (scale * jnp.sqrt(mean_var / jnp.maximum(power, GUIDANCE_EPS)))
    mean = m_c + bias
    var = v_c * (1.0 - scale**2)
    folded = fold_gaussian(gm_cond, m_c, v_c, mean, var)
    return GuidanceResult(folded, mean, var, bias, mean_var, gm_cond, m_c, v_c)


def cfg_velocity(u_cond: Array, u_uncond: Array, scale: float, orthogonal: bool = False) -> Array:
    """Classic CFG on a mean prediction: u_c + (u_c - u_u)(w - 1), optionally orthogonal (§5.9)."""
    bias = (u_cond - u_uncond) * (scale - 1.0)
    if orthogonal:
        bias = orthogonal_projection(bias, u_cond, 1.0)
    return u_cond + bias


def cfg_gm(gm_cond: GM, gm_uncond: GM, scale: float, orthogonal: bool = False) -> GM:
    """Vanilla CFG on a GM: shift every component mean by the CFG bias of the GM means (§5.9, A3)."""
    m_c, m_u = gmlib.gm_mean(gm_cond), gmlib.gm_mean(gm_uncond)
    shifted = cfg_velocity(m_c, m_u, scale, orthogonal)
    return GM(gm_cond.means + (shifted - m_c)[..., None, :], gm_cond.logweights, gm_cond.logstds)
