"""Compiled memory of the GM-DiT-XL/2 train step, and sharding overhead of a small GM-DiT on fake devices.

Part 1, memory (no parameter is ever materialized: the state and batch are `jax.ShapeDtypeStruct`s from
`jax.eval_shape`, and the step is only lowered and compiled): the ImageNet train step (GM-DiT-XL/2,
K = 8, SpectrumMLP and spectral loss, bf16 compute, AdamW + EMA, `docs/math.md` §8.1) at 512 images per device,
with and without per-block remat, from `jax.jit(step).lower(...).compile().memory_analysis()`:

* `1 dev`: one device holding the whole state (params, AdamW moments, EMA, all float32) and a batch of
  512, as one GPU of the reference's data-parallel run;
* `fsdp=8`: the sharded step (`train.step.jit_train_step`) on 8 fake devices with fsdp = 8 and a global batch of
  4096 (512 per device): the state is split 8 ways.

Per device: `state+batch` (arguments), `temp` (activations, gradients, scratch), and `peak` = arguments
+ outputs - aliased (the donated state is updated in place) + temp. The reference needs about 32 GB per
A100 at 512 images per GPU (bf16 autocast, gradient checkpointing; its README). These are XLA:CPU buffer
assignments of the same program: XLA:GPU fuses differently (and uses fused attention), so treat them as
estimates of the GPU footprint, good for the ratios (remat, fsdp).

What dominates (XLA:CPU, remat, 512 per device, measured by compiling 1, 2 and 4 layers of XL width
and extrapolating linearly, which reproduces the 28-layer figure): the state (fp32 params, AdamW
moments, EMA) 10.1 GiB of arguments on one device (1/8 of it at fsdp = 8); per layer 0.65 GiB of
temp, mostly the saved fp32 block input [512, 256, 1152] (0.56 GiB; 15.75 GiB over 28 layers); and
a fixed 25-26 GiB, the recomputed block's forward and backward working set, which XLA:CPU inflates:
it upcasts bf16 element-wise work to f32 in separate buffers (the MLP hidden layer [512, 256, 4608]
is 2.25 GiB per f32 copy; f32 compute gives about the same total) and materializes the f32
attention scores [512, 16, 256, 256] (2 GiB per copy). On GPU the cuDNN attention of
`jax.nn.dot_product_attention` never materializes the scores and XLA:GPU fuses the upcasts, so the
GPU footprint is lower than these figures.

Part 2, step time of a small GM-DiT (S/8 by default, K = 8, 32 x 32 x 4 latents, fixed global batch) on
1, 2, 4 and 8 fake CPU devices, each count in its own subprocess (`XLA_FLAGS=
--xla_force_host_platform_device_count=n`), mesh fsdp = n (and data = n with `--meshes fsdp,data`).
All fake devices share this machine's cores, so the work per step is constant and any growth with n is
the cost of sharding itself (partitioned ops, collectives, per-device dispatch).

    python benchmarks/memory.py                       # both parts
    python benchmarks/memory.py --part memory --remat both
    python benchmarks/memory.py --part time --time_model S/8 --time_batch 32 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REFERENCE_GB_PER_GPU = 32.0
"""The reference's memory per A100 at 512 images per GPU (README; `docs/paper-facts.md` §7)."""

GIB = 1024**3


def _build(model_name: str, remat: bool, dtype: str, scan: bool):
    """(model_fn, tx, configs, seams) of the ImageNet recipe for GM-DiT `model_name`."""
    import jax
    from flax import nnx

    from gmflow_jax.models.builder import build_image_denoiser
    from gmflow_jax.models.denoiser import network_functions
    from gmflow_jax.models.gm_dit import gm_dit_config
    from gmflow_jax.models.image_denoiser import SpectrumConfig
    from gmflow_jax.train.ema import EMAConfig
    from gmflow_jax.train.optimizer import OptimizerConfig, make_adamw
    from gmflow_jax.train.state import LossConfig

    cfg = gm_dit_config(model_name, num_gaussians=8, remat=remat, dtype=dtype, scan_blocks=scan)

    def model_fn():
        return build_image_denoiser(cfg, SpectrumConfig(), jax.random.PRNGKey(0))

    opt = OptimizerConfig(lr=2e-4, b2=0.95, weight_decay=0.05, grad_clip_norm=10.0, clip_begin=1000)
    ema = EMAConfig(policy="rampup", batch_size=4096, ema_kimg=30000.0)
    loss = LossConfig(
        trans_ratio=0.5, weight_scale=2.0, t_sampler="logit_normal", prob_class=0.9,
        null_label=cfg.num_classes,
    )  # fmt: skip
    seams = network_functions(nnx.eval_shape(model_fn))
    return model_fn, make_adamw(opt), opt, ema, loss, seams, cfg


