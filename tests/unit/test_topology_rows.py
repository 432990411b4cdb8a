"""Multi-host batch rows on real TPU device layouts, simulated from one CPU host.

`jax.experimental.topologies.get_topology_desc` (libtpu, from `jax[tpu]`) gives the devices of a real
slice with their real process (host) indices and physical placement; `make_mesh` builds the project's
mesh on them. For every host we compute what it reads (`process_rows`) and where each of its local
rows goes (`local_positions`), and check against an independent oracle of the batch sharding (the
block index of a device is its ("data", "fsdp") mesh coordinate, data-major) that every row of the
global batch is read by exactly the hosts whose devices hold it (once, without a cross-host tensor
axis) and lands on the device that holds it. The ArrayRecord loader is then run for every host of
such a layout and checked against the single-host global batch, and its iterator resumed.
"""

import functools
import os

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from gmflow_jax.data import latents
from gmflow_jax.parallel.mesh import make_mesh, mesh_shape
from gmflow_jax.parallel.sharding import (
    device_batch_rows,
    global_batch,
    local_positions,
    process_rows,
)

pytest.importorskip("libtpu", reason="jax[tpu] (libtpu) is needed for TPU topologies")
from gmflow_jax.parallel.topology import topology_devices as _topology_devices  # noqa: E402

ROWS_PER_DEVICE = 3


@functools.cache
def topology_devices(name: str, num_slices: int = 1):
    return tuple(_topology_devices(name, num_slices))


def processes_of(devices):
    return sorted({d.process_index for d in devices})


# (topology, slices, mesh config); dcn_data = -1 stands for "one per host" (process granules).
CASES = [
    ("v5p:2x2x2", 1, {}),
    ("v5p:2x2x2", 1, {"data": 2, "fsdp": -1}),
    ("v5p:2x2x2", 1, {"dcn_data": -1}),
    ("v5p:2x2x2", 2, {"dcn_data": 2}),
    ("v5p:2x4x4", 1, {}),
    ("v5p:2x4x4", 1, {"data": 2, "fsdp": -1}),
    ("v5p:2x4x4", 1, {"data": 4, "fsdp": -1}),
    ("v5p:2x4x4", 1, {"dcn_data": -1}),
    ("v5p:2x4x4", 1, {"fsdp": -1, "tensor": 2}),
    ("v5e:4x4", 1, {}),
    ("v5e:4x4", 1, {"data": 2, "fsdp": -1}),
    ("v5e:4x4", 1, {"dcn_data": -1}),
    ("v6e:4x4", 1, {}),
    ("v6e:4x4", 1, {"data": 4, "fsdp": -1}),
    ("v6e:4x4", 2, {"dcn_data": 2, "fsdp": -1}),
]


def build_mesh(name, slices, cfg):
    devices = topology_devices(name, slices)
    cfg = dict(cfg)
    if cfg.get("dcn_data") == -1:
        cfg["dcn_data"] = len(processes_of(devices))
    return make_mesh(cfg, devices=devices)


def oracle_rows(mesh, global_batch_size):
    """{device: (start, stop)} from the mesh coordinates alone (batch over data x fsdp, data-major)."""
    shape = mesh_shape(mesh)
    per = global_batch_size // (shape["data"] * shape["fsdp"])
    out = {}
    for (i, j, _), device in np.ndenumerate(mesh.devices):
        block = i * shape["fsdp"] + j
        out[device] = (block * per, (block + 1) * per)
    return out


@pytest.mark.parametrize("name,slices,cfg", CASES, ids=[f"{n}x{s}-{c}" for n, s, c in CASES])
def test_every_row_is_read_by_exactly_the_hosts_holding_it_and_lands_on_its_device(
    name, slices, cfg
):
    mesh = build_mesh(name, slices, cfg)
    shape = mesh_shape(mesh)
    batch_size = ROWS_PER_DEVICE * shape["data"] * shape["fsdp"]
    oracle = oracle_rows(mesh, batch_size)
    global_data = np.arange(batch_size) * 10 + 7  # row r carries a value naming r
    readers = {r: [] for r in range(batch_size)}
    for process in processes_of(mesh.devices.flat):
        rows = process_rows(mesh, batch_size, process)
        assert np.all(np.diff(rows) > 0)  # sorted, distinct
        for r in rows:
            readers[int(r)].append(process)
        local = global_data[rows]  # what this host's loader returns
        positions = local_positions(mesh, batch_size, process)
        mine = {d for d in mesh.devices.flat if d.process_index == process}
        assert set(positions) == mine
        for device, where in positions.items():
            start, stop = oracle[device]
            np.testing.assert_array_equal(local[where], global_data[start:stop])
        assert device_batch_rows(mesh, batch_size, process) == {d: oracle[d] for d in mine}
    for r, hosts in readers.items():
        holders = sorted({d.process_index for d, (a, b) in oracle.items() if a <= r < b})
        assert hosts == holders, f"row {r}: read by {hosts}, held by {holders}"
    if shape["tensor"] == 1:
        assert all(len(h) == 1 for h in readers.values())


