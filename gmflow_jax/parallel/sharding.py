"""Logical-axis rules and the shardings of the train state and the batch on a ("data","fsdp","tensor") mesh.

Rules are a tuple of `(logical name, mesh axis | tuple of mesh axes | None)` pairs, as in
`config.mesh.rules` (parameters) and `config.mesh.activation_rules` (activation constraints inside the
model, `gmflow_jax.models.logical_axes.constrain`). A logical name may appear in several pairs: the first
pair whose mesh axes are not yet used by another dimension of the same array wins (flax's convention),
so e.g. both dimensions of a square kernel never claim "fsdp".

Parameters, optimizer state and EMA (`param_shardings`):

1. a leaf that carries logical axis names (flax `out_sharding` metadata of an `nnx.Variable`, which the
   optimizer moments inherit from their parameter) is sharded by the rules;
2. a mesh axis is dropped from a dimension it does not divide (replicated there instead), so odd
   sizes such as the 1-wide log-std output never fail, and axes of size 1 are left out of the spec;
3. a leaf of at least `min_fsdp_size` elements that is still not split over "fsdp" (no names, or names
   that map elsewhere) has its largest dimension divisible by the fsdp size (and not already sharded)
   split over "fsdp", the ZeRO-3 rule;
4. scalars (step, Adam's count) and the PRNG key are replicated.

The batch is split over ("data", "fsdp") along its first dimension (`batch_sharding`); everything in the
step that follows from it is left to GSPMD propagation (all axes are `AxisType.Auto`).

Multi-host input: on a real slice the devices of one host are spread over the mesh (v5p 2x2x2 with
every device on fsdp: host 0 holds rows 0-3, 8-11, 16-19, 24-27 of a batch of 32), so a host's rows
are in general several blocks. `process_rows(mesh, B)` gives the sorted global rows this process
holds (what its data loader reads, in that order), `device_batch_rows` / `local_positions` the rows
of each of its devices, and `global_batch(local, mesh, B)` places exactly those rows on each device
(`jax.make_array_from_single_device_arrays`). All three take any `process_index`, so every host's
share can be checked from one machine against a topology's devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gmflow_jax.parallel.mesh import BATCH_AXES, mesh_shape

PyTree = Any
MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

DEFAULT_PARAM_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("modulation", "tensor"),
    ("classes", None),
    ("patch", None),
    ("freq", None),
    ("cond", "fsdp"),
    ("head_out", None),
    ("logstd_mlp", "fsdp"),
    ("logstd_out", None),
    ("layers", None),
)
"""GM-DiT parameter rules: the width D over "fsdp", the MLP / attention / modulation widths over
"tensor" (Megatron-style column/row split), the stacked-layer axis replicated."""

DEFAULT_ACTIVATION_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("cond", "tensor"),
    ("logstd_mlp", "tensor"),
    ("modulation", None),
    ("freq", None),
    ("head_out", None),
    ("logstd_out", None),
)
"""Activation rules: batch over ("data", "fsdp") for every activation (tokens, the conditioning
path, the modulations, the head), the hidden widths of the MLPs over "tensor" (Megatron-style), every
other width replicated (the residual stream's is all-gathered from the fsdp-sharded weights)."""

DEFAULT_MIN_FSDP_SIZE = 4096
"""Leaves with fewer elements are not split over "fsdp" by the fallback rule (step 3 above)."""


def _axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
    """Mesh axes of a rule value as a tuple (None -> ())."""
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def check_rules(rules: Rules, mesh: Mesh | None = None) -> tuple[tuple[str, MeshAxes], ...]:
    """`rules` as a tuple of pairs; ValueError naming a malformed pair or an unknown mesh axis."""
    out = []
    for pair in rules:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(
                f"each rule must be a (logical name, mesh axis | tuple | None) pair, got {pair!r}"
            )
        name, axes = pair
        axes_t = _axes_tuple(axes)
        if mesh is not None:
            unknown = [a for a in axes_t if a not in mesh.axis_names]
            if unknown:
                raise ValueError(
                    f"rule {tuple(pair)!r} names mesh axes {unknown} not in the mesh "
                    f"{tuple(mesh.axis_names)}"
                )
        value = None if not axes_t else axes_t[0] if len(axes_t) == 1 else axes_t
        out.append((name, value))
    return tuple(out)


def logical_to_mesh_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions have logical `names`, under `rules`.

    For each name the first rule whose mesh axes are still unused in this spec applies; a name with no
    applicable rule (or None) is replicated.
    """
    rules = check_rules(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        chosen: MeshAxes = None
        if name is not None:
            for rule_name, axes in rules:
                if rule_name != name:
                    continue
                axes_t = _axes_tuple(axes)
                if not used.intersection(axes_t):
                    chosen = axes
                    used.update(axes_t)
                    break
        spec.append(chosen)
    return PartitionSpec(*spec)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    """Product of the sizes of `axes` in `mesh`."""
    shape = mesh_shape(mesh)
    return math.prod(shape[a] for a in _axes_tuple(axes))


def leaf_spec(
    shape: Sequence[int],
    names: Sequence[str | None] | None,
    mesh: Mesh,
    rules: Rules,
    min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE,
) -> PartitionSpec:
    """PartitionSpec of one parameter-like array (steps 1-3 of the module docstring)."""
    shape = tuple(int(s) for s in shape)
    rules = check_rules(rules, mesh)
    if not shape:
        return PartitionSpec()
    if names is not None and len(names) == len(shape):
        spec = list(logical_to_mesh_spec(names, rules))
    else:
        spec = [None] * len(shape)
    # 2. drop a mesh axis from a dimension it does not divide (and axes of size 1: no split)
    spec = [
        axes
        if axes is not None and _axis_size(mesh, axes) > 1 and dim % _axis_size(mesh, axes) == 0
        else None
        for dim, axes in zip(shape, spec, strict=True)
    ]
    used = {a for axes in spec for a in _axes_tuple(axes)}
    fsdp = mesh_shape(mesh).get("fsdp", 1)
    if fsdp > 1 and "fsdp" not in used and math.prod(shape) >= min_fsdp_size:
        # 3. ZeRO-3 fallback: the largest unsharded dimension that fsdp divides
        candidates = [i for i, d in enumerate(shape) if spec[i] is None and d % fsdp == 0]
        if candidates:
            best = max(candidates, key=lambda i: (shape[i], -i))
            spec[best] = "fsdp"
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _logical_names(variable: Any) -> tuple[str | None, ...] | None:
    """The logical axis names recorded on an `nnx.Variable` (`out_sharding` metadata), or None."""
    if not isinstance(variable, nnx.Variable):
        return None
    meta = variable.get_metadata()
    names = meta.get("out_sharding", meta.get("sharding_names"))
    return tuple(names) if names is not None else None


def param_shardings(
    tree: PyTree, mesh: Mesh, rules: Rules, min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE
) -> PyTree:
    """NamedShardings (same pytree structure as `tree`) for params / optimizer state / EMA leaves.

    `tree` may hold arrays or `jax.ShapeDtypeStruct`s, wrapped in `nnx.Variable`s or not.
    """
    rules = check_rules(rules, mesh)

    def one(leaf: Any) -> Any:
        names = _logical_names(leaf)
        if isinstance(leaf, nnx.Variable):
            return jax.tree.map(
                lambda x: NamedSharding(
                    mesh, leaf_spec(np.shape(x), names, mesh, rules, min_fsdp_size)
                ),
                leaf,
            )
        return NamedSharding(mesh, leaf_spec(np.shape(leaf), None, mesh, rules, min_fsdp_size))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def train_state_shardings(
    abstract_state: Any, mesh: Mesh, rules: Rules, min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE
) -> Any:
    """Shardings of a `TrainState`-like dataclass: params / opt_state / ema_params by
    `param_shardings`, every other field (step, rng) replicated."""
    sharded_fields = ("params", "opt_state", "ema_params")
    out = jax.tree.map(lambda _: replicated(mesh), abstract_state)
    return out.replace(
        **{
            f: param_shardings(getattr(abstract_state, f), mesh, rules, min_fsdp_size)
            for f in sharded_fields
        }
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of every batch array: first dimension over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def device_batch_rows(
    mesh: Mesh, global_batch_size: int, process_index: int | None = None
) -> dict[jax.Device, tuple[int, int]]:
    """Rows [start, stop) of a global batch held by each device of process `process_index`.

    `process_index` defaults to this process; any index of the mesh's devices may be given, so every
    host's share can be computed from one place (tests simulate a pod from a topology's devices).
    Devices that replicate the batch (e.g. along "tensor") hold the same rows. Raises ValueError
    when the batch does not split evenly over ("data", "fsdp") or when the process holds no device.
    """
    split = math.prod(mesh_shape(mesh)[a] for a in BATCH_AXES)
    if global_batch_size < 1 or global_batch_size % split:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of data * fsdp "
            f"= {split}"
        )
    process = jax.process_index() if process_index is None else int(process_index)
    index_map = batch_sharding(mesh).devices_indices_map((global_batch_size,))
    out = {
        device: index[0].indices(global_batch_size)[:2]
        for device, index in index_map.items()
        if device.process_index == process
    }
    if not out:
        processes = sorted({d.process_index for d in mesh.devices.flat})
        raise ValueError(f"process_index {process} holds no device of the mesh (has {processes})")
    return out


def process_rows(
    mesh: Mesh, global_batch_size: int, process_index: int | None = None
) -> np.ndarray:
    """Sorted global row indices (int64) of a global batch that process `process_index` holds.

    These are the rows this host reads (in this order) and hands to `global_batch`: one block per
    distinct device slice, as many blocks as the device layout gives (on a real slice a host's
    devices are usually not one contiguous run of the mesh). See `device_batch_rows`.
    """
    blocks = sorted(set(device_batch_rows(mesh, global_batch_size, process_index).values()))
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in blocks])


def local_positions(
    mesh: Mesh, global_batch_size: int, process_index: int | None = None
) -> dict[jax.Device, slice]:
    """For each device of the process, its slice of the process-local batch (rows ordered as
    `process_rows`): `local[positions[d]]` is what device `d` holds."""
    rows = process_rows(mesh, global_batch_size, process_index)
    blocks = device_batch_rows(mesh, global_batch_size, process_index)
    out = {}
    for device, (a, b) in blocks.items():
        first = int(np.searchsorted(rows, a))
        out[device] = slice(first, first + (b - a))
    return out


def global_batch(
    batch: dict[str, np.ndarray], mesh: Mesh, global_batch_size: int | None = None
) -> dict[str, jax.Array]:
    """Assemble this process's rows (numpy, ordered as `process_rows`) into global batch arrays
    sharded by `batch_sharding`.

    Each array's first dimension is this process's share of the global batch (the whole batch in a
    single process); `global_batch_size` defaults to what that share implies. Every addressable
    device receives exactly its rows (`local_positions`), however many blocks the process holds.
    """
    sharding = batch_sharding(mesh)
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    if not arrays:
        return {}
    local = {a.shape[0] for a in arrays.values()}
    if len(local) != 1:
        raise ValueError(f"batch arrays disagree on the local batch size: {sorted(local)}")
    (local_size,) = local
    if global_batch_size is None:
        # Each distinct block of this process is global / split rows long.
        split = math.prod(mesh_shape(mesh)[a] for a in BATCH_AXES)
        blocks = len(set(device_batch_rows(mesh, split).values()))
        global_batch_size = local_size // blocks * split
    positions = local_positions(mesh, global_batch_size)
    expected = max(p.stop for p in positions.values())
    if local_size != expected:
        raise ValueError(
            f"this process holds {expected} rows of the global batch of {global_batch_size}, "
            f"got a local batch of {local_size}"
        )
    devices = list(positions)
    out = {}
    for key, value in arrays.items():
        shards = jax.device_put([value[positions[d]] for d in devices], devices)
        out[key] = jax.make_array_from_single_device_arrays(
            (global_batch_size, *value.shape[1:]), sharding, shards
        )
    return out
