"""Samplers (docs/math.md §5): the grammar of a sampler row and the whole loop as one `lax.scan`.

==============================  ==============================================================
module                          what it holds
==============================  ==============================================================
`solvers.config`                `SolverConfig`, THE sampler-row grammar (`parse_sampler`,
                                `format_sampler`) and the row -> `SolverConfig` mapping
`solvers.entry`                 `sample(denoiser, params, key, noise, labels, cfg, w, spectrum)`:
                                the jitted entry point
`solvers.gm_loop`               GM-SDE / GM-ODE scan (§5.2, §5.5, §5.6, §5.7)
`solvers.baseline_loop`         Euler / DDPM / DPM-Solver++ scan (§5.1, §5.9)
`solvers.network_call`          the (guided) network call inside a scan
`solvers.steps`                 scheduler updates sigma -> sigma' (§5.1)
`solvers.second_order`          the 2nd-order GM correction (§5.5)
==============================  ==============================================================

This package file only re-exports.
"""

from gmflow_jax.solvers import steps
from gmflow_jax.solvers.config import (
    ALLOWED_FORMS,
    BASELINE_SOLVERS,
    CANONICAL_ROWS,
    GM_SOLVERS,
    SOLVERS,
    SamplerRow,
    SolverConfig,
    canonical_sampler,
    default_substeps,
    format_sampler,
    guidance_kind,
    parse_sampler,
    row_solver_config,
)
from gmflow_jax.solvers.entry import sample

__all__ = [
    "ALLOWED_FORMS",
    "BASELINE_SOLVERS",
    "CANONICAL_ROWS",
    "GM_SOLVERS",
    "SOLVERS",
    "SamplerRow",
    "SolverConfig",
    "canonical_sampler",
    "default_substeps",
    "format_sampler",
    "guidance_kind",
    "parse_sampler",
    "row_solver_config",
    "sample",
    "steps",
]
