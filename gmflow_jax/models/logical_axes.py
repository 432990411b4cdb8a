"""Logical axis names on model parameters and activations (no-ops without a mesh and rules).

Parameters carry logical names as flax `out_sharding` metadata (`nnx.with_partitioning`), so
`nnx.get_partition_spec(nnx.state(model))` under `nnx.logical_axis_rules(rules)` gives mesh
`PartitionSpec`s. Large activations pass through `constrain`, which becomes
`jax.lax.with_sharding_constraint` only when both a mesh (`jax.set_mesh`) and logical axis rules
(`nnx.logical_axis_rules`) are active; otherwise it returns its input unchanged. An activation
name not covered by the rules (or None) is replicated along its dimension. Each constraint runs in
the name scope `constraint_scope(names)`, e.g. "constrain(batch,modulation)", so its logical names
appear in the lowered and compiled HLO's op names.

Eager sharding of parameters at creation happens only when a mesh and rules are active at
construction time; without them the names are recorded as metadata only, so models build on a
plain CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec

Array = jax.Array
LogicalNames = Sequence[str | None]


def _mesh_and_rules_active() -> bool:
    """Whether a (non-empty) mesh and logical axis rules are both set in the current context."""
    mesh = jax.sharding.get_abstract_mesh()
    return (not mesh.empty) and bool(core_spmd.get_logical_axis_rules())


def logical_param(initializer: Callable, names: LogicalNames) -> Callable:
    """Wrap a param initializer so the Param records logical axis `names` (one per dimension)."""
    metadata = {} if _mesh_and_rules_active() else {"eager_sharding": False}
    return nnx.with_partitioning(initializer, tuple(names), **metadata)


def constrain(x: Array, names: LogicalNames) -> Array:
    """Constrain `x` by logical `names` under the active mesh and rules; identity otherwise."""
    if len(names) != x.ndim:
        raise ValueError(f"names {tuple(names)} must name each of the {x.ndim} axes of x {x.shape}")
    if not _mesh_and_rules_active():
        return x
    rules = dict(core_spmd.get_logical_axis_rules())
    spec = PartitionSpec(*(rules.get(n) if n is not None else None for n in names))
    mesh = jax.sharding.get_abstract_mesh()
    # Why a named scope: the logical names then travel into the HLO's op names (profiles, dumps,
    # `python -m gmflow_jax.aot`), so each constraint can be traced back to its activation.
    with jax.named_scope(constraint_scope(names)):
        if mesh.are_all_axes_explicit:
            return jax.sharding.reshard(x, spec)
        return jax.lax.with_sharding_constraint(x, spec)


def constraint_scope(names: LogicalNames) -> str:
    """The name scope of a `constrain` call: "constrain(batch,length,embed)" ("_" for None)."""
    return "constrain(" + ",".join("_" if n is None else n for n in names) + ")"
