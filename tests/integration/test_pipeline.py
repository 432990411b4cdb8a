"""Tests of GMFlowPipeline (gmflow_jax.pipeline) and of the sampling notebook colab/sample.ipynb.

A tiny random GM-DiT (2 blocks, width 64, 2 heads, 8x8 latents, K = 2, 1000 classes), SpectrumMLP
and VAE are written as an official diffusers folder (`helpers.official_layout`, a plain
description of the key layouts). The pipeline's samples are compared with a direct `solvers.sample`
call built independently (hand-made noise, keys and `SolverConfig`), and its images with the VAE
decode of those latents.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers.official_layout import load_convert_cli, write_tiny_official_folder

from gmflow_jax import pipeline as pipeline_module
from gmflow_jax import solvers
from gmflow_jax.checkpoint import Checkpointer
from gmflow_jax.interop.converted_folder import load_official, load_vae_folder
from gmflow_jax.models.builder import gm_dit_config_to_dict
from gmflow_jax.models.image_denoiser import ImageDenoiser
from gmflow_jax.pipeline import (
    GMFlowPipeline,
    imagenet_class_names,
    label_ids_from_words,
)
from gmflow_jax.train.state import init_train_state

NOTEBOOK = pathlib.Path(__file__).resolve().parents[2] / "colab" / "sample.ipynb"

WORDS = ["hummingbird", 3, "Tinca tinca"]
LABELS = [94, 3, 0]


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory) -> pathlib.Path:
    """The tiny official folder, written once for the module."""
    return write_tiny_official_folder(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def pipe(official_dir) -> GMFlowPipeline:
    """The pipeline on the raw tiny official folder (converted in memory)."""
    return GMFlowPipeline.from_official(str(official_dir))


def _direct_latents(denoiser, params, spectrum, cfg, labels, seed, guidance_scale):
    """solvers.sample with the documented random streams (noise key, then sample key fold 0)."""
    noise_key, sample_key = jax.random.split(jax.random.PRNGKey(seed))
    noise = jax.random.normal(noise_key, (len(labels), 8, 8, 4), jnp.float32)
    out = solvers.sample(
        denoiser,
        params,
        jax.random.fold_in(sample_key, 0),
        noise,
        jnp.asarray(labels, jnp.int32),
        cfg,
        jnp.float32(guidance_scale),
        spectrum,
    )
    return np.asarray(out)


# ----------------------------------------------------------------------------------------------
# Class names
# ----------------------------------------------------------------------------------------------


def test_imagenet_class_file_lists_1000_distinct_classes():
    """The shipped file has 1000 lines, one class each in synset order; only "crane" repeats."""
    names = imagenet_class_names()
    assert len(names) == 1000 and all(names)
    repeated = {n for n in names if names.count(n) > 1}
    assert repeated == {"crane"} and [i for i, n in enumerate(names) if n == "crane"] == [134, 517]
    assert names[0] == "tench, Tinca tinca"
    assert names[999] == "toilet tissue, toilet paper, bathroom tissue"


@pytest.mark.parametrize(
    "word,index",
    [
        ("tench", 0),
        ("goldfish", 1),
        ("macaw", 88),
        ("hummingbird", 94),
        ("golden retriever", 207),
        ("giant panda", 388),
        ("balloon", 417),
        ("valley", 979),
        ("toilet tissue", 999),
        ("Carassius auratus", 1),  # a later synonym
        ("  Golden   RETRIEVER ", 207),  # case and whitespace
        ("vale", 979),
        ("partridge", 86),  # also a synonym of 82 (ruffed grouse): the class named so first wins
    ],
)
def test_label_lookup_matches_known_imagenet_indices(word, index):
    """Words map to the standard ImageNet-1k indices through any comma-separated synonym."""
    assert label_ids_from_words([word], imagenet_class_names()) == [index]


def test_unknown_and_ambiguous_words_raise_helpful_errors(pipe):
    """An unknown word suggests close matches; a word naming two classes lists both."""
    with pytest.raises(ValueError, match=r"unknown class name 'humingbird'.*'hummingbird'"):
        pipe.get_label_ids(["humingbird"])
    with pytest.raises(ValueError, match=r"ambiguous: 134 .*517 "):
        pipe.get_label_ids("crane")
    assert pipe.get_label_ids(["jay", "magpie"]) == [17, 18]


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def test_samples_equal_direct_solver_call_and_images_its_vae_decode(pipe, official_dir):
    """Labels, null label, noise, keys and solver settings reach solvers.sample; images = decode."""
    latents = pipe(
        WORDS, 0.3, num_steps=2, num_substeps=1, solver="gm_ode", seed=5, output_type="latents"
    )
    assert latents.shape == (3, 8, 8, 4) and latents.dtype == np.float32
    # The same network, with hand-made labels, noise, keys and SolverConfig (null label 1000).
    cfg = solvers.SolverConfig(
        solver="gm_ode", num_steps=2, num_substeps=1, guidance_scale=0.5, null_label=1000
    )
    params = {"denoiser": pipe.params["denoiser"]}
    expected = _direct_latents(pipe._denoiser, params, None, cfg, LABELS, 5, 0.3)
    assert np.std(expected) > 0.3
    # The pipeline samples through the sampling driver over the 8 test devices (the 3 labels padded
    # to 8, one row per device), which changes the matmul rounding (about 2e-6) against this
    # one-device batch of 3; a wrong label, key or noise stream would move the latents by O(1).
    np.testing.assert_allclose(latents, expected, rtol=0, atol=1e-5)
    # The traced guidance scale is used (no recompile for a new value), and so is the seed.
    other = pipe(
        WORDS, 0.6, num_steps=2, num_substeps=1, solver="gm_ode", seed=5, output_type="latents"
    )
    assert np.abs(other - latents).max() > 1e-3
    images = pipe(WORDS, 0.3, num_steps=2, num_substeps=1, solver="gm_ode", seed=5)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    vae_graphdef, vae_state = nnx.split(load_vae_folder(str(official_dir / "vae")))
    decoded = pipeline_module._decode(vae_graphdef, vae_state, jnp.asarray(latents))
    np.testing.assert_array_equal(images, np.asarray(decoded))
    assert len(np.unique(images)) > 20


def test_gm_sde_uses_spectral_sampling_when_a_spectrum_net_is_loaded(pipe, official_dir):
    """GM-SDE (2) draws x0 by spectral KR sampling when a SpectrumMLP is loaded; GM-ODE never does."""
    assert pipe.solver_config("gm_sde2", 2).spectral and pipe.solver_config("gm_sde", 2).spectral
    assert not pipe.solver_config("gm_ode2", 2).spectral
    assert not pipe.solver_config("gm_sde2", 2, spectral=False).spectral
    no_spec = load_official(str(official_dir), with_vae=False)
    plain = GMFlowPipeline(no_spec.transformer)
    assert not plain.solver_config("gm_sde2", 2).spectral
    with pytest.raises(ValueError, match="needs a SpectrumMLP"):
        plain.solver_config("gm_sde2", 2, spectral=True)


def test_converted_folder_and_chunked_batches_give_the_same_samples(pipe, official_dir, tmp_path):
    """The tool's converted folder samples like the raw folder; GM-ODE ignores batch chunking."""
    args = dict(num_steps=2, num_substeps=1, solver="gm_ode", seed=5, output_type="latents")
    raw = pipe(WORDS, 0.3, **args)
    assert load_convert_cli().main(["--src", str(official_dir), "--out_dir", str(tmp_path)]) == 0
    converted = GMFlowPipeline.from_official(str(tmp_path))
    assert converted.has_vae and converted._spectrum is not None
    np.testing.assert_array_equal(converted(WORDS, 0.3, **args), raw)
    chunked = pipe(WORDS, 0.3, batch_size=2, **args)
    np.testing.assert_allclose(chunked, raw, atol=1e-5)
    assert not np.array_equal(pipe(WORDS, 0.3, **{**args, "seed": 6}), raw)


