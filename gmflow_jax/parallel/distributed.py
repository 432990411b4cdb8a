"""Multi-host start-up: `jax.distributed.initialize` on TPU pods, SLURM and env-var GPU clusters.

Resolution order (first match wins):

1. explicit: `coordinator_address`, `num_processes`, `process_id` passed in (from the config);
2. environment: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (any launcher);
3. SLURM with more than one task (`SLURM_NTASKS` > 1): JAX's own SLURM cluster detection;
4. a multi-host Cloud TPU slice (`TPU_WORKER_HOSTNAMES` lists several hosts, or a Megascale
   multi-slice job): JAX's own TPU cluster detection;
5. otherwise a single process: nothing to initialize.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
from absl import logging


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins the job; `kind` is 'single', 'explicit', 'env', 'slurm' or 'tpu'."""

    kind: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def detect_cluster(
    env: Mapping[str, str] | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> ClusterSpec:
    """Decide how to start the distributed runtime, without starting it (pure; testable)."""
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
            int(env["JAX_NUM_PROCESSES"]),
            int(env["JAX_PROCESS_ID"]),
            tuple(int(i) for i in local.split(",")) if local else None,
        )
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return ClusterSpec("slurm")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return ClusterSpec("tpu")
    return ClusterSpec("single")


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> ClusterSpec:
    """Start `jax.distributed` when this is a multi-process job; skip it in a single process."""
    spec = detect_cluster(None, coordinator_address, num_processes, process_id)
    if spec.kind == "single":
        logging.info("single process: jax.distributed is not initialized")
        return spec
    if spec.kind in ("explicit", "env"):
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
        )
    else:  # JAX detects SLURM and Cloud TPU clusters itself.
        jax.distributed.initialize()
    logging.info(
        "jax.distributed (%s): process %d of %d, %d local / %d global devices",
        spec.kind,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return spec
