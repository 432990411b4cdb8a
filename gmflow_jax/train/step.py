"""The pure train step, the one helper that jits it on a mesh, and the shape-first init.

`docs/math.md`: §4.1-4.4 (loss), §4.6 (AdamW update), §4.7 (EMA).

==========================  ==========================================================================
name                        what it is
==========================  ==========================================================================
`step_settings`             (OptimizerConfig, EMAConfig, LossConfig) from a run config
`make_train_step`           the pure `train_step(state, batch) -> (state, metrics)`: no jit, no cache
`jit_train_step`            `jax.jit` of a step with in/out shardings on a mesh, the state donated,
                            the activation rules active while it traces
`init_on_mesh`              (graphdef, jitted init, state shardings): shape-first init on a mesh
==========================  ==========================================================================

Every run, one CPU device or a pod, takes this path: `init_on_mesh` -> `jit_train_step(make_train_step
(...))`. On a one-device mesh every sharding is trivial and the compiled step is the single-device one;
on a larger mesh the same function is partitioned by GSPMD from the state and batch shardings
(`gmflow_jax.parallel.sharding`), agreeing with one device up to the order of float reductions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from gmflow_jax.gm import GM
from gmflow_jax.parallel.sharding import (
    DEFAULT_ACTIVATION_RULES,
    DEFAULT_MIN_FSDP_SIZE,
    DEFAULT_PARAM_RULES,
    Rules,
    batch_sharding,
    check_rules,
    replicated,
    train_state_shardings,
)
from gmflow_jax.train.ema import EMAConfig, ema_beta, ema_update
from gmflow_jax.train.optimizer import OptimizerConfig, apply_gradients
from gmflow_jax.train.state import LossConfig, TrainState, init_train_state, loss_terms

Array = jax.Array
PyTree = Any
StepFn = Callable[[TrainState, dict[str, Array]], tuple[TrainState, dict[str, Array]]]

MODEL_BATCH_KEYS = ("x0", "labels")
"""Batch entries the train step reads; others (e.g. example "ids") stay on the host."""


def step_settings(
    config: ml_collections.ConfigDict,
) -> tuple[OptimizerConfig, EMAConfig, LossConfig]:
    """The static settings of the step: `config.train.optimizer`, `config.train.ema` and the loss.

    The objective follows `config.model.mean_only` (flow-matching L2 for a mean-only model, the
    transition GM-NLL otherwise). Class-conditional runs set `config.train.prob_class` (label keep
    probability, default 1.0) and the null label is `config.model.num_classes`;
    `config.train.spectral_loss_weight` (default 1.0) weighs the spectral loss of a model with a
    SpectrumMLP.
    """
    t = config.train
    loss = LossConfig(
        objective="flow_matching_l2" if config.model.mean_only else "transition_nll",
        trans_ratio=t.trans_ratio,
        weight_scale=t.weight_scale,
        t_sampler=t.t_sampler,
        logit_normal_mean=t.logit_normal_mean,
        logit_normal_std=t.logit_normal_std,
        shift=t.shift,
        prob_class=float(t.get("prob_class", 1.0)),
        null_label=int(config.model.get("num_classes", -1)),
        spectral_weight=float(t.get("spectral_loss_weight", 1.0)),
    )
    return OptimizerConfig(**t.optimizer.to_dict()), EMAConfig(**t.ema.to_dict()), loss


def make_train_step(
    denoiser: Callable[..., GM | Array],
    tx: optax.GradientTransformation,
    opt_cfg: OptimizerConfig,
    ema_cfg: EMAConfig,
    loss_cfg: LossConfig,
    spectrum: Callable[..., Array] | None = None,
) -> StepFn:
    """The pure `train_step(state, batch) -> (state, metrics)` (§4.1-4.4, §4.6, §4.7).

    `batch` is `{"x0": [B, H, W, C], "labels": [B] int or absent}`. Iteration i = state.step uses the
    key fold_in(state.rng, i), so a resumed run continues bit for bit. Metrics (float32 scalars, left
    on device): loss, lr, grad_norm, skipped, and with a `spectrum` function also loss_trans and
    loss_spec (loss = loss_trans + loss_spec). Not jitted: `jit_train_step` compiles it with the
    run's shardings, and tests or benchmarks may wrap it however they need.
    """

    def total_loss(params: PyTree, key: Array, batch: dict[str, Array]):
        terms = loss_terms(
            denoiser, params, key, batch["x0"], batch.get("labels"), loss_cfg, spectrum
        )
        if "spec" in terms:
            return terms["trans"] + terms["spec"], {
                "loss_trans": terms["trans"],
                "loss_spec": terms["spec"],
            }
        return terms["trans"], {}

    def train_step(state: TrainState, batch: dict[str, Array]):
        key = jax.random.fold_in(state.rng, state.step)
        (loss, parts), grads = jax.value_and_grad(total_loss, has_aux=True)(
            state.params, key, batch
        )
        params, opt_state, metrics = apply_gradients(
            opt_cfg, tx, state.params, grads, state.opt_state, state.step
        )
        ema_params = ema_update(state.ema_params, params, ema_beta(ema_cfg, state.step))
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
        )
        return new_state, {"loss": loss.astype(jnp.float32), **parts, **metrics}

    return train_step


def jit_train_step(
    step_fn: StepFn,
    mesh: Mesh,
    state_shardings: TrainState,
    activation_rules: Rules | None = DEFAULT_ACTIVATION_RULES,
) -> Any:
    """`jax.jit(step_fn)` on `mesh`: state in/out on `state_shardings` (donated), the batch split over
    ("data", "fsdp"), metrics replicated. Returns the jitted function (`.lower(...)` works on
    abstract arguments, e.g. for a topology compile).

    The step traces with `mesh` as the abstract mesh and `activation_rules` active, so the models'
    logical activation constraints (`models.logical_axes.constrain`) bind to mesh axes;
    `activation_rules=None` leaves activations to GSPMD propagation.
    """
    rules = check_rules(activation_rules, mesh) if activation_rules is not None else None

    def step_on_mesh(state: TrainState, batch: dict[str, Array]):
        # Why inside the traced function: the rules are a trace-time context, and entering them here
        # ties them to this jit (a jit cache entry can never be reused with other rules).
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), contextlib.ExitStack() as stack:
            if rules is not None:
                stack.enter_context(nnx.logical_axis_rules(rules))
            return step_fn(state, batch)

    return jax.jit(
        step_on_mesh,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )


def init_on_mesh(
    model_fn: Callable[[], nnx.Module],
    tx: optax.GradientTransformation,
    rng: Array,
    mesh: Mesh,
    rules: Rules = DEFAULT_PARAM_RULES,
    min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE,
) -> tuple[nnx.GraphDef, Callable[[], TrainState], TrainState]:
    """(graphdef, jitted init `() -> TrainState` on `mesh`, state shardings); nothing runs yet.

    Shape-first: `jax.eval_shape` of the init gives the abstract state, its shardings follow from the
    parameter rules, and `jax.jit(init, out_shardings=...)` creates every leaf directly in its shards,
    so the full parameters never exist on one device. `model_fn()` builds the freshly initialized
    network (its init key closed over); `rng` (a raw uint32 key) becomes the state's training key.
    """
    graphdef = nnx.split(nnx.eval_shape(model_fn))[0]
    rng = np.asarray(jax.device_get(rng))  # a host constant: never aliased with a donated buffer

    def init() -> TrainState:
        return init_train_state(model_fn(), tx, rng)[1]

    shardings = train_state_shardings(jax.eval_shape(init), mesh, rules, min_fsdp_size)
    return graphdef, jax.jit(init, out_shardings=shardings), shardings
