"""The sampler-row grammar (gmflow_jax/solvers/config.py): one spelling per sampler, checked against
an independent enumeration of the allowed forms."""

import itertools

import pytest

from gmflow_jax import solvers
from gmflow_jax.solvers import SamplerRow, format_sampler, parse_sampler, row_solver_config


def _expected_rows():
    """Every canonical spelling, built here from the documented form, independently of the code."""
    out = {}
    for order, off in itertools.product((1, 2), (False, True)):
        name = "gm_sde" + ("_2" if order == 2 else "") + ("_nospec" if off else "")
        out[name] = ("gm_sde", order, True, not off)
        name = "gm_ode" + ("_2" if order == 2 else "") + ("_nosub" if off else "")
        out[name] = ("gm_ode", order, not off, True)
    for name in ("euler", "ddpm_small", "ddpm_large", "dpmpp_2m", "dpmpp_2m_sde"):
        out[name] = (name, 1, True, True)
    return out


@pytest.mark.parametrize("text,fields", sorted(_expected_rows().items()))
def test_every_canonical_row_parses_to_its_fields_and_formats_back(text, fields):
    row = parse_sampler(text)
    assert (row.solver, row.order, row.substeps, row.spectral) == fields
    assert format_sampler(row) == text
    assert row.guidance == ("probabilistic" if text.startswith("gm_") else "cfg")


def test_canonical_rows_are_exactly_the_documented_forms():
    assert set(solvers.CANONICAL_ROWS) == set(_expected_rows())


def test_legacy_pipeline_spellings_normalize_to_the_canonical_rows():
    assert format_sampler(parse_sampler("gm_ode2")) == "gm_ode_2"
    assert format_sampler(parse_sampler("gm_sde2")) == "gm_sde_2"


@pytest.mark.parametrize(
    "text,nearest",
    [
        ("gm_ode_3", "gm_ode_2"),
        ("gm_sde_2_nosub", "gm_ode_2_nosub"),  # nosub is a GM-ODE switch
        ("gm_ode_nospec", "gm_sde_nospec"),  # the nearest by characters
        ("eulr", "euler"),
        ("dpmpp2m", "dpmpp_2m"),
        ("euler_2", "euler"),
        ("gm_sde_nospec_2", "gm_sde_nospec"),
    ],
)
def test_unknown_spelling_is_one_line_naming_the_allowed_forms_and_the_nearest(text, nearest):
    with pytest.raises(ValueError) as err:
        parse_sampler(text)
    message = str(err.value)
    assert "\n" not in message
    assert f"unknown sampler {text!r}" in message
    assert f"did you mean {nearest!r}?" in message
    assert "gm_sde[_2][_nospec], gm_ode[_2][_nosub], euler, ddpm_small" in message


def test_non_string_rows_are_refused():
    with pytest.raises(ValueError, match="unknown sampler"):
        parse_sampler(("gm_sde", 1))
    with pytest.raises(ValueError, match="_nosub"):
        SamplerRow("gm_sde", substeps=False)


def test_row_solver_config_substeps_spectral_and_guidance():
    # S = ceil(total / NFE): 128 / 3 -> 43 (computed by hand), `_nosub` -> 1, explicit override.
    assert row_solver_config("gm_ode_2", 3).num_substeps == 43
    assert row_solver_config("gm_ode_2_nosub", 3).num_substeps == 1
    assert row_solver_config("gm_ode", 32, num_substeps=4).num_substeps == 4
    with pytest.raises(ValueError, match="num_substeps=4 > 1 needs a GM-ODE solver"):
        row_solver_config("gm_ode_nosub", 8, num_substeps=4)
    assert row_solver_config("gm_sde", 4, has_spectrum=True).spectral
    assert not row_solver_config("gm_sde_nospec", 4, has_spectrum=True).spectral
    assert not row_solver_config("gm_sde", 4, has_spectrum=False).spectral
    guided = row_solver_config("gm_sde_2", 4, 0.3, null_label=10)
    assert guided.guided and guided.guidance == "probabilistic" and guided.order == 2
    assert not row_solver_config("euler", 4, 1.0, null_label=10).guided  # CFG w = 1: unguided
    cfg = row_solver_config("dpmpp_2m", 4, 3.0, null_label=10)
    assert cfg.guided and cfg.guidance == "cfg"
    with pytest.raises(ValueError, match="probabilistic guidance range"):
        row_solver_config("gm_ode", 4, 1.5, null_label=10)
