"""The one training path: the pure step jitted on a mesh, the loop, resume, and the main job
(`docs/math.md` §4.1-4.7).

Every test runs the code that `python -m gmflow_jax.main` runs: `train.step.init_on_mesh` and
`train.step.jit_train_step` on the default mesh (here 8 fake CPU devices, every one on "fsdp").
"""

import json
import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.config_files import REPO, load_config

from gmflow_jax.models.builder import build_model
from gmflow_jax.models.denoiser import network_functions
from gmflow_jax.parallel.mesh import make_mesh
from gmflow_jax.tasks import make_task
from gmflow_jax.train import loop
from gmflow_jax.train.optimizer import OptimizerConfig, make_adamw
from gmflow_jax.train.reporting import check_finite_metrics
from gmflow_jax.train.step import init_on_mesh, jit_train_step, make_train_step, step_settings
from gmflow_jax.train.task import run_keys


def _load_config(variant: str):
    return load_config("checkerboard", variant)


def _train(config, workdir):
    keys = run_keys(config.seed)
    return loop.train(config, str(workdir), make_task(config, keys), keys)


# ----------------------------------------------------------------------------------------------
# Train step


def _tiny_step(config, mesh=None, **opt_overrides):
    opt_cfg, ema_cfg, loss_cfg = step_settings(config)
    opt_cfg = OptimizerConfig(**{**opt_cfg.__dict__, **opt_overrides})
    tx = make_adamw(opt_cfg)
    keys = run_keys(config.seed)
    mesh = make_mesh() if mesh is None else mesh

    def model_fn():
        return build_model(config.model, keys["init"])

    graphdef, init, shardings = init_on_mesh(model_fn, tx, keys["train"], mesh)
    denoiser, spectrum = network_functions(nnx.eval_shape(model_fn))
    pure = make_train_step(denoiser, tx, opt_cfg, ema_cfg, loss_cfg, spectrum)
    return graphdef, init(), jit_train_step(pure, mesh, shardings), pure


def _batch(config, seed=0):
    x = jax.random.uniform(
        jax.random.PRNGKey(seed), (config.train.batch_size, 1, 1, 2), minval=-4, maxval=4
    )
    return {"x0": x}


