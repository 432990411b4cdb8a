"""Tests of the optimizer, EMA, train step and main job (spec §4.6, §4.7; oracle 30)."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.config_files import REPO, load_config
from flax import nnx

from gmflow_jax.train import loop
from gmflow_jax.train.ema import EMAConfig, ema_beta, ema_update
from gmflow_jax.train.optimizer import (
    OptimizerConfig,
    apply_gradients,
    make_adamw,
    warmup_constant_lr,
    weight_decay_mask,
)
from gmflow_jax.train.state import NNXDenoiser, init_train_state, make_train_step

apply_gradients_jit = jax.jit(apply_gradients, static_argnums=(0, 1))
"""`apply_gradients` compiled (eager op-by-op dispatch is slow on a loaded 2-core CPU)."""


def _load_config(variant: str):
    return load_config("checkerboard", variant)


def _params():
    """A small params pytree with kernels and biases at several depths."""
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "dense": {"kernel": jax.random.normal(k[0], (3, 4)), "bias": jax.random.normal(k[1], (4,))},
        "head": {
            "kernel": jax.random.normal(k[2], (4, 2)),
            "out_bias": jax.random.normal(k[3], (2,)),
        },
        "table": jnp.ones((5, 2)),
    }


# ----------------------------------------------------------------------------------------------
# Oracle 30: learning rate and EMA beta


def test_lr_schedule_oracle_values():
    lr = warmup_constant_lr(2e-4, 1000, 0.001)
    np.testing.assert_allclose(lr(0), 2e-7, rtol=1e-6)
    np.testing.assert_allclose(lr(500), 1.001e-4, rtol=1e-6)
    np.testing.assert_allclose(lr(999), 2e-4 * (1 - (1 - 999 / 1000) * 0.999), rtol=1e-6)
    assert float(lr(1000)) == float(np.float32(2e-4))  # exactly the constant lr
    assert float(lr(150_000)) == float(np.float32(2e-4))


def test_karras_ema_beta_oracle_values():
    cfg = EMAConfig(policy="karras", gamma=7.0)
    assert float(ema_beta(cfg, 0)) == 0.0
    np.testing.assert_allclose(ema_beta(cfg, 1), 0.5**8, rtol=1e-7)
    np.testing.assert_allclose(ema_beta(cfg, 99), (1 - 1 / 100) ** 8, rtol=1e-6)


def test_rampup_ema_beta_oracle_values():
    cfg = EMAConfig(policy="rampup", ema_kimg=30000, ema_rampup=0.05, batch_size=4096)
    np.testing.assert_allclose(ema_beta(cfg, 0), 2.0**-20, rtol=1e-5)
    final = 0.5 ** (4096 / 3e7)
    np.testing.assert_allclose(final, 0.99990537, atol=1e-8)
    for i in (146_484, 146_485, 199_999):
        np.testing.assert_allclose(ema_beta(cfg, i), final, rtol=1e-7)
    assert float(ema_beta(cfg, 146_000)) < final - 1e-8


def test_fixed_ema_beta_and_update_are_a_lerp():
    cfg = EMAConfig(policy="fixed", beta=0.9)
    beta = ema_beta(cfg, 123)
    np.testing.assert_allclose(beta, 0.9, rtol=1e-7)
    ema, params = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, -2.0])}
    out = ema_update(ema, params, beta)
    np.testing.assert_allclose(out["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-6)
    # beta_0 = 0 of the karras policy copies the parameters
    copied = ema_update(ema, params, ema_beta(EMAConfig(), 0))
    np.testing.assert_array_equal(copied["w"], params["w"])


# ----------------------------------------------------------------------------------------------
# Optimizer


def test_weight_decay_mask_excludes_exactly_the_biases():
    mask = weight_decay_mask(_params())
    assert mask == {
        "dense": {"kernel": True, "bias": False},
        "head": {"kernel": True, "out_bias": False},
        "table": True,
    }


def test_weight_decay_does_not_touch_biases():
    # zero gradients: Adam's update is 0 / (0 + eps) = 0, so only decoupled decay acts
    cfg = OptimizerConfig(lr=0.1, weight_decay=0.5, warmup_iters=0)
    tx, params = make_adamw(cfg), _params()
    grads = jax.tree.map(jnp.zeros_like, params)
    new, _, _ = apply_gradients_jit(cfg, tx, params, grads, tx.init(params), jnp.int32(0))
    for path in (("dense", "bias"), ("head", "out_bias")):
        np.testing.assert_array_equal(new[path[0]][path[1]], params[path[0]][path[1]])
    np.testing.assert_allclose(
        new["dense"]["kernel"], params["dense"]["kernel"] * (1 - 0.05), rtol=1e-6
    )
    np.testing.assert_allclose(new["table"], params["table"] * (1 - 0.05), rtol=1e-6)


def _wavy_grads(params, i):
    """Deterministic step-dependent gradients sin((i + 1) p)."""
    return jax.tree.map(lambda p: jnp.sin(p * (i + 1)), params)


def test_adamw_equals_optax_adamw_with_the_same_schedule():
    cfg = OptimizerConfig(lr=1e-2, b1=0.9, b2=0.95, weight_decay=0.05, warmup_iters=3)
    schedule = warmup_constant_lr(cfg.lr, cfg.warmup_iters, cfg.warmup_ratio)
    ref_tx = optax.adamw(
        schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, mask=weight_decay_mask
    )
    tx, params = make_adamw(cfg), _params()
    ref_params, ref_state, state = params, ref_tx.init(params), tx.init(params)

    @jax.jit
    def ref_step(p, s, i):
        updates, s = ref_tx.update(_wavy_grads(p, i), s, p)
        return optax.apply_updates(p, updates), s

    for i in range(5):
        grads = _wavy_grads(params, i)
        params, state, metrics = apply_gradients_jit(cfg, tx, params, grads, state, jnp.int32(i))
        ref_params, ref_state = ref_step(ref_params, ref_state, i)
        np.testing.assert_allclose(metrics["lr"], schedule(i), rtol=1e-7)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_clipping_applies_from_clip_begin_only():
    cfg = OptimizerConfig(lr=1e-2, warmup_iters=0, grad_clip_norm=1.0, clip_begin=3)
    tx, params = make_adamw(cfg), _params()
    grads = jax.tree.map(lambda p: 10.0 * jnp.cos(p), params)
    norm = float(optax.global_norm(grads))
    scaled = jax.tree.map(lambda g: g / norm, grads)
    # make Adam sensitive to the gradient scale: non-empty second moments from one prior update
    state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)[1]
    clipped, _, m = apply_gradients_jit(cfg, tx, params, grads, state, jnp.int32(3))
    by_hand, _, _ = apply_gradients_jit(cfg, tx, params, scaled, state, jnp.int32(0))
    unclipped, _, _ = apply_gradients_jit(cfg, tx, params, grads, state, jnp.int32(2))
    np.testing.assert_allclose(m["grad_norm"], norm, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(by_hand), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    diffs = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(unclipped), strict=True)
    ]
    assert max(diffs) > 1e-4


def test_nonfinite_gradient_skips_the_whole_update_from_clip_begin():
    cfg = OptimizerConfig(
        lr=1e-2, weight_decay=0.1, warmup_iters=0, clip_begin=5, skip_nonfinite=True
    )
    tx, params = make_adamw(cfg), _params()
    state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)[1]
    grads = jax.tree.map(jnp.ones_like, params)
    grads["dense"]["kernel"] = grads["dense"]["kernel"].at[0, 0].set(jnp.nan)
    new, new_state, m = apply_gradients_jit(cfg, tx, params, grads, state, jnp.int32(5))
    assert float(m["skipped"]) == 1.0 and not math.isfinite(float(m["grad_norm"]))
    for a, b in zip(
        jax.tree.leaves((new, new_state)), jax.tree.leaves((params, state)), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # no Adam moment update, no weight decay, no count
    # before clip_begin the NaN propagates into the parameters
    new, _, m = apply_gradients_jit(cfg, tx, params, grads, state, jnp.int32(4))
    assert float(m["skipped"]) == 0.0
    assert np.isnan(np.asarray(new["dense"]["kernel"])).any()


def test_optimizer_config_rejects_bad_values():
    with pytest.raises(ValueError, match="warmup_ratio"):
        OptimizerConfig(warmup_ratio=0.0)
    with pytest.raises(ValueError, match="policy"):
        EMAConfig(policy="power")


# ----------------------------------------------------------------------------------------------
# Train step


def _tiny_step(config, **opt_overrides):
    opt_cfg = loop.optimizer_config(config)
    opt_cfg = OptimizerConfig(**{**opt_cfg.__dict__, **opt_overrides})
    tx = make_adamw(opt_cfg)
    keys = loop.run_keys(config.seed)
    graphdef = loop.model_graphdef(config)
    state = jax.jit(
        lambda: init_train_state(loop.build_model(config.model, keys["init"]), tx, keys["train"])[1]
    )()
    step = make_train_step(
        NNXDenoiser(graphdef), tx, opt_cfg, loop.ema_config(config), loop.loss_config(config)
    )
    return graphdef, state, step


def _batch(config, seed=0):
    x = jax.random.uniform(
        jax.random.PRNGKey(seed), (config.train.batch_size, 1, 1, 2), minval=-4, maxval=4
    )
    return {"x0": x}


@pytest.mark.parametrize("variant", ["tiny", "tiny_baseline"])
def test_train_step_is_finite_updates_params_and_does_not_retrace(variant):
    config = _load_config(variant)
    _, state, step = _tiny_step(config)
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
    _, state, step = _tiny_step(config, clip_begin=1, skip_nonfinite=True)
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
    _, state, step = _tiny_step(config, clip_begin=1, skip_nonfinite=True)  # same compile
    batch = _batch(config)
    batch["x0"] = batch["x0"].at[0, 0, 0, 0].set(jnp.nan)
    state, m = step(state, batch)
    assert any(np.isnan(np.asarray(p)).any() for p in jax.tree.leaves(state.params))
    history = [(0, {k: float(v) for k, v in m.items()})]
    with pytest.raises(FloatingPointError, match=r"loss = nan at training step 0"):
        loop.check_finite_metrics(history)


def test_check_finite_metrics_tolerates_skipped_steps_and_names_the_first_bad_step():
    ok = {"loss": 1.0, "grad_norm": 2.0, "skipped": 0.0}
    skipped = {"loss": math.nan, "grad_norm": math.nan, "skipped": 1.0}
    loop.check_finite_metrics([(0, ok), (1, skipped), (2, ok)])
    bad = {"loss": 1.0, "grad_norm": math.inf, "skipped": 0.0}
    with pytest.raises(FloatingPointError, match="grad_norm = inf at training step 7"):
        loop.check_finite_metrics([(6, ok), (7, bad), (8, {**bad, "loss": math.nan})])


# ----------------------------------------------------------------------------------------------
# The main job


def test_resume_continues_the_same_run_bit_exactly(tmp_path):
    config = _load_config("tiny")
    config.eval.enabled = False
    config.train.num_steps = 4
    _, straight, _ = loop.train(config, str(tmp_path / "straight"))
    half = _load_config("tiny")
    half.train.num_steps = 2
    _, first, info1 = loop.train(half, str(tmp_path / "resumed"))
    assert int(first.step) == 2 and info1["start_step"] == 0
    _, resumed, info2 = loop.train(config, str(tmp_path / "resumed"))
    assert info2["start_step"] == 2 and "resumed from step 2" in info2["resumed"]
    assert int(resumed.step) == int(straight.step) == 4
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(a, b)
    # a finished run skips training entirely
    _, again, info3 = loop.train(config, str(tmp_path / "resumed"))
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
    keys = loop.run_keys(config.seed)
    params = jax.jit(lambda: nnx.split(loop.build_model(config.model, keys["init"]))[1])()
    payload = loop.evaluate(config, str(tmp_path), loop.model_graphdef(config), params)
    assert payload["model"] == "flow_matching_baseline"
    assert [(r["solver"], r["nfe"]) for r in payload["results"]] == [("euler", 1), ("euler", 2)]
    assert all(r["metrics"]["num_samples"] == 300 for r in payload["results"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["results"] == json.loads(json.dumps(payload["results"]))
    assert (tmp_path / "samples.png").exists()
