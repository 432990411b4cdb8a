"""A tiny pod-scale training job for the resume and multi-process tests (run as a script).

It is a thin wrapper over the real training loop of `python -m gmflow_jax.main` for a config with a
mesh (`gmflow_jax.train.loop.train`, the one loop): the `configs/imagenet256.py:tiny` config pointed at
a tiny ArrayRecord latent set (`write_tiny_latents`), with the mesh, steps and checkpoint interval of
the command line. So the jobs these tests kill, preempt and resume run the same code as the
entry point: distributed start-up -> mesh -> shape-first sharded init -> grain loader (this
process's rows) -> restore (state + data iterator) or init -> sharded steps, checkpoints (state +
iterator) and the preemption poll.

The loop's callback appends one JSON line per event to `--log` (per process: `<log>.p<i>`): the start
(step, how it was obtained), every step (loss as float and its exact float32 bits, this process's
example ids) and a preemption. At the end process 0 writes the final parameters (gathered from every
process) to `--final` (npz).

Usage: python tests/helpers/sharded_run.py --data_dir D --workdir W --steps 10 [--mesh 2,2,1] ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from helpers.config_files import REPO, load_config

LATENT_SHAPE = (8, 8, 4)
"""Latent shape of the tiny data set."""

NUM_CLASSES = 5
"""Classes of the tiny data set (label NUM_CLASSES is the null label)."""


def write_tiny_latents(directory: str, num_examples: int, shard_sizes: list[int], seed: int = 0):
    """Write a tiny latents directory (ArrayRecord shards + index.json); returns the labels."""
    from gmflow_jax.data import latents

    if sum(shard_sizes) != num_examples:
        raise ValueError(f"shard sizes {shard_sizes} must sum to {num_examples}")
    os.makedirs(directory, exist_ok=True)
    rs = np.random.default_rng(seed)
    labels = rs.integers(0, NUM_CLASSES, num_examples)
    shards, first = [], 0
    for j, count in enumerate(shard_sizes):
        records = [
            latents.encode_record(
                rs.normal(size=LATENT_SHAPE).astype(np.float32), labels[first + i], first + i
            )
            for i in range(count)
        ]
        name = f"latents-{j:05d}-of-{len(shard_sizes):05d}.array_record"
        latents.write_shard(os.path.join(directory, name), records)
        shards.append({"file": name, "num_records": count, "first_id": first})
        first += count
    latents.write_index(directory, shards, LATENT_SHAPE, np.float32, NUM_CLASSES)
    return labels


FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
"""XLA:CPU flags of every job: compiles take about half as long (the steps are tiny)."""


def launch(root, name: str, stderr_path, *, devices: int, steps: int, batch_size: int,
           save_every: int, extra=()) -> subprocess.Popen:  # fmt: skip
    """Start this script as a subprocess on `devices` fake CPU devices (workdir `root/name`).

    Data in `root/data`, per-process logs `root/name.log.p<i>`, final params `root/name.npz`, a
    shared persistent compilation cache in `root/xla_cache`; stdout and stderr append to
    `stderr_path`. `extra` are further flags (--mesh, --step_delay, the distributed ones).
    """
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
    )
    args = [
        sys.executable, os.path.abspath(__file__), f"--data_dir={root / 'data'}",
        f"--workdir={root / name}", f"--steps={steps}", f"--batch_size={batch_size}",
        f"--save_every={save_every}", f"--log={root / name}.log", f"--final={root / name}.npz",
        f"--cache_dir={root / 'xla_cache'}", *extra,
    ]  # fmt: skip
    err = open(stderr_path, "a")
    return subprocess.Popen(args, env=env, stdout=err, stderr=err, cwd=REPO)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--data_dir", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_every", type=int, default=1)
    p.add_argument("--mesh", default="2,2,1", help="data,fsdp,tensor (ICI)")
    p.add_argument("--dcn_data", type=int, default=1)
    p.add_argument("--log", required=True)
    p.add_argument("--final", default="")
    p.add_argument("--step_delay", type=float, default=0.0, help="seconds to sleep after a step")
    p.add_argument("--cache_dir", default="", help="persistent XLA compilation cache")
    p.add_argument("--coordinator", default="")
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument(
        "--interleave_processes",
        action="store_true",
        help="build the mesh over the devices in the order p0 d0, p1 d0, p0 d1, ... (as a real "
        "slice spreads each host's devices), so each process holds several blocks of rows",
    )
    return p.parse_args(argv)


def make_config(args: argparse.Namespace):
    """`configs/imagenet256.py:tiny` on the tiny ArrayRecord set, with the command line's settings."""
    config = load_config("imagenet256", "tiny")
    config.seed = args.seed
    config.data.source, config.data.path, config.data.include_ids = "files", args.data_dir, True
    config.model.num_layers = 1
    config.model.dtype = "float32"  # the oracles compare float32 runs
    config.model.spectrum_net.enabled = False  # a shorter compile; the loop is the same
    config.model.num_classes = NUM_CLASSES
    config.train.num_steps = args.steps
    config.train.batch_size = config.train.ema.batch_size = args.batch_size
    config.train.log_every = args.steps
    config.checkpoint.every_steps = args.save_every
    config.checkpoint.max_to_keep = 3
    data, fsdp, tensor = (int(v) for v in args.mesh.split(","))
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    config.mesh.dcn_data = args.dcn_data
    config.mesh.min_fsdp_size = 256  # shard the tiny model's larger kernels over fsdp too
    if args.coordinator:
        config.distributed.coordinator_address = args.coordinator
        config.distributed.num_processes = args.num_processes
        config.distributed.process_id = args.process_id
    return config


