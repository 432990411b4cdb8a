"""The device mesh of a run: axes ("data", "fsdp", "tensor"), sizes from `config.mesh`.

`config.mesh` (a `ConfigDict`, a mapping or any object with these attributes; missing fields take the
`MeshConfig` defaults):

===========  =====================================================================================
field        meaning
===========  =====================================================================================
`data`       pure data parallelism (parameters replicated across it), per slice
`fsdp`       data parallelism with parameters, optimizer state and EMA sharded across it (ZeRO-3)
`tensor`     tensor (model) parallelism of the MLP / attention widths
`dcn_data`   number of slices (or processes) along "data" over the data-centre network
`dcn_fsdp`   number of slices (or processes) along "fsdp" over the data-centre network
===========  =====================================================================================

`data`, `fsdp` and `tensor` are the sizes inside one slice (over the fast ICI links); one of them may be
-1 and is filled in from the number of devices per slice. The mesh axis sizes are then
`data * dcn_data`, `fsdp * dcn_fsdp` and `tensor`. With `dcn_data * dcn_fsdp > 1` the device array comes
from `jax.experimental.mesh_utils.create_hybrid_device_mesh`, the DCN axes outermost. The units of the
slow network are the slices (TPU multi-slice: `device.slice_index`) when there are exactly
`dcn_data * dcn_fsdp` of them, else the processes (CPU and GPU clusters report a single slice); otherwise
the mesh is built with `mesh_utils.create_device_mesh`.

All axes are `jax.sharding.AxisType.Auto` (see the jax-stack notes: with Explicit axes a `jax.jit`
outside `jax.set_mesh` fails), so `jax.jit` with `in_shardings` / `out_shardings` and GSPMD propagation
decide the layouts of everything else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
"""Mesh axis names, outermost (least communication) first."""

BATCH_AXES = ("data", "fsdp")
"""Mesh axes the batch dimension is split over."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh sizes (see the module docstring); defaults: every device on "fsdp", one slice."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1

    def __post_init__(self) -> None:
        """Validate the sizes, naming the bad field."""
        for name in ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"mesh.{name} must be an int, got {value!r}")
            allowed = (-1,) if name in ("data", "fsdp", "tensor") else ()
            if value < 1 and value not in allowed:
                raise ValueError(
                    f"mesh.{name} must be >= 1"
                    + (" or -1 (fill in from the device count)" if allowed else "")
                    + f", got {value}"
                )
        fill = [n for n in ("data", "fsdp", "tensor") if getattr(self, n) == -1]
        if len(fill) > 1:
            raise ValueError(f"at most one of mesh.data/fsdp/tensor may be -1, got -1 for {fill}")

    @property
    def num_slices(self) -> int:
        """Number of DCN units (slices or processes): dcn_data * dcn_fsdp."""
        return self.dcn_data * self.dcn_fsdp


def _field(cfg: Any, name: str) -> Any:
    """Field `name` of a mapping or an object (ConfigDict, dataclass), None when absent."""
    if isinstance(cfg, Mapping):
        return cfg.get(name)
    return getattr(cfg, name, None)


def mesh_config_from(cfg: Any) -> MeshConfig:
    """`MeshConfig` from a ConfigDict / mapping / dataclass / object (missing fields: defaults)."""
    if isinstance(cfg, MeshConfig):
        return cfg
    fields = {}
    for f in dataclasses.fields(MeshConfig):
        value = _field(cfg, f.name)
        if value is not None:
            fields[f.name] = value
    return MeshConfig(**fields)


def resolve_mesh_shape(
    cfg: Any, num_devices: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(per-slice ICI shape, DCN shape) over ("data", "fsdp", "tensor") for `num_devices` devices.

    Fills in the -1 field; raises ValueError (naming the sizes) when they do not multiply to the
    device count.
    """
    mc = mesh_config_from(cfg)
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    slices = mc.num_slices
    if num_devices % slices:
        raise ValueError(
            f"{num_devices} devices cannot be split into dcn_data * dcn_fsdp = {mc.dcn_data} * "
            f"{mc.dcn_fsdp} = {slices} slices of equal size"
        )
    per_slice = num_devices // slices
    sizes = {"data": mc.data, "fsdp": mc.fsdp, "tensor": mc.tensor}
    known = math.prod(v for v in sizes.values() if v != -1)
    fill = [n for n, v in sizes.items() if v == -1]
    if fill:
        if per_slice % known:
            raise ValueError(
                f"mesh {sizes} cannot fill {fill[0]}: the other sizes multiply to {known}, which "
                f"does not divide the {per_slice} devices per slice ({num_devices} devices / "
                f"{slices} slices)"
            )
        sizes[fill[0]] = per_slice // known
    elif known != per_slice:
        raise ValueError(
            f"mesh data * fsdp * tensor = {sizes['data']} * {sizes['fsdp']} * {sizes['tensor']} = "
            f"{known} must equal the {per_slice} devices per slice ({num_devices} devices / "
            f"{slices} slices); set one of them to -1 to fill it in"
        )
    ici = (sizes["data"], sizes["fsdp"], sizes["tensor"])
    return ici, (mc.dcn_data, mc.dcn_fsdp, 1)


def make_mesh(cfg: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ("data", "fsdp", "tensor") mesh of `cfg` (see module docstring) over `devices` (default all).

    Axis sizes are ICI x DCN; every axis is `AxisType.Auto`.
    """
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = resolve_mesh_shape(MeshConfig() if cfg is None else cfg, len(devices))
    if math.prod(dcn) > 1:
        slices = {getattr(d, "slice_index", None) for d in devices}
        processes = {d.process_index for d in devices}
        if None not in slices and len(slices) == math.prod(dcn):
            process_is_granule = False
        elif len(processes) == math.prod(dcn):
            process_is_granule = True
        else:
            raise ValueError(
                f"dcn_data * dcn_fsdp = {math.prod(dcn)} must equal the number of slices "
                f"({len(slices)}) or of processes ({len(processes)}) of the devices"
            )
        array = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=process_is_granule
        )
    else:
        array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """{axis name: size} of `mesh`."""
    return dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))


def batch_split(mesh: Mesh) -> int:
    """Number of ways the batch dimension is split: size("data") * size("fsdp")."""
    shape = mesh_shape(mesh)
    return math.prod(shape.get(a, 1) for a in BATCH_AXES)
