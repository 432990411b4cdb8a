"""Sampler settings: `SolverConfig` and THE grammar of a sampler row (docs/math.md §5).

A sampler row names one sampler of an evaluation table, a config, the pipeline's `solver=` and
`tools/sample.py --solver`. One spelling per sampler:

==========================  ===================================================================
row                         sampler
==========================  ===================================================================
`gm_sde[_2][_nospec]`       GM-SDE (§5.1, §5.2); `_2` = 2nd order (§5.5); spectral sampling of
                            x0 (§5.7) when the model has a SpectrumMLP, unless `_nospec`
`gm_ode[_2][_nosub]`        GM-ODE (§5.1, mean mode); `_2` = 2nd order; S analytic substeps per
                            step (§5.6), S = ceil(substeps_total / NFE), or 1 with `_nosub`
`euler`, `ddpm_small`,      flow-matching baselines on the mean (§5.1, §5.9)
`ddpm_large`, `dpmpp_2m`,
`dpmpp_2m_sde`
==========================  ===================================================================

The guidance kind follows the family: probabilistic guidance (§5.3, w in [0, 1), active when w > 0)
for the GM rows, classic CFG (§5.9, w >= 0, active when w > 1) for the baseline rows. The legacy
pipeline spellings `gm_ode2` / `gm_sde2` are accepted and normalized to `gm_ode_2` / `gm_sde_2`
(`format_sampler` always writes the canonical form).

==============================  ==============================================================
name                            what it is
==============================  ==============================================================
`SolverConfig`                  static settings of one jitted sampler run (hashable)
`SamplerRow`                    a parsed row: solver, order, substeps on/off, spectral on/off
`parse_sampler`                 row text -> `SamplerRow` (ValueError naming the nearest form)
`format_sampler`                `SamplerRow` -> its canonical text
`row_solver_config`             the `SolverConfig` of a row at (NFE, w)
`default_substeps`              the paper's GM-ODE substep rule ceil(128 / NFE)
==============================  ==============================================================
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from gmflow_jax import guidance

GM_SOLVERS = ("gm_sde", "gm_ode")
BASELINE_SOLVERS = ("euler", "ddpm_small", "ddpm_large", "dpmpp_2m", "dpmpp_2m_sde")
SOLVERS = GM_SOLVERS + BASELINE_SOLVERS

DEFAULT_SUBSTEPS_TOTAL = 128
"""GM-ODE substeps per sample over the whole grid for 2-D data and ImageNet (`docs/paper-facts.md` §2)."""

GUIDED_PROBABILISTIC_STATIC_SCALE = 0.5
"""Static guidance scale of a guided GM `SolverConfig`; the traced w replaces it when sampling."""

GUIDED_CFG_STATIC_SCALE = 2.0
"""Static guidance scale of a guided CFG `SolverConfig`; the traced w replaces it when sampling."""

LEGACY_SPELLINGS = {"gm_ode2": "gm_ode_2", "gm_sde2": "gm_sde_2"}
"""Accepted older pipeline spellings -> canonical rows (the notebook and old commands use them)."""

ALLOWED_FORMS = "gm_sde[_2][_nospec], gm_ode[_2][_nosub], " + ", ".join(BASELINE_SOLVERS)
"""The grammar in one line (error messages, --help)."""


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Static sampler settings (hashable, so it can be a `jit` static argument)."""

    solver: str = "gm_sde"  # one of SOLVERS
    num_steps: int = 8  # N outer steps = network evaluations (NFE)
    num_substeps: int = 1  # S analytic GM-ODE substeps per outer step (§5.6)
    order: int = 1  # 1, or 2 for GM-SDE 2 / GM-ODE 2 (§5.5)
    guidance_scale: float = 0.0  # probabilistic w in [0, 1) or CFG w (active when > 1)
    guidance: str = "probabilistic"  # "probabilistic" (§5.3) or "cfg" (§5.9)
    orthogonal_guidance: float = 1.0  # projection strength o (§5.3 step 2)
    null_label: int = -1  # the unconditional label, required when guidance is active
    shift: float = 1.0  # timestep shift of the grid (§1.2)
    gm2_coefs: tuple[float, float] = (0.005, 1.0)  # (c_a, c_b) of §5.5
    gm2_correction_steps: int = 0  # correction iterations of §5.5 step 6
    spectral: bool = False  # GM-SDE: spectral KR sampling of x0 (§5.7), needs a spectrum net

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver={self.solver!r} is unknown; allowed: {', '.join(SOLVERS)}")
        if int(self.num_steps) != self.num_steps or self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps} must be an integer >= 1")
        if int(self.num_substeps) != self.num_substeps or self.num_substeps < 1:
            raise ValueError(f"num_substeps={self.num_substeps} must be an integer >= 1")
        if self.num_substeps > 1 and self.solver != "gm_ode":
            raise ValueError(
                f"num_substeps={self.num_substeps} > 1 needs solver='gm_ode' (mean output), "
                f"got solver={self.solver!r}"
            )
        if self.order not in (1, 2):
            raise ValueError(f"order={self.order} must be 1 or 2")
        if self.order == 2 and self.solver not in GM_SOLVERS:
            raise ValueError(
                f"order=2 applies to the GM solvers {GM_SOLVERS}; {self.solver!r} has its own order"
            )
        if self.guidance == "probabilistic":
            guidance.check_guidance_scale(self.guidance_scale, "probabilistic")
            if self.guidance_scale > 0 and self.solver not in GM_SOLVERS:
                raise ValueError(
                    f"probabilistic guidance needs a GM solver {GM_SOLVERS}, got "
                    f"solver={self.solver!r}; use guidance='cfg' for the baselines"
                )
        else:
            guidance.check_guidance_scale(self.guidance_scale, self.guidance)
        if self.guided and self.null_label < 0:
            raise ValueError(
                f"guidance_scale={self.guidance_scale} is active but null_label={self.null_label}; "
                "set null_label to the model's unconditional label"
            )
        if self.spectral and self.solver != "gm_sde":
            raise ValueError(f"spectral=True needs solver='gm_sde', got {self.solver!r}")

    @property
    def guided(self) -> bool:
        """Whether the sampler runs the [uncond; cond] batch (§5.2 step 2.1, §5.9)."""
        if self.guidance == "probabilistic":
            return self.guidance_scale > 0
        return self.guidance_scale > 1

    @property
    def nfe(self) -> int:
        """Network evaluations (each on a 2B batch when guided)."""
        return self.num_steps