@pytest.mark.parametrize("variant", ["tiny", "tiny_baseline"])
def test_step_on_a_one_device_mesh_equals_the_plain_jit_bit_for_bit(variant):
    # The one path changes no result: on one device the sharded, donating jit of the pure step
    # computes exactly what a plain jax.jit of it computes.
    config = _load_config(variant)
    mesh = make_mesh(None, jax.devices()[:1])
    _, state, step, pure = _tiny_step(config, mesh)
    plain = jax.jit(pure)
    expected_state, expected_metrics = plain(state, _batch(config, 0))
    expected_state, expected_metrics = jax.device_get((expected_state, expected_metrics))
    new_state, metrics = step(state, _batch(config, 0))
    for a, b in zip(
        jax.tree.leaves((new_state, metrics)),
        jax.tree.leaves((expected_state, expected_metrics)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("variant", ["tiny", "tiny_baseline"])
def test_train_step_is_finite_updates_params_and_does_not_retrace(variant):
    config = _load_config(variant)
    _, state, step, _ = _tiny_step(config)
    before = jax.tree.map(np.asarray, state.params)
    state, m1 = step(state, _batch(config, 0))
    compiled = step._cache_size()
    state, m2 = step(state, _batch(config, 1))
    assert int(state.step) == 2
    for m in (m1, m2):
        assert set(m) == {"loss", "lr", "grad_norm", "skipped"}
        assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    moved = [
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True)
    ]
    assert max(moved) > 0
    assert step._cache_size() == compiled  # the second call reused the first compilation
    np.testing.assert_allclose(m1["lr"], config.train.optimizer.lr * 0.001, rtol=1e-6)


def test_nan_batch_is_skipped_with_step_counted_when_skip_enabled():
    config = _load_config("tiny")
    _, state, step, _ = _tiny_step(config, clip_begin=1, skip_nonfinite=True)
    state, m0 = step(state, _batch(config, 0))  # iteration 0: a normal update
    assert float(m0["skipped"]) == 0.0
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    batch = _batch(config, 1)
    batch["x0"] = batch["x0"].at[0, 0, 0, 0].set(jnp.nan)
    state, m = step(state, batch)  # iteration 1 >= clip_begin: skipped
    assert int(state.step) == 2 and float(m["skipped"]) == 1.0
    for a, b in zip(
        jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves(before), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_nan_batch_before_clip_begin_propagates_and_the_host_check_raises():
    config = _load_config("tiny")
    _, state, step, _ = _tiny_step(config, clip_begin=1, skip_nonfinite=True)  # same compile
    batch = _batch(config)
    batch["x0"] = batch["x0"].at[0, 0, 0, 0].set(jnp.nan)
    state, m = step(state, batch)
    assert any(np.isnan(np.asarray(p)).any() for p in jax.tree.leaves(state.params))
    history = [(0, {k: float(v) for k, v in m.items()})]
    with pytest.raises(FloatingPointError, match=r"loss = nan at training step 0"):
        check_finite_metrics(history)


def test_check_finite_metrics_tolerates_skipped_steps_and_names_the_first_bad_step():
    ok = {"loss": 1.0, "grad_norm": 2.0, "skipped": 0.0}
    skipped = {"loss": math.nan, "grad_norm": math.nan, "skipped": 1.0}
    check_finite_metrics([(0, ok), (1, skipped), (2, ok)])
    bad = {"loss": 1.0, "grad_norm": math.inf, "skipped": 0.0}
    with pytest.raises(FloatingPointError, match="grad_norm = inf at training step 7"):
        check_finite_metrics([(6, ok), (7, bad), (8, {**bad, "loss": math.nan})])


# ----------------------------------------------------------------------------------------------
# The main job


def test_resume_continues_the_same_run_bit_exactly(tmp_path):
    config = _load_config("tiny")
    config.eval.enabled = False
    config.train.num_steps = 4
    _, straight, _ = _train(config, tmp_path / "straight")
    half = _load_config("tiny")
    half.train.num_steps = 2
    _, first, info1 = _train(half, tmp_path / "resumed")
    assert int(first.step) == 2 and info1["start_step"] == 0
    _, resumed, info2 = _train(config, tmp_path / "resumed")
    assert info2["start_step"] == 2 and "resumed from step 2" in info2["resumed"]
    assert int(resumed.step) == int(straight.step) == 4
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(a, b)
    # a finished run skips training entirely
    _, again, info3 = _train(config, tmp_path / "resumed")
    assert info3["start_step"] == 4 and "it_per_s" not in info3


def test_main_end_to_end_writes_metrics_json_and_png(tmp_path):
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "gmflow_jax.main",
        f"--config={os.path.join(REPO, 'configs', 'checkerboard.py')}:tiny",
        f"--workdir={workdir}",
        "--config.train.num_steps=3",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((workdir / "metrics.json").read_text())
    assert payload["model"] == "gmflow" and payload["config"]["train"]["num_steps"] == 3
    rows = {(r["row"], r["nfe"]) for r in payload["results"]}
    assert rows == {("gm_sde", 1), ("gm_sde", 2), ("gm_ode_2", 1), ("gm_ode_2", 2)}
    for r in payload["results"]:
        assert 0.0 <= r["metrics"]["in_square_rate"] <= 1.0
        assert r["num_substeps"] == (math.ceil(4 / r["nfe"]) if r["solver"] == "gm_ode" else 1)
    assert payload["exact_sample_floor"]["in_square_rate"] == 1.0
    assert (workdir / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exact samples" in proc.stdout and "gm_ode_2" in proc.stdout
    assert not list(workdir.glob("*.tmp.*"))


def test_evaluate_uses_baseline_solvers_for_a_mean_only_model(tmp_path):
    config = _load_config("tiny_baseline")
    config.sample.baseline_solvers = ("euler",)
    config.eval.num_samples = 300  # not a multiple of the sampling batch: the last batch is cut
    config.sample.batch_size = 128
    keys = run_keys(config.seed)
    graphdef = nnx.split(nnx.eval_shape(lambda: build_model(config.model, keys["init"])))[0]
    params = jax.jit(lambda: nnx.split(build_model(config.model, keys["init"]))[1])()
    payload = make_task(config, keys).evaluate(str(tmp_path), graphdef, params, {})
    assert payload["model"] == "flow_matching_baseline"
    assert [(r["solver"], r["nfe"]) for r in payload["results"]] == [("euler", 1), ("euler", 2)]
    assert all(r["metrics"]["num_samples"] == 300 for r in payload["results"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["results"] == json.loads(json.dumps(payload["results"]))
    assert (tmp_path / "samples.png").exists()


def test_sigterm_on_the_checkerboard_checkpoints_and_the_rerun_is_bit_exact(tmp_path):
    # The single-device checkerboard run takes the same preemption path as a pod: SIGTERM sets the
    # flag, the loop saves that step and returns `preempted`; rerunning resumes bit for bit.
    config = _load_config("tiny")
    config.train.num_steps = 8
    config.checkpoint.every_steps = 1000  # only the preemption and the end save
    _, straight, _ = _train(config, tmp_path / "straight")

    def preempt_at_step_2(event, fields):
        if event == "step" and fields["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    keys = run_keys(config.seed)
    workdir = str(tmp_path / "preempted")
    _, first, info = loop.train(
        config, workdir, make_task(config, keys), keys, callback=preempt_at_step_2
    )
    assert info["preempted"] and int(first.step) == 3
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
    _, resumed, info2 = _train(config, workdir)
    assert info2["start_step"] == 3 and not info2["preempted"] and int(resumed.step) == 8
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(a, b)
