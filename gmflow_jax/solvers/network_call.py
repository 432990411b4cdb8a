"""The network call inside a sampler scan: float32 outputs, the guided 2B batch.

Both sampler loops (`gm_loop`, `baseline_loop`) call the denoiser through `evaluate_denoiser`: one
call per outer step, on `[x; x]` with labels `[null; labels]` when guidance is active (docs/math.md
§5.2 step 2.1, §5.9). Re-binding the closed-over parameters inside the scan (for NNX's own
`nnx.scan` over stacked blocks) is the network wrapper's job: `models.denoiser.DenoiserFn` and
`SpectrumFn` lift their state (`models.denoiser.lift`) on every call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gmflow_jax.solvers.config import SolverConfig


def as_f32(tree):
    """Every leaf of `tree` as float32 (GM math and solver updates run in float32)."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a).astype(jnp.float32), tree)


def evaluate_denoiser(denoiser, params, x, t, labels, cfg: SolverConfig):
    """Network call at scalar time t; returns (cond output, uncond output or None), float32."""
    batch = x.shape[0]
    t_batch = jnp.full((batch,), t, jnp.float32)
    if not cfg.guided:
        return as_f32(denoiser(params, x, t_batch, labels)), None
    null = jnp.full((batch,), cfg.null_label, labels.dtype)
    out = denoiser(
        params,
        jnp.concatenate([x, x]),
        jnp.concatenate([t_batch, t_batch]),
        jnp.concatenate([null, labels]),
    )
    out = as_f32(out)
    uncond = jax.tree_util.tree_map(lambda a: a[:batch], out)
    cond = jax.tree_util.tree_map(lambda a: a[batch:], out)
    return cond, uncond
