"""The optimizer and the EMA against their closed forms (`docs/math.md` §4.6, §4.7; oracle §9.30)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.config_files import load_config

from gmflow_jax.train.ema import EMAConfig, ema_beta, ema_update
from gmflow_jax.train.optimizer import (
    OptimizerConfig,
    apply_gradients,
    make_adamw,
    warmup_constant_lr,
    weight_decay_mask,
)

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
