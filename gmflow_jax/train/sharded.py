"""The train state and step on a device mesh: shape-first sharded init, the sharded jitted step.

The math is that of `gmflow_jax.train.state` (spec §4.1-4.4 loss, §4.6 AdamW, §4.7 EMA): the sharded step
is `jax.jit` of the very step function `state.make_train_step` compiles for one device, now with
`in_shardings` / `out_shardings` from `gmflow_jax.parallel.sharding` and the state donated. On one
device the two give the same numbers; on a mesh they agree up to the order of floating-point reductions.

Initialization is shape-first: `jax.eval_shape` of the state init gives the abstract state, its
shardings follow from the parameter rules, and `jax.jit(init, out_shardings=...)` creates every leaf
directly in its shards, so the full parameters never exist on one device.

==================================  ============================================================
name                                what it is
==================================  ============================================================
`sharded_init`                      (graphdef, jitted init, state shardings) without running it
`create_sharded_train_state`        (graphdef, sharded TrainState, state shardings)
`sharded_train_step`                `ShardedStep`: the jitted, donating `step(state, batch)`
`abstract_train_state`              ShapeDtypeStructs (with shardings) of the state, for restores
==================================  ============================================================

Batches enter as host-local numpy arrays and become global arrays with
`gmflow_jax.parallel.sharding.global_batch(batch, mesh)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

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
from gmflow_jax.train.ema import EMAConfig
from gmflow_jax.train.optimizer import OptimizerConfig
from gmflow_jax.train.state import LossConfig, TrainState, init_train_state, make_train_step

Array = jax.Array
PyTree = Any


def sharded_init(
    model_fn: Callable[[], nnx.Module],
    tx: optax.GradientTransformation,
    rng: Array,
    mesh: Mesh,
    rules: Rules = DEFAULT_PARAM_RULES,
    min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE,
) -> tuple[nnx.GraphDef, Callable[[], TrainState], TrainState]:
    """(graphdef, jitted init `() -> TrainState` placed on `mesh`, state shardings); nothing runs.

    `model_fn()` builds the freshly initialized network (its init key closed over); `rng` (a raw
    uint32 key) becomes the state's training key. Only shapes are traced here.
    """
    graphdef = nnx.split(nnx.eval_shape(model_fn))[0]
    rng = np.asarray(jax.device_get(rng))  # a host constant: never aliased with a donated buffer

    def init() -> TrainState:
        return init_train_state(model_fn(), tx, rng)[1]

    abstract = jax.eval_shape(init)
    shardings = train_state_shardings(abstract, mesh, rules, min_fsdp_size)
    return graphdef, jax.jit(init, out_shardings=shardings), shardings


def create_sharded_train_state(
    model_fn: Callable[[], nnx.Module],
    tx: optax.GradientTransformation,
    rng: Array,
    mesh: Mesh,
    rules: Rules = DEFAULT_PARAM_RULES,
    min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, step-0 TrainState created in its shards on `mesh`, state shardings)."""
    graphdef, init, shardings = sharded_init(model_fn, tx, rng, mesh, rules, min_fsdp_size)
    return graphdef, init(), shardings


def abstract_train_state(init: Callable[[], TrainState]) -> TrainState:
    """ShapeDtypeStructs, with their shardings, of what the jitted `init` of `sharded_init` returns."""
    return jax.eval_shape(init)


def sharded_train_step(
    denoiser: Callable[..., Any],
    tx: optax.GradientTransformation,
    opt_cfg: OptimizerConfig,
    ema_cfg: EMAConfig,
    loss_cfg: LossConfig,
    spectrum: Callable[..., Array] | None,
    *,
    mesh: Mesh,
    state_shardings: TrainState,
    activation_rules: Rules | None = DEFAULT_ACTIVATION_RULES,
) -> ShardedStep:
    """The sharded `step(state, batch) -> (state, metrics)`: state in/out on `state_shardings`
    (donated), batch split over ("data", "fsdp"), metrics replicated.

    The step function is `state.make_train_step`'s (same loss, update and EMA). It is traced with
    `mesh` as the abstract mesh and the `activation_rules` active, so the model's activation
    constraints (`models.logical_axes.constrain`) apply; `activation_rules=None` leaves activations to
    GSPMD propagation.
    """
    jitted_single = make_train_step(denoiser, tx, opt_cfg, ema_cfg, loss_cfg, spectrum)
    step_fn = getattr(jitted_single, "__wrapped__", jitted_single)
    rules = check_rules(activation_rules, mesh) if activation_rules is not None else None

    def step_with_rules(state: TrainState, batch: dict[str, Array]):
        # The mesh and rules are entered inside the traced function: this closure is new for every
        # sharded step, so a trace with (or without) activation rules is never reused for another.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), contextlib.ExitStack() as stack:
            if rules is not None:
                stack.enter_context(nnx.logical_axis_rules(rules))
            return step_fn(state, batch)

    jitted = jax.jit(
        step_with_rules,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )
    return ShardedStep(jitted, mesh, rules)


class ShardedStep:
    """A jitted sharded train step (its mesh and activation rules are applied inside the trace)."""

    def __init__(self, jitted: Any, mesh: Mesh, activation_rules: Rules | None):
        """Wrap `jitted` (a `jax.jit` with shardings) with `mesh` and `activation_rules`."""
        self.jitted = jitted
        self.mesh = mesh
        self.activation_rules = activation_rules

    def __call__(self, state: TrainState, batch: dict[str, Array]):
        """One step: `(state, batch) -> (state, metrics)`; `state` is donated."""
        return self.jitted(state, batch)

    def lower(self, state: Any, batch: Any) -> Any:
        """`jax.jit(...).lower` on (abstract) arguments, e.g. for `.compile().memory_analysis()`."""
        return self.jitted.lower(state, batch)