def test_a_v5p_host_holds_several_blocks_under_the_default_mesh():
    # The layout that made the one-block assumption fail (v5p 2x2x2, every device on fsdp).
    mesh = build_mesh("v5p:2x2x2", 1, {})
    rows = process_rows(mesh, 32, 0)
    blocks = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    assert len(blocks) > 1
    assert sum(len(b) for b in blocks) == 16


def test_rows_reject_a_batch_that_does_not_split_and_an_unknown_host():
    mesh = build_mesh("v5e:4x4", 1, {})
    with pytest.raises(ValueError, match="multiple of data \\* fsdp = 16"):
        process_rows(mesh, 24, 0)
    with pytest.raises(ValueError, match="process_index 9 holds no device"):
        process_rows(mesh, 32, 9)


def test_global_batch_of_one_process_places_each_devices_rows():
    # The assembly itself on this process's 8 CPU devices, in a mesh order that is not the device
    # order (a permuted 2x4 data x fsdp mesh): every device gets the rows its mesh position owns.
    devices = np.array(jax.devices()[:8])[[3, 0, 6, 1, 7, 2, 5, 4]].reshape(2, 4, 1)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    data = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    out = global_batch({"x0": data}, mesh, 16)["x0"]
    oracle = oracle_rows(mesh, 16)
    for shard in out.addressable_shards:
        start, stop = oracle[shard.device]
        np.testing.assert_array_equal(np.asarray(shard.data), data[start:stop])
    with pytest.raises(
        ValueError, match="holds 32 rows of the global batch of 32, got a local batch of 16"
    ):
        global_batch({"x0": data}, mesh, 32)


# ----------------------------------------------------------------------------------------------
# The ArrayRecord loader on a real layout

SHAPE = (2, 2, 1)


def _write_latents(directory, count):
    os.makedirs(directory, exist_ok=True)
    records = [latents.encode_record(np.full(SHAPE, i, np.float32), i % 5, i) for i in range(count)]
    latents.write_shard(os.path.join(directory, "s0.array_record"), records[: count // 2])
    latents.write_shard(os.path.join(directory, "s1.array_record"), records[count // 2 :])
    shards = [
        {"file": "s0.array_record", "num_records": count // 2, "first_id": 0},
        {"file": "s1.array_record", "num_records": count - count // 2, "first_id": count // 2},
    ]
    latents.write_index(directory, shards, SHAPE, np.float32, 5)
    return latents.open_latent_shards(str(directory))


@pytest.mark.parametrize("name,cfg", [("v5p:2x2x2", {}), ("v5e:4x4", {"data": 2, "fsdp": -1})])
def test_each_hosts_loader_reads_exactly_its_rows_and_resumes_bit_exactly(tmp_path, name, cfg):
    mesh = build_mesh(name, 1, cfg)
    shape = mesh_shape(mesh)
    batch_size = 2 * shape["data"] * shape["fsdp"]
    shards = _write_latents(tmp_path / "d", 3 * batch_size + 5)  # batches straddle epochs
    single = latents.latent_dataset(shards, global_batch_size=batch_size, seed=11, include_ids=True)
    hosts = {
        p: latents.latent_dataset(
            shards,
            global_batch_size=batch_size,
            seed=11,
            rows=process_rows(mesh, batch_size, p),
            include_ids=True,
        )
        for p in processes_of(mesh.devices.flat)
    }
    oracle = oracle_rows(mesh, batch_size)
    for step in range(6):
        want = single[step]
        seen = np.zeros(batch_size, int)
        for p, ds in hosts.items():
            got = ds[step]
            rows = process_rows(mesh, batch_size, p)
            seen[rows] += 1
            np.testing.assert_array_equal(got["ids"], want["ids"][rows])
            np.testing.assert_array_equal(got["x0"][:, 0, 0, 0], want["ids"][rows])
            for device, where in local_positions(mesh, batch_size, p).items():
                a, b = oracle[device]
                np.testing.assert_array_equal(got["ids"][where], want["ids"][a:b])
        assert np.all(seen == 1)
    # Resume: a fresh iterator given the saved state continues with identical bytes.
    p = processes_of(mesh.devices.flat)[-1]
    it = latents.make_iterator(hosts[p], prefetch=0)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    fresh = latents.make_iterator(hosts[p], prefetch=0)
    fresh.set_state(state)
    for got, want in zip([next(fresh) for _ in range(3)], expected, strict=True):
        for key in want:
            assert got[key].tobytes() == want[key].tobytes()