def main(argv: list[str]) -> int:
    """Run (or resume) the tiny job; returns the exit status."""
    args = _parse(argv)
    import jax

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    from absl import flags

    from gmflow_jax import tasks
    from gmflow_jax.parallel.distributed import start_distributed
    from gmflow_jax.train.loop import train
    from gmflow_jax.train.task import run_keys

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags
    config = make_config(args)
    start_distributed(config)  # before anything touches a device
    if args.interleave_processes:
        from gmflow_jax.parallel.mesh import make_mesh
        from gmflow_jax.train import loop

        groups = [
            [d for d in jax.devices() if d.process_index == p] for p in range(jax.process_count())
        ]
        order = [d for group in zip(*groups, strict=True) for d in group]
        # Why replace run_mesh: the loop builds its mesh over jax.devices(), whose CPU order keeps
        # each process's devices together; the real make_mesh then runs on the interleaved order.
        loop.run_mesh = lambda cfg: make_mesh(cfg.get("mesh"), devices=order)
    keys = run_keys(config.seed)
    task = tasks.make_task(config, keys)
    log = open(f"{args.log}.p{jax.process_index()}", "a")

    def callback(event: str, fields: dict) -> None:
        record = {"event": event, "step": int(fields["step"])}
        if event == "start":
            record["how"] = fields["how"]
        elif event == "step":
            loss = np.float32(jax.device_get(fields["metrics"]["loss"]))
            record["loss"] = float(loss)
            record["loss_bits"] = int(loss.view(np.uint32))
            record["ids"] = [int(i) for i in fields["batch"]["ids"]]
        log.write(json.dumps(record) + "\n")
        log.flush()
        if event == "step" and args.step_delay:
            time.sleep(args.step_delay)

    with log:
        _, state, info = train(config, args.workdir, task, keys, callback=callback)
        if not info["preempted"]:
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(state.params, tiled=True)
            if args.final and jax.process_index() == 0:
                flat = {
                    jax.tree_util.keystr(path): np.asarray(v)
                    for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
                }
                np.savez(args.final, **flat)
            log.write(json.dumps({"event": "done", "step": int(state.step)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