def _memory_row(model_name: str, remat: bool, dtype: str, per_device: int, fsdp: int) -> dict:
    """Compile (abstractly) the train step and return its memory statistics per device."""
    import jax
    import jax.numpy as jnp

    from gmflow_jax.parallel.mesh import make_mesh
    from gmflow_jax.parallel.sharding import batch_sharding
    from gmflow_jax.train.step import init_on_mesh, jit_train_step, make_train_step

    model_fn, tx, opt, ema, loss, (denoiser, spectrum), cfg = _build(
        model_name, remat, dtype, scan=True
    )
    shape = (cfg.sample_size, cfg.sample_size, cfg.in_channels)
    t0 = time.perf_counter()
    # One device is a mesh of one device: the same jitted, sharded step as fsdp = 8.
    mesh = make_mesh({"data": 1, "fsdp": fsdp}, devices=jax.devices()[:fsdp])
    _, init, shardings = init_on_mesh(model_fn, tx, jax.random.PRNGKey(1), mesh)
    state = jax.eval_shape(init)
    sharding = batch_sharding(mesh)
    batch = {
        "x0": jax.ShapeDtypeStruct((per_device * fsdp, *shape), jnp.float32, sharding=sharding),
        "labels": jax.ShapeDtypeStruct((per_device * fsdp,), jnp.int32, sharding=sharding),
    }
    step = jit_train_step(make_train_step(denoiser, tx, opt, ema, loss, spectrum), mesh, shardings)
    compiled = step.lower(state, batch).compile()
    stats = compiled.memory_analysis()
    params = sum(x.size for x in jax.tree.leaves(state.params))
    peak = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )
    return {
        "model": model_name,
        "dtype": dtype,
        "remat": remat,
        "devices": fsdp,
        "per_device_batch": per_device,
        "params": params,
        "args_gib": stats.argument_size_in_bytes / GIB,
        "temp_gib": stats.temp_size_in_bytes / GIB,
        "alias_gib": stats.alias_size_in_bytes / GIB,
        "peak_gib": peak / GIB,
        "compile_s": time.perf_counter() - t0,
    }


def _time_row(model_name: str, batch: int, mesh_kind: str, steps: int) -> dict:
    """Median step time of the sharded step on all visible devices (mesh `mesh_kind` = n)."""
    import jax
    import numpy as np

    from gmflow_jax.parallel.mesh import make_mesh
    from gmflow_jax.parallel.sharding import global_batch
    from gmflow_jax.train.step import init_on_mesh, jit_train_step, make_train_step

    # Unrolled blocks: XLA:CPU can deadlock on collectives inside a while loop (nnx.scan) when its
    # thunk executor runs an independent collective first on one fake device (seen with fsdp = 2).
    model_fn, tx, opt, ema, loss, (denoiser, spectrum), cfg = _build(
        model_name, remat=False, dtype="float32", scan=False
    )
    n = jax.device_count()
    mesh = make_mesh(
        {"data": n if mesh_kind == "data" else 1, "fsdp": n if mesh_kind == "fsdp" else 1}
    )
    _, init, shardings = init_on_mesh(model_fn, tx, jax.random.PRNGKey(1), mesh)
    state = init()
    step = jit_train_step(make_train_step(denoiser, tx, opt, ema, loss, spectrum), mesh, shardings)
    rs = np.random.default_rng(0)
    host = {
        "x0": rs.normal(size=(batch, cfg.sample_size, cfg.sample_size, 4)).astype(np.float32),
        "labels": rs.integers(0, 1000, batch).astype(np.int32),
    }
    data = global_batch(host, mesh)
    t0 = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {
        "devices": n,
        "mesh": mesh_kind,
        "model": model_name,
        "batch": batch,
        "times": times,
        "first_call_s": compile_s,
    }


