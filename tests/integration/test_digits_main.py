"""`python -m gmflow_jax.main --config=configs/digits.py:tiny` end to end, and its train step (issue 4).

Runs the absl entry point in-process (the flags are parsed exactly as on the command line). The
evaluator's classifier cache is pre-filled with an untrained classifier of the right configuration,
so the test checks the plumbing (train -> EMA -> sample -> score -> files), not classifier quality.
The one-step test after it builds the same jitted train step (memoized, so it is compiled once).
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from helpers.config_files import REPO, load_config

from gmflow_jax import main as main_module
from gmflow_jax import tasks
from gmflow_jax.eval.digits import (
    DigitsClassifier,
    classifier_cache_path,
    classifier_config,
)
from gmflow_jax.models.builder import build_model
from gmflow_jax.models.denoiser import network_functions
from gmflow_jax.parallel.mesh import make_mesh
from gmflow_jax.parallel.sharding import process_rows
from gmflow_jax.train.optimizer import make_adamw
from gmflow_jax.train.step import init_on_mesh, jit_train_step, make_train_step, step_settings
from gmflow_jax.train.task import BatchLayout, run_keys


def _load_config(variant: str):
    return load_config("digits", variant)


def _fill_classifier_cache(directory: str, image_size: int = 8) -> None:
    """Write an untrained classifier where `load_or_train_classifier` looks for the cached one."""
    model = DigitsClassifier(image_size, rngs=nnx.Rngs(0))
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    arrays = {"param:" + jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}
    arrays["config"] = np.array(json.dumps(classifier_config(image_size, 0), sort_keys=True))
    arrays["held_out_accuracy"] = np.array(0.1)
    os.makedirs(directory, exist_ok=True)
    np.savez(classifier_cache_path(directory, image_size, 0), **arrays)


@pytest.fixture
def run_main():
    """Call main with command-line arguments; restore the global flags afterwards."""

    def run(*args: str) -> None:
        flags.FLAGS(["gmflow_jax.main", *args])
        main_module.main(["gmflow_jax.main"])

    yield run
    flags.FLAGS.unparse_flags()
    flags.FLAGS.mark_as_parsed()


def test_main_on_tiny_digits_writes_metrics_json_png_and_pipeline_config(
    tmp_path, run_main, capsys
):
    workdir = tmp_path / "run"
    _fill_classifier_cache(str(workdir))
    run_main(
        f"--config={os.path.join(REPO, 'configs', 'digits.py')}:tiny",
        f"--workdir={workdir}",
    )
    payload = json.loads((workdir / "metrics.json").read_text())
    assert payload["model"] == "gmflow" and payload["config"]["train"]["num_steps"] == 3
    (result,) = payload["results"]
    assert (result["row"], result["nfe"], result["w"]) == ("gm_sde_2", 2, 0.3)
    assert result["spectral"] and result["order"] == 2 and result["guided"]
    m = result["metrics"]
    assert m["num_images"] == 40 and 0.0 <= m["accuracy"] <= 1.0 and np.isfinite(m["fd"])
    assert payload["real"]["mean_abs"] > 0
    png = (workdir / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pipeline = json.loads((workdir / "config.json").read_text())
    assert pipeline["model"]["num_gaussians"] == 4
    assert pipeline["spectrum_net"]["base_size"] == [1, 8, 8]
    out = capsys.readouterr().out
    assert "gm_sde_2" in out and "real digits" in out
    assert not list(workdir.glob("*.tmp*")) and not list(workdir.glob(".tmp_*"))


def _moved(before, after) -> float:
    return max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True)
    )


def test_one_tiny_digits_train_step_updates_gm_dit_and_spectrum_net():
    """Finite metrics, loss = trans + spec, fp32 params of both networks move."""
    config = _load_config("tiny")
    keys = run_keys(config.seed)
    task = tasks.make_task(config, keys)
    opt_cfg, ema_cfg, loss_cfg = step_settings(config)
    tx = make_adamw(opt_cfg)
    mesh = make_mesh()

    def model_fn():
        return build_model(config.model, keys["init"])

    _, init, shardings = init_on_mesh(model_fn, tx, keys["train"], mesh)
    denoiser, spectrum = network_functions(nnx.eval_shape(model_fn))
    step = jit_train_step(
        make_train_step(denoiser, tx, opt_cfg, ema_cfg, loss_cfg, spectrum), mesh, shardings
    )
    state = init()
    layout = BatchLayout(mesh, config.train.batch_size, process_rows(mesh, config.train.batch_size))
    batch = next(task.batches(0, layout))
    assert batch["x0"].shape == (16, 8, 8, 1) and batch["labels"].shape == (16,)
    batch = {k: jax.device_put(v, layout.sharding) for k, v in batch.items()}
    before = jax.tree.map(np.asarray, state.params)
    state, m = step(state, batch)
    m = {k: float(v) for k, v in m.items()}
    assert set(m) == {"loss", "loss_trans", "loss_spec", "lr", "grad_norm", "skipped"}
    assert all(math.isfinite(v) for v in m.values()) and m["skipped"] == 0.0
    np.testing.assert_allclose(m["loss"], m["loss_trans"] + m["loss_spec"], rtol=1e-6, atol=1e-6)
    assert _moved(before["denoiser"], state.params["denoiser"]) > 0
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    # at init psi = 0, so only the last SpectrumMLP layer has a gradient
    out = state.params["spectrum_net"]["linear_out"]
    assert _moved(before["spectrum_net"]["linear_out"], out) > 0
