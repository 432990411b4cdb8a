"""GMFlowPipeline accepts every sampler-row spelling of the grammar (gmflow_jax/solvers/config.py)."""

import numpy as np
import pytest
from helpers.official_layout import write_tiny_official_folder

from gmflow_jax import solvers
from gmflow_jax.pipeline import GMFlowPipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """The tiny official folder (GM-DiT + SpectrumMLP + VAE), converted in memory."""
    return GMFlowPipeline.from_official(
        str(write_tiny_official_folder(tmp_path_factory.mktemp("o")))
    )


@pytest.mark.parametrize("row", [*solvers.CANONICAL_ROWS, "gm_ode2", "gm_sde2"])
def test_every_spelling_gives_the_config_its_fields_name(pipe, row):
    parsed = solvers.parse_sampler(row)
    w = 0.3 if parsed.is_gm else 0.0
    cfg = pipe.solver_config(row, 8, guidance_scale=w)
    assert (cfg.solver, cfg.order) == (parsed.solver, parsed.order)
    assert cfg.guided == parsed.is_gm and cfg.null_label == 1000
    # GM-ODE: ceil(128 / 8) = 16 substeps unless `_nosub`; spectral GM-SDE unless `_nospec`.
    assert cfg.num_substeps == (16 if parsed.solver == "gm_ode" and parsed.substeps else 1)
    assert cfg.spectral == (parsed.solver == "gm_sde" and parsed.spectral)


def test_gm_sde_2_samples_and_equals_its_legacy_spelling(pipe):
    args = dict(num_steps=2, seed=3, output_type="latents")
    a = pipe([1, 2, 3], 0.3, solver="gm_sde_2", **args)
    b = pipe([1, 2, 3], 0.3, solver="gm_sde2", **args)
    assert a.shape == (3, 8, 8, 4) and np.isfinite(a).all() and np.std(a) > 0.1
    np.testing.assert_array_equal(a, b)
    c = pipe([1, 2, 3], 0.3, solver="gm_sde_2_nospec", **args)
    assert np.abs(c - a).max() > 1e-3  # spectral sampling is on for gm_sde_2, off for _nospec


def test_baseline_rows_take_classic_cfg_scales(pipe):
    """Baseline rows on a GM model: CFG w (active when > 1, default 1 = off), not probabilistic."""
    cfg = pipe.solver_config("dpmpp_2m", 4, guidance_scale=2.5)
    assert (cfg.guidance, cfg.guided, cfg.null_label) == ("cfg", True, 1000)
    assert not pipe.solver_config("euler", 4, guidance_scale=1.0).guided
    assert not pipe.solver_config("euler", 4).guided and pipe.default_guidance_scale("euler") == 1.0
    with pytest.raises(ValueError, match="must be >= 0 for CFG"):
        pipe.solver_config("euler", 4, guidance_scale=-0.5)
