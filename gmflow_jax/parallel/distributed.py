"""Multi-host start-up: find the job's coordinator, process count and process id, then join it with
`jax.distributed.initialize` before anything touches a device.

Detection follows JAX's own cluster detection (`jax._src.clusters`), resolved here to explicit values
so that what is logged is what runs, and so that every case can be tested without a cluster.
First match wins:

==========  ======================================================================================
kind        where the values come from
==========  ======================================================================================
explicit    `config.distributed.coordinator_address` / `num_processes` / `process_id`
env         `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`
            (optional `JAX_LOCAL_DEVICE_IDS`): any launcher
slurm       an `srun` step with `SLURM_NTASKS` > 1: coordinator = the first host of
            `SLURM_STEP_NODELIST`, port 61440 + `SLURM_JOB_ID` mod 4096 (JAX's choice),
            id = `SLURM_PROCID`, one process per task (`SLURM_LOCALID` picks the local device
            when there are as many tasks as GPUs on the node, left to JAX)
gke         GKE TPU pods: hosts in `TPU_PROCESS_ADDRESSES` or `TPU_WORKER_HOSTNAMES`, this host
            `TPU_WORKER_ID`
gce         a plain Cloud TPU VM slice (what `launch/tpu_pod.sh` creates): a machine with TPU chips
            on its PCI bus (Google vendor id 0x1ae0, JAX's test) whose metadata server names
            the hosts (`worker-network-endpoints`) and this host (`agent-worker-number`)
single      anything else, and a TPU slice of one host: nothing to initialize
==========  ======================================================================================

For both TPU kinds, multi-slice (Megascale) values come from the environment or from the metadata
server's `tpu-env` attribute: `MEGASCALE_NUM_SLICES`, `MEGASCALE_SLICE_ID` and
`MEGASCALE_COORDINATOR_ADDRESS`; process id = id in slice + slice id * hosts per slice; the coordinator
is `MEGASCALE_COORDINATOR_ADDRESS` or the first host, on port 8482 (JAX's).

`start_distributed(config)` is what a run calls first; `detect_cluster` is the pure decision (its
environment, metadata reader and TPU-VM test are arguments, so tests drive it with tables).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import jax
from absl import logging

TPU_COORDINATOR_PORT = 8482
"""Coordinator port on TPU slices (JAX's `cloud_tpu_cluster.coordinator_port`)."""

GOOGLE_PCI_VENDOR_ID = "0x1ae0"
"""PCI vendor id of Google's TPU chips (what JAX checks to decide it runs on a Cloud TPU VM)."""

METADATA_TIMEOUT_S = 5.0
"""Seconds to wait for one metadata-server answer (it is local to the VM and answers in ms)."""

MetadataReader = Callable[[str], "str | None"]
"""`read(key)`: the instance attribute `key` from the GCE metadata server, None when absent."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins the job; `kind` is one of the table in the module docstring."""

    kind: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def is_multi_process(self) -> bool:
        """Whether `jax.distributed.initialize` has to run."""
        return self.kind != "single"


def gce_metadata_reader(
    endpoint: str | None = None, timeout_s: float = METADATA_TIMEOUT_S
) -> MetadataReader:
    """A reader of the GCE metadata server's instance attributes (`GCE_METADATA_IP` or
    metadata.google.internal): the attribute's text, None on 404 or when the server is unreachable."""
    host = endpoint or os.environ.get("GCE_METADATA_IP", "metadata.google.internal")

    def read(key: str) -> str | None:
        request = urllib.request.Request(
            f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
            headers={"Metadata-Flavor": "Google"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read().decode()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise RuntimeError(
                f"metadata server answered {err.code} for attribute {key!r}"
            ) from err
        except (urllib.error.URLError, OSError):
            return None

    return read


def has_tpu_chips(pci_root: str = "/sys/bus/pci/devices") -> bool:
    """Whether a Google TPU chip is on this machine's PCI bus (JAX's Cloud TPU VM test)."""
    for vendor_path in glob.glob(os.path.join(pci_root, "*", "vendor")):
        try:
            with open(vendor_path) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR_ID:
                    return True
        except OSError:
            continue
    return False


def _int_field(value: Any, name: str) -> int:
    """`value` as an int; ValueError naming the field."""
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _tpu_env_value(key: str, env: Mapping[str, str], metadata: MetadataReader | None) -> str | None:
    """`key` from the environment, else from the metadata server's `tpu-env` ("KEY: 'value'" lines)."""
    if env.get(key):
        return env[key]
    if metadata is None:
        return None
    text = metadata("tpu-env") or ""
    for line in text.splitlines():
        if ":" in line:
            name, value = re.split(":", line, maxsplit=1)
            if name.strip() == key:
                return value.strip().strip("'\"") or None
    return None


def _worker_hosts(endpoints: str) -> list[str]:
    """Host addresses of `worker-network-endpoints`: plain hostnames or `name:id:ip` triples."""
    hosts = []
    for entry in (e.strip() for e in endpoints.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) == 1:
            hosts.append(parts[0])
        elif len(parts) == 3:
            hosts.append(parts[2])
        else:
            raise ValueError(
                f"worker-network-endpoints entry {entry!r} is neither host nor name:id:ip"
            )
    return hosts


def _tpu_spec(
    kind: str,
    hosts: list[str],
    id_in_slice: int,
    env: Mapping[str, str],
    metadata: MetadataReader | None,
) -> ClusterSpec:
    """The spec of a TPU slice (or several, Megascale) from its hosts and this host's id."""
    slices = _int_field(_tpu_env_value("MEGASCALE_NUM_SLICES", env, metadata) or 1, "slices")
    slice_id = _int_field(_tpu_env_value("MEGASCALE_SLICE_ID", env, metadata) or 0, "slice id")
    num = len(hosts) * slices
    if num <= 1:
        return ClusterSpec("single")
    if not 0 <= id_in_slice < len(hosts):
        raise ValueError(f"TPU worker id {id_in_slice} is not in [0, {len(hosts)}) for {hosts}")
    coordinator = _tpu_env_value("MEGASCALE_COORDINATOR_ADDRESS", env, metadata) or hosts[0]
    coordinator = coordinator.split(":")[0]
    return ClusterSpec(
        kind,
        f"{coordinator}:{TPU_COORDINATOR_PORT}",
        num,
        id_in_slice + slice_id * len(hosts),
    )


def _slurm_first_host(node_list: str) -> str:
    """The first host of a SLURM node list ('n1', 'n1,n2', 'n[001-004],m', 'n[001,007-015]')."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", node_list)
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[,-]", ranges)[0]


SLURM_STEP_VARS = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
"""Variables of an `srun` job step that JAX's SLURM detection needs besides SLURM_JOB_ID/NTASKS."""


def detect_cluster(
    env: Mapping[str, str] | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    metadata: MetadataReader | None = None,
    tpu_vm: bool | None = None,
) -> ClusterSpec:
    """Decide how this process joins the job (module docstring), without starting anything.

    `env` defaults to `os.environ`; `tpu_vm` (default: `has_tpu_chips()` unless
    `TPU_SKIP_MDS_QUERY` is set) says whether to ask the metadata server, read with `metadata`
    (default `gce_metadata_reader()`). Raises ValueError naming the missing or bad setting.
    """
    env = os.environ if env is None else env
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError(
                f"coordinator_address={coordinator_address!r} also needs num_processes and "
                f"process_id (got {num_processes}, {process_id})"
            )
        return ClusterSpec("explicit", coordinator_address, int(num_processes), int(process_id))
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")
        local = env.get("JAX_LOCAL_DEVICE_IDS")
        return ClusterSpec(
            "env",
            env["JAX_COORDINATOR_ADDRESS"],
            _int_field(env["JAX_NUM_PROCESSES"], "JAX_NUM_PROCESSES"),
            _int_field(env["JAX_PROCESS_ID"], "JAX_PROCESS_ID"),
            tuple(int(i) for i in local.split(",")) if local else None,
        )
    if env.get("SLURM_JOB_ID") and _int_field(env.get("SLURM_NTASKS", "1"), "SLURM_NTASKS") > 1:
        missing = [k for k in SLURM_STEP_VARS if k not in env]
        if missing:
            raise ValueError(
                f"SLURM_NTASKS={env['SLURM_NTASKS']} but {', '.join(missing)} is not set: start "
                "one process per task with srun"
            )
        port = _int_field(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % 2**12 + (65535 - 2**12 + 1)
        return ClusterSpec(
            "slurm",
            f"{_slurm_first_host(env['SLURM_STEP_NODELIST'])}:{port}",
            _int_field(env["SLURM_NTASKS"], "SLURM_NTASKS"),
            _int_field(env["SLURM_PROCID"], "SLURM_PROCID"),
        )
    gke_hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if gke_hosts:
        hosts = [h.strip() for h in gke_hosts.split(",") if h.strip()]
        if len(hosts) > 1 and "TPU_WORKER_ID" not in env:
            raise ValueError(
                f"TPU_WORKER_HOSTNAMES lists {len(hosts)} hosts but TPU_WORKER_ID is unset"
            )
        worker = _int_field(env.get("TPU_WORKER_ID", 0), "TPU_WORKER_ID")
        return _tpu_spec("gke", hosts, worker, env, None)
    if tpu_vm is None:
        tpu_vm = env.get("TPU_SKIP_MDS_QUERY") is None and has_tpu_chips()
    if tpu_vm:
        metadata = metadata or gce_metadata_reader()
        worker = metadata("agent-worker-number")
        endpoints = metadata("worker-network-endpoints")
        if worker is not None and endpoints:
            hosts = _worker_hosts(endpoints)
            return _tpu_spec("gce", hosts, _int_field(worker, "agent-worker-number"), env, metadata)
    return ClusterSpec("single")


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    env: Mapping[str, str] | None = None,
    metadata: MetadataReader | None = None,
    tpu_vm: bool | None = None,
) -> ClusterSpec:
    """Detect the cluster (`detect_cluster`) and join it with `jax.distributed.initialize`; a single
    process initializes nothing. Returns the spec that ran."""
    spec = detect_cluster(
        env, coordinator_address, num_processes, process_id, metadata=metadata, tpu_vm=tpu_vm
    )
    if not spec.is_multi_process:
        logging.info("single process: jax.distributed is not initialized")
        return spec
    logging.info(
        "jax.distributed (%s): coordinator %s, process %d of %d",
        spec.kind,
        spec.coordinator_address,
        spec.process_id,
        spec.num_processes,
    )
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
    )
    logging.info(
        "jax.distributed joined: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return spec


def config_cluster_args(config: Any) -> dict[str, Any]:
    """`initialize_distributed` arguments from the optional `config.distributed` section (empty when
    it names no coordinator)."""
    d = config.get("distributed") if hasattr(config, "get") else None
    if d is None or not d.get("coordinator_address"):
        return {}
    return {
        "coordinator_address": str(d.coordinator_address),
        "num_processes": int(d.num_processes),
        "process_id": int(d.process_id),
    }


def start_distributed(config: Any = None) -> ClusterSpec | None:
    """Join the multi-process job of `config.distributed` / the environment / the TPU slice, once (a
    no-op in a single process or when already joined). Call it before anything touches a device:
    `jax.distributed.initialize` refuses to run after the backends exist. Returns the spec that ran,
    None when the job was already joined."""
    if jax.distributed.is_initialized():
        return None
    return initialize_distributed(**config_cluster_args(config))