def default_substeps(nfe: int) -> int:
    """The paper's GM-ODE substep rule for 2-D data: ceil(128 / NFE) (`docs/paper-facts.md` §2)."""
    return max(1, math.ceil(DEFAULT_SUBSTEPS_TOTAL / nfe))


# --------------------------------------------------------------------------------------------
# The row grammar
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerRow:
    """One sampler row (module docstring). `substeps` / `spectral` are GM-ODE / GM-SDE switches."""

    solver: str
    order: int = 1
    substeps: bool = True  # GM-ODE: ceil(substeps_total / NFE) substeps; False = `_nosub`
    spectral: bool = True  # GM-SDE: spectral sampling when a SpectrumMLP exists; False = `_nospec`

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver={self.solver!r} is unknown; allowed: {', '.join(SOLVERS)}")
        if self.order not in (1, 2) or (self.order == 2 and self.solver not in GM_SOLVERS):
            raise ValueError(
                f"order={self.order} is not allowed for solver={self.solver!r}; "
                "order 2 applies to gm_sde and gm_ode"
            )
        if not self.substeps and self.solver != "gm_ode":
            raise ValueError(f"substeps=False (_nosub) applies to gm_ode, not {self.solver!r}")
        if not self.spectral and self.solver != "gm_sde":
            raise ValueError(f"spectral=False (_nospec) applies to gm_sde, not {self.solver!r}")

    @property
    def is_gm(self) -> bool:
        """Whether the row is a GM solver (needs a GM denoiser)."""
        return self.solver in GM_SOLVERS

    @property
    def guidance(self) -> str:
        """ "probabilistic" for GM rows (w in [0, 1), §5.3), "cfg" for baseline rows (§5.9)."""
        return "probabilistic" if self.is_gm else "cfg"


def format_sampler(row: SamplerRow) -> str:
    """The canonical spelling of `row`, e.g. `gm_ode_2_nosub`, `gm_sde`, `dpmpp_2m`."""
    parts = [row.solver]
    if row.order == 2:
        parts.append("2")
    if row.solver == "gm_sde" and not row.spectral:
        parts.append("nospec")
    if row.solver == "gm_ode" and not row.substeps:
        parts.append("nosub")
    return "_".join(parts)


def _all_canonical() -> tuple[str, ...]:
    """Every canonical row (for the nearest-match hint)."""
    rows = [format_sampler(SamplerRow("gm_sde", o, True, s)) for o in (1, 2) for s in (True, False)]
    rows += [
        format_sampler(SamplerRow("gm_ode", o, s, True)) for o in (1, 2) for s in (True, False)
    ]
    return (*rows, *BASELINE_SOLVERS)