def _subprocess_row(kind: str, devices: int, payload: dict) -> dict:
    """Run `_worker` in a fresh process with `devices` fake CPU devices; its JSON result."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_worker", kind, json.dumps(payload)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker ({devices} devices) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker(kind: str, payload: str) -> int:
    """Subprocess entry: compute one row and print it as JSON."""
    args = json.loads(payload)
    row = _memory_row(**args) if kind == "memory" else _time_row(**args)
    print(json.dumps(row), flush=True)
    return 0


def memory_table(model: str, remats: list[bool], dtype: str, per_device: int, fsdp: int) -> str:
    """Part 1: rows for each remat setting on one device and on `fsdp` devices."""
    rows = []
    for remat in remats:
        for devices in (1, fsdp):
            payload = {
                "model_name": model,
                "remat": remat,
                "dtype": dtype,
                "per_device": per_device,
                "fsdp": devices,
            }
            rows.append(_subprocess_row("memory", max(devices, 1), payload))
            print(f"  compiled {model} remat={remat} devices={devices}", flush=True)
    lines = [
        f"GM-DiT-{model} train step, {dtype} compute, {per_device} images per device "
        f"(reference: about {REFERENCE_GB_PER_GPU:.0f} GB per A100 at 512/GPU)",
        f"{'remat':<7}{'devices':>8}{'params':>12}{'state+batch':>13}{'temp':>9}{'peak':>9}"
        f"{'vs 32 GB':>10}{'compile':>9}",
    ]
    for r in rows:
        peak_gb = r["peak_gib"] * GIB / 1e9
        lines.append(
            f"{str(r['remat']):<7}{r['devices']:>8}{r['params'] / 1e6:>11.1f}M"
            f"{r['args_gib']:>11.2f}Gi{r['temp_gib']:>7.2f}Gi{r['peak_gib']:>7.2f}Gi"
            f"{peak_gb / REFERENCE_GB_PER_GPU:>9.2f}x{r['compile_s']:>8.0f}s"
        )
    return "\n".join(lines)


def time_table(model: str, batch: int, meshes: list[str], steps: int, rounds: int) -> str:
    """Part 2: the step time at 1, 2, 4, 8 fake devices for each mesh kind.

    Device counts run in the order 1, 2, 4, 8, 8, 4, 2, 1, ... (`rounds` passes), so that a drift in
    the machine's load cancels; the table shows the fastest and the median step of all passes (the
    fastest is the least disturbed by other processes).
    """
    times: dict[tuple[str, int], list[float]] = {}
    first: dict[tuple[str, int], float] = {}
    for r in range(rounds):
        for mesh_kind in meshes:
            for n in (1, 2, 4, 8) if r % 2 == 0 else (8, 4, 2, 1):
                payload = {
                    "model_name": model,
                    "batch": batch,
                    "mesh_kind": mesh_kind,
                    "steps": steps,
                }
                row = _subprocess_row("time", n, payload)
                times.setdefault((mesh_kind, n), []).extend(row["times"])
                first[(mesh_kind, n)] = row["first_call_s"]
                print(f"  timed {mesh_kind}={n} (pass {r + 1})", flush=True)
    lines = [
        f"GM-DiT-{model} train step (K=8, SpectrumMLP, fp32), global batch {batch}, fake CPU "
        f"devices sharing {os.cpu_count()} cores; {rounds} passes x {steps} steps",
        f"{'mesh':<6}{'devices':>8}{'min s':>9}{'median s':>10}{'min vs 1':>10}{'1st call s':>12}",
    ]
    for mesh_kind in meshes:
        base = min(times[(mesh_kind, 1)])
        for n in (1, 2, 4, 8):
            t = times[(mesh_kind, n)]
            lines.append(
                f"{mesh_kind:<6}{n:>8}{min(t):>9.3f}{statistics.median(t):>10.3f}"
                f"{min(t) / base:>9.2f}x{first[(mesh_kind, n)]:>12.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the memory table and/or the sharding-overhead table."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_worker":
        return _worker(argv[1], argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("memory", "time", "both"), default="both")
    p.add_argument("--model", default="XL/2")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--per_device", type=int, default=512)
    p.add_argument("--fsdp", type=int, default=8)
    p.add_argument("--remat", choices=("both", "on", "off"), default="both")
    p.add_argument("--time_model", default="S/8")
    p.add_argument("--time_batch", type=int, default=32)
    p.add_argument("--meshes", default="fsdp")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    if args.part in ("memory", "both"):
        remats = {"both": [False, True], "on": [True], "off": [False]}[args.remat]
        print(memory_table(args.model, remats, args.dtype, args.per_device, args.fsdp), flush=True)
    if args.part in ("time", "both"):
        meshes = [m for m in args.meshes.split(",") if m]
        table = time_table(args.time_model, args.time_batch, meshes, args.steps, args.rounds)
        print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
