"""Sampling the models we train: the digits GMFlow model (pixel space, GM head, SpectrumMLP) and its
mean-only flow-matching baseline, through `GMFlowPipeline.from_checkpoint` and `tools/sample.py`.

Both are trained by the real entry point (`python -m gmflow_jax.main --config=configs/digits.py:tiny`
and `:tiny_baseline`, 3 steps, evaluation off) in two 1-device subprocesses started together. The
GM run writes `config.json`; the baseline run has only the resolved `run_config.json`, which
`from_checkpoint` falls back to. Oracles: a direct `solvers.sample` call with hand-made noise, keys
and `SolverConfig` on the restored EMA parameters, and NumPy's uint8 conversions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from gmflow_jax import solvers
from gmflow_jax.pipeline import GMFlowPipeline
from gmflow_jax.sampling.streams import sample_labels

REPO = pathlib.Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "sample.py"
FAST_COMPILE = ["--xla_option", "xla_backend_optimization_level=0"]
LABELS = [3, 0, 9, 3, 7]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """{"gm": workdir, "baseline": workdir}: the tiny digits runs (checkpoints at steps 2 and 3)."""
    root = tmp_path_factory.mktemp("digits_runs")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = {}
    for name, variant in (("gm", "tiny"), ("baseline", "tiny_baseline")):
        cmd = [
            sys.executable, "-m", "gmflow_jax.main",
            f"--config={REPO / 'configs' / 'digits.py'}:{variant}",
            f"--workdir={root / name}", "--config.eval.enabled=False",
        ]  # fmt: skip
        procs[name] = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}: {out[-3000:]}"
    return {name: root / name for name in procs}


def _direct(pipe, cfg, labels, seed, w):
    """solvers.sample on the pipeline's EMA parameters with the documented batch streams."""
    noise_key, sample_key = jax.random.split(jax.random.PRNGKey(seed))
    noise = jax.random.normal(noise_key, (len(labels), 8, 8, 1), jnp.float32)
    out = solvers.sample(
        pipe._denoiser,
        pipe.params,
        jax.random.fold_in(sample_key, 0),
        noise,
        jnp.asarray(labels, jnp.int32),
        cfg,
        jnp.float32(w),
        pipe._spectrum if cfg.spectral else None,
    )
    return np.asarray(out, np.float64)


def _round_uint8(x):
    """NumPy oracle of the pipeline's uint8: floor(255 clip((x + 1) / 2, 0, 1) + 0.5)."""
    return np.floor(255.0 * np.clip((x + 1.0) / 2.0, 0.0, 1.0) + 0.5).astype(np.uint8)


def _close_uint8(got, want):
    """uint8 images equal up to one level on a tiny fraction (float rounding at .5 boundaries)."""
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.02, (diff.max(), np.mean(diff > 0))


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def test_digits_gm_model_samples_uint8_pixel_images_of_the_solver_output(runs):
    """GM-SDE 2 (spectral, guided): uint8 [N, 8, 8, 1] = rounding of a direct solver call."""
    pipe = GMFlowPipeline.from_checkpoint(str(runs["gm"]))
    assert pipe.pixel_space and not pipe.mean_only and not pipe.has_vae
    images = pipe(LABELS, 0.3, num_steps=2, solver="gm_sde_2", seed=4)
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    cfg = solvers.SolverConfig(
        solver="gm_sde", order=2, num_steps=2, guidance_scale=0.5, null_label=10, spectral=True
    )
    expected = _direct(pipe, cfg, LABELS, 4, 0.3)
    assert np.std(expected) > 0.2
    _close_uint8(images, _round_uint8(expected))
    pil = pipe(LABELS, 0.3, num_steps=2, solver="gm_sde_2", seed=4, output_type="pil")
    assert [p.mode for p in pil] == ["L"] * 5 and pil[0].size == (8, 8)
    np.testing.assert_array_equal(np.stack([np.asarray(p) for p in pil])[..., None], images)
    with pytest.raises(ValueError, match="pixel-space model has no latents"):
        pipe(LABELS, output_type="latents")