@pytest.mark.parametrize("with_spectrum", [False, True], ids=["dit_only", "dit_and_spectrum"])
def test_from_checkpoint_samples_with_the_ema_parameters(
    pipe, official_dir, tmp_path, with_spectrum
):
    """A training checkpoint (orbax TrainState) + config.json loads its EMA params, not the raw ones."""
    models = load_official(str(official_dir), scan_blocks=True, with_vae=False)
    # The training module (`models.builder.build_model`'s ImageDenoiser), with or without spectrum.
    module = ImageDenoiser(models.transformer, models.spectrum_net if with_spectrum else None)
    graphdef, state = init_train_state(module, optax.adamw(1e-3), jax.random.PRNGKey(0))
    ema = jax.jit(lambda tree: jax.tree.map(lambda a: 0.5 * a, tree))(state.params)
    state = state.replace(ema_params=ema)
    with Checkpointer(tmp_path / "checkpoints", async_save=False) as ckpt:
        ckpt.save(3, state, force=True)
    run_config = {"model": gm_dit_config_to_dict(models.transformer.config)}
    if with_spectrum:
        run_config["spectrum_net"] = {"base_size": [4, 8, 8], "layers": [16, 8]}
        shutil.copytree(official_dir / "vae", tmp_path / "vae")  # a config's vae stays inside
        run_config["vae"] = "vae"
    (tmp_path / "config.json").write_text(json.dumps(run_config))

    loaded = GMFlowPipeline.from_checkpoint(str(tmp_path))
    assert loaded.has_vae == with_spectrum and (loaded._spectrum is not None) == with_spectrum
    ema_model = nnx.merge(graphdef, ema)
    ema_dit = ema_model.denoiser
    args = dict(num_steps=2, num_substeps=1, solver="gm_ode", seed=5, output_type="latents")
    expected = GMFlowPipeline(ema_dit)(WORDS, 0.3, **args)
    np.testing.assert_array_equal(loaded(WORDS, 0.3, **args), expected)
    assert np.abs(pipe(WORDS, 0.3, **args) - expected).max() > 1e-3  # raw params differ
    if with_spectrum:
        for a, b in zip(
            jax.tree.leaves(loaded.params["spectrum_net"]),
            jax.tree.leaves(nnx.state(ema_model.spectrum_net)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    else:
        # The checkpoint directory itself works too, with the config passed explicitly.
        again = GMFlowPipeline.from_checkpoint(
            str(tmp_path / "checkpoints"), config=str(tmp_path / "config.json")
        )
        np.testing.assert_array_equal(again(WORDS, 0.3, **args), expected)


def test_from_checkpoint_without_a_config_says_what_to_write(tmp_path):
    """A workdir without config.json raises FileNotFoundError naming the files looked for."""
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GMFlowPipeline.from_checkpoint(str(tmp_path))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"guidance_scale": 1.0}, r"guidance_scale=1.0 must be in \[0, 1\)"),
        ({"guidance_scale": -0.1}, r"must be in \[0, 1\)"),
        ({"guidance_scale": float("nan")}, r"must be in \[0, 1\)"),
        ({"num_steps": 0}, "num_steps=0 must be an integer >= 1"),
        ({"num_steps": 2.5}, "num_steps=2.5 must be an integer >= 1"),
        ({"solver": "gm_sde3"}, r"unknown sampler 'gm_sde3'; did you mean 'gm_sde'\? Allowed:"),
        ({"solver": "gm_sde2", "num_substeps": 4}, "num_substeps=4 > 1 needs a GM-ODE solver"),
        ({"solver": "euler", "guidance_scale": -1.0}, "must be >= 0 for CFG"),
        ({"solver": "euler", "guidance_scale": float("inf")}, "must be finite"),
        ({"solver": "gm_ode2", "spectral": True}, "spectral=True needs a GM-SDE solver"),
        ({"output_type": "png"}, "output_type='png' must be one of"),
        ({"batch_size": 0}, "batch_size=0 must be an integer >= 1"),
        ({"class_labels": [1000]}, r"class label 1000 must be .* \[0, 1000\)"),
        ({"class_labels": []}, "class_labels is empty"),
        ({"class_labels": ["golden retreiver"]}, "did you mean.*'golden retriever'"),
    ],
)
def test_bad_arguments_raise_clear_errors(pipe, kwargs, match):
    """Invalid calls fail before any sampling with a ValueError naming the argument."""
    kwargs = {"class_labels": [1, 2], **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_images_without_a_vae_are_refused_and_latents_returned_by_default(official_dir):
    """No VAE: output_type='images' raises; the default output is the latents."""
    models = load_official(str(official_dir), with_vae=False)
    no_vae = GMFlowPipeline(models.transformer, models.spectrum_net)
    assert not no_vae.has_vae
    with pytest.raises(ValueError, match="needs a VAE"):
        no_vae([1], output_type="images")


# ----------------------------------------------------------------------------------------------
# The notebook
# ----------------------------------------------------------------------------------------------


def test_sample_notebook_runs_headless_on_a_tiny_model(official_dir, tmp_path, monkeypatch):
    """colab/sample.ipynb executes end to end (nbclient) with its parameters from the environment."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    figure = tmp_path / "grid.png"
    env = {
        "GMFLOW_MODEL_KIND": "official",
        "GMFLOW_MODEL_PATH": str(official_dir),
        "GMFLOW_VARIANT": "",
        "GMFLOW_DTYPE": "float32",
        "GMFLOW_WORDS": "hummingbird,0",  # a class word and an integer class id
        "GMFLOW_STEPS": "2",
        "GMFLOW_FIGURE": str(figure),
        "MPLBACKEND": "Agg",
        # Cheaper XLA CPU compiles in the kernel (the tiny model's run time does not matter).
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    text = "\n".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream"
    )
    assert "gm_ode2    2 steps: (2, 16, 16, 3) uint8" in text
    assert "gm_sde2    2 steps: (2, 16, 16, 3) uint8" in text
    assert "{'hummingbird': 94, 0: 0}" in text
    assert figure.stat().st_size > 1000


def test_notebook_defaults_target_the_official_checkpoint():
    """The parameter cell's defaults are the real checkpoint and the paper's sampling settings."""
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    source = params.source
    assert '"Lakonik/gmflow_imagenet_k8_ema"' in source
    assert '"GMFLOW_GUIDANCE", "0.45"' in source and '"GMFLOW_STEPS", "8,32"' in source
    assert '["gm_ode2", "gm_sde2"]' in source
    assert any("%pip install" in c.source for c in notebook.cells if c.cell_type == "code")


def test_solver_config_defaults_follow_the_evaluation_pairs(pipe):
    """GM-ODE substeps default to 128 / steps ((8, 16), (32, 4)); GM-SDE to 1; null label = 1000."""
    assert pipe.solver_config("gm_ode2", 8).num_substeps == 16
    assert pipe.solver_config("gm_ode2", 32).num_substeps == 4
    cfg = pipe.solver_config("gm_sde2", 32)
    assert (cfg.num_substeps, cfg.order, cfg.null_label, cfg.solver) == (1, 2, 1000, "gm_sde")
    assert dataclasses.replace(cfg, spectral=False) != cfg