CANONICAL_ROWS = _all_canonical()
"""Every canonical row spelling."""


def _unknown(text: object) -> ValueError:
    """The one-line error of an unknown spelling, naming the nearest canonical row."""
    close = difflib.get_close_matches(str(text), CANONICAL_ROWS, n=1, cutoff=0.0)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown sampler {text!r}{hint} Allowed: {ALLOWED_FORMS}")


def parse_sampler(text: str | SamplerRow) -> SamplerRow:
    """Row text -> `SamplerRow` (a `SamplerRow` passes through). Legacy `gm_ode2`/`gm_sde2` accepted.

    Raises a one-line ValueError listing the allowed forms and the nearest canonical spelling.
    """
    if isinstance(text, SamplerRow):
        return text
    if not isinstance(text, str):
        raise _unknown(text)
    name = LEGACY_SPELLINGS.get(text, text)
    if name in BASELINE_SOLVERS:
        return SamplerRow(name)
    solver, rest = name[:6], name[6:]
    if solver not in GM_SOLVERS or (rest and not rest.startswith("_")):
        raise _unknown(text)
    tokens = rest[1:].split("_") if rest else []
    order = 1
    if tokens and tokens[0] == "2":
        order, tokens = 2, tokens[1:]
    switch = "nospec" if solver == "gm_sde" else "nosub"
    if tokens not in ([], [switch]):
        raise _unknown(text)
    off = tokens == [switch]
    if solver == "gm_sde":
        return SamplerRow(solver, order, spectral=not off)
    return SamplerRow(solver, order, substeps=not off)


def canonical_sampler(text: str | SamplerRow) -> str:
    """`format_sampler(parse_sampler(text))`: the canonical spelling of any accepted one."""
    return format_sampler(parse_sampler(text))


def guidance_kind(row: str | SamplerRow) -> str:
    """ "probabilistic" for GM rows (w in [0, 1)), "cfg" for baseline rows (active when w > 1)."""
    return parse_sampler(row).guidance


def row_solver_config(
    row: str | SamplerRow,
    nfe: int,
    w: float = 0.0,
    *,
    null_label: int = -1,
    substeps_total: int = DEFAULT_SUBSTEPS_TOTAL,
    num_substeps: int | None = None,
    shift: float = 1.0,
    orthogonal_guidance: float = 1.0,
    has_spectrum: bool = False,
) -> SolverConfig:
    """The `SolverConfig` of sampler `row` at `nfe` network evaluations and guidance scale w.

    GM-ODE takes S = ceil(substeps_total / nfe) substeps (§5.6), or `num_substeps` when given, or 1
    for `_nosub`. GM-SDE samples spectrally (§5.7) iff the row allows it and `has_spectrum`. The
    config is guided iff w is active (probabilistic w > 0, CFG w > 1); its static scale is a
    stand-in: pass w as the traced `guidance_scale` of `solvers.sample` / the sampling driver.
    """
    parsed = parse_sampler(row)
    if isinstance(nfe, bool) or int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe={nfe!r} must be an integer >= 1")
    nfe = int(nfe)
    kind = parsed.guidance
    guidance.check_guidance_scale(w, kind)
    if not math.isfinite(float(w)):
        raise ValueError(f"guidance_scale={w} must be finite")
    if num_substeps is not None:
        if isinstance(num_substeps, bool) or int(num_substeps) != num_substeps or num_substeps < 1:
            raise ValueError(f"num_substeps={num_substeps!r} must be an integer >= 1")
        if num_substeps > 1 and not (parsed.solver == "gm_ode" and parsed.substeps):
            raise ValueError(
                f"num_substeps={num_substeps} > 1 needs a GM-ODE solver with substeps "
                f"(gm_ode, gm_ode_2), got {format_sampler(parsed)!r}"
            )
        substeps = int(num_substeps)
    elif parsed.solver == "gm_ode" and parsed.substeps:
        substeps = max(1, math.ceil(substeps_total / nfe))
    else:
        substeps = 1
    if kind == "probabilistic":
        static_scale = GUIDED_PROBABILISTIC_STATIC_SCALE if w > 0 else 0.0
    else:
        static_scale = GUIDED_CFG_STATIC_SCALE if w > 1 else 0.0
    return SolverConfig(
        solver=parsed.solver,
        num_steps=nfe,
        num_substeps=substeps,
        order=parsed.order,
        guidance_scale=static_scale,
        guidance=kind,
        orthogonal_guidance=float(orthogonal_guidance),
        null_label=int(null_label),
        shift=float(shift),
        spectral=parsed.solver == "gm_sde" and parsed.spectral and has_spectrum,
    )