def test_digits_baseline_samples_with_cfg_and_refuses_gm_rows(runs):
    """The mean-only model (from run_config.json): euler + CFG w=2 = a direct CFG solver call."""
    work = runs["baseline"]
    assert not (work / "config.json").exists() and (work / "run_config.json").exists()
    pipe = GMFlowPipeline.from_checkpoint(str(work))
    assert pipe.mean_only and pipe.default_solver == "euler" and pipe.pixel_space
    images = pipe(LABELS, 2.0, num_steps=2, seed=1)  # default row: euler
    cfg = solvers.SolverConfig(
        solver="euler", num_steps=2, guidance="cfg", guidance_scale=2.0, null_label=10
    )
    expected = _direct(pipe, cfg, LABELS, 1, 2.0)
    _close_uint8(images, _round_uint8(expected))
    # After 3 steps the class embedding barely matters; w = 50 amplifies cond - uncond 49-fold.
    unguided = pipe(LABELS, 1.0, num_steps=2, seed=1)  # CFG w = 1: guidance off
    strong = pipe(LABELS, 50.0, num_steps=2, seed=1)
    assert np.abs(unguided.astype(int) - strong.astype(int)).max() >= 2
    dpm = pipe(LABELS, 3.0, num_steps=2, solver="dpmpp_2m", seed=1)
    assert dpm.shape == (5, 8, 8, 1)
    with pytest.raises(ValueError, match="mean-only flow-matching baseline: use a baseline row"):
        pipe(LABELS, solver="gm_ode_2")
    with pytest.raises(ValueError, match="must be >= 0 for CFG"):
        pipe(LABELS, -1.0)


def test_from_checkpoint_step_picks_that_step(runs):
    """step=2 and step=3 restore different EMA weights; a step not saved names the steps there."""
    newest = GMFlowPipeline.from_checkpoint(str(runs["gm"]))
    step3 = GMFlowPipeline.from_checkpoint(str(runs["gm"]), step=3)
    step2 = GMFlowPipeline.from_checkpoint(str(runs["gm"]), step=2)
    leaves = [jax.tree.leaves(p.params) for p in (newest, step3, step2)]
    assert all(np.array_equal(a, b) for a, b in zip(leaves[0], leaves[1], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves[1], leaves[2], strict=True))
    with pytest.raises(FileNotFoundError, match=r"step=7 is not a checkpoint step .*\[2, 3\]"):
        GMFlowPipeline.from_checkpoint(str(runs["gm"]), step=7)


# ----------------------------------------------------------------------------------------------
# tools/sample.py
# ----------------------------------------------------------------------------------------------


def _tool():
    """tools/sample.py as a module."""
    spec = importlib.util.spec_from_file_location("sample_tool_trained", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_samples_the_digits_gm_model_without_a_vae(runs, tmp_path):
    """Pixel model: samples.npz holds ADM uint8 of the saved samples and the index-seeded labels."""
    out = tmp_path / "gm"
    args = ["--checkpoint", str(runs["gm"]), "--out_dir", str(out), "--num_samples", "12"]
    args += ["--solver", "gm_ode_2", "--num_steps", "2", "--guidance_scale", "0.3"]
    args += ["--batch_size", "8", "--seed", "5", "--save_latents", *FAST_COMPILE]
    assert _tool().main(args) == 0
    with np.load(out / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, sample_labels(5, np.arange(12), 10))
    raw = []
    for path in sorted(out.glob("shard_*.npz")):
        with np.load(path) as data:
            raw.append(data["arr_2"])
    raw = np.concatenate(raw).astype(np.float64)
    np.testing.assert_array_equal(
        images, np.floor(np.clip((raw + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)
    )
    assert len(np.unique(images)) > 20
    Image.fromarray(images[0, ..., 0])  # a valid grey image


def test_tool_samples_the_baseline_with_cfg_and_refuses_a_gm_row(runs, tmp_path, capsys):
    """Baseline: DPM++ 2M with CFG 2 from --step 2; a GM row exits 2."""
    out = tmp_path / "baseline"
    base = ["--checkpoint", str(runs["baseline"]), "--num_samples", "8", "--batch_size", "8"]
    args = [*base, "--out_dir", str(out), "--step", "2", "--solver", "dpmpp_2m"]
    assert _tool().main([*args, "--num_steps", "2", "--guidance_scale", "2", *FAST_COMPILE]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["model"]["step"] == 2 and manifest["solver"] == "dpmpp_2m"
    assert manifest["solver_config"]["guidance"] == "cfg" and manifest["guidance_scale"] == 2.0
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (8, 8, 8, 1)
    with pytest.raises(SystemExit) as exc:
        _tool().main([*base, "--out_dir", str(tmp_path / "gm_row"), "--solver", "gm_sde_2"])
    assert exc.value.code == 2
    assert "mean-only flow-matching baseline: use a baseline row" in capsys.readouterr().err
    assert not (tmp_path / "gm_row").exists()
